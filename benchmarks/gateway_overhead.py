"""How much server CPU does one audio frame cost? The light gateway vs other WebSocket servers.

Why this exists: the light gateway (``nlsstream.gateway.light``) must absorb 50k-100k
frames/s on one core without becoming the bottleneck of the scale benchmark. This script
measures the server-side CPU per 640-byte frame, one row per candidate server, all under
the same load in one run:

* ``light``: ``nlsstream serve --light`` (picows, the one the benchmarks use;
  it also sends the SentenceBegin/SentenceEnd events the others do not),
* ``aiohttp``: the smallest useful ``aiohttp.web`` WebSocket server doing the same job
  (answer Start with Started, timestamp every audio message in ``async for msg in ws``),
* ``websockets``: the same with the ``websockets`` library.

The load: ``--connections`` raw-socket clients in this process, each sending one
pre-masked frame every 20 ms from one shared ticker. Server CPU comes from
``/proc/<pid>/stat`` over a steady window of ``--seconds``. With ``--rounds`` above 1 the
servers take turns, round after round, and the summary gives each one's median.

    python -m benchmarks.gateway_overhead --connections 300 --seconds 5 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import FRAME_BYTES, FRAME_S, ROOT, raise_nofile_limit

SERVERS = ("light", "aiohttp", "websockets")


# --------------------------------------------------------------------------- websockets server


async def _serve_websockets() -> None:
    from websockets.asyncio.server import ServerConnection, serve

    from nlsstream.realtime.protocol import build_event, encode, parse_directive

    arrivals: list[float] = []

    async def handler(ws: ServerConnection) -> None:
        async for message in ws:
            if isinstance(message, bytes):
                arrivals.append(time.perf_counter())
            else:
                d = parse_directive(message)
                if d.name.startswith("Start"):
                    await ws.send(
                        encode(build_event(d.namespace, "TranscriptionStarted", d.task_id))
                    )

    async with serve(handler, "127.0.0.1", 0, compression=None, max_queue=64) as server:
        port = server.sockets[0].getsockname()[1]
        print(f"websockets listening on ws://127.0.0.1:{port}/ws/v1", flush=True)
        await asyncio.Future()


# --------------------------------------------------------------------------- aiohttp server


async def _serve_aiohttp() -> None:
    from aiohttp import WSMsgType, web

    from nlsstream.realtime.protocol import build_event, encode, parse_directive

    arrivals: list[float] = []

    async def handler(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(compress=False, autoping=True)
        await ws.prepare(request)
        async for msg in ws:
            if msg.type is WSMsgType.BINARY:
                arrivals.append(time.perf_counter())
            elif msg.type is WSMsgType.TEXT:
                d = parse_directive(msg.data)
                if d.name.startswith("Start"):
                    await ws.send_str(
                        encode(build_event(d.namespace, "TranscriptionStarted", d.task_id))
                    )
        return ws

    app = web.Application()
    app.router.add_get("/ws/v1", handler)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, backlog=4096).start()
    port = runner.addresses[0][1]
    print(f"aiohttp listening on ws://127.0.0.1:{port}/ws/v1", flush=True)
    await asyncio.Future()


# --------------------------------------------------------------------------- load generator


def _masked(opcode: int, payload: bytes) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    head = (
        bytes((0x80 | opcode, 0x80 | n))
        if n < 126
        else bytes((0x80 | opcode, 0xFE)) + n.to_bytes(2, "big")
    )
    return head + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


async def _open(
    host: str, port: int, start_frame: bytes
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection(host, port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws/v1 HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\nX-NLS-Token: t\r\n\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    if not head.startswith(b"HTTP/1.1 101"):
        raise RuntimeError(f"handshake refused: {head[:80]!r}")
    writer.write(start_frame)
    await asyncio.wait_for(reader.read(4096), 10)  # TranscriptionStarted
    return reader, writer


async def _drain(reader: asyncio.StreamReader) -> None:
    with contextlib.suppress(ConnectionError):
        while await reader.read(65536):
            pass


def _proc_cpu(pid: int) -> float:
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def _load(url: str, pid: int, connections: int, seconds: float) -> dict[str, Any]:
    from nlsstream.realtime.protocol import (
        TRANSCRIBER,
        build_directive,
        encode,
        new_id,
        start_payload,
    )

    host, port = url.split("//", 1)[1].split("/", 1)[0].split(":")
    conns = []
    for _ in range(connections):
        start = encode(
            build_directive(
                TRANSCRIBER.name,
                TRANSCRIBER.start,
                task_id=new_id(),
                appkey="a",
                payload=start_payload(),
            )
        )
        conns.append(await _open(host, int(port), _masked(0x1, start.encode())))
    drains = [asyncio.create_task(_drain(r)) for r, _ in conns]
    frame = _masked(0x2, b"\x00" * FRAME_BYTES)
    loop = asyncio.get_running_loop()
    warmup = 1.0
    t0 = loop.time()
    ticks = 0
    cpu0 = cpu1 = 0.0
    measured_ticks = 0
    while True:
        now = loop.time()
        elapsed = now - t0
        if elapsed >= warmup + seconds:
            break
        for _, w in conns:
            w.write(frame)
        ticks += 1
        if elapsed >= warmup:
            if not measured_ticks:
                cpu0 = _proc_cpu(pid)
                w0 = now
            measured_ticks += 1
        await asyncio.sleep(max(0.0, t0 + ticks * FRAME_S - loop.time()))
    cpu1 = _proc_cpu(pid)
    wall = loop.time() - w0
    for _, w in conns:
        w.close()
    for task in drains:
        task.cancel()
    frames = measured_ticks * connections
    return {
        "connections": connections,
        "frames_per_s": round(frames / wall),
        "server_cpu_share": round((cpu1 - cpu0) / wall, 3),
        "server_us_per_frame": round((cpu1 - cpu0) * 1e6 / frames, 2) if frames else None,
    }


def _start_server(kind: str) -> tuple[subprocess.Popen[str], str]:
    if kind == "light":
        cmd = [
            sys.executable,
            "-m",
            "nlsstream",
            "serve",
            "--light",
            "--port",
            "0",
            "--idle-timeout",
            "60",
            "--log-level",
            "WARNING",
        ]
    elif kind in ("aiohttp", "websockets"):
        cmd = [sys.executable, "-m", "benchmarks.gateway_overhead", f"--serve-{kind}"]
    else:
        raise ValueError(f"unknown server {kind!r}; expected one of {SERVERS}")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "ws://" not in line:
        proc.kill()
        raise RuntimeError(f"{kind} server did not start: {line!r}")
    return proc, line[line.index("ws://") :].split()[0]


def measure(kind: str, connections: int, seconds: float) -> dict[str, Any]:
    """Start the ``kind`` server, load it, return its CPU per frame."""
    proc, url = _start_server(kind)
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) >= 2:  # server and load generator on different cores
        os.sched_setaffinity(proc.pid, {cpus[-1]})
        os.sched_setaffinity(0, {cpus[0]})
    try:
        result = asyncio.run(_load(url, proc.pid, connections, seconds))
    finally:
        proc.terminate()
        proc.wait(10)
    result["server"] = kind
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--servers", default=",".join(SERVERS))
    parser.add_argument("--rounds", type=int, default=1, help="rounds of every server, in turn")
    parser.add_argument("--serve-websockets", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--serve-aiohttp", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_websockets or args.serve_aiohttp:
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(_serve_websockets() if args.serve_websockets else _serve_aiohttp())
        return 0
    raise_nofile_limit()
    kinds = [kind.strip() for kind in args.servers.split(",")]
    per_frame: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(args.rounds):
        for kind in kinds:
            result = measure(kind, args.connections, args.seconds)
            print(json.dumps(result), flush=True)
            per_frame[kind].append(result["server_us_per_frame"])
    base = statistics.median(per_frame[kinds[0]])
    for kind in kinds:
        median = statistics.median(per_frame[kind])
        summary = {
            "server": kind,
            "median_us_per_frame": round(median, 2),
            f"vs_{kinds[0]}": round(median / base, 2),
        }
        print(json.dumps(summary), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
