"""``--stats`` (issue 22, section 3): the session's figures on stderr at the end, one a
line, for ``transcribe`` and ``recognize`` in real time; the phases of a recording; a
warning in a batch. Real processes against a loopback gateway with the fast ``span``
recogniser."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest
from helpers import HELLO, THREE, run_cli

from nlsstream.gateway import Gateway

REALTIME_FIGURES = [
    "audio sent",
    "frames sent",
    "lateness p99",
    "lateness max",
    "time to first partial",
    "final latency p50",
    "final latency p90",
    "final latency p99",
    "first-partial latency p50",
    "stop -> completed",
    "resumes",
    "replayed audio",
    "keepalive audio",
]
MS = r"\d+(\.\d)? ms"


@pytest.fixture(scope="module")
def span_gateway() -> Iterator[Gateway]:
    with Gateway(recognizer="span").run_in_thread() as gw:
        yield gw


def stats(stderr: str) -> dict[str, str]:
    """The ``--stats`` lines, in order: ``{name: value}``."""
    found = re.findall(r"^nlsstream: stats: (.+?): (.+)$", stderr, re.MULTILINE)
    return dict(found)


def test_transcribe_stats_prints_every_figure_of_the_session(span_gateway: Gateway) -> None:
    args = ("--service", "realtime", "--pace", "4", "--intermediate", "--stats")
    proc = run_cli("transcribe", THREE, *args, "--url", span_gateway.url)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count("\n") == 3  # the transcript is untouched
    figures = stats(proc.stderr)
    assert list(figures) == REALTIME_FIGURES, proc.stderr
    assert figures["audio sent"] == "9.28 s"  # three_sentences.wav: 9.28 s at 16 kHz
    assert int(figures["frames sent"]) > 400
    for name in ("lateness p99", "lateness max", "time to first partial", "stop -> completed"):
        assert re.fullmatch(MS, figures[name]), (name, figures[name])
    # three sentences, each with a final and first partial latency
    for p in (50, 90, 99):
        assert re.fullmatch(MS, figures[f"final latency p{p}"]), figures
    assert re.fullmatch(MS, figures["first-partial latency p50"]), figures
    assert figures["resumes"] == "0"
    assert figures["replayed audio"] == figures["keepalive audio"] == "0.00 s"


def test_unpaced_and_recognize_say_what_was_not_measured(span_gateway: Gateway) -> None:
    fast = run_cli("transcribe", THREE, "--pace", "0", "--stats", "--url", span_gateway.url)
    assert fast.returncode == 0, fast.stderr
    figures = stats(fast.stderr)
    assert figures["lateness p99"] == figures["lateness max"] == "n/a"  # nothing paced
    assert figures["first-partial latency p50"] == "n/a"  # no partials asked for
    one = run_cli("recognize", HELLO, "--stats", "--url", span_gateway.url)
    assert one.returncode == 0, one.stderr
    figures = stats(one.stderr)
    assert list(figures) == REALTIME_FIGURES
    assert figures["final latency p50"] == "n/a"  # a recognizer has no sentences


def test_no_stats_without_the_option(span_gateway: Gateway) -> None:
    proc = run_cli("transcribe", HELLO, "--pace", "0", "--url", span_gateway.url)
    assert proc.returncode == 0 and "stats" not in proc.stderr


def test_a_recording_gives_its_phases(span_gateway: Gateway) -> None:
    proc = run_cli("transcribe", HELLO, "--stats", "--url", span_gateway.http_url)
    assert proc.returncode == 0, proc.stderr
    figures = stats(proc.stderr)
    assert list(figures) == ["preparing", "uploading", "recognising", "total", "note"]
    assert all(re.fullmatch(r"\d+\.\d\d s", figures[k]) for k in list(figures)[:4])
    assert "--service realtime" in figures["note"]


def test_stats_in_a_batch_is_a_warning(span_gateway: Gateway, tmp_path: Path) -> None:
    out = f"{tmp_path}/out"
    proc = run_cli("transcribe", HELLO, "--output-dir", out, "--stats", "--url", span_gateway.url)
    assert proc.returncode == 0, proc.stderr
    assert "warning: --stats applies to one input, not to a batch" in proc.stderr
    assert "nlsstream: stats:" not in proc.stderr
