"""The latencies a voice bot is judged by: per sentence (on the events) and as
percentiles (in the metrics), measured against when the audio went out."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nlsstream import ResultChanged, SentenceEnd, Transcriber
from nlsstream.gateway import Gateway
from nlsstream.realtime.latency import LatencyHistogram, SendLog

FIXTURES = Path(__file__).parents[1] / "fixtures"
THREE = str(FIXTURES / "three_sentences.wav")


def test_send_log_says_when_an_offset_went_out_while_it_remembers() -> None:
    log = SendLog(size=4)
    assert log.sent_at(1) is None  # nothing sent yet
    for k in range(1, 7):  # writes reaching 640, 1280, ... at t = 1 .. 6
        log.mark(640 * k, float(k))
    assert log.sent_at(640 * 6) == 6.0
    assert log.sent_at(640 * 5 + 1) == 6.0  # the write that reached it
    assert log.sent_at(640 * 4) == 4.0
    assert log.sent_at(640 * 3) is None  # the oldest remembered: earlier writes forgotten
    assert log.sent_at(640 * 7) is None  # not sent yet


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_send_log_agrees_with_the_full_history_wherever_the_ring_wraps(size: int) -> None:
    # The ring is searched in place: check it against every write kept in a list, for
    # every offset, after every write (the ring's seam moves through each position).
    rng = random.Random(size)
    log, history, end = SendLog(size=size), [], 0
    for t in range(3 * size + 4):
        end += rng.choice([1, 640, 640, 1280])
        log.mark(end, float(t))
        history.append((end, float(t)))
        kept = history[-size:]
        forgotten = len(history) > size
        for offset in range(0, end + 700, 97):
            first = next((i for i, (e, _) in enumerate(kept) if e >= offset), None)
            expected = None if first is None or (first == 0 and forgotten) else kept[first][1]
            assert log.sent_at(offset) == expected, (t, offset)


def test_latency_histogram_percentiles() -> None:
    h = LatencyHistogram()
    assert h.percentile(50) is None
    for ms in (5.5, 15.2, 25.7, 35, 1004, 20000):
        h.record(ms)
    assert h.percentile(50) == 26.0  # 3rd of 6 figures: 1 ms buckets below 100 ms
    assert h.percentile(80) == 1010.0  # 5th: 10 ms buckets above
    assert h.percentile(100) == 20000.0  # past the last bucket: the largest figure
    with pytest.raises(ValueError, match="percentile"):
        h.percentile(0)


async def test_sentences_carry_their_latency_and_the_metrics_its_percentiles() -> None:
    ends: list[SentenceEnd] = []
    firsts: list[ResultChanged] = []
    async with (
        Gateway(recognizer="sphinx") as gw,
        Transcriber(
            "app",
            "tok",
            url=gw.url,
            enable_intermediate_result=True,
            on_sentence_end=ends.append,
            on_result_changed=lambda r: firsts.append(r) if r.latency_ms is not None else None,
        ) as t,
    ):
        await t.stream(THREE, pace=2.0)
        await t.stop()
    assert len(ends) == 3
    for sentence in ends:
        # At 2x real time, after the audio at its end went out: positive, and bounded by
        # how long the whole session took (an absurd figure would be a wrong offset).
        assert sentence.latency_ms is not None and 0 <= sentence.latency_ms < 30_000
    assert t.metrics.final_latency.count == 3
    p50 = t.metrics.final_latency_ms(50)
    assert p50 is not None and p50 >= min(s.latency_ms or 0 for s in ends)
    assert firsts and all(r.latency_ms is not None and r.latency_ms >= 0 for r in firsts)
    assert t.metrics.first_partial_latency.count == len(firsts)
