"""A tiny run of the concurrency benchmark's final-latency comparison (``--latency-compare``)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import concurrency, latency_compare  # noqa: E402

#: A real bound, loose enough for a busy shared machine: on loopback a sentence's final
#: latency is a few ms; a latency measured from the wrong instant (the stream's start,
#: the previous sentence) would be a second or more.
LATENCY_BOUND_MS = 1000.0


def test_latency_compare_runs_1_and_n_sessions_and_reports_final_latency(
    tmp_path: Path,
) -> None:
    out = tmp_path / "RESULTS-latency.md"
    argv = ["--latency-compare", "3", "--seconds", "2", "--ramp", "0.2", "--out", str(out)]
    argv += ["--note", "smoke run"]
    assert concurrency.main(argv) == 0
    data = json.loads(out.with_suffix(".json").read_text(encoding="utf-8"))
    rows = data["rows"]
    assert [(r["client"], r["sessions"]) for r in rows] == [("nlsstream", 1), ("nlsstream", 3)]
    for r in rows:
        assert r["errors"] == 0, r["client_errors_sample"]
        assert r["events_lost"] == 0
        fl = r["final_latency"]
        # One SentenceEnd per second of audio, each with its latency: 2 per session.
        assert fl["count"] == 2 * r["sessions"]
        assert 0.0 <= fl["p50_ms"] <= fl["p90_ms"] <= fl["p99_ms"] <= fl["max_ms"]
        assert fl["max_ms"] < LATENCY_BOUND_MS
        assert fl["worst_session_p99_ms"] is not None
        assert fl["worst_session_p99_ms"] < LATENCY_BOUND_MS
        assert r["uplink"]["count"] == fl["count"]
    text = out.read_text(encoding="utf-8")
    assert "| 1 | nlsstream | 1 |" in text and "| 1 | nlsstream | 3 |" in text
    assert "at 3 sessions final latency p50 / p90 / p99" in text
    assert "smoke run" in text
    assert not list(tmp_path.glob("*.partial"))


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--latency-compare", "10", "--sessions", "1,10"], "leave out --sessions"),
        (["--latency-compare", "1"], "N must be >= 2"),
        (["--latency-compare", "10", "--seconds", "2.5"], "whole number of sentences"),
        (["--latency-compare", "10", "--sentence-ms", "0"], "needs sentence events"),
        (["--latency-compare", "10", "--clients", "official"], "only the nlsstream clients"),
        (["--latency-compare", "10", "--drift-seconds", "5"], "has no drift run"),
    ],
)
def test_latency_compare_rejects_what_it_cannot_measure(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exc:
        concurrency.main(argv)
    assert exc.value.code == 2
    assert message in capsys.readouterr().err


def test_verdict_compares_each_run_with_its_own_single_session() -> None:
    def row(run: int, sessions: int, p50: float, p99: float) -> dict[str, object]:
        latency = {"count": 20, "p50_ms": p50, "p90_ms": p99, "p99_ms": p99, "max_ms": p99}
        return {
            "run": run,
            "client": "nlsstream",
            "sessions": sessions,
            "final_latency": latency,
            "errors": 0,
            "events_lost": 0,
            "load_before": 1.0,
            "load_after": 1.5,
        }

    lines = latency_compare.verdict_lines(
        [row(1, 1, 1.0, 3.0), row(1, 1000, 2.0, 9.0), row(2, 1, 1.0, 30.0), row(2, 1000, 5, 60)]
    )
    text = "\n".join(lines)
    assert "run 1, nlsstream: at 1,000 sessions" in text and "p99 +6.0 ms" in text
    assert "within the 20 ms allowed" in text
    # Run 2 compares with its own 1-session row (30 ms), not run 1's: +30 ms, over.
    assert "p99 +30.0 ms" in text and "**over** the 20 ms allowed" in text
    assert "Largest p99 added by N sessions over 1, in any run: +30.0 ms" in text
