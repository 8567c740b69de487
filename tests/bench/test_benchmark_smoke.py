"""A tiny run of the scale benchmark through its harness functions (both clients)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

pytest.importorskip("nls")  # the official SDK is installed for compatibility tests only

from benchmarks import concurrency, latency_compare  # noqa: E402


def test_official_client_through_harness(tmp_path: Path) -> None:
    gw = concurrency.start_gateway()
    try:
        row = concurrency.run_step(gw, "official", 3, 2.0, ramp=0.2)
    finally:
        concurrency.stop_gateway(gw)
    assert gw.proc.returncode is not None
    assert row["client"] == "official" and row["sessions"] == 3
    assert row["sessions_started"] == 3
    assert row["sessions_completed_at_server"] == 3
    assert row["errors"] == 0, row["client_errors_sample"]
    assert row["events_lost"] == 0
    assert row["frames_lost"] == 0
    assert row["peak_concurrent"] >= 1
    for key in ("p50_ms", "p99_ms", "worst_session_p99_ms", "max_ms"):
        assert row[key] >= 0.0
    assert row["p50_ms"] <= row["p99_ms"] <= row["max_ms"]
    assert row["client_cpu_ms_per_audio_s"] > 0
    assert 0.0 < row["gateway_cpu_share"] < 2.0

    out = tmp_path / "RESULTS.md"
    md, png, raw = concurrency.write_results(
        [row], ["a note"], concurrency.machine_info(), out, "smoke"
    )
    text = md.read_text()
    assert "| official | 3 |" in text and "a note" in text
    assert raw.exists()
    if png is not None:
        assert png.read_bytes().startswith(b"\x89PNG")


def test_compat_client_through_harness() -> None:
    """The official client's code with only the import changed (``--sdk compat``)."""
    gw = concurrency.start_gateway()
    try:
        row = concurrency.run_step(gw, "compat", 3, 2.0, ramp=0.2)
    finally:
        concurrency.stop_gateway(gw)
    assert row["client"] == "compat"
    assert row["sessions_started"] == row["sessions_completed_at_server"] == 3
    assert row["errors"] == 0, row["client_errors_sample"]
    assert row["events_lost"] == 0 and row["frames_lost"] == 0
    assert row["extra"]["sdk"].startswith("nlsstream.compat.nls 1.0.2+nlsstream")


def test_nlsstream_client_through_harness() -> None:
    gw = concurrency.start_gateway()
    try:
        row = concurrency.run_step(gw, "nlsstream", 3, 2.0, ramp=0.2)
    finally:
        concurrency.stop_gateway(gw)
    assert row["sessions_started"] == 3
    assert row["sessions_completed_at_server"] == 3
    assert row["errors"] == 0, row["client_errors_sample"]
    assert row["events_lost"] == 0 and row["frames_lost"] == 0
    assert row["extra"]["loop"] in ("uvloop", "asyncio")
    # Two SentenceEnds per session (one per second of audio), each with its delivery time.
    delivery = row["event_delivery"]
    assert 0.0 < delivery["p50_ms"] <= delivery["p99_ms"] <= delivery["max_ms"]
    assert 0.0 < row["client_system_cpu_ms_per_audio_s"] < row["client_cpu_ms_per_audio_s"]
    # Each of those SentenceEnds with its final latency, in the table's column too.
    latency = row["final_latency"]
    assert latency["count"] == 6
    assert 0.0 <= latency["p50_ms"] <= latency["p90_ms"] <= latency["p99_ms"] < 1000.0
    text = concurrency.render_markdown([row], [], {}, "smoke", None)
    assert "final latency p50 / p90 / p99 ms" in text
    (line,) = [x for x in text.splitlines() if x.startswith("| nlsstream | 3 |")]
    assert f"| {latency_compare.final_cell(row)} |" in line


def test_events_lost_matches_per_task() -> None:
    server = {
        "sessions": [
            {"task_id": "a", "sentence_end_sent": 3},
            {"task_id": "b", "sentence_end_sent": 2},
        ]
    }
    assert concurrency.events_lost(server, {"sentence_ends": {"a": [1, 2, 3], "b": [1, 2]}}) == 0
    assert concurrency.events_lost(server, {"sentence_ends": {"a": [1, 3], "b": []}}) == 3


def test_unknown_client_is_rejected() -> None:
    with pytest.raises(ValueError, match="unknown client"):
        concurrency.run_client("nope", "ws://127.0.0.1:1/ws/v1", 1, 1.0)


def test_recordings_benchmark_builds_its_recording_and_table(tmp_path: Path) -> None:
    from benchmarks import recordings

    seconds = recordings.build_recording(tmp_path / "r.wav", 12.5)
    assert seconds == 12.5
    row = {"wall_s": 5.0, "client_cpu_s": 0.5, "gateway_cpu_s": 4.0, "x_real_time": 2.5}
    services = [{**row, "service": "flash", "audio_s": seconds, "sentences": 3}]
    batches = [{**row, "jobs": 4, "files": 2, "file_s": 6.0, "files_per_min": 24.0}]
    text = recordings.render(services, batches, {"command": "c", "machine": "m"})
    assert "| flash | 5.0 | 2.5 | 0.50 | 4.0 | 3 |" in text
    assert "FlashRecognizer runs at 2.5x real time" in text
    assert "| 4 | 5.0 | 24.0 | 2.5 | 0.50 | 4.0 |" in text
