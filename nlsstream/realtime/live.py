"""A live audio source any thread can fill, sent by the pacer's own ticks.

:class:`AudioQueue` is what ``Session.stream()`` takes from code that produces audio on
another thread (a blocking sender, an audio device's callback): :meth:`AudioQueue.put`
is one deque append, with no lock and no wake-up of the event loop. The stream does not
wait for the producer either: at every tick of the loop's
:class:`~nlsstream.realtime.pacing.Pacer` (20 ms) it takes what is queued, frames it and
writes what is due, in the same tick. So a thousand producing threads cost the loop one
look per session per tick, and nothing per call.

**A cushion against the producer's jitter.** The first audio is held until
:attr:`AudioQueue.cushion` seconds of it are queued (or as long has passed): the stream
then runs that far behind the producer. A producing thread is woken a little late now
and then; without a cushion, a frame that reached the queue after the tick it was due on
would restart the stream's schedule a tick later (an underrun) and every later frame
would arrive that much later. With it, a producer late by less than the cushion never
makes a frame late at the gateway.
"""

from __future__ import annotations

from collections import deque

from ..errors import AudioFormatError

__all__ = ["DEFAULT_CUSHION_S", "AudioQueue"]

#: How far behind its producer a queue's stream runs by default (s).
DEFAULT_CUSHION_S = 0.06


class AudioQueue:
    """PCM16LE mono audio at the session's rate, put by one thread at a time (any thread)
    and sent by ``await session.stream(queue)`` at real time until :meth:`close`.

    Unbounded: :attr:`queued_bytes` says how much waits, for a producer that may run
    ahead of real time to bound itself.
    """

    __slots__ = ("_chunks", "_closed", "cushion", "put_bytes", "taken_bytes")

    def __init__(self, *, cushion: float = DEFAULT_CUSHION_S) -> None:
        if not cushion >= 0:
            raise ValueError(f"cushion must be >= 0 seconds, got {cushion!r}")
        #: Seconds of audio the stream holds back at first (see the module docstring).
        self.cushion = cushion
        self._chunks: deque[bytes] = deque()
        #: Bytes put so far (by the producer) and taken by the stream (by the loop):
        #: each written by one side only, so neither needs a lock.
        self.put_bytes = 0
        self.taken_bytes = 0
        self._closed = False

    def put(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` (copied unless it is ``bytes``); never waits. Raises
        AudioFormatError for an odd number of bytes, RuntimeError after :meth:`close`."""
        if self._closed:
            raise RuntimeError("AudioQueue.put() after close()")
        if len(data) % 2:
            raise AudioFormatError(
                f"PCM16 audio must be an even number of bytes, got a chunk of {len(data)}"
            )
        if not data:
            return
        chunk = data if type(data) is bytes else bytes(data)
        self._chunks.append(chunk)
        self.put_bytes += len(chunk)

    def close(self) -> None:
        """No more audio: the stream sends what is queued, then returns."""
        self._closed = True

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def queued_bytes(self) -> int:
        """Bytes put and not yet taken by the stream."""
        return self.put_bytes - self.taken_bytes

    def take(self, limit: int) -> bytes:
        """Up to ``limit`` bytes (even) of the queued audio, oldest first; the loop side."""
        chunks = self._chunks
        if not chunks or limit < 2:
            return b""
        limit -= limit % 2
        parts: list[bytes] = []
        size = 0
        while chunks and size < limit:
            chunk = chunks.popleft()
            if size + len(chunk) > limit:
                keep = limit - size
                chunks.appendleft(chunk[keep:])  # the producer only appends on the right
                chunk = chunk[:keep]
            parts.append(chunk)
            size += len(chunk)
        self.taken_bytes += size
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def drop(self) -> int:
        """Discard what is queued (the session ended); returns how many bytes."""
        dropped = 0
        while self._chunks:
            dropped += len(self._chunks.popleft())
        self.taken_bytes += dropped
        return dropped
