"""Microphone: a fake backend whose own thread plays the PortAudio callback thread."""

from __future__ import annotations

import asyncio
import logging
import sys
import threading
from collections.abc import Callable

import numpy as np
import pytest

from nlsstream.errors import AudioFormatError, InvalidStateError, NlsError
from nlsstream.mic import Microphone, MicrophoneError, SoundDeviceBackend


def synthetic_chunk(index: int, frames: int, rate: int) -> bytes:
    """A 440 Hz tone whose first sample carries the chunk's sequence number."""
    t = (np.arange(frames) + index * frames) / rate
    samples = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2")
    samples[0] = index
    return samples.tobytes()


def index_of(chunk: bytes) -> int:
    return int(np.frombuffer(chunk[:2], "<i2")[0])


class FakeStream:
    def __init__(
        self,
        rate: int,
        blocksize: int,
        callback: Callable[[bytes], None],
        chunks: int | None,
        interval: float,
        fail_start: bool = False,
    ) -> None:
        self.rate = rate
        self.blocksize = blocksize
        self.callback = callback
        self.chunks = chunks
        self.interval = interval
        self.fail_start = fail_start
        self.finished = threading.Event()
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.started = self.stopped = self.closed = False

    def start(self) -> None:
        if self.fail_start:
            raise OSError("Device unavailable [PaErrorCode -9985]")
        self.started = True
        self.thread = threading.Thread(target=self._run, name="fake-portaudio", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        i = 0
        while not self._stop.is_set() and (self.chunks is None or i < self.chunks):
            self.callback(synthetic_chunk(i, self.blocksize, self.rate))
            i += 1
            if self.interval:
                self._stop.wait(self.interval)
        self.finished.set()

    def stop(self) -> None:
        self._stop.set()
        if self.thread is not None:
            self.thread.join(5)
        self.stopped = True

    def close(self) -> None:
        self.closed = True


class FakeBackend:
    def __init__(
        self,
        chunks: int | None = None,
        interval: float = 0.0,
        error: Exception | None = None,
        fail_start: bool = False,
    ) -> None:
        self.chunks = chunks
        self.interval = interval
        self.error = error
        self.fail_start = fail_start
        self.opened: dict[str, object] = {}
        self.stream: FakeStream | None = None

    def open_input(
        self,
        *,
        sample_rate: int,
        channels: int,
        blocksize: int,
        device: int | str | None,
        callback: Callable[[bytes], None],
    ) -> FakeStream:
        self.opened = {
            "sample_rate": sample_rate,
            "channels": channels,
            "blocksize": blocksize,
            "device": device,
        }
        if self.error is not None:
            raise self.error
        self.stream = FakeStream(
            sample_rate, blocksize, callback, self.chunks, self.interval, self.fail_start
        )
        return self.stream


def fake_threads_alive() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "fake-portaudio"]


async def wait_finished(stream: FakeStream) -> None:
    assert await asyncio.to_thread(stream.finished.wait, 5)
    # chunk hand-offs were queued on the loop before the completion; let them run
    await asyncio.sleep(0)


async def test_chunks_arrive_in_order_and_close_is_clean() -> None:
    backend = FakeBackend(interval=0.002)
    async with Microphone(backend=backend) as mic:
        assert backend.opened == {
            "sample_rate": 16000,
            "channels": 1,
            "blocksize": 1600,
            "device": None,
        }
        received = []
        async for chunk in mic:
            assert len(chunk) == mic.chunk_bytes == 3200
            received.append(index_of(chunk))
            if len(received) == 20:
                break
    assert received == list(range(20))
    assert mic.overflows == 0
    stream = backend.stream
    assert stream is not None and stream.started and stream.stopped and stream.closed
    assert not fake_threads_alive()
    assert mic.closed


async def test_8k_and_device_are_passed_to_backend() -> None:
    backend = FakeBackend(chunks=3)
    async with Microphone(sample_rate=8000, chunk_ms=20, device="USB Mic", backend=backend) as mic:
        assert backend.opened["blocksize"] == 160
        assert backend.opened["device"] == "USB Mic"
        assert backend.stream is not None
        await wait_finished(backend.stream)
        chunks = [await mic.__anext__() for _ in range(3)]
    assert [len(c) for c in chunks] == [320, 320, 320]
    assert [index_of(c) for c in chunks] == [0, 1, 2]


async def test_overflow_drops_oldest_and_counts() -> None:
    backend = FakeBackend(chunks=20)
    mic = Microphone(max_queue_chunks=5, backend=backend)
    await mic.start()
    assert backend.stream is not None
    await wait_finished(backend.stream)  # nobody consumed: 15 of 20 chunks overflowed
    assert mic.overflows == 15
    await mic.close()
    # buffered chunks are still delivered after close, then iteration ends
    assert [index_of(c) async for c in mic] == [15, 16, 17, 18, 19]


async def test_overflow_warning_is_rate_limited(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="nlsstream.mic")
    backend = FakeBackend(chunks=120)
    async with Microphone(max_queue_chunks=1, backend=backend) as mic:
        assert backend.stream is not None
        await wait_finished(backend.stream)
        assert mic.overflows == 119
    warnings = [r for r in caplog.records if "dropped the oldest chunk" in r.getMessage()]
    assert len(warnings) == 3  # the 1st, 51st and 101st drop


async def test_close_ends_a_waiting_consumer() -> None:
    backend = FakeBackend(chunks=0)
    mic = Microphone(backend=backend, read_timeout=5)
    await mic.start()

    async def consume() -> list[bytes]:
        return [c async for c in mic]

    consumer = asyncio.ensure_future(consume())
    await asyncio.sleep(0.05)
    assert not consumer.done()
    await mic.close()
    assert await asyncio.wait_for(consumer, 2) == []
    assert not fake_threads_alive()


async def test_a_cancel_that_lands_with_a_chunk_is_not_lost() -> None:
    """The reader is cancelled in the very loop iteration a chunk wakes it: it must end
    cancelled (asyncio.wait_for before 3.12 returned the chunk instead, and a cancelled
    stream() read a live device for ever)."""
    backend = FakeBackend(chunks=0)
    async with Microphone(backend=backend, read_timeout=5) as mic:
        for _ in range(20):  # the race is exact: every round makes it
            reader = asyncio.ensure_future(mic.__anext__())
            await asyncio.sleep(0)  # the reader now waits for a wake-up
            mic._push(b"\x00\x00" * 160)  # a chunk wakes it...
            reader.cancel()  # ... and the cancel lands in the same iteration
            with pytest.raises(asyncio.CancelledError):
                await reader
            mic._chunks.clear()


async def test_callback_after_close_is_ignored() -> None:
    backend = FakeBackend(chunks=0)
    async with Microphone(backend=backend) as mic:
        assert backend.stream is not None
        late_callback = backend.stream.callback
    # a PortAudio thread racing with close must neither raise nor queue audio
    thread = threading.Thread(target=late_callback, args=(b"\x00\x00" * 1600,))
    thread.start()
    thread.join(5)
    await asyncio.sleep(0)
    assert [c async for c in mic] == []


async def test_stalled_device_raises_instead_of_hanging() -> None:
    async with Microphone(backend=FakeBackend(chunks=0), read_timeout=0.1) as mic:
        with pytest.raises(MicrophoneError, match="delivered nothing"):
            await asyncio.wait_for(mic.__anext__(), 5)


async def test_no_input_device_error() -> None:
    backend = FakeBackend(error=MicrophoneError("no default audio input device found"))
    with pytest.raises(MicrophoneError, match="no default audio input device"):
        async with Microphone(backend=backend):
            pass


async def test_device_cannot_open_at_rate_is_wrapped() -> None:
    backend = FakeBackend(error=OSError("Invalid sample rate [PaErrorCode -9997]"))
    with pytest.raises(MicrophoneError, match="at 8000 Hz mono: Invalid sample rate") as info:
        async with Microphone(sample_rate=8000, backend=backend):
            pass
    assert isinstance(info.value, NlsError)
    assert isinstance(info.value.__cause__, OSError)


async def test_start_failure_closes_the_stream() -> None:
    backend = FakeBackend(fail_start=True)
    mic = Microphone(backend=backend)
    with pytest.raises(MicrophoneError, match="Device unavailable"):
        await mic.start()
    assert backend.stream is not None and backend.stream.closed
    assert mic.closed


async def test_sounddevice_missing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "sounddevice", None)  # makes `import sounddevice` fail
    with pytest.raises(MicrophoneError, match=r"pip install 'nlsstream\[mic\]'"):
        async with Microphone():
            pass
    with pytest.raises(MicrophoneError, match="sounddevice"):
        SoundDeviceBackend()


async def test_default_backend_fails_with_microphone_error_only() -> None:
    # On machines without PortAudio or without an input device (CI) the real backend must
    # fail with MicrophoneError, never a raw OSError/PortAudioError.
    try:
        async with Microphone(read_timeout=1):
            pass
    except MicrophoneError as exc:
        assert "PortAudio" in str(exc) or "device" in str(exc) or "sounddevice" in str(exc)
    else:
        pytest.skip("a real input device is available here")


async def test_misuse_is_reported() -> None:
    mic = Microphone(backend=FakeBackend(chunks=0))
    with pytest.raises(InvalidStateError, match="async with Microphone"):
        await mic.__anext__()
    await mic.start()
    with pytest.raises(InvalidStateError):
        await mic.start()
    await mic.close()
    await mic.close()  # idempotent


@pytest.mark.parametrize(
    ("kwargs", "error"),
    [
        ({"sample_rate": 44100}, AudioFormatError),
        ({"chunk_ms": 0}, ValueError),
        ({"sample_rate": 8000, "chunk_ms": 1.5}, ValueError),
        ({"max_queue_chunks": 0}, ValueError),
        ({"read_timeout": 0}, ValueError),
    ],
)
def test_bad_parameters(kwargs: dict[str, float], error: type[Exception]) -> None:
    with pytest.raises(error):
        Microphone(**kwargs)  # type: ignore[arg-type]
