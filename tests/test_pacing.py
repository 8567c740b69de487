"""The shared pacer, driven by a fake clock (no wall-clock timing assertions)."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable

import pytest

from nlsstream.pacing import LATE_THRESHOLD_MS, Metrics, Pacer

FRAME = 640
BPS_16K = 32000.0  # bytes per second of 16 kHz PCM16 mono


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class Sink:
    """Records (time, frame) for every frame written, and the number of writes (a
    backlog goes out in one); can fail on demand. Frames are length-prefixed, like
    WebSocket frames, so that frames written together can be told apart."""

    def __init__(self, clock: FakeClock) -> None:
        self.clock = clock
        self.sent: list[tuple[float, bytes]] = []
        self.writes = 0
        self.fail: Exception | None = None
        self.write_frames: Callable[[bytes], object] = self.write_frame

    def encode_frames(self, pcm: bytes, frame_bytes: int) -> list[bytes]:
        return [
            len(pcm[i : i + frame_bytes]).to_bytes(2, "big") + pcm[i : i + frame_bytes]
            for i in range(0, len(pcm), frame_bytes)
        ]

    def write_frame(self, data: bytes) -> None:
        if self.fail is not None:
            raise self.fail
        self.writes += 1
        while data:
            size = int.from_bytes(data[:2], "big")
            self.sent.append((self.clock(), data[2 : 2 + size]))
            data = data[2 + size :]


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
    clock.now = t0 + 0.02  # two frames due
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
    s1.held = True  # what a session does from its transport's pause_writing()
    for i in range(5):
        clock.now = t0 + i * 0.02
        pacer.run_due()
    assert len(fast.sent) == 5 and slow.sent == []
    assert fast_m.late_frames == 0
    s1.held = False
    clock.now = t0 + 0.2
    pacer.run_due()
    # Late frames are sent at once, in one write, never dropped, and their lateness
    # is recorded.
    assert len(slow.sent) == 5 and slow.writes == 1
    assert fast.writes == 5
    assert slow_m.late_frames == 5
    assert slow_m.max_lateness_ms == pytest.approx(200.0)
    assert slow_m.p99_lateness_ms == pytest.approx(200.0)


async def test_failing_sink_fails_only_its_stream(pacer: Pacer, clock: FakeClock) -> None:
    bad, good = Sink(clock), Sink(clock)
    bad.fail = ConnectionError("gone")
    s1 = pacer.open(bad, BPS_16K, Metrics(), max_ahead_bytes=10 * FRAME)
    s2 = pacer.open(good, BPS_16K, Metrics(), max_ahead_bytes=10 * FRAME)
    await fill(s1, frames(2))
    await fill(s2, frames(2))
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
    stream.held = True
    pacer.run_due()
    assert metrics.stalled_ticks == 1 and sink.sent == []
    stream.held = False
    clock.now = t0 + 0.02
    pacer.run_due()  # frames 0 and 1 are due: sent at once, the late one counted
    await asyncio.wait_for(producer, 1)
    assert len(sink.sent) == 2 and stream.buffered_bytes == 5 * FRAME
    assert metrics.max_lateness_ms == pytest.approx(20.0) and metrics.paced_frames == 2
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
