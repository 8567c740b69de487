"""AudioQueue: audio put by another thread, sent by the pacer's ticks, against the local
gateway over loopback."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import soundfile
from helpers import wait_until

from nlsstream import AudioFormatError, AudioQueue, InvalidStateError, Recognizer, Transcriber
from nlsstream.gateway import Gateway
from nlsstream.realtime.pacing import Metrics, PacedStream, Pacer

FIXTURES = Path(__file__).parents[1] / "fixtures"
TRANSCRIPTS: dict[str, list[str]] = json.loads((FIXTURES / "transcripts.json").read_text())
HELLO = str(FIXTURES / "hello.wav")
FRAME = 640


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    async with Gateway(tokens=["tok"], appkeys=["app"], recognizer="span") as g:
        yield g


def produce(queue: AudioQueue, pcm: bytes, chunk: int = FRAME, close: bool = True) -> None:
    """Put ``pcm`` in ``chunk`` pieces at real time (absolute deadlines), as a sending
    thread does, then close the queue."""
    t0 = time.monotonic()
    for k, i in enumerate(range(0, len(pcm), chunk)):
        delay = t0 + k * chunk / 32000 - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        queue.put(pcm[i : i + chunk])
    if close:
        queue.close()


async def test_a_thread_fills_the_queue_and_the_stream_sends_it_in_order() -> None:
    pytest.importorskip("pocketsphinx")
    samples, _ = soundfile.read(HELLO, dtype="int16")
    pcm = samples.tobytes()
    queue = AudioQueue()
    async with (
        Gateway(tokens=["tok"], appkeys=["app"], recognizer="sphinx") as gw,
        Recognizer("app", "tok", url=gw.url) as r,
    ):
        producer = threading.Thread(target=produce, args=(queue, pcm, 1000))  # odd frames
        producer.start()
        try:
            await asyncio.wait_for(r.stream(queue), 30)
        finally:
            producer.join()
        result = await r.stop()
    assert result.text == TRANSCRIPTS["hello.wav"][0]
    assert r.metrics.bytes_sent == len(pcm) == gw.sessions[-1].audio_bytes
    assert queue.queued_bytes == 0 and queue.taken_bytes == len(pcm)
    assert r.metrics.paced_frames == -(-len(pcm) // FRAME)


async def test_queues_of_several_sessions_are_encoded_together_and_each_arrives_whole() -> None:
    """The frames every queue gives in one tick are masked in one pass, then split again:
    each session must get exactly its own audio (recognised, so in order and intact)."""
    pytest.importorskip("pocketsphinx")
    names = ["hello.wav", "weather.wav", "hello.wav", "weather.wav"]
    pcms = [soundfile.read(str(FIXTURES / n), dtype="int16")[0].tobytes() for n in names]
    # Four recognitions at once on a possibly loaded machine: room to decode them all.
    async with Gateway(
        tokens=["tok"], appkeys=["app"], recognizer="sphinx", decoder_wait=60.0
    ) as gw:

        async def one(pcm: bytes, chunk: int) -> str:
            queue = AudioQueue()
            async with Recognizer("app", "tok", url=gw.url, stop_timeout=60) as r:
                producer = threading.Thread(target=produce, args=(queue, pcm, chunk))
                producer.start()
                try:
                    await asyncio.wait_for(r.stream(queue), 60)
                finally:
                    producer.join()
                return (await r.stop()).text

        # Chunk sizes that are not whole frames: the framers carry the rest across ticks.
        texts = await asyncio.gather(*(one(p, 640 + 2 * k) for k, p in enumerate(pcms)))
    assert texts == [TRANSCRIPTS[n][0] for n in names]


async def test_the_stream_holds_back_a_cushion_then_keeps_pace(gw: Gateway) -> None:
    pcm = bytes(32000)  # 1 s
    queue = AudioQueue(cushion=0.1)
    async with Transcriber("app", "tok", url=gw.url, keepalive=False) as t:
        producer = threading.Thread(target=produce, args=(queue, pcm))
        started = time.monotonic()
        producer.start()
        try:
            await asyncio.wait_for(t.stream(queue), 30)
        finally:
            producer.join()
        took = time.monotonic() - started
        await t.stop()
    # The first frame waits until 100 ms of audio is queued (the 5th put, at 80 ms),
    # the 49 frames after it follow at real time: never sooner, whatever the machine.
    assert took >= 0.08 + 49 * 0.02 - 0.01
    assert t.metrics.bytes_sent == len(pcm)


async def test_a_closed_queue_is_sent_at_the_pace_asked(gw: Gateway) -> None:
    queue = AudioQueue()
    queue.put(bytes(64000))  # 2 s, all queued before the stream starts
    queue.close()
    async with Transcriber("app", "tok", url=gw.url) as t:
        started = time.monotonic()
        await asyncio.wait_for(t.stream(queue, pace=4.0), 30)
        took = time.monotonic() - started
        await t.stop()
    assert took >= 0.5 - 0.02  # 2 s at 4x real time
    assert t.metrics.bytes_sent == 64000 == gw.sessions[-1].audio_bytes


async def test_a_quiet_queue_gets_keepalive_silence(gw: Gateway) -> None:
    queue = AudioQueue()
    async with Transcriber("app", "tok", url=gw.url, keepalive=0.2) as t:
        streaming = asyncio.ensure_future(t.stream(queue))
        await asyncio.sleep(0)
        queue.put(bytes(3200))
        await wait_until(lambda: t.metrics.keepalive_bytes > 0)
        queue.close()
        await asyncio.wait_for(streaming, 10)
        await t.stop()
    assert t.metrics.keepalive_bytes > 0
    assert t.metrics.bytes_sent == 3200 + t.metrics.keepalive_bytes


async def test_a_recognizer_queue_is_cut_at_its_limit() -> None:
    queue = AudioQueue()
    queue.put(bytes(32000 * 61))
    queue.close()
    async with (
        Gateway(tokens=["tok"], appkeys=["app"], recognizer="span") as gw,
        Recognizer("app", "tok", url=gw.url) as r,
    ):
        with pytest.raises(AudioFormatError, match="limit of 60 s"):
            await asyncio.wait_for(r.stream(queue, pace=200), 30)
        await r.stop()
    assert r.metrics.bytes_sent == 32000 * 60
    assert queue.queued_bytes == 32000


async def test_the_task_ending_interrupts_the_stream_and_leaves_the_rest(gw: Gateway) -> None:
    queue = AudioQueue()
    queue.put(bytes(32000 * 5))
    async with Transcriber("app", "tok", url=gw.url) as t:
        streaming = asyncio.ensure_future(t.stream(queue))
        await wait_until(lambda: t.metrics.bytes_sent > 0)
        await t.abort()
        with pytest.raises(InvalidStateError, match="buffered bytes were not sent"):
            await asyncio.wait_for(streaming, 10)
    assert 0 < queue.taken_bytes < 32000 * 5


async def test_bad_use_is_refused_clearly(gw: Gateway) -> None:
    queue = AudioQueue()
    with pytest.raises(AudioFormatError, match="even number of bytes"):
        queue.put(b"\x00")
    with pytest.raises(ValueError, match="cushion"):
        AudioQueue(cushion=-1)
    queue.close()
    with pytest.raises(RuntimeError, match="after close"):
        queue.put(b"\x00\x00")
    async with Transcriber("app", "tok", url=gw.url) as t:
        with pytest.raises(ValueError, match="real time"):
            await t.stream(AudioQueue(), pace=None)
        with pytest.raises(AudioFormatError, match="session's rate"):
            await t.stream(AudioQueue(), sample_rate=8000)
        await t.stop()


def test_take_splits_a_chunk_and_keeps_the_rest_first() -> None:
    queue = AudioQueue()
    queue.put(b"ab" * 3)
    queue.put(b"cd")
    assert queue.take(4) == b"abab"
    assert queue.take(3) == b"ab"  # even: 2 bytes
    assert queue.take(100) == b"cd"
    assert queue.take(100) == b""
    assert (queue.put_bytes, queue.taken_bytes, queue.queued_bytes) == (8, 8, 0)


class _NullSink:
    written = 0

    def write_frames(self, data: bytes) -> None:
        self.written += len(data)

    @staticmethod
    def encode_frames(pcm: bytes, frame_bytes: int) -> list[bytes]:
        return [pcm[i : i + frame_bytes] for i in range(0, len(pcm), frame_bytes)]


async def test_streams_a_tap_registers_during_a_tick_keep_one_timer_on_one_grid() -> None:
    """A stream whose first frame a tap puts registers inside the pacer's tick: the
    pacer is busy then, so it must not start a new grid and a second timer (once it did:
    every such stream added a timer chain, and the sessions' frames left a tick late)."""
    pacer = Pacer(asyncio.get_running_loop())
    sink = _NullSink()
    streams: list[PacedStream] = []

    def tap(now: float) -> None:
        if len(streams) < 10:
            stream = pacer.open(sink, 32000, Metrics(), max_ahead_bytes=64000)
            stream.put_batched(bytes(640 * 100))
            streams.append(stream)

    pacer.add_tap(tap)
    started = time.monotonic()
    await wait_until(lambda: len(streams) == 10 and pacer.ticks >= 20)
    elapsed = time.monotonic() - started
    pacer.remove_tap(tap)
    for stream in streams:
        stream.abort(RuntimeError("test over"))
    # A busy machine delays ticks, it never adds any: at most one per 20 ms, plus the first.
    assert pacer.ticks <= elapsed / 0.02 + 2, (pacer.ticks, elapsed)
    assert sink.written > 0
