"""Real-time pacing of audio frames: one clock per event loop serves every session.

Design (sized for thousands of concurrent sessions in one process):

* One :class:`Pacer` per event loop (:meth:`Pacer.for_loop`), holding a heap of
  ``(due_time, seq, stream)`` and at most **one** timer (``loop.call_at``) set for the
  earliest due frame. When it fires, :meth:`Pacer.run_due` writes every frame that is due,
  for every session, synchronously. There is no sleeping task per session or per frame.
* Each ``stream()`` call owns a :class:`PacedStream`: a small bounded buffer (about one
  second of audio ahead) that the caller's task fills and the pacer drains. Filling
  awaits space; :meth:`PacedStream.finish` resolves once the last frame is written.
* Scheduling is drift-free: frame *n* is due at ``t0 + bytes_before_n / (bytes_per_second
  * pace)``, measured from the first frame on a monotonic clock, so rounding and timer
  jitter never accumulate. A late frame is sent at once and counted, never dropped.
* A session whose transport is above its write high-water mark is skipped for that tick
  (its frames wait and its lateness shows in its metrics); it cannot stall the others.

The clock is injectable: ``Pacer(clock=..., autorun=False)`` never touches a timer and is
driven by calling :meth:`Pacer.run_due` with a fake time, which is how pacing accuracy is
tested. The writing itself goes through a :class:`FrameSink`; :func:`send_binary_nowait`
is the cheap synchronous WebSocket write that sessions use for it.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

from websockets.protocol import State as WsState

if TYPE_CHECKING:
    from websockets.asyncio.connection import Connection

__all__ = [
    "LATE_THRESHOLD_MS",
    "FrameSink",
    "Metrics",
    "PacedStream",
    "Pacer",
    "send_binary_nowait",
]

logger = logging.getLogger("nlsstream.pacing")

#: A frame written more than this late counts in :attr:`Metrics.late_frames`.
LATE_THRESHOLD_MS = 5.0
#: Lateness histogram: 1 ms buckets up to this bound, plus one overflow bucket.
_HIST_MS = 200
#: How long a session whose socket is backed up waits before the pacer looks again.
_BLOCKED_RETRY_S = 0.005


# --------------------------------------------------------------------------- metrics


@dataclass
class Metrics:
    """Per-session counters; cheap to update (O(1) per frame) and safe to read any time.

    ``bytes_sent`` / ``audio_ms_sent`` are the session's audio clock: how much audio the
    gateway has been given (by :meth:`stream` and :meth:`send_audio` alike). Lateness is
    measured only for paced frames: how long after its due time each frame was written.
    """

    sample_rate: int = 16000
    frames_sent: int = 0
    bytes_sent: int = 0
    late_frames: int = 0
    max_lateness_ms: float = 0.0
    #: From the first audio byte sent to the first recognition result (partial or final).
    time_to_first_partial_ms: float | None = None
    #: From sending Stop to receiving Completed.
    stop_to_completed_ms: float | None = None
    _hist: list[int] = field(default_factory=lambda: [0] * (_HIST_MS + 1), repr=False)
    _paced_frames: int = field(default=0, repr=False)

    @property
    def audio_ms_sent(self) -> float:
        """Milliseconds of audio sent so far (PCM16 mono at the session's rate)."""
        return self.bytes_sent * 1000.0 / (2 * self.sample_rate)

    def record_audio(self, nbytes: int) -> None:
        """Count one frame (or ``send_audio`` chunk) of ``nbytes`` handed to the socket."""
        self.frames_sent += 1
        self.bytes_sent += nbytes

    def record_lateness(self, lateness_ms: float) -> None:
        """Count how late one paced frame was written."""
        self._paced_frames += 1
        if lateness_ms > LATE_THRESHOLD_MS:
            self.late_frames += 1
        if lateness_ms > self.max_lateness_ms:
            self.max_lateness_ms = lateness_ms
        self._hist[min(int(lateness_ms), _HIST_MS)] += 1

    @property
    def p99_lateness_ms(self) -> float:
        """99th percentile of paced-frame lateness, to 1 ms resolution (upper bucket edge).

        Lateness beyond the histogram's range reports :attr:`max_lateness_ms`.
        """
        total = self._paced_frames
        if total == 0:
            return 0.0
        rank = total - total // 100  # frames at or below the p99 value
        seen = 0
        for ms, count in enumerate(self._hist):
            seen += count
            if seen >= rank:
                return (
                    self.max_lateness_ms
                    if ms == _HIST_MS
                    else min(float(ms + 1), self.max_lateness_ms)
                )
        return self.max_lateness_ms  # pragma: no cover - counts always reach rank


# --------------------------------------------------------------------------- the fast write


def send_binary_nowait(conn: Connection, data: bytes) -> bool:
    """Queue one binary WebSocket frame on ``conn`` without awaiting; ``False`` if this
    fast path cannot be used right now (the caller then waits, or awaits ``conn.send``).

    This is ``Connection.send(bytes)`` from websockets 17 minus its ``await drain()``:
    ``send_context()`` checks the state is OPEN, then ``protocol.send_binary`` frames and
    masks the data and ``send_data()`` hands it to the transport (``websockets.broadcast``
    does exactly the same). We refuse when the connection is not OPEN (``send`` would
    raise ConnectionClosed), while another coroutine is sending a fragmented message
    (interleaving would corrupt it), and while the transport is paused above its write
    high-water mark (``send`` would wait in ``drain``): the pacer then retries a little
    later instead of growing the buffer without bound.
    """
    if conn.protocol.state is not WsState.OPEN or conn.send_in_progress is not None:
        return False
    if conn.paused or conn.transport.is_closing():
        return False
    conn.protocol.send_binary(data)
    conn.send_data()
    return True


# --------------------------------------------------------------------------- pacer


class FrameSink(Protocol):
    """Where a paced stream writes its frames (a session)."""

    def frame_writable(self) -> bool:
        """Whether a frame can be written now without growing a backed-up buffer."""
        ...

    def write_frame(self, frame: bytes) -> None:
        """Write one frame synchronously; raise to fail the stream."""
        ...


class PacedStream:
    """One paced flow of frames into a sink, fed by the caller and drained by the pacer.

    Memory bound: at most ``max_ahead_bytes`` (plus one frame) are buffered; :meth:`put`
    waits for space beyond that.
    """

    __slots__ = (
        "_bps",
        "_buf",
        "_buffered",
        "_closed",
        "_done",
        "_error",
        "_in_heap",
        "_max_ahead",
        "_pacer",
        "_queued",
        "_space",
        "_t0",
        "metrics",
        "sink",
    )

    def __init__(
        self,
        pacer: Pacer,
        sink: FrameSink,
        bytes_per_second: float,
        metrics: Metrics,
        max_ahead_bytes: int,
    ) -> None:
        if bytes_per_second <= 0:
            raise ValueError(f"bytes_per_second must be positive, got {bytes_per_second}")
        self._pacer = pacer
        self.sink = sink
        self.metrics = metrics
        self._bps = bytes_per_second
        self._max_ahead = max(1, max_ahead_bytes)
        self._buf: deque[tuple[float, bytes]] = deque()
        self._buffered = 0
        self._queued = 0  # bytes ever put: the schedule position of the next frame
        self._t0: float | None = None
        self._in_heap = False
        self._closed = False
        self._error: BaseException | None = None
        self._space: asyncio.Future[None] | None = None
        self._done: asyncio.Future[None] | None = None

    @property
    def buffered_bytes(self) -> int:
        """Bytes waiting to be written."""
        return self._buffered

    @property
    def finished(self) -> bool:
        """True once every frame was written, or the stream failed or was aborted."""
        return self._error is not None or (self._closed and not self._buf)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    async def put(self, frame: bytes) -> None:
        """Schedule ``frame`` after the previous ones, waiting while the buffer is full."""
        self._check()
        if self._closed:
            raise RuntimeError("put() after finish()")
        while self._buffered >= self._max_ahead:
            self._space = self._pacer.loop.create_future()
            try:
                await self._space
            finally:
                self._space = None
            self._check()
        if self._t0 is None:
            self._t0 = self._pacer.clock()
        due = self._t0 + self._queued / self._bps
        self._queued += len(frame)
        self._buf.append((due, frame))
        self._buffered += len(frame)
        if not self._in_heap:
            self._pacer._schedule(self, due)

    async def finish(self) -> None:
        """Mark the end of the stream and wait until its last frame has been written.

        Raises the error that failed the stream, if any.
        """
        self._closed = True
        self._check()
        if not self._buf:
            return
        self._done = self._pacer.loop.create_future()
        try:
            await self._done
        finally:
            self._done = None
        self._check()

    def abort(self, error: BaseException) -> None:
        """Fail the stream: buffered frames are discarded and waiters raise ``error``.

        Used when the session ends (stop, failure, cancellation); the discarded audio is
        reported to the caller of ``stream()`` through ``error``, never silently.
        """
        if self.finished:
            return
        self._error = error
        self._buf.clear()
        self._buffered = 0
        self._wake()

    def _wake(self) -> None:
        for fut in (self._space, self._done):
            if fut is not None and not fut.done():
                if self._error is not None:
                    fut.set_exception(self._error)
                    # Consumers re-raise via _check(); don't let asyncio log it too.
                    fut.exception()
                else:
                    fut.set_result(None)

    def _service(self, now: float, horizon: float) -> float | None:
        """Write every frame due by ``horizon``; return when to look again (None: nothing
        left). Lateness is measured against ``now``."""
        buf = self._buf
        if self._error is not None:
            return None
        if not buf:
            return None
        if buf[0][0] > horizon:
            return buf[0][0]
        sink = self.sink
        if not sink.frame_writable():
            return now + _BLOCKED_RETRY_S
        metrics = self.metrics
        try:
            while buf and buf[0][0] <= horizon:
                due, frame = buf.popleft()
                self._buffered -= len(frame)
                sink.write_frame(frame)
                metrics.record_lateness(max(0.0, (now - due) * 1000.0))
                if buf and buf[0][0] <= horizon and not sink.frame_writable():
                    self._wake_space()
                    return now + _BLOCKED_RETRY_S
        except BaseException as exc:  # the sink refused: fail this stream only
            self.abort(exc)
            return None
        self._wake_space()
        if buf:
            return buf[0][0]
        if self._closed and self._done is not None and not self._done.done():
            self._done.set_result(None)
        return None

    def _wake_space(self) -> None:
        space = self._space
        # Hysteresis: wake the producer only once half the buffer is free, so it runs
        # once per ~half-second of audio rather than once per frame.
        if space is not None and not space.done() and self._buffered <= self._max_ahead // 2:
            space.set_result(None)


class Pacer:
    """Writes due frames of every :class:`PacedStream` on one event loop, from one timer.

    ``clock`` is the monotonic time source (default: the loop's). With ``autorun=False``
    no timer is ever set and the owner calls :meth:`run_due` itself (tests, custom loops).
    ``tolerance`` lets the timer send frames due within that many seconds, since timers
    may fire up to the loop's clock resolution early.
    """

    _per_loop: ClassVar[weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, Pacer]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop | None = None,
        *,
        clock: Callable[[], float] | None = None,
        autorun: bool = True,
        tolerance: float = 0.0005,
    ) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self._loop_clock = clock is None
        self.clock: Callable[[], float] = clock or self.loop.time
        self.autorun = autorun
        self.tolerance = tolerance
        self._heap: list[tuple[float, int, PacedStream]] = []
        self._seq = itertools.count()
        self._timer: asyncio.TimerHandle | None = None
        self._timer_when = float("inf")
        #: Timer wake-ups so far (one per tick, however many sessions it serves).
        self.ticks = 0

    @classmethod
    def for_loop(cls, loop: asyncio.AbstractEventLoop | None = None) -> Pacer:
        """The shared pacer of ``loop`` (default: the running loop), created on first use."""
        loop = loop or asyncio.get_running_loop()
        pacer = cls._per_loop.get(loop)
        if pacer is None:
            pacer = cls._per_loop[loop] = cls(loop)
        return pacer

    def open(
        self,
        sink: FrameSink,
        bytes_per_second: float,
        metrics: Metrics,
        *,
        max_ahead_bytes: int,
    ) -> PacedStream:
        """A new paced stream writing to ``sink`` at ``bytes_per_second``."""
        return PacedStream(self, sink, bytes_per_second, metrics, max_ahead_bytes)

    @property
    def pending(self) -> int:
        """Streams currently waiting in the schedule."""
        return len(self._heap)

    def _schedule(self, stream: PacedStream, when: float) -> None:
        stream._in_heap = True
        heapq.heappush(self._heap, (when, next(self._seq), stream))
        if self.autorun and when < self._timer_when:
            self._arm(when)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        loop_when = when if self._loop_clock else self.loop.time() + (when - self.clock())
        self._timer = self.loop.call_at(loop_when, self._on_timer)
        self._timer_when = when

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_when = float("inf")
        self.ticks += 1
        try:
            self.run_due(early=self.tolerance)
        finally:
            if self._heap and self.autorun:
                self._arm(self._heap[0][0])

    def run_due(self, now: float | None = None, *, early: float = 0.0) -> int:
        """Write every frame due at ``now`` (default: the clock) for every stream, and
        those due within ``early`` seconds after it.

        Returns how many streams were serviced. Streams whose sink is backed up are
        skipped and looked at again shortly; a failing sink fails only its own stream.
        """
        if now is None:
            now = self.clock()
        horizon = now + early
        heap = self._heap
        later: list[tuple[float, PacedStream]] = []
        served = 0
        while heap and heap[0][0] <= horizon:
            _, _, stream = heapq.heappop(heap)
            stream._in_heap = False
            served += 1
            nxt = stream._service(now, horizon)
            if nxt is not None:
                later.append((nxt, stream))
        for when, stream in later:
            if not stream._in_heap:
                stream._in_heap = True
                heapq.heappush(heap, (when, next(self._seq), stream))
        return served
