"""A tiny run of ``benchmarks.compat_isolation`` (a subprocess: it patches the pacer
and pins its process, which the test worker must not inherit)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _run(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "benchmarks.compat_isolation", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        stdin=subprocess.DEVNULL,
    )


def test_both_modes_stream_every_session_and_trace_the_ticks(tmp_path: Path) -> None:
    out = tmp_path / "isolation.md"
    proc = _run("--sessions", "4", "--seconds", "4", "--repeat", "1", "--no-pin", "--out", str(out))
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert [r["mode"] for r in rows] == ["threads", "one"]
    for row in rows:
        assert row["sessions"] == 4 and row["errors"] == []
        # 4 s of audio from 0-0.75 s on; the steady window from 1 s after the last
        # start to 1 s before the first end: 1.25 s, ~62 ticks of 20 ms.
        assert 40 <= row["ticks"] <= 75, row
        assert row["cpu_ms_per_audio_s"] > 0
        assert row["worst_p99_ms"] is not None and row["worst_p99_ms"] >= 0
    table = out.read_text()
    assert "| 1 | one per session | 4 | on |" in table
    assert "| 1 | one for all sessions | 4 | on |" in table


def test_an_unknown_mode_is_refused_with_the_modes_it_takes() -> None:
    proc = _run("--modes", "threads,bogus", timeout=30)
    assert proc.returncode == 2
    assert "--modes takes threads, one" in proc.stderr
