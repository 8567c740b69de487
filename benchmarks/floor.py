"""The physical floor of the scale target: one ``send`` system call per frame per session.

A plain Python loop, no event loop, no WebSocket library: N loopback TCP connections to a
sink process (pinned to the other core, like the gateway in ``concurrency.py``) that
reads and discards. Every 20 ms the loop wakes once and does one ``socket.send`` of a
pre-built, pre-masked 648-byte WebSocket frame (2-byte header, 2-byte extended length,
4-byte mask key, 640 bytes of audio) on every socket. The CPU time of this process per
frame is what any client pays at least: a real client must also frame and mask (cheap,
in C) and run its event loop, so it cannot be cheaper than this.

On loopback the sender's ``send`` also runs the receiver's TCP input path (softirq in
the same system call), so the floor includes both sides of the kernel's TCP work.

    python -m benchmarks.floor --sessions 1000 --seconds 10

prints one JSON object: ``cpu_us_per_frame`` (user+system) and its split.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from typing import Any

FRAME = b"\x82\xfe\x02\x80" + b"\x12\x34\x56\x78" + bytes(range(256)) * 2 + bytes(128)
PERIOD = 0.02

_SINK = r"""
import asyncio, sys, time
try:
    import uvloop
except ImportError:
    uvloop = None
NAP = float(sys.argv[1]) / 1e6

class Sink(asyncio.Protocol):
    def data_received(self, data):
        pass

def nap():  # poll like the light gateway with --nap-us (see nlsstream.gateway.light._nap)
    time.sleep(NAP)
    asyncio.get_running_loop().call_soon(nap)

async def main():
    server = await asyncio.get_running_loop().create_server(Sink, "127.0.0.1", 0, backlog=4096)
    if NAP > 0:
        asyncio.get_running_loop().call_soon(nap)
    print(server.sockets[0].getsockname()[1], flush=True)
    await asyncio.sleep(3600)

(uvloop.run if uvloop else asyncio.run)(main())
"""


def _cpu() -> tuple[float, float]:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime, r.ru_stime


def _start_sink(nap_us: int) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", _SINK, str(nap_us)], stdout=subprocess.PIPE, text=True
    )


def measure(sessions: int, seconds: float, *, pin: bool = True, nap_us: int = 0) -> dict[str, Any]:
    """Run the floor loop; returns CPU per frame in microseconds (user, system, total)."""
    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cpus = sorted(os.sched_getaffinity(0))
    sink = _start_sink(nap_us)
    try:
        if pin and len(cpus) >= 2:
            os.sched_setaffinity(sink.pid, {cpus[-1]})
            os.sched_setaffinity(0, {cpus[0]})
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        socks = []
        for _ in range(sessions):
            s = socket.create_connection(("127.0.0.1", port))
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            socks.append(s)
        time.sleep(0.5)
        sends = [s.send for s in socks]
        ticks = round(seconds / PERIOD)
        frame = FRAME
        u0, s0 = _cpu()
        t0 = time.monotonic()
        late = 0.0
        for k in range(ticks):
            due = t0 + k * PERIOD
            delay = due - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                late = max(late, -delay)
            for send in sends:
                send(frame)
        u1, s1 = _cpu()
        wall = time.monotonic() - t0
        for s in socks:
            s.close()
    finally:
        sink.kill()
        sink.wait()
    frames = ticks * sessions
    user = (u1 - u0) * 1e6 / frames
    system = (s1 - s0) * 1e6 / frames
    return {
        "sessions": sessions,
        "seconds": seconds,
        "frames": frames,
        "wall_s": round(wall, 3),
        "cpu_share": round((u1 - u0 + s1 - s0) / wall, 3),
        "cpu_us_per_frame": round(user + system, 2),
        "user_us_per_frame": round(user, 2),
        "system_us_per_frame": round(system, 2),
        "cpu_ms_per_audio_s": round((user + system) * 50 / 1000, 3),
        "max_tick_late_ms": round(late * 1000, 2),
    }


def measure_loop(
    sessions: int, seconds: float, *, loop_kind: str = "uvloop", nap_us: int = 0
) -> dict[str, Any]:
    """The same load from an event loop: one timer per tick, ``transport.write`` of the
    pre-built frame on every connection. The floor for an asyncio client (the loop's
    own cost per write included, no framing, masking or bookkeeping)."""
    import asyncio

    _soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    cpus = sorted(os.sched_getaffinity(0))
    sink = _start_sink(nap_us)

    async def run() -> dict[str, Any]:
        assert sink.stdout is not None
        port = int(sink.stdout.readline())
        loop = asyncio.get_running_loop()
        transports = []
        for _ in range(sessions):
            tr, _p = await loop.create_connection(asyncio.Protocol, "127.0.0.1", port)
            transports.append(tr)
        await asyncio.sleep(0.5)
        writes = [tr.write for tr in transports]  # type: ignore[attr-defined]
        ticks = round(seconds / PERIOD)
        done = loop.create_future()
        t0 = loop.time() + PERIOD
        u0, s0 = _cpu()

        def tick(k: int) -> None:
            for write in writes:
                write(FRAME)
            if k + 1 < ticks:
                loop.call_at(t0 + (k + 1) * PERIOD, tick, k + 1)
            else:
                done.set_result(None)

        loop.call_at(t0, tick, 0)
        await done
        u1, s1 = _cpu()
        wall = loop.time() - t0
        for tr in transports:
            tr.close()
        frames = ticks * sessions
        user, system = (u1 - u0) * 1e6 / frames, (s1 - s0) * 1e6 / frames
        return {
            "mode": f"event loop ({loop_kind})",
            "sessions": sessions,
            "frames": frames,
            "wall_s": round(wall, 3),
            "cpu_us_per_frame": round(user + system, 2),
            "user_us_per_frame": round(user, 2),
            "system_us_per_frame": round(system, 2),
            "cpu_ms_per_audio_s": round((user + system) * 50 / 1000, 3),
        }

    try:
        if len(cpus) >= 2:
            os.sched_setaffinity(sink.pid, {cpus[-1]})
            os.sched_setaffinity(0, {cpus[0]})
        if loop_kind == "uvloop":
            import uvloop

            result: dict[str, Any] = uvloop.run(run())
        else:
            result = asyncio.run(run())
        return result
    finally:
        sink.kill()
        sink.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument(
        "--mode",
        choices=("socket", "uvloop", "asyncio"),
        default="socket",
        help="plain socket.send loop (default) or transport.write from an event loop",
    )
    parser.add_argument(
        "--sink-nap-us", type=int, default=0, help="the sink polls with this nap (0: epoll)"
    )
    args = parser.parse_args(argv)
    if args.mode == "socket":
        result = measure(args.sessions, args.seconds, pin=not args.no_pin, nap_us=args.sink_nap_us)
        result["mode"] = "socket.send loop"
    else:
        result = measure_loop(
            args.sessions, args.seconds, loop_kind=args.mode, nap_us=args.sink_nap_us
        )
    result["sink_nap_us"] = args.sink_nap_us
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
