"""Recordings through the local gateway: each service's wall time and CPU, and batches.

What one run measures (issue 10), every figure through the real command line
(``python -m nlsstream transcribe``) against one local gateway process
(``python -m nlsstream serve``) on loopback, with PocketSphinx:

* one recording of ``--minutes`` (default 10), built in a temporary directory by
  concatenating the speech fixtures with pauses, transcribed by ``realtime`` as fast as
  possible (``--pace 0``), ``flash`` and ``filetrans`` (and ``realtime`` at ``--pace 1``
  with ``--include-realtime-pace1``: that takes the recording's length); for each, the
  wall time, how many times faster than real time, and the CPU seconds of the client
  process and of the gateway process;
* a batch of ``--batch-files`` files of ``--batch-seconds`` each, with the default
  service (flash) at each ``-j`` of ``--jobs`` (default 1,4,16): files per minute.

It prints the figures and writes a Markdown table (``--out``, default
``benchmarks/RESULTS-recordings.md``). Run it on an otherwise idle machine::

    python -m benchmarks.recordings --include-realtime-pace1

Nothing it builds is kept: the recording and the batch live in a temporary directory.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import secrets
import select
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import soundfile

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
SPEECH = ("hello.wav", "weather.wav", "three_sentences.wav", "alarm_8k.wav", "two_channel.flac")
RATE = 16000
PAUSE_S = 1.0
CLI = [sys.executable, "-m", "nlsstream"]
DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS-recordings.md"


def _clean_env(**extra: str) -> dict[str, str]:
    prefixes = ("NLS_", "ALIYUN_", "ALIBABA_CLOUD_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


def build_recording(path: Path, seconds: float) -> float:
    """Write a 16 kHz mono WAV of about ``seconds``: the speech fixtures in turn, each
    followed by a pause, looped. Returns its duration in seconds."""
    from nlsstream.audio import load_file

    pause = np.zeros(int(PAUSE_S * RATE), dtype="<i2")
    pieces = [np.frombuffer(load_file(FIXTURES / name, RATE), dtype="<i2") for name in SPEECH]
    out: list[np.ndarray[Any, Any]] = []
    total = 0
    i = 0
    while total < seconds * RATE:
        piece = pieces[i % len(pieces)]
        out += [piece, pause]
        total += len(piece) + len(pause)
        i += 1
    data = np.concatenate(out)[: int(seconds * RATE)]
    soundfile.write(path, data, RATE, subtype="PCM_16")
    return len(data) / RATE


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@dataclass
class GatewayProcess:
    proc: subprocess.Popen[bytes]
    port: int
    ak_id: str
    ak_secret: str

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def cpu(self) -> float:
        """The gateway process's user + system CPU seconds so far (Linux /proc)."""
        with open(f"/proc/{self.proc.pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
        ticks = os.sysconf("SC_CLK_TCK")
        return (int(fields[11]) + int(fields[12])) / ticks


def start_gateway(timeout: float = 60.0, extra: tuple[str, ...] = ()) -> GatewayProcess:
    """``nlsstream serve`` on a free port with an AccessKey pair of its own (and ``extra``
    options)."""
    port = _free_port()
    ak_id, ak_secret = "LTAIbench" + secrets.token_hex(4), secrets.token_urlsafe(16)
    env = _clean_env(NLS_GATEWAY_ACCESS_KEYS=f"{ak_id}:{ak_secret}")
    args = ["serve", "--port", str(port), "--log-level", "WARNING", *extra]
    proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE, env=env)
    assert proc.stdout is not None
    # "NLS gateway listening on ..." once bound (PocketSphinx is loaded first).
    ready = select.select([proc.stdout], [], [], timeout)[0]
    line = proc.stdout.readline().decode() if ready else ""
    if "listening" not in line:
        proc.kill()
        proc.wait()
        raise RuntimeError(f"the gateway did not start within {timeout} s: {line!r}")
    return GatewayProcess(proc, port, ak_id, ak_secret)


def stop_gateway(gw: GatewayProcess) -> None:
    gw.proc.terminate()
    try:
        gw.proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        gw.proc.kill()
        gw.proc.wait()


def _children_cpu() -> float:
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_cli(gw: GatewayProcess, args: list[str], timeout: float) -> dict[str, Any]:
    """One CLI run against the gateway: wall time, client and gateway CPU seconds."""
    env = _clean_env(ALIYUN_AK_ID=gw.ak_id, ALIYUN_AK_SECRET=gw.ak_secret)
    if "filetrans" not in args:
        env = _clean_env()  # an AccessKey would make the client fetch tokens from the cloud
    cpu0, gw0, t0 = _children_cpu(), gw.cpu(), time.monotonic()
    proc = subprocess.run(
        [*CLI, "transcribe", *args, "--url", gw.url, "--no-progress"],
        capture_output=True,
        env=env,
        timeout=timeout,
    )
    wall = time.monotonic() - t0
    client_cpu, gateway_cpu = _children_cpu() - cpu0, gw.cpu() - gw0
    if proc.returncode != 0:
        raise RuntimeError(f"transcribe {' '.join(args)} failed: {proc.stderr.decode()}")
    return {"wall_s": wall, "client_cpu_s": client_cpu, "gateway_cpu_s": gateway_cpu}


def measure_services(
    gw: GatewayProcess, recording: Path, seconds: float, tmp: Path, pace1: bool
) -> list[dict[str, Any]]:
    """The recording through each service; one row each."""
    backlog = str(round(60 + 2 * seconds))  # realtime --pace 0: recognised after Stop
    runs: list[tuple[str, list[str]]] = []
    if pace1:
        runs.append(("realtime --pace 1", ["--service", "realtime", "--pace", "1"]))
    runs += [
        ("realtime --pace 0", ["--service", "realtime", "--pace", "0", "--timeout", backlog]),
        ("flash", ["--service", "flash"]),
        ("filetrans", ["--service", "filetrans"]),
    ]
    rows = []
    for name, args in runs:
        out = tmp / f"{name.replace(' ', '_')}.txt"
        print(f"  {name} ...", file=sys.stderr, flush=True)
        row = run_cli(gw, [str(recording), *args, "-o", str(out)], timeout=60 + 4 * seconds)
        lines = out.read_text().splitlines()
        row.update(
            service=name,
            audio_s=seconds,
            sentences=len(lines),
            x_real_time=seconds / row["wall_s"],
            first=lines[0] if lines else "",
        )
        rows.append(row)
        print(f"    {_row_text(row)}", file=sys.stderr, flush=True)
    return rows


def measure_batches(
    gw: GatewayProcess, tmp: Path, files: int, file_seconds: float, jobs: list[int]
) -> list[dict[str, Any]]:
    """``files`` recordings of ``file_seconds`` at each ``-j``; one row each."""
    folder = tmp / "batch"
    folder.mkdir()
    paths = []
    for i in range(files):
        path = folder / f"file{i:03d}.wav"
        build_recording(path, file_seconds)
        paths.append(str(path))
    rows = []
    for j in jobs:
        out = tmp / f"out-j{j}"
        print(f"  batch of {files} at -j {j} ...", file=sys.stderr, flush=True)
        args = [*paths, "--output-dir", str(out), "-j", str(j)]
        row = run_cli(gw, args, timeout=120 + 4 * files * file_seconds)
        written = len(os.listdir(out))
        if written != files:
            raise RuntimeError(f"-j {j}: {written} outputs for {files} files")
        row.update(
            jobs=j,
            files=files,
            file_s=file_seconds,
            files_per_min=files * 60 / row["wall_s"],
            x_real_time=files * file_seconds / row["wall_s"],
        )
        rows.append(row)
        print(f"    {row['files_per_min']:.1f} files/min", file=sys.stderr, flush=True)
    return rows


def _row_text(row: dict[str, Any]) -> str:
    return (
        f"{row['wall_s']:.1f} s wall ({row['x_real_time']:.1f}x real time), CPU client "
        f"{row['client_cpu_s']:.1f} s + gateway {row['gateway_cpu_s']:.1f} s, "
        f"{row['sentences']} sentences"
    )


def render(
    services: list[dict[str, Any]], batches: list[dict[str, Any]], info: dict[str, Any]
) -> str:
    lines = [
        "# Recordings through the local gateway",
        "",
        f"Command: `{info['command']}`",
        "",
        f"Machine: {info['machine']}. Recognition: PocketSphinx in the gateway process "
        "(`nlsstream serve`, 2 recognition threads), the client is the command line "
        "(`nlsstream transcribe --url ...`), both on loopback.",
        "",
        f"## One recording of {services[0]['audio_s'] / 60:.1f} min "
        "(the speech fixtures with 1 s pauses)",
        "",
        "| service | wall s | x real time | client CPU s | gateway CPU s | sentences |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in services:
        lines.append(
            f"| {r['service']} | {r['wall_s']:.1f} | {r['x_real_time']:.1f} | "
            f"{r['client_cpu_s']:.2f} | {r['gateway_cpu_s']:.1f} | {r['sentences']} |"
        )
    flash = next((r for r in services if r["service"] == "flash"), None)
    if flash is not None:
        lines += [
            "",
            f"**The emulator's FlashRecognizer runs at {flash['x_real_time']:.1f}x real "
            f"time**: {flash['audio_s']:.0f} s of audio in {flash['wall_s']:.1f} s.",
        ]
    if batches:
        b0 = batches[0]
        lines += [
            "",
            f"## A batch of {b0['files']} files of {b0['file_s']:.0f} s (default service: flash)",
            "",
            "| -j | wall s | files/min | x real time | client CPU s | gateway CPU s |",
            "|---:|---:|---:|---:|---:|---:|",
        ]
        for r in batches:
            lines.append(
                f"| {r['jobs']} | {r['wall_s']:.1f} | {r['files_per_min']:.1f} | "
                f"{r['x_real_time']:.1f} | {r['client_cpu_s']:.2f} | {r['gateway_cpu_s']:.1f} |"
            )
        lines += [
            "",
            "Recognition is CPU-bound in the gateway: beyond the machine's cores (and the "
            "gateway's 2 recognition threads), more jobs add waiting, not throughput.",
        ]
    return "\n".join(lines) + "\n"


def machine() -> str:
    from benchmarks.concurrency import machine_info

    info = machine_info()
    return f"{info['cores']} CPUs ({info['cpu_model']}), Python {info['python']}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0, help="recording length (default 10)")
    p.add_argument(
        "--include-realtime-pace1",
        action="store_true",
        help="also stream the recording at real time (takes --minutes)",
    )
    p.add_argument("--batch-files", type=int, default=16, help="files in the batch (16)")
    p.add_argument("--batch-seconds", type=float, default=30.0, help="each file's length (30)")
    p.add_argument("--jobs", default="1,4,16", help="-j values of the batch (1,4,16)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the Markdown table")
    p.add_argument("--json", type=Path, help="also write the rows as JSON here")
    args = p.parse_args(argv)
    jobs = [int(j) for j in args.jobs.split(",") if j.strip()]
    command = "python -m benchmarks.recordings " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    with tempfile.TemporaryDirectory(prefix="nls-recordings-") as tmpdir:
        tmp = Path(tmpdir)
        recording = tmp / "recording.wav"
        seconds = build_recording(recording, args.minutes * 60)
        print(f"recording: {seconds:.0f} s in {recording}", file=sys.stderr, flush=True)
        gw = start_gateway()
        try:
            services = measure_services(gw, recording, seconds, tmp, args.include_realtime_pace1)
            batches = (
                measure_batches(gw, tmp, args.batch_files, args.batch_seconds, jobs)
                if args.batch_files > 0 and jobs
                else []
            )
        finally:
            stop_gateway(gw)
    text = render(services, batches, {"command": command.strip(), "machine": machine()})
    args.out.write_text(text)
    if args.json is not None:
        args.json.write_text(json.dumps({"services": services, "batches": batches}, indent=1))
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
