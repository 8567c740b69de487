"""Microphone input as an async iterator of PCM16 mono chunks.

Needs the ``mic`` extra (``pip install 'nlsstream[mic]'``: sounddevice + PortAudio), which is
imported only when a :class:`Microphone` without an explicit backend is started. The audio
backend is a small protocol (:class:`AudioBackend`) so other sources, and tests, can plug in.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable
from types import TracebackType
from typing import Any, Protocol

from .errors import AudioFormatError, InvalidStateError, MicrophoneError
from .redaction import get_logger

__all__ = [
    "AudioBackend",
    "InputStream",
    "Microphone",
    "MicrophoneError",
    "SoundDeviceBackend",
]

logger = get_logger("nlsstream.mic")

#: Sample rates the gateway accepts (docs/protocol.md §5).
SUPPORTED_RATES = (8000, 16000)
# Opening/closing a PortAudio device normally takes milliseconds; this only bounds a hang.
_DEVICE_TIMEOUT = 10.0
# A warning is logged for the first dropped chunk and then for every this many more.
_OVERFLOW_LOG_EVERY = 50


class InputStream(Protocol):
    """A running capture stream returned by :meth:`AudioBackend.open_input`."""

    def start(self) -> None: ...

    def stop(self) -> None: ...

    def close(self) -> None: ...


class AudioBackend(Protocol):
    """Opens capture streams.

    ``callback`` receives each block of ``blocksize`` frames as int16 little-endian PCM
    (``bytes``). It is called on the backend's own thread, never on the event loop. The
    backend raises :class:`MicrophoneError` (or any exception, which is wrapped in one)
    when the device is missing or cannot record with these settings.
    """

    def open_input(
        self,
        *,
        sample_rate: int,
        channels: int,
        blocksize: int,
        device: int | str | None,
        callback: Callable[[bytes], None],
    ) -> InputStream: ...


class SoundDeviceBackend:
    """The default backend: PortAudio through the ``sounddevice`` package."""

    def __init__(self) -> None:
        try:
            import sounddevice
        except ImportError as exc:
            raise MicrophoneError(
                "microphone input needs the 'sounddevice' package: pip install 'nlsstream[mic]'"
            ) from exc
        except OSError as exc:  # sounddevice raises this when libportaudio is missing
            raise MicrophoneError(
                f"sounddevice is installed but the PortAudio library is not ({exc}); "
                "install it, e.g. 'apt install libportaudio2' or 'brew install portaudio'"
            ) from exc
        self._sd: Any = sounddevice

    def open_input(
        self,
        *,
        sample_rate: int,
        channels: int,
        blocksize: int,
        device: int | str | None,
        callback: Callable[[bytes], None],
    ) -> InputStream:
        sd = self._sd
        try:
            info = sd.query_devices(device, "input")
        except Exception as exc:
            which = "default audio input device" if device is None else f"input device {device!r}"
            raise MicrophoneError(f"no {which} found: {exc}") from exc
        try:
            sd.check_input_settings(
                device=device, channels=channels, dtype="int16", samplerate=sample_rate
            )
        except Exception as exc:
            raise MicrophoneError(
                f"input device {info.get('name', device)!r} cannot record {channels} channel(s) "
                f"of 16-bit audio at {sample_rate} Hz: {exc}"
            ) from exc

        def on_audio(indata: Any, frames: int, time_info: Any, status: Any) -> None:
            if status:
                logger.debug("PortAudio input status: %s", status)
            callback(bytes(indata))

        stream: InputStream = sd.RawInputStream(
            samplerate=sample_rate,
            blocksize=blocksize,
            device=device,
            channels=channels,
            dtype="int16",
            callback=on_audio,
        )
        return stream


class Microphone:
    """Live microphone audio: an async iterator of PCM16 mono ``bytes`` chunks.

    ::

        async with Microphone(sample_rate=16000) as mic:
            await transcriber.stream(mic)

    Each chunk holds ``chunk_ms`` of audio (``chunk_bytes`` bytes) as delivered by the
    device. Iteration ends after :meth:`close` (buffered chunks are still yielded first).

    The capture callback runs on the audio backend's thread and hands chunks to the event
    loop, where at most ``max_queue_chunks`` wait for the consumer. When that queue is full
    the **oldest** chunk is dropped: real-time recognition prefers fresh audio to a growing
    backlog. Drops are counted in :attr:`overflows` and logged (first, then every 50th).
    If the device delivers nothing for ``read_timeout`` seconds, iteration raises
    :class:`MicrophoneError` instead of hanging.
    """

    def __init__(
        self,
        sample_rate: int = 16000,
        chunk_ms: int = 100,
        max_queue_chunks: int = 50,
        device: int | str | None = None,
        backend: AudioBackend | None = None,
        *,
        read_timeout: float = 5.0,
    ) -> None:
        if sample_rate not in SUPPORTED_RATES:
            raise AudioFormatError(
                f"microphone sample_rate must be 8000 or 16000 Hz, not {sample_rate}"
            )
        if isinstance(chunk_ms, bool) or not isinstance(chunk_ms, int) or chunk_ms <= 0:
            raise ValueError(f"chunk_ms must be a positive whole number of ms, not {chunk_ms}")
        if max_queue_chunks < 1:
            raise ValueError("max_queue_chunks must be at least 1")
        if read_timeout <= 0:
            raise ValueError("read_timeout must be positive")
        self.sample_rate = sample_rate
        self.chunk_ms = chunk_ms
        self.frames_per_chunk = sample_rate * chunk_ms // 1000
        self.chunk_bytes = 2 * self.frames_per_chunk
        self.device = device
        self.max_queue_chunks = max_queue_chunks
        self.read_timeout = read_timeout
        #: Chunks dropped because the consumer fell behind (oldest first).
        self.overflows = 0
        self._backend = backend
        self._chunks: collections.deque[bytes] = collections.deque()
        self._wakeup = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stream: InputStream | None = None
        self._started = False
        self._closed = False

    def __repr__(self) -> str:
        return (
            f"Microphone(sample_rate={self.sample_rate}, chunk_ms={self.chunk_ms}, "
            f"device={self.device!r}, overflows={self.overflows})"
        )

    @property
    def closed(self) -> bool:
        return self._closed

    async def start(self) -> None:
        """Open the device and start capturing (``async with`` does this for you)."""
        if self._started:
            raise InvalidStateError("this Microphone was already started; create a new one")
        self._started = True
        self._loop = asyncio.get_running_loop()
        try:
            backend = self._backend if self._backend is not None else SoundDeviceBackend()
            self._stream = await asyncio.wait_for(
                asyncio.to_thread(
                    backend.open_input,
                    sample_rate=self.sample_rate,
                    channels=1,
                    blocksize=self.frames_per_chunk,
                    device=self.device,
                    callback=self._on_audio_thread,
                ),
                _DEVICE_TIMEOUT,
            )
            await asyncio.wait_for(asyncio.to_thread(self._stream.start), _DEVICE_TIMEOUT)
        except BaseException as exc:
            await self.close()
            if isinstance(exc, (MicrophoneError, asyncio.CancelledError)):
                raise
            if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
                raise MicrophoneError(f"opening the audio input device timed out: {exc}") from exc
            if isinstance(exc, Exception):
                raise MicrophoneError(
                    f"cannot open audio input device {self.device!r} at {self.sample_rate} Hz "
                    f"mono: {exc}"
                ) from exc
            raise

    async def close(self) -> None:
        """Stop capturing and release the device. Safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        self._wakeup.set()
        stream, self._stream = self._stream, None
        if stream is not None:
            try:
                await asyncio.wait_for(asyncio.to_thread(_stop_and_close, stream), _DEVICE_TIMEOUT)
            except Exception as exc:
                logger.warning("closing the audio input device failed: %s", exc)

    async def __aenter__(self) -> Microphone:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    def __aiter__(self) -> Microphone:
        return self

    async def __anext__(self) -> bytes:
        while not self._chunks:
            if self._closed:
                raise StopAsyncIteration
            if not self._started:
                raise InvalidStateError(
                    "start the microphone first: 'async with Microphone() as mic: ...'"
                )
            self._wakeup.clear()
            # Not asyncio.wait_for: before Python 3.12 it returns the result, swallowing
            # a cancellation, when the wake-up lands in the same loop iteration as the
            # cancel; a cancelled stream() then kept reading the device for ever.
            woken = asyncio.ensure_future(self._wakeup.wait())
            try:
                done, _ = await asyncio.wait({woken}, timeout=self.read_timeout)
            finally:
                woken.cancel()
            if not done:
                raise MicrophoneError(
                    f"the audio input device delivered nothing for {self.read_timeout} s"
                )
        return self._chunks.popleft()

    def _on_audio_thread(self, data: bytes) -> None:
        # Runs on the backend's thread: must not touch loop state or raise into PortAudio.
        loop = self._loop
        if loop is None or self._closed:
            return
        # RuntimeError: the loop was closed under us; nobody is listening any more.
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self._push, bytes(data))

    def _push(self, data: bytes) -> None:
        if self._closed:
            return
        if len(self._chunks) >= self.max_queue_chunks:
            self._chunks.popleft()
            self.overflows += 1
            if self.overflows % _OVERFLOW_LOG_EVERY == 1:
                logger.warning(
                    "microphone consumer is slower than real time: dropped the oldest chunk "
                    "(%d dropped so far)",
                    self.overflows,
                )
        self._chunks.append(data)
        self._wakeup.set()


def _stop_and_close(stream: InputStream) -> None:
    try:
        stream.stop()
    finally:
        stream.close()
