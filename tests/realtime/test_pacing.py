"""The shared pacer, driven by a fake clock (no wall-clock timing assertions)."""

from __future__ import annotations

import asyncio
import gc
import math
import random
import time
import weakref
from collections.abc import Callable

import pytest

from nlsstream.realtime.pacing import LATE_THRESHOLD_MS, Metrics, Pacer

FRAME = 640
BPS_16K = 32000.0  # bytes per second of 16 kHz PCM16 mono
#: Ticks computed here and due times computed by the pacer (from another origin) may
#: differ in the last bit: ticks run with this tolerance, like the timer's 0.5 ms.
EARLY = 1e-9


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Sink:
    """Records (time, frame) for every frame written, and the number of writes (a
    backlog goes out in one) and of frames in each; can fail on demand. Frames are
    length-prefixed, like WebSocket frames, so that frames written together can be told
    apart. ``encode_cost`` is what framing a batch costs the producer: seconds added to
    the fake clock, or with ``spin`` real CPU time (the loop is busy meanwhile)."""

    def __init__(
        self, clock: Callable[[], float], *, encode_cost: float = 0.0, spin: bool = False
    ) -> None:
        self.clock = clock
        self.sent: list[tuple[float, bytes]] = []
        self.writes = 0
        self.batches: list[int] = []  # frames per write
        self.written = asyncio.Event()
        self.fail: Exception | None = None
        self.encode_cost = encode_cost
        self.spin = spin
        self.write_frames: Callable[[bytes], object] = self.write_frame

    def encode_frames(self, pcm: bytes, frame_bytes: int) -> list[bytes]:
        if self.spin:
            end = time.perf_counter() + self.encode_cost
            while time.perf_counter() < end:
                pass
        elif self.encode_cost:
            assert isinstance(self.clock, FakeClock)
            self.clock.now += self.encode_cost
        return [
            len(pcm[i : i + frame_bytes]).to_bytes(2, "big") + pcm[i : i + frame_bytes]
            for i in range(0, len(pcm), frame_bytes)
        ]

    def write_frame(self, data: bytes) -> None:
        if self.fail is not None:
            raise self.fail
        self.writes += 1
        before = len(self.sent)
        while data:
            size = int.from_bytes(data[:2], "big")
            self.sent.append((self.clock(), data[2 : 2 + size]))
            data = data[2 + size :]
        self.batches.append(len(self.sent) - before)
        self.written.set()


def frames(n: int, size: int = FRAME) -> list[bytes]:
    return [bytes([i % 256]) * size for i in range(n)]


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def pacer(clock: FakeClock) -> Pacer:
    return Pacer(clock=clock, autorun=False)


async def fill(stream: object, items: list[bytes]) -> None:
    for f in items:
        await stream.put(f)  # type: ignore[attr-defined]


async def test_frames_are_due_on_a_drift_free_schedule(pacer: Pacer, clock: FakeClock) -> None:
    sink = Sink(clock)
    metrics = Metrics()
    stream = pacer.open(sink, BPS_16K, metrics, max_ahead_bytes=100 * FRAME)
    await fill(stream, frames(50))
    t0 = clock.now
    # Drive the pacer with jittery wake-ups: each frame must go out at the first
    # wake-up at or after t0 + n * 20 ms, however late the previous one was.
    jitter = [0.0, 0.003, 0.0007, 0.011, 0.0001]
    n = 0
    while n < 50:
        clock.now = t0 + n * 0.02 + jitter[n % len(jitter)]
        pacer.run_due()
        n = len(sink.sent)
    for i, (when, frame) in enumerate(sink.sent):
        due = t0 + i * 0.02
        assert when >= due
        assert when - due < 0.0111 + 1e-9, f"frame {i} sent {when - due:.4f} s after due"
        assert frame == frames(50)[i]
    assert metrics.frames_sent == metrics.paced_frames == 50
    assert metrics.bytes_sent == 50 * FRAME
    assert metrics.late_frames == sum(1 for i in range(50) if jitter[i % 5] * 1e3 > 5)
    assert metrics.max_lateness_ms == pytest.approx(11.0)
    assert stream.finished is False


async def test_a_frame_is_never_sent_early(pacer: Pacer, clock: FakeClock) -> None:
    sink = Sink(clock)
    stream = pacer.open(sink, BPS_16K, Metrics(), max_ahead_bytes=10 * FRAME)
    await fill(stream, frames(3))
    t0 = clock.now
    pacer.run_due()
    assert len(sink.sent) == 1
    clock.now = t0 + 0.0199
    pacer.run_due()
    assert len(sink.sent) == 1
    clock.now = t0 + 0.02
    pacer.run_due()
    assert len(sink.sent) == 2
    # ``early`` (the timer's tolerance) lets a frame go out just before its due time.
    clock.now = t0 + 0.0395
    pacer.run_due(early=0.0005)
    assert len(sink.sent) == 3


@pytest.mark.parametrize(("pace", "period"), [(1.0, 0.02), (2.0, 0.01), (0.5, 0.04)])
async def test_pace_scales_the_schedule(
    pacer: Pacer, clock: FakeClock, pace: float, period: float
) -> None:
    sink = Sink(clock)
    stream = pacer.open(sink, BPS_16K * pace, Metrics(), max_ahead_bytes=20 * FRAME)
    await fill(stream, frames(10))
    t0 = clock.now
    for i in range(10):
        clock.now = t0 + i * period
        pacer.run_due()
        assert len(sink.sent) == i + 1
        assert sink.sent[-1][0] == pytest.approx(t0 + i * period)


async def test_8khz_frames_last_40ms_and_short_last_frame_is_sent(
    pacer: Pacer, clock: FakeClock
) -> None:
    sink = Sink(clock)
    stream = pacer.open(sink, 16000.0, Metrics(sample_rate=8000), max_ahead_bytes=16000)
    await fill(stream, [*frames(2), b"\x01" * 100])
    t0 = clock.now
    done = asyncio.ensure_future(stream.finish())
    await asyncio.sleep(0)
    for t in (0.0, 0.04, 0.0799):
        clock.now = t0 + t
        pacer.run_due()
    assert len(sink.sent) == 2 and not done.done()
    clock.now = t0 + 0.08
    pacer.run_due()
    await asyncio.wait_for(done, 1)
    assert [len(f) for _, f in sink.sent] == [640, 640, 100]
    assert stream.finished


async def test_buffer_is_bounded_and_put_waits_for_space(pacer: Pacer, clock: FakeClock) -> None:
    sink = Sink(clock)
    stream = pacer.open(sink, BPS_16K, Metrics(), max_ahead_bytes=3 * FRAME)
    producer = asyncio.ensure_future(fill(stream, frames(6)))
    await asyncio.sleep(0.01)
    assert stream.buffered_bytes == 3 * FRAME and not producer.done()
    t0 = clock.now
    pacer.run_due()  # frame 0: the buffer is above its low-water mark, no refill yet
    await asyncio.sleep(0.01)
    assert stream.buffered_bytes == 2 * FRAME
    clock.now = t0 + 0.02
    pacer.run_due()
    await asyncio.sleep(0.01)
    assert len(sink.sent) == 2
    assert stream.buffered_bytes == 3 * FRAME  # refilled up to the bound, no further
    for i in range(2, 6):
        clock.now = t0 + i * 0.02
        pacer.run_due()
        await asyncio.sleep(0)
    await asyncio.wait_for(producer, 1)
    clock.now = t0 + 1
    pacer.run_due()
    assert len(sink.sent) == 6


async def test_backed_up_session_is_skipped_without_stalling_others(
    pacer: Pacer, clock: FakeClock
) -> None:
    slow, fast = Sink(clock), Sink(clock)
    slow_m, fast_m = Metrics(), Metrics()
    s1 = pacer.open(slow, BPS_16K, slow_m, max_ahead_bytes=20 * FRAME)
    s2 = pacer.open(fast, BPS_16K, fast_m, max_ahead_bytes=20 * FRAME)
    await fill(s1, frames(5))
    await fill(s2, frames(5))
    t0 = clock.now
    pacer.run_due()  # both streams are under way: their schedules are set
    s1.held = True  # what a session does from its transport's pause_writing()
    for i in range(1, 5):
        clock.now = t0 + i * 0.02
        pacer.run_due()
    assert len(fast.sent) == 5 and len(slow.sent) == 1
    assert fast_m.late_frames == 0 and slow_m.stalled_ticks == 4
    s1.held = False
    clock.now = t0 + 0.2
    pacer.run_due()
    # Late frames are sent at once, in one write, never dropped, and their lateness
    # is recorded.
    assert len(slow.sent) == 5 and slow.writes == 2
    assert fast.writes == 5
    assert slow_m.late_frames == 4
    assert slow_m.max_lateness_ms == pytest.approx(180.0)
    assert slow_m.p99_lateness_ms == pytest.approx(180.0)


async def test_failing_sink_fails_only_its_stream(pacer: Pacer, clock: FakeClock) -> None:
    bad, good = Sink(clock), Sink(clock)
    bad.fail = ConnectionError("gone")
    s1 = pacer.open(bad, BPS_16K, Metrics(), max_ahead_bytes=10 * FRAME)
    s2 = pacer.open(good, BPS_16K, Metrics(), max_ahead_bytes=10 * FRAME)
    await fill(s1, frames(2))
    await fill(s2, frames(2))
    pacer.run_due()
    clock.now += 1
    pacer.run_due()
    assert len(good.sent) == 2
    with pytest.raises(ConnectionError, match="gone"):
        await s1.finish()
    with pytest.raises(ConnectionError):
        await s1.put(b"x" * FRAME)
    await s2.finish()


async def test_abort_wakes_a_waiting_producer(pacer: Pacer, clock: FakeClock) -> None:
    stream = pacer.open(Sink(clock), BPS_16K, Metrics(), max_ahead_bytes=FRAME)
    producer = asyncio.ensure_future(fill(stream, frames(3)))
    await asyncio.sleep(0.01)
    stream.abort(RuntimeError("session ended"))
    with pytest.raises(RuntimeError, match="session ended"):
        await asyncio.wait_for(producer, 1)
    assert stream.buffered_bytes == 0 and stream.finished


async def test_metrics_histogram_p99() -> None:
    m = Metrics(sample_rate=16000)
    for _ in range(990):
        m.record_lateness(0.2)
    for _ in range(10):
        m.record_lateness(30.0)
    assert m.p99_lateness_ms == pytest.approx(1.0)  # 99 % of frames within the first 1 ms
    m.record_lateness(30.0)
    assert m.p99_lateness_ms == pytest.approx(30.0)
    assert m.late_frames == 11 and LATE_THRESHOLD_MS < 30
    m.record_audio(32000)
    assert m.audio_ms_sent == pytest.approx(1000.0)
    assert Metrics(sample_rate=8000, bytes_sent=16000).audio_ms_sent == pytest.approx(1000.0)
    assert Metrics().p99_lateness_ms == 0.0


async def test_one_pacer_per_loop_and_no_task_per_stream(clock: FakeClock) -> None:
    loop = asyncio.get_running_loop()
    pacer = Pacer.for_loop()
    assert Pacer.for_loop(loop) is pacer
    tasks_before = len(asyncio.all_tasks())
    sinks = [Sink(clock) for _ in range(50)]
    streams = [pacer.open(s, BPS_16K * 50, Metrics(), max_ahead_bytes=10 * FRAME) for s in sinks]
    for s in streams:
        await fill(s, frames(5))
    # 50 streams with frames pending: still no extra task, at most one timer.
    assert len(asyncio.all_tasks()) == tasks_before
    assert pacer.pending == 50
    await asyncio.wait_for(asyncio.gather(*(s.finish() for s in streams)), 5)
    assert all(len(s.sent) == 5 for s in sinks)
    assert pacer.pending == 0


async def test_other_loops_get_their_own_pacer() -> None:
    here = Pacer.for_loop()

    def other() -> Pacer:
        async def get() -> Pacer:
            return Pacer.for_loop()

        return asyncio.run(get())

    there = await asyncio.to_thread(other)
    assert there is not here


async def test_put_batches_and_stalls_are_counted(pacer: Pacer, clock: FakeClock) -> None:
    sink = Sink(clock)
    metrics = Metrics()
    stream = pacer.open(sink, BPS_16K, metrics, max_ahead_bytes=4 * FRAME)
    await stream.put(b"".join(frames(4)))
    assert stream.buffered_bytes == 4 * FRAME
    # The buffer is full: the next batch waits until the pacer frees half of it.
    producer = asyncio.ensure_future(stream.put(b"".join(frames(3))))
    await asyncio.sleep(0)
    assert not producer.done()
    t0 = clock.now
    pacer.run_due()  # frame 0; the buffer (3 frames) is above its low-water mark
    await asyncio.sleep(0)
    assert not producer.done()
    stream.held = True
    clock.now = t0 + 0.02
    pacer.run_due()
    assert metrics.stalled_ticks == 1 and len(sink.sent) == 1
    stream.held = False
    clock.now = t0 + 0.04
    pacer.run_due()  # frames 1 and 2 are due: sent at once, the late one counted
    await asyncio.wait_for(producer, 1)
    assert len(sink.sent) == 3 and stream.buffered_bytes == 4 * FRAME
    assert metrics.max_lateness_ms == pytest.approx(20.0) and metrics.paced_frames == 3
    clock.now = t0 + 1
    pacer.run_due()
    await asyncio.wait_for(stream.finish(), 1)
    assert [f for _, f in sink.sent] == frames(4) + frames(3)
    assert pacer.pending == 0


async def test_put_cuts_any_length_into_frames_and_finish_sends_the_rest(
    pacer: Pacer, clock: FakeClock
) -> None:
    sink = Sink(clock)
    metrics = Metrics()
    stream = pacer.open(sink, BPS_16K, metrics, max_ahead_bytes=100 * FRAME)
    pcm = random.Random(3).randbytes(5 * FRAME + 100)
    for piece in (pcm[:1], pcm[1:1000], pcm[1000:1000], pcm[1000:]):
        await stream.put(piece)
    assert stream.buffered_bytes == len(pcm)  # 5 frames queued, 100 bytes not yet cut
    assert stream.start_time == clock.now
    t0 = clock.now
    done = asyncio.ensure_future(stream.finish())
    await asyncio.sleep(0)
    for i in range(6):
        clock.now = t0 + i * 0.02
        pacer.run_due()
    await asyncio.wait_for(done, 1)
    assert b"".join(f for _, f in sink.sent) == pcm
    assert [len(f) for _, f in sink.sent] == [FRAME] * 5 + [100]
    assert [when for when, _ in sink.sent] == pytest.approx([t0 + i * 0.02 for i in range(6)])
    assert metrics.bytes_sent == len(pcm) and metrics.frames_sent == 6
    assert stream.buffered_bytes == 0 and stream.finished and pacer.pending == 0


# ----------------------------------------------------- the schedule starts with the audio


async def test_first_frame_is_due_at_the_first_tick_after_it_is_ready(
    pacer: Pacer, clock: FakeClock
) -> None:
    # Three streams open at the same instant; their producers have audio ready at
    # different times. Each starts at the first tick after its first frame was put,
    # whatever the stream's opening time, and every frame of each falls on a tick.
    t0 = clock.now
    sinks = [Sink(clock) for _ in range(3)]
    metrics = [Metrics() for _ in range(3)]
    streams = [
        pacer.open(sink, BPS_16K, m, max_ahead_bytes=10 * FRAME)
        for sink, m in zip(sinks, metrics, strict=True)
    ]
    ready_at = [0.0, 0.005, 0.031]  # after the stream opened
    first_tick = [0.0, 0.02, 0.04]  # the first tick (t0 + k * 20 ms) from then
    for stream, ready in zip(streams, ready_at, strict=True):
        clock.now = t0 + ready
        await fill(stream, frames(4))
    for stream, tick in zip(streams, first_tick, strict=True):
        assert stream.start_time == pytest.approx(t0 + tick)
    for k in range(7):
        clock.now = t0 + k * 0.02
        pacer.run_due(early=EARLY)
    for sink, m, tick in zip(sinks, metrics, first_tick, strict=True):
        assert [when for when, _ in sink.sent] == pytest.approx(
            [t0 + tick + i * 0.02 for i in range(4)]
        )
        assert m.max_lateness_ms == 0.0 and m.late_frames == 0
        assert sink.batches == [1, 1, 1, 1]


async def test_a_herd_of_starts_gives_no_late_first_frame_and_no_burst(
    pacer: Pacer, clock: FakeClock
) -> None:
    # 100 streams open at once; each producer takes 2 ms of the (single) loop to frame
    # its first second of audio, and no tick can run meanwhile: the last producer is
    # done 200 ms after the first, and the first tick after that runs 3 ms late. No
    # first frame goes out late: they wait for the next tick, and every stream starts
    # there, one frame per tick.
    t0 = clock.now
    origin = t0 + 0.002  # the first audio is ready: the pacer's ticks start
    sinks = [Sink(clock, encode_cost=0.002) for _ in range(100)]
    metrics = [Metrics() for _ in sinks]
    streams = [
        pacer.open(sink, BPS_16K, m, max_ahead_bytes=50 * FRAME)
        for sink, m in zip(sinks, metrics, strict=True)
    ]
    for stream in streams:
        await stream.put(b"".join(frames(50)))
    assert clock.now == pytest.approx(t0 + 0.2)
    late = origin + 0.2  # the first tick at or after the last producer's audio
    clock.now = late + 0.003
    pacer.run_due()
    assert [len(sink.sent) for sink in sinks] == [0] * 100
    for k in range(1, 11):
        clock.now = late + k * 0.02 + random.Random(k).uniform(0, 0.0009)
        pacer.run_due(early=EARLY)
    for sink, m, stream in zip(sinks, metrics, streams, strict=True):
        assert sink.batches == [1] * 10  # no catch-up burst
        assert [when for when, _ in sink.sent] == pytest.approx(
            [late + k * 0.02 for k in range(1, 11)], abs=0.001
        )
        assert stream.start_time == pytest.approx(late + 0.02)
        assert m.max_lateness_ms < 1.0


async def test_a_first_frame_waits_for_one_later_tick_only(pacer: Pacer, clock: FakeClock) -> None:
    # A loop late at every tick must not hold a stream back: after one wait, its first
    # frame goes out at the tick that runs, late by that tick's lateness (under one
    # tick) and alone.
    sink = Sink(clock)
    metrics = Metrics()
    stream = pacer.open(sink, BPS_16K, metrics, max_ahead_bytes=10 * FRAME)
    t0 = clock.now
    await fill(stream, frames(3))
    clock.now = t0 + 0.003
    pacer.run_due()
    assert sink.sent == [] and stream.start_time == pytest.approx(t0 + 0.02)
    for k in (1, 2, 3):
        clock.now = t0 + k * 0.02 + 0.005
        pacer.run_due(early=EARLY)
    assert sink.batches == [1, 1, 1]
    assert [when for when, _ in sink.sent] == pytest.approx(
        [t0 + k * 0.02 + 0.005 for k in (1, 2, 3)]
    )
    assert stream.start_time == pytest.approx(t0 + 0.02)
    assert metrics.max_lateness_ms == pytest.approx(5.0)


async def test_a_busy_loop_does_not_start_streams_on_a_stale_tick(clock: FakeClock) -> None:
    # The timer path: a stream opens the timer's first tick, then the loop stays busy
    # (here: the test does not yield) while another stream's producer frames its
    # audio 100 ms later. When the overdue tick finally runs, both streams start at
    # it with one frame, rather than with the five frames "due" since the stale tick.
    pacer = Pacer(clock=clock)  # a real timer, on the fake clock
    early, late = Sink(clock), Sink(clock)
    m_early, m_late = Metrics(), Metrics()
    s1 = pacer.open(early, BPS_16K, m_early, max_ahead_bytes=20 * FRAME)
    s2 = pacer.open(late, BPS_16K, m_late, max_ahead_bytes=20 * FRAME)
    t0 = clock.now
    await fill(s1, frames(10))  # put() does not yield: the loop is still ours
    clock.now = t0 + 0.1
    await fill(s2, frames(10))
    assert s2.start_time == pytest.approx(t0 + 0.1)  # not the stale tick at t0
    await asyncio.wait_for(asyncio.gather(early.written.wait(), late.written.wait()), 2)
    try:
        assert early.batches == [1] and late.batches == [1]
        assert s1.start_time == s2.start_time == pytest.approx(t0 + 0.1)
        assert m_early.max_lateness_ms == m_late.max_lateness_ms == 0.0
    finally:
        for s in (s1, s2):
            s.abort(RuntimeError("test over"))


async def test_a_real_loop_herd_starts_every_stream_with_one_frame() -> None:
    # The real clock and timer: 100 producers start at once and each spends 0.4 ms of
    # CPU framing its first second of audio, all in one loop iteration (40 ms, two
    # ticks). Whatever the machine's load, every stream's first write is one frame:
    # its schedule starts at the tick that writes it. (Lateness is not asserted here:
    # timing targets belong to the benchmark.)
    pacer = Pacer.for_loop()
    loop = asyncio.get_running_loop()
    sinks = [Sink(loop.time, encode_cost=0.0004, spin=True) for _ in range(100)]
    streams = [pacer.open(s, BPS_16K, Metrics(), max_ahead_bytes=50 * FRAME) for s in sinks]
    pcm = b"".join(frames(50))
    try:
        await asyncio.gather(*(s.put(pcm) for s in streams))
        await asyncio.wait_for(asyncio.gather(*(s.written.wait() for s in sinks)), 10)
        assert [s.batches[0] for s in sinks] == [1] * 100
    finally:
        for s in streams:
            s.abort(RuntimeError("test over"))


async def test_an_underrun_restarts_the_schedule_instead_of_bursting(
    pacer: Pacer, clock: FakeClock
) -> None:
    sink = Sink(clock)
    metrics = Metrics()
    stream = pacer.open(sink, BPS_16K, metrics, max_ahead_bytes=20 * FRAME)
    t0 = clock.now
    await fill(stream, frames(2))
    pacer.run_due()
    # A live source that delivers just in time (before the frame's tick) keeps the
    # schedule.
    clock.now = t0 + 0.015
    await fill(stream, frames(1))
    for k in (1, 2):
        clock.now = t0 + k * 0.02
        pacer.run_due(early=EARLY)
    assert len(sink.sent) == 3
    # Then it stalls: frames 3.. are due from t0 + 60 ms, but nothing comes until
    # t0 + 130 ms. The stream resumes at the next tick, one frame per tick, on time.
    for k in (3, 4, 5, 6):
        clock.now = t0 + k * 0.02
        pacer.run_due(early=EARLY)
    clock.now = t0 + 0.13
    await fill(stream, frames(3))
    for k in (7, 8, 9):
        clock.now = t0 + k * 0.02
        pacer.run_due(early=EARLY)
    assert sink.batches == [1] * 6
    assert [when for when, _ in sink.sent] == pytest.approx(
        [t0 + k * 0.02 for k in (0, 1, 2, 7, 8, 9)]
    )
    assert metrics.max_lateness_ms == 0.0
    assert metrics.underruns == 1  # the stall, not the just-in-time frame
    done = asyncio.ensure_future(stream.finish())
    await asyncio.wait_for(done, 1)
    assert stream.finished and pacer.pending == 0


async def test_the_send_log_knows_when_each_frame_went_out(pacer: Pacer, clock: FakeClock) -> None:
    # The latencies count from when a frame went out. The pacer logs only what leaves
    # the schedule (a catch-up batch, a restart after an underrun); frames on it, on
    # time or a little late, take their tick's time: every frame's time must come out
    # of the log exactly.
    sink = Sink(clock)
    metrics = Metrics()
    rng = random.Random(7)
    stream = pacer.open(sink, BPS_16K, metrics, max_ahead_bytes=400 * FRAME)
    t0 = clock.now
    await fill(stream, frames(60))
    for k in range(90):
        stream.held = 30 <= k < 34  # a backed-up socket: five frames go out in one write
        jitter = rng.choice([0.0, 0.0003, 0.0008, 0.004])
        clock.now = t0 + k * 0.02 + (0.0 if 55 <= k < 75 else jitter)  # on time around the restart
        pacer.run_due(early=EARLY)
        if k == 70:  # the source ran dry at frame 60: the schedule restarts at tick 71
            clock.now += 0.01
            await fill(stream, frames(10))
    assert metrics.underruns == 1 and 5 in sink.batches and metrics.late_frames > 0
    assert len(sink.sent) == 70
    # What it costs the pacer: an entry per departure from the schedule and per run
    # (the first run, the catch-up batch and the run after it, the run the restart
    # began), never one per frame on schedule, late or not.
    assert metrics.send_log.entries == 4
    for j, (when, _) in enumerate(sink.sent):
        for offset in (j * FRAME + 1, (j + 1) * FRAME):  # its first and last byte
            sent = metrics.send_log.sent_at(offset, metrics.bytes_sent)
            assert sent == pytest.approx(when, rel=0, abs=1e-9), (j, offset)
    assert metrics.send_log.sent_at(70 * FRAME + 1, metrics.bytes_sent) is None


async def test_the_send_log_knows_a_held_frame_went_out_late(
    pacer: Pacer, clock: FakeClock
) -> None:
    # 8 kHz frames last two ticks: a frame held at its tick goes out alone at the next
    # one, late, on the fast path. Its time is that write's, not its tick's.
    sink = Sink(clock)
    metrics = Metrics()
    stream = pacer.open(sink, BPS_16K / 2, metrics, max_ahead_bytes=40 * FRAME)
    t0 = clock.now
    await fill(stream, frames(10))
    for k in range(20):
        stream.held = k == 4  # frame 2 is due at tick 4
        clock.now = t0 + k * 0.02
        pacer.run_due(early=EARLY)
    assert sink.batches == [1] * 10 and metrics.max_lateness_ms == pytest.approx(20)
    for j, (when, _) in enumerate(sink.sent):
        sent = metrics.send_log.sent_at((j + 1) * FRAME, metrics.bytes_sent)
        assert sent == pytest.approx(when, rel=0, abs=1e-9), j


async def test_a_stream_that_starts_on_a_tick_already_run_logs_its_first_write(
    pacer: Pacer, clock: FakeClock
) -> None:
    # Stream A's last tick reached 0.5 ms past its time; the pacer goes idle, and B's
    # first frame is ready 0.1 ms later: due on a tick that already ran, written at the
    # next one. Its time is that write's.
    first = pacer.open(Sink(clock), BPS_16K, Metrics(), max_ahead_bytes=20 * FRAME)
    await fill(first, frames(2))
    done = asyncio.ensure_future(first.finish())
    t0 = clock.now
    for k in range(2):
        clock.now = t0 + k * 0.02
        pacer.run_due(early=0.0005)
    await asyncio.wait_for(done, 1)
    sink, metrics = Sink(clock), Metrics()
    clock.now += 0.0001
    stream = pacer.open(sink, BPS_16K, metrics, max_ahead_bytes=20 * FRAME)
    await fill(stream, frames(3))
    start = clock.now
    for k in range(3):
        clock.now = start + 0.0003 + k * 0.02
        pacer.run_due(early=0.0005)
    assert len(sink.sent) == 3
    for j, (when, _) in enumerate(sink.sent):
        assert metrics.send_log.sent_at((j + 1) * FRAME, metrics.bytes_sent) == when, j


async def test_the_send_log_is_exact_under_random_ticks_holds_and_underruns(
    clock: FakeClock,
) -> None:
    # Ticks on the grid, late by up to 70 ms or skipped as the timer does; streams held,
    # sources that run dry, 8 and 16 kHz and pace 1.5, streams in turn on one session's
    # metrics with unpaced writes between them: every byte's time from the log is the
    # time it was written, or unknown, never another.
    for seed in range(40):
        rng = random.Random(seed)
        pacer = Pacer(clock=clock, autorun=False)
        metrics = Metrics()
        writes: list[tuple[float, int]] = []  # (time, PCM bytes) in stream order
        for _ in range(rng.randint(1, 3)):
            if rng.random() < 0.4:  # an unpaced write, as AudioSender.send makes one
                clock.now += rng.random() * 0.05
                metrics.send_log.mark(metrics.bytes_sent, clock.now)
                metrics.record_audio(1280)
                writes.append((clock.now, 1280))
            sink = Sink(clock)
            rate = rng.choice([BPS_16K, BPS_16K / 2, BPS_16K * 1.5])
            stream = pacer.open(sink, rate, metrics, max_ahead_bytes=10**9)
            await fill(stream, frames(rng.randint(1, 20)))
            for tick in range(rng.randint(20, 200)):
                if tick == 0 or pacer.pending == 0:
                    origin = clock.now
                    k = 0
                r = rng.random()
                late = 0.0 if r < 0.6 else rng.random() * (0.001 if r < 0.8 else 0.07)
                clock.now = max(origin + k * 0.02 + late, clock.now)
                if rng.random() < 0.1:  # the source delivers (or ran dry before)
                    await fill(stream, frames(rng.randint(1, 30)))
                stream.held = rng.random() < 0.1
                pacer.run_due(early=0.0005)
                k = max(k + 1, math.floor((clock.now - origin) / 0.02 + 1e-6) + 1)
            stream.held = False
            done = asyncio.ensure_future(stream.finish())
            while not done.done():
                clock.now += 0.02
                pacer.run_due(early=0.0005)
                await asyncio.sleep(0)
            writes += [(when, len(frame)) for when, frame in sink.sent]
        offset, known = 0, []
        for when, size in writes:
            for byte_end in (offset + 1, offset + size):
                sent = metrics.send_log.sent_at(byte_end, metrics.bytes_sent)
                assert sent in (None, when), (seed, byte_end, sent, when)
                known.append(sent is not None)
            offset += size
        assert offset == metrics.bytes_sent
        # Forgotten (the rings are bounded: 256 entries, 1,024 ticks): never the recent.
        assert all(known[-200:]), seed


async def test_a_restarted_schedule_is_exact_on_ticks_without_tolerance(
    pacer: Pacer, clock: FakeClock
) -> None:
    # run_due() without ``early``: a tick's horizon is its time, equal to the restarted
    # schedule's first due time. The log must compute that due time as the pacer does.
    sink, metrics = Sink(clock), Metrics()
    stream = pacer.open(sink, BPS_16K, metrics, max_ahead_bytes=1000 * FRAME)
    await fill(stream, frames(209))
    origin = clock.now
    for k in range(216):
        clock.now = origin + k * 0.02
        pacer.run_due()
        if k == 209:  # the source ran dry at frame 209: the schedule restarts at tick 210
            clock.now += 0.01
            await fill(stream, frames(5))
    assert metrics.underruns == 1 and len(sink.sent) == 214
    for j, (when, _) in enumerate(sink.sent):
        assert metrics.send_log.sent_at((j + 1) * FRAME, metrics.bytes_sent) == when, j


async def test_a_finished_stream_is_not_kept_alive_by_its_sessions_metrics(
    pacer: Pacer, clock: FakeClock
) -> None:
    # The send log's open run refers to its stream weakly: the metrics a user keeps
    # after a session must not keep the stream, and through it the connection, alive.
    metrics = Metrics()
    stream = pacer.open(Sink(clock), BPS_16K, metrics, max_ahead_bytes=20 * FRAME)
    await fill(stream, frames(3))
    done = asyncio.ensure_future(stream.finish())
    for _ in range(3):
        clock.now += 0.02
        pacer.run_due(early=EARLY)
    await asyncio.wait_for(done, 1)
    gone = weakref.ref(stream)
    del stream, done
    gc.collect()
    assert gone() is None
    assert metrics.send_log.sent_at(FRAME, metrics.bytes_sent) is not None


class CountingSink(Sink):
    """A Sink that counts its producer's batches (``encode_frames`` calls)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        super().__init__(clock)
        self.encodes = 0

    def encode_frames(self, pcm: bytes, frame_bytes: int) -> list[bytes]:
        self.encodes += 1
        return super().encode_frames(pcm, frame_bytes)


async def test_producers_of_a_herd_refill_over_many_ticks(pacer: Pacer, clock: FakeClock) -> None:
    # 400 streams start in the same tick, each from a whole source handed over in
    # slices of 2 s (pcm_chunks' 64 KiB) with the default second of buffer: their
    # buffers drain in step. Every producer would otherwise cut and frame its next 2 s
    # between the same two ticks (400 batches at once, every 2 s, delaying the tick
    # after them for every stream); the pacer wakes at most ceil(400 / 12) = 34 of them
    # per tick, none of them late enough to underrun, and the refills stay spread.
    n, chunk = 400, 100 * FRAME  # 2 s of audio per put
    sinks = [CountingSink(clock) for _ in range(n)]
    metrics = [Metrics() for _ in sinks]
    streams = [
        pacer.open(sink, BPS_16K, m, max_ahead_bytes=50 * FRAME)
        for sink, m in zip(sinks, metrics, strict=True)
    ]

    async def produce(stream: object) -> None:
        for _ in range(4):  # 8 s of audio
            await stream.put(bytes(chunk))  # type: ignore[attr-defined]

    producers = [asyncio.ensure_future(produce(s)) for s in streams]
    await asyncio.sleep(0)
    assert [s.encodes for s in sinks] == [1] * n  # the herd's first batch, together
    t0 = clock.now
    refills_per_tick = []
    for k in range(400):  # 8 s of ticks
        clock.now = t0 + k * 0.02
        pacer.run_due(early=EARLY)
        before = sum(s.encodes for s in sinks)
        for _ in range(3):  # let the producers woken by this tick run
            await asyncio.sleep(0)
        refills_per_tick.append(sum(s.encodes for s in sinks) - before)
    await asyncio.wait_for(asyncio.gather(*producers), 1)
    assert sum(refills_per_tick) == 3 * n
    assert max(refills_per_tick) <= 34, max(refills_per_tick)
    assert sum(1 for r in refills_per_tick if r) >= 3 * 12  # each wave over 12 ticks
    assert all(m.underruns == 0 and m.max_lateness_ms == 0 for m in metrics)
    assert all(m.paced_frames == 400 for m in metrics)
    assert pacer.deferred_wakes > 0


async def test_a_late_tick_wakes_every_deferred_producer(pacer: Pacer, clock: FakeClock) -> None:
    # The herd's refills are being spread when the loop stalls: the tick after the
    # stall sends a catch-up batch per stream, so no producer may be kept waiting then
    # (its buffer could run dry before its turn): all are woken, and none underruns.
    n, chunk = 400, 100 * FRAME
    sinks = [CountingSink(clock) for _ in range(n)]
    metrics = [Metrics() for _ in sinks]
    streams = [
        pacer.open(sink, BPS_16K, m, max_ahead_bytes=50 * FRAME)
        for sink, m in zip(sinks, metrics, strict=True)
    ]

    async def produce(stream: object) -> None:
        for _ in range(3):
            await stream.put(bytes(chunk))  # type: ignore[attr-defined]

    producers = [asyncio.ensure_future(produce(s)) for s in streams]
    await asyncio.sleep(0)
    t0 = clock.now

    async def tick(when: float) -> int:
        clock.now = when
        before = sum(s.encodes for s in sinks)
        pacer.run_due(early=EARLY)
        for _ in range(3):
            await asyncio.sleep(0)
        return sum(s.encodes for s in sinks) - before

    refilled = sum([await tick(t0 + k * 0.02) for k in range(77)])
    # Buffers reached their low-water mark (25 of 100 frames) at tick 74: three ticks
    # of refills so far, 34 each, the rest waiting.
    assert refilled == 3 * 34 and pacer.deferred_wakes > 0
    # The next tick runs 100 ms late (5 ticks missed): everyone left is woken now.
    assert await tick(t0 + 82 * 0.02) == n - refilled
    for k in range(83, 300):
        await tick(t0 + k * 0.02)
    await asyncio.wait_for(asyncio.gather(*producers), 1)
    assert all(m.underruns == 0 and m.paced_frames == 300 for m in metrics)


class _QueueSender:
    """What a queue's tap needs of its session's sender (a 16 kHz session)."""

    sample_rate = 16000
    max_ahead_bytes = 50 * FRAME

    def queued_audio(self, pcm: bytes, paced: object) -> None:
        pass

    def send_silence(self, pcm: bytes) -> None:  # pragma: no cover - no keepalive here
        raise AssertionError("no keepalive in this test")


async def test_a_queue_tap_takes_what_a_late_tick_writes(pacer: Pacer, clock: FakeClock) -> None:
    # A live sender puts a frame every 20 ms into the queue a tap streams. A tick that
    # runs 50 ms late writes three frames at once: the tap must have moved them all into
    # the stream first, or the third is missing at its tick (an underrun, and the
    # schedule restarts late). A tap that moved audio only while the stream held under
    # two frames (to move a few at a time) underran here.
    from nlsstream.realtime.live import AudioQueue
    from nlsstream.realtime.sending import QueueTap

    sink, metrics = Sink(clock), Metrics()
    stream = pacer.open(sink, BPS_16K, metrics, max_ahead_bytes=50 * FRAME)
    queue = AudioQueue(cushion=0.04)
    tap = QueueTap(queue, stream, _QueueSender(), None, None)  # type: ignore[arg-type]
    pacer.add_tap(tap)
    items = frames(40)
    queue.put(items[0])
    queue.put(items[1])  # the cushion: two frames
    t0, n, k = clock.now, 2, 0
    while n < 40:
        k += 1
        late = 0.05 if k == 10 else 0.0
        while n < 40 and t0 + (n - 1) * 0.02 <= t0 + k * 0.02 + late:
            queue.put(items[n])  # the sender is on time
            n += 1
        clock.now = t0 + k * 0.02 + late
        pacer.run_due(early=EARLY)
        if late:
            k += 2  # the ticks this one stood for
    for j in range(k + 1, k + 6):
        clock.now = t0 + j * 0.02
        pacer.run_due(early=EARLY)
    assert metrics.underruns == 0
    assert [frame for _, frame in sink.sent] == items[: len(sink.sent)]
    assert len(sink.sent) >= 38
    assert metrics.max_lateness_ms == pytest.approx(50.0, abs=20.0)
