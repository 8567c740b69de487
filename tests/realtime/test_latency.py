"""The latencies a voice bot is judged by: per sentence (on the events) and as
percentiles (in the metrics), measured against when the audio went out."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from nlsstream import ResultChanged, SentenceEnd, Transcriber
from nlsstream.gateway import Gateway
from nlsstream.realtime.latency import LatencyHistogram, SendLog, TickLog

FIXTURES = Path(__file__).parents[1] / "fixtures"
THREE = str(FIXTURES / "three_sentences.wav")


def test_send_log_says_when_an_offset_went_out_while_it_remembers() -> None:
    log = SendLog(size=4)
    assert log.sent_at(1, 0) is None  # nothing sent yet
    for k in range(6):  # writes of 640 bytes from 0, 640, ... at t = 1 .. 6
        log.mark(640 * k, float(k + 1))
    written = 640 * 6
    assert log.sent_at(640 * 6, written) == 6.0
    assert log.sent_at(640 * 5 + 1, written) == 6.0  # the write that carried its last byte
    assert log.sent_at(640 * 4, written) == 4.0
    assert log.sent_at(640 * 2 + 1, written) == 3.0  # the oldest write remembered
    assert log.sent_at(640 * 2, written) is None  # earlier writes forgotten
    assert log.sent_at(640 * 6 + 1, written) is None  # not sent yet


def test_a_run_takes_each_frames_time_from_the_tick_that_reached_it() -> None:
    ticks = TickLog(size=8)
    log = SendLog(size=4)
    closed: list[str] = []
    # Ticks every 20 ms from t = 10 s, each running a little late; frame k of the
    # schedule (t0 = 9.96 s) is due at t0 + k * 20 ms.
    for k in range(6):
        ticks.record(10.0 + 0.02 * k + 0.0005, 10.0 + 0.02 * k + 0.0003 * k)
    log.open_run(0, 2, 9.96, 0.02, 640, ticks, lambda: closed.append("run"))
    # Frames 2.. written on schedule: nothing logged per frame.
    assert log.sent_at(640, 640 * 5) == 10.0
    assert log.sent_at(641, 640 * 5) == pytest.approx(10.0203)
    assert log.sent_at(640 * 5, 640 * 5) == pytest.approx(10.0812)
    assert log.sent_at(640 * 5 + 1, 640 * 5) is None  # not written yet
    # A frame off the schedule: a single write, and the run is closed.
    log.mark(640 * 5, 10.105)
    assert closed == ["run"]
    assert log.sent_at(640 * 6, 640 * 6) == 10.105
    assert log.sent_at(640 * 5, 640 * 6) == pytest.approx(10.0812)  # the run ends there
    log.close_run()
    assert closed == ["run"]
    # Ticks the tick log no longer remembers: unknown, not a wrong time.
    for k in range(6, 14):
        ticks.record(10.0 + 0.02 * k + 0.0005, 10.0 + 0.02 * k)
    assert log.sent_at(640, 640 * 6) is None
    assert log.sent_at(640 * 6, 640 * 6) == 10.105


def test_the_tick_log_finds_the_first_tick_that_reached_a_time() -> None:
    ticks = TickLog(size=3)
    assert ticks.time_of(1.0) is None
    for k in range(1, 6):  # horizons 1.5, 2.5, ... ; ticks at 1 .. 5
        ticks.record(k + 0.5, float(k))
        for due in (x / 4 for x in range(0, 28)):
            expected = next((float(j) for j in range(1, k + 1) if j + 0.5 >= due), None)
            if expected is not None and k > 3 and expected <= k - 3 + 1:
                # The oldest tick remembered, or older: a forgotten tick may have been first.
                expected = None
            assert ticks.time_of(due) == expected, (k, due)


def test_the_tick_log_stays_sorted_when_a_tick_reaches_less_far() -> None:
    # run_due called by hand between the timer's ticks, with no tolerance: its horizon
    # is below the previous tick's. What it covered, the earlier tick did.
    ticks = TickLog(size=4)
    ticks.record(1.0005, 1.0)
    ticks.record(1.0003, 1.0003)
    ticks.record(1.0205, 1.02)
    assert ticks.time_of(1.0004) == 1.0
    assert ticks.time_of(1.01) == 1.02


@pytest.mark.parametrize("size", [1, 2, 3, 5, 8])
def test_send_log_agrees_with_the_full_history_wherever_the_ring_wraps(size: int) -> None:
    # The ring is searched in place: check it against every write kept in a list, for
    # every offset, after every entry (the ring's seam moves through each position).
    # Entries are single writes of various sizes and runs of frames on a schedule.
    rng = random.Random(size)
    ticks = TickLog(size=4096)
    log = SendLog(size=size)
    writes: list[tuple[int, int, float]] = []  # (start, end, time) of every write
    entry_starts: list[int] = []
    end, tick = 0, 0
    for _ in range(3 * size + 4):
        entry_starts.append(end)
        if rng.random() < 0.5:
            tick += 1
            ticks.record(tick * 0.02, tick * 0.02 + 0.0001)
            n = rng.choice([1, 640, 1280])
            log.mark(end, tick * 0.02 + 0.0001)
            writes.append((end, end + n, tick * 0.02 + 0.0001))
            end += n
        else:  # frame k of the schedule due at tick k, from frame `tick + 1` on
            log.open_run(end, tick + 1, 0.0, 0.02, 640, ticks, lambda: None)
            for _ in range(rng.randint(1, 4)):
                tick += 1
                ticks.record(tick * 0.02, tick * 0.02 + 0.0002)
                writes.append((end, end + 640, tick * 0.02 + 0.0002))
                end += 640
        kept_from = entry_starts[-size:][0]  # older entries are forgotten
        for offset in range(0, end + 700, 97):
            byte = max(offset, 1) - 1
            first = next((w for w in writes if w[0] <= byte < w[1]), None)
            expected = None if first is None or offset > end or byte < kept_from else first[2]
            got = log.sent_at(offset, end)
            assert got == (expected if expected is None else pytest.approx(expected)), (
                offset,
                len(entry_starts),
            )


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
