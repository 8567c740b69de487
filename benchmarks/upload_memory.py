"""Gateway memory while many large uploads are in flight (issue 18, item 7).

Starts ``nlsstream serve`` in its own process (``--recognizer span``), opens N uploads of
SIZE MB each to ``/stream/v1/FlashRecognizer`` (PCM16, declared in full), sends all but
the last megabyte of every body and holds them there (in flight), then samples the
gateway's resident memory (VmRSS) and its peak (VmHWM) from /proc; then drops the
uploads and samples again. With ``--baseline-src DIR`` the same is measured, in the same
run, for a gateway imported from another source tree (e.g. ``git archive main``), side
by side.

    python benchmarks/upload_memory.py --uploads 16 --mb 50 \
        --baseline-src /tmp/nlsstream-main --out benchmarks/RESULTS-upload-memory.md

Linux only (/proc).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _status(pid: int) -> dict[str, int]:
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) // 1024  # MiB
    return out


def _start(src: Path | None, max_uploads: int) -> tuple[subprocess.Popen[str], str]:
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(src)
    cmd = [sys.executable, "-m", "nlsstream", "serve", "--port", "0", "--recognizer", "span"]
    cmd += ["--log-level", "WARNING"]
    # cwd: ``-m`` puts the working directory first on sys.path, before PYTHONPATH.
    cwd = src if src is not None else Path("/")
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, env=env, text=True, cwd=cwd)
    assert proc.stdout is not None
    line = proc.stdout.readline()
    url = line.split()[-1]
    host_port = url.split("//", 1)[1].split("/", 1)[0]
    return proc, host_port


class _Phase:
    """Where the uploads are: every body sent but its last megabyte, then dropped."""

    def __init__(self, uploads: int) -> None:
        self.uploads = uploads
        self.sent = 0
        self.all_sent = asyncio.Event()
        self.hold = asyncio.Event()


async def _upload(host: str, port: int, size: int, phase: _Phase) -> None:
    _reader, writer = await asyncio.open_connection(host, port)
    head = (
        "POST /stream/v1/FlashRecognizer?appkey=a&token=t&format=pcm&sample_rate=16000 "
        f"HTTP/1.1\r\nHost: x\r\nContent-Length: {size}\r\n\r\n"
    )
    writer.write(head.encode())
    chunk = bytes(1 << 20)
    sent = 0
    while sent < size - len(chunk) and not phase.hold.is_set():
        writer.write(chunk)
        await writer.drain()
        sent += len(chunk)
    phase.sent += 1
    if phase.sent == phase.uploads:
        phase.all_sent.set()
    await phase.hold.wait()
    writer.transport.abort()


async def _measure(src: Path | None, uploads: int, mb: int, settle: float) -> dict[str, float]:
    proc, host_port = _start(src, uploads)
    host, port = host_port.rsplit(":", 1)
    try:
        idle = _status(proc.pid)["VmRSS"]
        phase = _Phase(uploads)
        tasks = [
            asyncio.create_task(_upload(host, int(port), mb << 20, phase)) for _ in range(uploads)
        ]
        # Every body but its last megabyte is written (and drained to the socket).
        await asyncio.wait_for(phase.all_sent.wait(), 300)
        await asyncio.sleep(settle)
        during = _status(proc.pid)
        phase.hold.set()
        await asyncio.gather(*tasks, return_exceptions=True)
        await asyncio.sleep(settle)
        after = _status(proc.pid)
        return {
            "idle": idle,
            "in_flight": during["VmRSS"],
            "peak": after["VmHWM"],
            "after": after["VmRSS"],
        }
    finally:
        proc.terminate()
        proc.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--uploads", type=int, default=16)
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--settle", type=float, default=3.0, help="seconds before sampling")
    parser.add_argument("--baseline-src", type=Path, help="another source tree to compare")
    parser.add_argument("--out", type=Path, help="write a Markdown results table here")
    args = parser.parse_args()
    runs = [("this tree", None)]
    if args.baseline_src is not None:
        runs.insert(0, (f"baseline ({args.baseline_src})", args.baseline_src))
    rows = []
    for name, src in runs:
        figures = asyncio.run(_measure(src, args.uploads, args.mb, args.settle))
        rows.append((name, figures))
        print(
            f"{name}: idle {figures['idle']} MiB, {args.uploads} x {args.mb} MB in flight "
            f"{figures['in_flight']} MiB, peak {figures['peak']} MiB, after {figures['after']} MiB",
            flush=True,
        )
    if args.out is not None:
        lines = [
            f"# Gateway memory, {args.uploads} uploads of {args.mb} MB in flight",
            "",
            f"`python benchmarks/upload_memory.py --uploads {args.uploads} --mb {args.mb}"
            + (f" --baseline-src {args.baseline_src}" if args.baseline_src else "")
            + "` (RSS of the `nlsstream serve --recognizer span` process, MiB; the bodies"
            " are sent but their last MB, then dropped)",
            "",
            "| gateway | idle | in flight | peak | after |",
            "|---|---|---|---|---|",
        ]
        for name, f in rows:
            lines.append(
                f"| {name} | {f['idle']:.0f} | {f['in_flight']:.0f} | {f['peak']:.0f} "
                f"| {f['after']:.0f} |"
            )
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
