"""Real-time pacing of audio frames: one clock per event loop serves every session.

Design (sized for thousands of concurrent sessions in one process):

* One :class:`Pacer` per event loop (:meth:`Pacer.for_loop`) with **one** periodic timer
  that wakes once per ``tick`` (default 20 ms, one 16 kHz frame period) while any stream
  is open. Each wake-up (:meth:`Pacer.run_due`) writes every frame due by then, for
  every session, synchronously. There is no sleeping task per session or per frame,
  and the number of wake-ups does not grow with the number of sessions (a timer per
  distinct due time would mean up to 50k wake-ups a second at 1,000 sessions whose
  phases differ).
* A stream's schedule starts at the next tick, so when its frame period is a multiple of
  the tick (16 kHz or 8 kHz at ``pace=1``) every frame falls on a tick and goes out on
  time, plus timer jitter. A frame is never sent before it is due (beyond ``tolerance``,
  default 0.5 ms, for timers that fire early), so with a period that is not a multiple
  (``pace=1.5``) frames go out up to one tick late: use a smaller ``tick`` for those.
* Each ``stream()`` call owns a :class:`PacedStream`: a bounded buffer (about one second
  of audio ahead) that the caller's task fills and the pacer drains. The producer is
  woken only once the buffer is half empty, so it runs about twice per second, not
  per frame.
* Scheduling is drift-free: frame *n* is due at ``t0 + bytes_before_n / (bytes_per_second
  * pace)``, so rounding and timer jitter never accumulate. A late frame is sent at once
  and counted, never dropped.
* A session whose socket is backed up (transport above its write high-water mark) is
  skipped for that tick and counted in :attr:`Metrics.stalled_ticks`; its frames wait
  and their lateness shows in its metrics. It cannot stall the others.

The clock is injectable: ``Pacer(clock=..., autorun=False)`` never touches a timer and is
driven by calling :meth:`Pacer.run_due` with a fake time, which is how pacing accuracy is
tested. The writing itself goes through a :class:`FrameSink`; :func:`send_binary_nowait`
is the cheap synchronous WebSocket write (:func:`client_frame` does the framing).
"""

from __future__ import annotations

import asyncio
import logging
import os
import struct
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar, Protocol

from websockets.protocol import State as WsState

try:  # websockets' C helper; its pure-Python fallback is far slower per frame
    from websockets.speedups import apply_mask
except ImportError:  # pragma: no cover - the wheel ships the extension
    from websockets.utils import apply_mask

if TYPE_CHECKING:
    from websockets.asyncio.connection import Connection

__all__ = [
    "LATE_THRESHOLD_MS",
    "FrameSink",
    "Metrics",
    "PacedStream",
    "Pacer",
    "client_frame",
    "send_binary_nowait",
    "ws_writable",
]

logger = logging.getLogger("nlsstream.pacing")

#: A frame written more than this late counts in :attr:`Metrics.late_frames`.
LATE_THRESHOLD_MS = 5.0
#: Lateness histogram: 1 ms buckets up to this bound, plus one overflow bucket.
_HIST_MS = 200
#: Default pacer tick: one 640-byte frame of 16 kHz PCM16.
DEFAULT_TICK_S = 0.02


# --------------------------------------------------------------------------- metrics


@dataclass(slots=True)  # compact and fast: the pacer updates it for every frame
class Metrics:
    """Per-session counters; cheap to update (O(1) per frame) and safe to read any time.

    ``bytes_sent`` / ``audio_ms_sent`` are the session's audio clock: how much audio the
    gateway has been given (by :meth:`stream` and :meth:`send_audio` alike). Lateness is
    measured only for paced frames: how long after its due time each frame was written.
    ``stalled_ticks`` counts pacer ticks at which this session had a frame due but its
    socket was backed up (a session that cannot keep up shows here and in its lateness).
    """

    sample_rate: int = 16000
    frames_sent: int = 0
    bytes_sent: int = 0
    late_frames: int = 0
    max_lateness_ms: float = 0.0
    stalled_ticks: int = 0
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

    @property
    def paced_frames(self) -> int:
        """Frames written by the pacer (the population of the lateness statistics)."""
        return self._paced_frames

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


_HEADER_640 = b"\x82\xfe\x02\x80"  # FIN + binary, masked, 16-bit length 640
_pack_header16 = struct.Struct("!BBH").pack
_pack_header64 = struct.Struct("!BBQ").pack


class _ClientFramer:
    """Frames client messages. Masking keys (RFC 6455 §5.3: fresh and unpredictable per
    frame) are drawn from ``os.urandom`` 1,024 at a time: one system call per 1,024
    frames instead of one per frame, with the same randomness as
    ``secrets.token_bytes(4)``. One method does it all: it runs once per paced frame."""

    __slots__ = ("_pool", "_pos")
    _SIZE = 4 * 1024

    def __init__(self) -> None:
        self._pool = b""
        self._pos = self._SIZE

    def frame(self, data: bytes) -> bytes:
        """``data`` as one masked binary WebSocket frame (client to server, no
        extensions): what ``websockets``' ``Frame.serialize`` produces, minus its
        generic machinery."""
        pos = self._pos
        if pos >= self._SIZE:
            self._pool = os.urandom(self._SIZE)
            pos = 0
        self._pos = pos + 4
        key = self._pool[pos : pos + 4]
        n = len(data)
        if n == 640:  # the paced frame size at 16 kHz: skip the header arithmetic
            header = _HEADER_640
        elif n < 126:
            header = bytes((0x82, 0x80 | n))
        elif n < 65536:
            header = _pack_header16(0x82, 0xFE, n)
        else:
            header = _pack_header64(0x82, 0xFF, n)
        return b"".join((header, key, apply_mask(data, key)))  # one copy, unlike a + b + c


#: ``client_frame(data)``: ``data`` as one masked binary WebSocket frame (client to
#: server, no extensions); see :meth:`_ClientFramer.frame`.
client_frame = _ClientFramer().frame


def ws_writable(conn: Connection) -> bool:
    """Whether one binary frame can be written on ``conn`` right now, synchronously.

    No when the connection is not OPEN (``send`` would raise ConnectionClosed), while
    another coroutine is sending a fragmented message (interleaving would corrupt it),
    while websockets itself has bytes not yet handed to the transport, and while the
    transport is paused above its write high-water mark (``send`` would wait in
    ``drain``): the pacer then retries at its next tick instead of growing the buffer
    without bound.
    """
    return (
        conn.protocol.state is WsState.OPEN
        and conn.send_in_progress is None
        and not conn.paused
        and not conn.protocol.writes
        and not conn.transport.is_closing()
    )


def send_binary_nowait(conn: Connection, data: bytes) -> bool:
    """Queue one binary WebSocket frame on ``conn`` without awaiting; ``False`` if this
    fast path cannot be used right now (see :func:`ws_writable`; the caller then waits,
    or awaits ``conn.send``).

    This is ``Connection.send(bytes)`` from websockets 17 minus its ``await drain()``.
    Without extensions (``compression=None``) the frame is built by
    :func:`client_frame` and written straight to the transport: websockets keeps no
    per-frame state on the sending side once the checks above pass, and ``send_binary``
    + ``send_data`` cost several times more Python per frame. With an extension
    negotiated, websockets frames it.
    """
    if not ws_writable(conn):
        return False
    if conn.protocol.extensions:
        conn.protocol.send_binary(data)
        conn.send_data()
    else:
        conn.transport.write(client_frame(data))
    return True


# --------------------------------------------------------------------------- pacer


class FrameSink(Protocol):
    """Where a paced stream writes its frames (a session)."""

    def frame_writable(self) -> bool:
        """Whether frames can be written now without growing a backed-up buffer; may
        raise to fail the stream (e.g. the session ended)."""
        ...

    def write_frame(self, frame: bytes) -> None:
        """Write one frame synchronously; raise to fail the stream."""
        ...


class PacedStream:
    """One paced flow of frames into a sink, fed by the caller and drained by the pacer.

    Memory bound: at most ``max_ahead_bytes`` plus one :meth:`put_many` batch are
    buffered; :meth:`put` and :meth:`put_many` wait for space beyond that.
    """

    __slots__ = (
        "__weakref__",
        "_bps",
        "_buf",
        "_buffered",
        "_closed",
        "_done",
        "_error",
        "_max_ahead",
        "_next_due",
        "_pacer",
        "_sent",
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
        self._buf: deque[bytes] = deque()
        self._buffered = 0
        self._sent = 0  # bytes written: the schedule position of the next frame
        self._t0 = 0.0
        self._next_due = float("inf")  # due time of the buffer's first frame
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

    async def _wait_for_space(self) -> None:
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

    def _append(self, frames: list[bytes] | tuple[bytes, ...]) -> None:
        buf = self._buf
        if not buf and self._next_due == float("inf"):
            if self._sent == 0:  # the first frame: the schedule starts at the next tick
                self._t0 = self._pacer._start_time(self)
            self._next_due = self._t0 + self._sent / self._bps
        buf.extend(frames)
        self._buffered += sum(map(len, frames))

    async def put(self, frame: bytes) -> None:
        """Schedule ``frame`` after the previous ones, waiting while the buffer is full."""
        await self._wait_for_space()
        self._append((frame,))

    async def put_many(self, frames: list[bytes]) -> None:
        """Schedule ``frames`` (in order) after the previous ones; waits, before adding
        them, while the buffer is full. One await per batch instead of one per frame."""
        if frames:
            await self._wait_for_space()
            self._append(frames)

    async def finish(self) -> None:
        """Mark the end of the stream and wait until its last frame has been written.

        Raises the error that failed the stream, if any.
        """
        self._closed = True
        self._check()
        if not self._buf:
            self._pacer._detach(self)
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
            self._pacer._detach(self)
            return
        self._error = error
        self._buf.clear()
        self._buffered = 0
        self._pacer._detach(self)
        for fut in (self._space, self._done):
            if fut is not None and not fut.done():
                fut.set_exception(error)
                # Consumers re-raise via _check(); don't let asyncio log it too.
                fut.exception()

    def _service(self, now: float, horizon: float) -> None:
        """Write every frame due by ``horizon``; lateness is measured against ``now``."""
        if self._next_due > horizon:
            return
        sink = self.sink
        metrics = self.metrics
        buf = self._buf
        sent = self._sent
        try:
            if not sink.frame_writable():
                metrics.stalled_ticks += 1
                return
            write = sink.write_frame
            due = self._next_due
            t0, bps = self._t0, self._bps
            while True:
                frame = buf.popleft()
                write(frame)
                sent += len(frame)
                lateness_ms = (now - due) * 1000.0
                if lateness_ms < 1.0:  # the common case, kept to two increments
                    metrics._paced_frames += 1
                    metrics._hist[0] += 1
                else:
                    metrics.record_lateness(lateness_ms)
                due = t0 + sent / bps
                if not buf or due > horizon:
                    break
                if not sink.frame_writable():  # backed up in the middle of a backlog
                    metrics.stalled_ticks += 1
                    break
        except BaseException as exc:  # the sink refused: fail this stream only
            self._sent = sent
            self.abort(exc)
            return
        self._buffered -= sent - self._sent
        self._sent = sent
        self._next_due = due if buf else float("inf")
        space = self._space
        # Hysteresis: wake the producer only once half the buffer is free, so it runs
        # about twice per second of buffer rather than once per frame.
        if space is not None and self._buffered <= self._max_ahead // 2 and not space.done():
            space.set_result(None)
        if not buf and self._closed:
            self._pacer._detach(self)
            if self._done is not None and not self._done.done():
                self._done.set_result(None)


class Pacer:
    """Writes due frames of every :class:`PacedStream` on one event loop, from one timer.

    ``clock`` is the monotonic time source (default: the loop's). With ``autorun=False``
    no timer is ever set and the owner calls :meth:`run_due` itself (tests, custom loops).
    ``tick`` is the timer period; each tick sends the frames due within ``tolerance``
    seconds after it (timers may fire up to the clock's resolution early).
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
        tick: float = DEFAULT_TICK_S,
        tolerance: float = 0.0005,
    ) -> None:
        if not tick > 0:
            raise ValueError(f"tick must be positive, got {tick!r}")
        self.loop = loop or asyncio.get_running_loop()
        self._loop_clock = clock is None
        self.clock: Callable[[], float] = clock or self.loop.time
        self.autorun = autorun
        self.tick = tick
        self.tolerance = tolerance
        # Open streams, in insertion order (a dict is an ordered set); a stream leaves
        # when it is finished or aborted.
        self._streams: dict[PacedStream, None] = {}
        self._timer: asyncio.TimerHandle | None = None
        self._next_tick = 0.0
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
        """Streams currently open on this pacer (with or without frames buffered)."""
        return len(self._streams)

    def _start_time(self, stream: PacedStream) -> float:
        """Register ``stream`` and return when its first frame is due: the next tick
        (or now, without a timer)."""
        self._streams[stream] = None
        if not self.autorun:
            return self.clock()
        if self._timer is None:
            self._next_tick = self.clock()
            self._arm()
        return self._next_tick

    def _detach(self, stream: PacedStream) -> None:
        self._streams.pop(stream, None)

    def _arm(self) -> None:
        when = self._next_tick
        loop_when = when if self._loop_clock else self.loop.time() + (when - self.clock())
        self._timer = self.loop.call_at(loop_when, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self.ticks += 1
        now = self.clock()
        try:
            self.run_due(now, early=self.tolerance)
        finally:
            if self._streams:
                # Stay on the grid t0 + k * tick (drift-free); if the loop was so busy
                # that ticks were missed, skip them rather than fire in a burst.
                nxt = self._next_tick + self.tick
                if nxt <= now:
                    nxt += (int((now - nxt) / self.tick) + 1) * self.tick
                self._next_tick = nxt
                self._arm()

    def run_due(self, now: float | None = None, *, early: float = 0.0) -> int:
        """Write every frame due at ``now`` (default: the clock) for every stream, and
        those due within ``early`` seconds after it.

        Returns how many streams are open. Streams whose sink is backed up are skipped
        until the next call; a failing sink fails only its own stream.
        """
        if now is None:
            now = self.clock()
        horizon = now + early
        # A copy: finishing or failing streams leave the dict while we iterate.
        for stream in list(self._streams):
            stream._service(now, horizon)
        return len(self._streams)
