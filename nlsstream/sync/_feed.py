"""How a blocking session's ``send_audio()`` reaches the gateway at almost no cost to
the calling thread.

PCM: ``send_audio()`` puts the audio in the session's
:class:`~nlsstream.realtime.live.AudioQueue` (a deque append: no lock, no cross-thread
wake-up per call) and returns. On the loop thread the session streams that queue
(``stream(queue, pace=1.0)``): at every tick of the loop's pacer (20 ms) the stream takes
what is queued and writes what is due, in the same tick. The stream runs
:data:`CUSHION_S` behind the sender (the queue's cushion), so a sending thread woken late
by less than that never makes a frame late at the gateway. Audio sent faster than real
time is streamed at real time; what waits meanwhile is bounded by
:data:`MAX_QUEUED_BYTES` (``send_audio()`` then waits, at most :data:`QUEUE_TIMEOUT` s).

Encoded audio (not PCM) goes out as one message per ``send_audio()`` chunk, as given:
a :class:`Collector` timer per loop looks at the waiting sessions every
:data:`COLLECT_S` and wakes those with audio queued.
"""

from __future__ import annotations

import asyncio
import time
import weakref
from collections import deque
from collections.abc import AsyncIterator
from typing import ClassVar

from ..errors import InvalidStateError, NlsError
from ..realtime.live import AudioQueue
from ..realtime.session import Session
from ..redaction import get_logger

__all__ = [
    "COLLECT_S",
    "CUSHION_S",
    "MAX_QUEUED_BYTES",
    "QUEUE_TIMEOUT",
    "AudioFeed",
    "Collector",
]

logger = get_logger("nlsstream.sync")

#: How often the loop looks for encoded audio the sending threads have queued (s).
COLLECT_S = 0.01
#: How far the stream runs behind the sending thread (s of audio; the queue's cushion).
CUSHION_S = 0.06
#: Audio queued and not yet taken by the stream, beyond which ``send_audio()`` waits.
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
        waiting = self._waiting
        for feed in [f for f in waiting if f.ready()]:
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
        self._pcm = session.format == "pcm"
        #: PCM: the queue the running (or next) stream takes its audio from.
        self.queue = AudioQueue(cushion=CUSHION_S)
        #: Encoded audio: the chunks, one message each, and the timer that wakes the feed.
        self.chunks: deque[bytes] = deque()
        self.collector = Collector.for_loop(loop)
        #: Bytes queued so far (by the sending thread) and taken by the stream: each
        #: written by one side only, so neither needs a lock.
        self.put_bytes = 0
        self.max_bytes = max_bytes  # the task's limit (a Recognizer's 60 s)
        #: Why audio is no longer accepted (the task ended or failed), once it is not.
        self.refused: NlsError | None = None
        self.running = False  # a feed task runs, or its start is on its way
        self._finishing = False
        self._task: asyncio.Task[None] | None = None

    # ------------------------------------------------------------ the sending thread

    def put(self, data: bytes) -> None:
        """Queue ``data`` (already checked and copied); starts the feed if it is idle."""
        if self._pcm:
            queue = self.queue
            try:
                queue.put(data)
            except RuntimeError:  # finish() closed it just now: the next stream's queue
                queue = self.queue
                queue.put(data)
            queued = queue.queued_bytes
        else:
            self.chunks.append(data)
            queued = sum(map(len, self.chunks))
        self.put_bytes += len(data)
        if not self.running:
            self.running = True
            self.loop.call_soon_threadsafe(self._start)
        if queued > MAX_QUEUED_BYTES:
            self._wait_for_room()

    def _queued(self) -> int:
        return self.queue.queued_bytes if self._pcm else sum(map(len, self.chunks))

    def _wait_for_room(self) -> None:
        """Too much queued (sent faster than real time): wait, polling, until the stream
        has taken some; a slow path, taken only while the sender runs ahead."""
        deadline = time.monotonic() + QUEUE_TIMEOUT
        while self._queued() > MAX_QUEUED_BYTES and self.refused is None:
            if time.monotonic() >= deadline:
                raise TimeoutError(
                    f"the session took no audio for {QUEUE_TIMEOUT:g} s "
                    f"({self._queued()} bytes queued)"
                )
            time.sleep(COLLECT_S)

    # ------------------------------------------------------------ the loop thread

    def _start(self) -> None:
        if self._task is None and not self._finishing:
            self._task = self.loop.create_task(self._run(), name="nlsstream-sync-feed")

    async def _run(self) -> None:
        session = self.session
        try:
            if self._pcm:
                await session.stream(self.queue, pace=1.0)
            else:  # encoded audio: one message per chunk, as given
                async for chunk in self._chunks():
                    await session.send_audio(chunk)
        except NlsError as exc:
            self.refuse(exc)
        except Exception as exc:  # pragma: no cover - a bug: say so, refuse the rest
            logger.exception("task %s: the audio feed failed", session.task_id)
            self.refuse(InvalidStateError(f"the audio feed failed: {exc!r}"))
        finally:
            self._task = None
            self.running = False
            self._restart()

    def _restart(self) -> None:
        """Audio queued while the feed was ending: start again."""
        if self._queued() and self.refused is None and not self._finishing:
            self.running = True
            self._start()

    async def _chunks(self) -> AsyncIterator[bytes]:
        chunks = self.chunks
        while True:
            if chunks:
                yield chunks.popleft()
            elif self._finishing:
                return
            else:
                await self.collector.wait(self)

    def ready(self) -> bool:
        """Whether the collector should wake this (encoded) feed now."""
        return bool(self.chunks) or self._finishing

    async def finish(self) -> None:
        """Send everything queued (at real time), then end the feed; the next
        :meth:`put` starts it again. Raises nothing: a failure is in :attr:`refused`."""
        task = self._task
        if task is None:
            if self._queued() and self.refused is None:
                self._start()
                task = self._task
            if task is None:
                return
        self._finishing = True
        if self._pcm:
            queue, self.queue = self.queue, AudioQueue(cushion=CUSHION_S)
            queue.close()
        else:
            self.collector.wake(self)
        try:
            await asyncio.wait([task])
        finally:
            self._finishing = False
            self._restart()

    def refuse(self, error: NlsError) -> None:
        """No more audio: drop what is queued, saying so."""
        if self.refused is None:
            self.refused = error
        dropped = self.queue.drop() + sum(map(len, self.chunks))
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
