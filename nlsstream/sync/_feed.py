"""How a blocking session's ``send_audio()`` reaches the gateway at almost no cost to
the calling thread.

``send_audio()`` appends the audio to the session's :class:`AudioFeed` (a deque: an
append is atomic under the GIL, so there is no lock) and returns; there is no
cross-thread wake-up per call. On the loop thread, the feed is a live source for the
session's own ``stream(pace=1.0)``: one :class:`Collector` timer per loop looks at every
waiting feed each :data:`COLLECT_S` and hands the queued audio to its stream in batches
(:meth:`AudioFeed.ready`), whose frames the loop's shared pacer writes at real time
(pre-framed, one write per session per tick).

**Batches, and a cushion against the sending thread's jitter.** The stream's pipeline
(conversion, framing, masking, a task step) costs about the same for one frame as for
four, so the feed hands audio over once :data:`BATCH_S` of it has gathered, or sooner
when the stream has :data:`LOW_S` or less left to send (or the oldest audio has waited
:data:`CUSHION_S`: a slow trickle). The first batch is also a cushion: the stream runs
that far behind the sender. A sending thread is woken a little late now and then; if a
frame reached the pacer after the tick it was due on, the stream's schedule would restart
a tick later (an underrun) and every later frame would arrive that much later. With the
cushion, a sender (or the loop) late by less than about 60 ms never makes a frame late
at the gateway; the price is about 80-100 ms between ``send_audio()`` and the gateway.
Audio sent faster than real time is streamed at real time; what waits meanwhile is
bounded by :data:`MAX_QUEUED_BYTES` (``send_audio()`` then waits, at most
:data:`QUEUE_TIMEOUT` s).
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator
from typing import ClassVar

from ..audio import FRAME_BYTES
from ..errors import InvalidStateError, NlsError
from ..realtime.session import Session
from ..redaction import get_logger

__all__ = [
    "BATCH_S",
    "COLLECT_S",
    "CUSHION_S",
    "LOW_S",
    "MAX_QUEUED_BYTES",
    "QUEUE_TIMEOUT",
    "AudioFeed",
    "Collector",
]

logger = get_logger("nlsstream.sync")

#: How often the loop looks at the audio the sending threads have queued (s).
COLLECT_S = 0.01
#: The stream is handed the queued audio once this much has gathered (s of audio)...
BATCH_S = 0.08
#: ...or once it has no more than this buffered ahead (it would soon starve)...
LOW_S = 0.04
#: ...or once the oldest queued audio has waited this long (a slow trickle; s).
CUSHION_S = 0.1
_CUSHION_TICKS = round(CUSHION_S / COLLECT_S)
#: Audio queued and not yet handed to the stream, beyond which ``send_audio()`` waits.
MAX_QUEUED_BYTES = 1 << 20
#: How long ``send_audio()`` waits for room before it raises ``TimeoutError``.
QUEUE_TIMEOUT = 60.0


class Collector:
    """One timer per event loop that wakes the feeds which have audio to hand over."""

    _per_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Collector]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self._waiting: dict[AudioFeed, asyncio.Future[None]] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._tick = 0

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop) -> Collector:
        collector = cls._per_loop.get(loop)
        if collector is None:
            collector = cls._per_loop[loop] = cls(loop)
        return collector

    def wait(self, feed: AudioFeed) -> asyncio.Future[None]:
        """A future set once ``feed`` has audio to take (or is closing)."""
        waiter = self.loop.create_future()
        self._waiting[feed] = waiter
        if self._timer is None:
            self._timer = self.loop.call_later(COLLECT_S, self._run)
        return waiter

    def wake(self, feed: AudioFeed) -> None:
        waiter = self._waiting.pop(feed, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _run(self) -> None:
        self._tick += 1
        tick = self._tick
        waiting = self._waiting
        for feed in [f for f in waiting if f.ready(tick)]:
            self.wake(feed)
        self._timer = self.loop.call_later(COLLECT_S, self._run) if waiting else None


class AudioFeed:
    """The audio queue of one blocking session (see the module docstring).

    :meth:`put` runs on the sending thread; everything else on the loop thread.
    """

    def __init__(
        self, session: Session, loop: asyncio.AbstractEventLoop, max_bytes: int | None
    ) -> None:
        self.session = session
        self.loop = loop
        self.collector = Collector.for_loop(loop)
        self.chunks: deque[bytes] = deque()
        #: Bytes queued so far (by the sending thread) and taken (by the loop): each
        #: written by one side only, so neither needs a lock.
        self.put_bytes = 0
        self.taken_bytes = 0
        self.max_bytes = max_bytes  # the task's limit (a Recognizer's 60 s)
        #: Why audio is no longer accepted (the task ended or failed), once it is not.
        self.refused: NlsError | None = None
        self.running = False  # a feed task runs, or its start is on its way
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._first_seen: int | None = None
        self._go = False  # the collector said: hand the queued audio over
        self._pcm = session.format == "pcm"
        rate = 2 * session.sample_rate  # PCM16 bytes per second
        self._batch_bytes = int(BATCH_S * rate)
        self._low_bytes = max(FRAME_BYTES, int(LOW_S * rate))
        self._sent_base = 0
        self._taken_base = 0

    # ------------------------------------------------------------ the sending thread

    def put(self, data: bytes) -> None:
        """Queue ``data`` (already checked and copied); starts the feed if it is idle."""
        self.chunks.append(data)
        self.put_bytes += len(data)
        if not self.running:
            self.running = True
            self.loop.call_soon_threadsafe(self._start)
        if self.put_bytes - self.taken_bytes > MAX_QUEUED_BYTES:
            self._wait_for_room()

    def _wait_for_room(self) -> None:
        """Too much queued (sent faster than real time): wait, polling, until the stream
        has taken some; a slow path, taken only while the sender runs ahead."""
        deadline = time.monotonic() + QUEUE_TIMEOUT
        while self.put_bytes - self.taken_bytes > MAX_QUEUED_BYTES and self.refused is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the session took no audio for {QUEUE_TIMEOUT:g} s "
                    f"({self.put_bytes - self.taken_bytes} bytes queued)"
                )
            time.sleep(COLLECT_S)

    # ------------------------------------------------------------ the loop thread

    def _start(self) -> None:
        if self._task is None and not self._closing:
            self._task = self.loop.create_task(self._run(), name="nlsstream-sync-feed")

    async def _run(self) -> None:
        session = self.session
        try:
            if self._pcm:
                self._sent_base = session.metrics.bytes_sent
                self._taken_base = self.taken_bytes
                await session.stream(self._source(), pace=1.0)
            else:  # encoded audio: one message per chunk, as given
                async for chunk in self._source():
                    await session.send_audio(chunk)
        except NlsError as exc:
            self.refuse(exc)
        except Exception as exc:  # pragma: no cover - a bug: say so, refuse the rest
            logger.exception("task %s: the audio feed failed", session.task_id)
            self.refuse(InvalidStateError(f"the audio feed failed: {exc!r}"))
        finally:
            self._task = None
            self.running = False
            # Audio queued while the feed was ending: start again.
            if self.chunks and self.refused is None and not self._closing:
                self.running = True
                self._start()

    async def _source(self) -> AsyncIterator[bytes]:
        chunks = self.chunks
        while True:
            if chunks and (self._go or self._closing):
                self._go = False
                parts = []
                while chunks:
                    parts.append(chunks.popleft())
                data = parts[0] if len(parts) == 1 else b"".join(parts)
                self.taken_bytes += len(data)
                yield data
            elif self._closing:
                return
            else:
                await self.collector.wait(self)

    def ready(self, tick: int) -> bool:
        """At the collector's ``tick``: whether to hand the queued audio over now (see
        :data:`BATCH_S`, :data:`LOW_S`, :data:`CUSHION_S`). Handing it over in batches
        rather than per call costs the stream's pipeline (conversion, framing, masking)
        once per batch, and leaves the stream a cushion of audio against the sending
        thread's jitter."""
        if self._closing:
            return True
        if not self.chunks:
            self._first_seen = None
            return False
        go = not self._pcm or self.put_bytes - self.taken_bytes >= self._batch_bytes
        if not go:
            taken = self.taken_bytes - self._taken_base
            buffered = taken - (self.session.metrics.bytes_sent - self._sent_base)
            go = 0 < buffered <= self._low_bytes
        if not go:
            if self._first_seen is None:
                self._first_seen = tick
            go = tick - self._first_seen >= _CUSHION_TICKS
        if go:
            self._first_seen = None
            self._go = True
        return go

    async def finish(self) -> None:
        """Send everything queued (at real time), then end the feed; the next
        :meth:`put` starts it again. Raises nothing: a failure is in :attr:`refused`."""
        task = self._task
        if task is None:
            if self.chunks and self.refused is None:
                self._start()
                task = self._task
            if task is None:
                return
        self._closing = True
        self.collector.wake(self)
        try:
            await asyncio.wait([task])
        finally:
            self._closing = False

    def refuse(self, error: NlsError) -> None:
        """No more audio: drop what is queued, saying so."""
        if self.refused is None:
            self.refused = error
        dropped = sum(len(c) for c in self.chunks)
        self.chunks.clear()
        if dropped:
            logger.warning(
                "task %s: audio is no longer accepted (%s); %d queued bytes dropped",
                self.session.task_id,
                error,
                dropped,
            )

    def cancel(self) -> None:
        """The session is over: end the feed now."""
        task = self._task
        if task is not None:
            task.cancel()
        self.collector.wake(self)
