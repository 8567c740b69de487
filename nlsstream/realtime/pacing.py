"""Real-time pacing of audio frames: one clock per event loop serves every session.

Design (sized for thousands of concurrent sessions in one process):

* One :class:`Pacer` per event loop (:meth:`Pacer.for_loop`) with **one** periodic timer
  that wakes once per ``tick`` (default 20 ms, one 16 kHz frame period) while any stream
  is open, on a fixed grid of ticks (``origin + k * tick``, the origin set when the
  pacer goes from idle to busy). Each wake-up (:meth:`Pacer.run_due`) writes every frame
  due by then, for every session, synchronously. There is no sleeping task per session
  or per frame, and the number of wake-ups does not grow with the number of sessions (a
  timer per distinct due time would mean up to 50k wake-ups a second at 1,000 sessions
  whose phases differ).
* **A stream's schedule starts when its audio does**: at the first tick after its first
  frame is ready (cut and encoded by the producer), not when the stream is opened.
  Nothing has been sent yet, so nothing is owed: if the loop is too busy to run that
  tick on time (a thousand ``stream()`` calls that start at once all frame their first
  batch of audio in the same loop iteration), the first frame waits for the next tick
  instead of going out late, and the schedule starts there. It waits once: if that
  tick is late too, the schedule starts at it, the first frame as late as that tick ran
  (under one tick, by construction). Either way nothing else is due yet, so a
  thundering herd of starts gives neither late first frames nor a catch-up burst.
* Frames fall on ticks: when a stream's frame period is a multiple of the tick (16 kHz
  or 8 kHz at ``pace=1``) every frame is due on a tick and goes out on time, plus timer
  jitter. A frame is never sent before it is due (beyond ``tolerance``, default 0.5 ms,
  for timers that fire early), so with a period that is not a multiple (``pace=1.5``)
  frames go out up to one tick late: use a smaller ``tick`` for those.
* Each ``stream()`` call owns a :class:`PacedStream`: a bounded buffer (about one second
  of audio ahead) that the caller's task fills and the pacer drains. The producer cuts
  and frames its audio in batches ahead of time (the sink's ``encode_frames``: for a
  connection, masking in one vectorised pass per batch) and is woken only once the
  buffer is half empty, so it runs about twice per second, not per frame.
* **Producers are woken a bounded number per tick.** Streams that start together (a
  thousand ``stream()`` calls in one loop iteration, a reconnect storm) drain their
  buffers in step: each would reach its low-water mark at the same tick, and all their
  producers would cut and frame their next batch (a 64 KiB slice of a whole source:
  2 s of audio) between the same two ticks, every two seconds, delaying the next tick
  by tens of milliseconds for every stream. So each tick wakes at most
  ``ceil(open streams / 12)`` producers (at least 8); the others wait, in order, for
  the next ticks, unless their buffer is down to half its low-water mark, or the tick
  runs a tick or more late (the loop is overloaded: waiting would risk an underrun),
  which wake them at once. A herd's wake-ups are thus spread over about 12 ticks, and as
  every stream refills the same amount of audio each time, they stay spread.
* Scheduling is drift-free: frame *k* is due at ``t0 + k * frame_bytes /
  bytes_per_second``, so rounding and timer jitter never accumulate. A frame the pacer
  itself could not send on time (its socket was backed up, the loop was too busy to
  tick) is sent at once and counted late, never dropped; a backlog goes out in one
  write, which brings the stream back onto its schedule.
* **Underruns restart the schedule.** A source that cannot keep up (a live source whose
  next chunk comes late, a producer starved of CPU) leaves the buffer empty when a frame
  is due. That frame did not exist at its tick, so the pacer does not try to catch up
  with the source: when the frame is ready, the schedule restarts as it started, at the
  first tick after it (counted in :attr:`Metrics.underruns`). The gap shows as a pause
  in the audio's arrival, not as a burst after it, nor as lateness of every frame that
  follows. A frame that arrives before the tick it is due on was no underrun: it keeps
  its place on the schedule. (Before, the frames of a late chunk were due in the past:
  they went out in one burst, and for a live source that never gets ahead again, every
  later chunk too, each frame counted late by the length of the gap.)
* Per frame, a tick does what it must and no more: take the next encoded frame and hand
  it to the transport's ``write``. Flow control is pushed, not polled: a session whose
  socket is backed up (transport above its write high-water mark) or whose connection
  is closing marks its stream :attr:`~PacedStream.held`, from the transport's own
  ``pause_writing()`` / ``resume_writing()``; a held stream is skipped and counted in
  :attr:`Metrics.stalled_ticks`, its frames wait and their lateness shows in its
  metrics. It cannot stall the others. (A stream held before its first frame went out
  starts, like any other, when that frame can go.)

The clock is injectable: ``Pacer(clock=..., autorun=False)`` never touches a timer and is
driven by calling :meth:`Pacer.run_due` with a fake time (each call is a tick; the grid
of ticks starts at the clock's time when the first stream registers while none is
open), which is how pacing accuracy is tested. The writing itself goes through a
:class:`FrameSink` (a session's :class:`~nlsstream.realtime.connection.Connection`, which also
sets :attr:`PacedStream.held`).
"""

from __future__ import annotations

import asyncio
import math
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import ClassVar, Protocol

from ..audio import FRAME_BYTES, Framer
from ..redaction import get_logger
from .latency import LatencyHistogram, SendLog, TickLog

__all__ = ["LATE_THRESHOLD_MS", "FrameSink", "Metrics", "PacedStream", "Pacer"]

logger = get_logger("nlsstream.realtime.pacing")

#: A frame written more than this late counts in :attr:`Metrics.late_frames`.
LATE_THRESHOLD_MS = 5.0
#: Lateness histogram: 1 ms buckets up to this bound, plus one overflow bucket.
_HIST_MS = 200
#: Default pacer tick: one 640-byte frame of 16 kHz PCM16.
DEFAULT_TICK_S = 0.02
#: Slack, in ticks, when a time is placed on the grid of ticks: float rounding must not
#: push a time computed to fall on a tick to the next one.
_GRID_EPS = 1e-6
#: Producer wake-ups are spread over ticks: at most ``ceil(open streams / this)`` per
#: tick (and at least :data:`_MIN_WAKES_PER_TICK`), so a herd of streams whose buffers
#: drain in step is woken over about this many ticks, not between two of them.
_WAKE_SPREAD_TICKS = 12
_MIN_WAKES_PER_TICK = 8


# --------------------------------------------------------------------------- metrics


@dataclass(slots=True)  # compact and fast: the pacer updates it for every frame
class Metrics:
    """Per-session counters; cheap to update (O(1) per frame) and safe to read any time.

    ``bytes_sent`` / ``audio_ms_sent`` are the session's audio clock: how much audio the
    gateway has been given (by :meth:`stream` and :meth:`send_audio` alike). Lateness is
    measured only for paced frames: how long after its due time each frame was written.
    ``stalled_ticks`` counts pacer ticks at which this session had a frame due but its
    socket was backed up (a session that cannot keep up shows here and in its lateness).
    ``underruns`` counts the times the source was late instead: the buffer was empty when
    a frame was due, and the schedule restarted once audio came (see :mod:`.pacing`).
    """

    sample_rate: int = 16000
    frames_sent: int = 0
    bytes_sent: int = 0
    late_frames: int = 0
    max_lateness_ms: float = 0.0
    stalled_ticks: int = 0
    underruns: int = 0
    #: From the first audio byte sent to the first recognition result (partial or final).
    time_to_first_partial_ms: float | None = None
    #: From sending Stop to receiving Completed.
    stop_to_completed_ms: float | None = None
    #: Times the session resumed on a new connection, and the audio it sent again then
    #: (not in ``bytes_sent``, which stays the stream's own clock).
    reconnects: int = 0
    replayed_bytes: int = 0
    #: Silence the session sent to keep the task alive while its source was quiet
    #: (counted in ``bytes_sent`` too: it is on the stream's timeline).
    keepalive_bytes: int = 0
    #: Per transcriber sentence: audio at its end written -> its SentenceEnd, and audio
    #: at its beginning written -> its first intermediate result (see
    #: :mod:`nlsstream.realtime.latency`); percentiles via :meth:`final_latency_ms` and
    #: :meth:`first_partial_latency_ms`.
    final_latency: LatencyHistogram = field(default_factory=LatencyHistogram, repr=False)
    first_partial_latency: LatencyHistogram = field(default_factory=LatencyHistogram, repr=False)
    #: When the recent audio went out (offset reached, loop time), for the latencies.
    send_log: SendLog = field(default_factory=SendLog, repr=False)
    _hist: list[int] = field(default_factory=lambda: [0] * (_HIST_MS + 1), repr=False)
    _paced_frames: int = field(default=0, repr=False)

    def final_latency_ms(self, percentile: float = 50) -> float | None:
        """A percentile of the final-sentence latency (ms; 1 ms resolution below 100 ms,
        10 ms above); ``None`` before the first sentence."""
        return self.final_latency.percentile(percentile)

    def first_partial_latency_ms(self, percentile: float = 50) -> float | None:
        """A percentile of the sentences' first-partial latency (ms, as
        :meth:`final_latency_ms`)."""
        return self.first_partial_latency.percentile(percentile)

    @property
    def audio_ms_sent(self) -> float:
        """Milliseconds of audio sent so far (PCM16 mono at the session's rate)."""
        return self.bytes_sent * 1000.0 / (2 * self.sample_rate)

    @property
    def paced_frames(self) -> int:
        """Frames written by the pacer (the population of the lateness statistics)."""
        return self._paced_frames

    def record_audio(self, nbytes: int, when: float | None = None) -> None:
        """Count one frame (or ``send_audio`` chunk) of ``nbytes`` handed to the socket;
        with ``when``, the loop time it was written, also log it in :attr:`send_log`."""
        if when is not None:
            self.send_log.mark(self.bytes_sent, when)
        self.frames_sent += 1
        self.bytes_sent += nbytes

    def record_lateness(self, lateness_ms: float) -> None:
        """Count how late one paced frame was written."""
        self._paced_frames += 1
        if lateness_ms >= 1.0:
            self._record_late(lateness_ms)

    def _record_late(self, lateness_ms: float) -> None:
        # Frames under 1 ms late are only counted (in _paced_frames): the first histogram
        # bucket is derived from it, which keeps the pacer's common case to one increment.
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
        seen = total - sum(self._hist)  # the frames under 1 ms late
        for ms, count in enumerate(self._hist):
            seen += count
            if seen >= rank:
                return (
                    self.max_lateness_ms
                    if ms == _HIST_MS
                    else min(float(ms + 1), self.max_lateness_ms)
                )
        return self.max_lateness_ms  # pragma: no cover - counts always reach rank


# --------------------------------------------------------------------------- pacer


class FrameSink(Protocol):
    """Where a paced stream writes its frames (a session's connection).

    Flow control is pushed, not polled, as in asyncio's ``pause_writing()``: a sink that
    cannot take frames for a while (its socket is backed up, its connection is closing)
    sets :attr:`PacedStream.held` until it can again; to stop for good the session calls
    :meth:`PacedStream.abort`.
    """

    #: Writes one or more encoded frames, concatenated (may raise to fail the stream).
    #: Read once, when the stream opens, so that a sink can hand out a transport's own
    #: ``write``.
    write_frames: Callable[[bytes], object]

    def encode_frames(self, pcm: bytes, frame_bytes: int) -> list[bytes]:
        """``pcm`` cut into ``frame_bytes`` frames (the last may be shorter), each in the
        form :attr:`write_frames` takes. Runs in the producer, ahead of time."""
        ...


class PacedStream:
    """One paced flow of audio into a sink, fed by the caller and drained by the pacer.

    :meth:`put` takes PCM of any length and cuts it into ``frame_bytes`` frames (the
    remainder waits for the next put, or :meth:`finish`, which sends it as a shorter last
    frame). Frame *k* is due at ``t0 + k * frame_bytes / bytes_per_second``; ``t0`` is
    the tick at which the first frame is written (the first one after it was ready,
    unless that ran late) and moves only after an underrun (see the module docstring).

    Memory bound: at most ``max_ahead_bytes`` plus one :meth:`put` are buffered;
    :meth:`put` waits for space beyond that.
    """

    __slots__ = (
        "__weakref__",
        "_buf",
        "_closed",
        "_done",
        "_encode",
        "_error",
        "_frame_bytes",
        "_framer",
        "_index",
        "_log",
        "_low_water",
        "_max_frames",
        "_next_due",
        "_pacer",
        "_period",
        "_restart",
        "_restart_waited",
        "_run_open",
        "_space",
        "_start",
        "_t0",
        "_tail",
        "_urgent",
        "_wake_queued",
        "_write",
        "held",
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
        frame_bytes: int = FRAME_BYTES,
    ) -> None:
        if bytes_per_second <= 0:
            raise ValueError(f"bytes_per_second must be positive, got {bytes_per_second}")
        self._pacer = pacer
        self.sink = sink
        self.metrics = metrics
        self._log = metrics.send_log
        # Whether this stream's on-schedule writes extend an open run of the send log
        # (nothing to log per frame); the log clears it when another entry starts.
        self._run_open = False
        self._write = sink.write_frames
        #: While true the pacer skips this stream: its frames wait (and count in
        #: :attr:`Metrics.stalled_ticks` at every tick one is due), then go out at once,
        #: late, when it is cleared. Set by the sink (flow control).
        self.held = False
        self._encode = sink.encode_frames
        self._framer = Framer(frame_bytes)
        self._frame_bytes = frame_bytes
        self._period = frame_bytes / bytes_per_second
        self._max_frames = max(1, max_ahead_bytes // frame_bytes)
        # Hysteresis: the producer is woken once half the buffer is free, so it runs
        # about twice per second of buffer rather than once per frame.
        self._low_water = self._max_frames // 2
        # Below this the producer is woken even past the pacer's wake-ups for the tick.
        self._urgent = self._low_water // 2
        self._wake_queued = False  # waiting in the pacer's queue of deferred wake-ups
        self._buf: deque[bytes] = deque()  # encoded frames
        self._index = 0  # frames written: frame _index is the next one due
        self._tail = 0  # PCM bytes of the short last frame, once finish() queued it
        self._t0 = 0.0
        self._next_due = float("inf")  # due time of the buffer's first frame
        # The index of the frame that (re)starts the schedule: the first frame, or the
        # first one after an underrun. When the tick that writes it is late, the
        # schedule moves to that tick instead of catching up (see _catch_up).
        self._restart = -1
        self._restart_waited = False  # that frame already waited for a later tick
        self._start: float | None = None  # when the first frame is (or was) due
        self._closed = False
        self._error: BaseException | None = None
        self._space: asyncio.Future[None] | None = None
        self._done: asyncio.Future[None] | None = None

    def retarget(self, sink: FrameSink) -> None:
        """Write to ``sink`` from now on (a session resumed on a new connection). The
        frames already encoded go there as they are: a client frame carries its own
        masking key, so it is valid on any connection without extensions."""
        self.sink = sink
        self._write = sink.write_frames
        self._encode = sink.encode_frames

    @property
    def buffered_bytes(self) -> int:
        """PCM bytes waiting to be written (including a partial frame not yet cut)."""
        queued = len(self._buf) * self._frame_bytes
        if self._tail and queued:  # the short last frame is queued until it is written
            queued -= self._frame_bytes - self._tail
        return queued + self._framer.buffered

    @property
    def start_time(self) -> float | None:
        """When the first frame is due (on the pacer's clock), once one was queued: the
        first tick after it was ready, or, once it was written, the tick that wrote it."""
        return self._start

    @property
    def finished(self) -> bool:
        """True once every frame was written, or the stream failed or was aborted."""
        return self._error is not None or (self._closed and not self._buf)

    def _check(self) -> None:
        if self._error is not None:
            raise self._error

    async def put(self, pcm: bytes | bytearray | memoryview) -> None:
        """Schedule ``pcm`` after what came before; waits, before adding it, while the
        buffer is full. One await per call, however many frames it holds."""
        self._check()
        if self._closed:
            raise RuntimeError("put() after finish()")
        while len(self._buf) >= self._max_frames:
            self._space = self._pacer.loop.create_future()
            try:
                await self._space
            finally:
                self._space = None
            self._check()
        self.put_nowait(pcm)

    def put_nowait(self, pcm: bytes | bytearray | memoryview) -> None:
        """Schedule ``pcm`` after what came before, now, even past the buffer's bound: for
        small pieces from a callback (a session's keepalive silence)."""
        self._check()
        if self._closed:
            raise RuntimeError("put() after finish()")
        block = self._framer.take(pcm)
        if block:
            self._append(self._encode(block, self._frame_bytes))

    def put_batched(self, pcm: bytes | bytearray | memoryview) -> None:
        """:meth:`put_nowait`, for a pacer tap (:meth:`Pacer.add_tap`): the frames are
        encoded once every tap of this tick has run, with all the others' frames in one
        vectorised pass (a live source gives a frame or two per tick: encoded alone,
        each would cost a pass of its own)."""
        self._check()
        if self._closed:
            raise RuntimeError("put() after finish()")
        block = self._framer.take(pcm)
        if block:
            self._pacer._batch.append((self, block))

    def _append(self, frames: list[bytes]) -> None:
        buf = self._buf
        if not buf:
            pacer = self._pacer
            index = self._index
            if self._start is None:
                # The first frame is ready now (framed and encoded): the schedule starts
                # at the next tick, not at one that was due before there was audio.
                due = self._start = self._t0 = pacer._register(self)
                self._restart, self._restart_waited = 0, False
            else:
                due = self._t0 + index * self._period
                if due <= pacer._ran_until:
                    # Underrun: a tick that was due to write this frame ran while the
                    # source had not delivered it. Restart the schedule at the first
                    # tick from now rather than burst to catch up with a late source.
                    due = pacer._tick_after(pacer.clock())
                    self._t0 = due - index * self._period
                    # As every due time (and the send log's runs) computes it: the
                    # tick's own value may differ in the last bit.
                    due = self._t0 + index * self._period
                    self._restart, self._restart_waited = index, False
                    self._log.close_run()  # the schedule moved
                    self.metrics.underruns += 1
            self._next_due = due
        buf.extend(frames)

    async def finish(self) -> None:
        """Queue the partial frame left over (if any), mark the end of the stream and
        wait until its last frame has been written.

        Raises the error that failed the stream, if any.
        """
        self._check()
        if not self._closed:
            tail = self._framer.flush()
            if tail:
                self._append(self._encode(tail, len(tail)))
                self._tail = len(tail)
            self._closed = True
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
        self._framer.flush()
        self._pacer._detach(self)
        for fut in (self._space, self._done):
            if fut is not None and not fut.done():
                fut.set_exception(error)
                # Consumers re-raise via _check(); don't let asyncio log it too.
                fut.exception()

    def run_due(self, now: float, horizon: float, before: float = float("-inf")) -> None:
        """Write what is due by ``horizon`` (the pacer's tick, ``now`` plus its tolerance);
        called by the :class:`Pacer` at each tick, with ``before`` the previous tick's
        horizon.

        At 1,000 sessions this runs 50,000 times a second, so the common case (one frame
        due, on time or in a tick that runs a little late) is inlined here and touches
        only the buffer, the metrics and the transport; backlogs and late (re)starts of
        the schedule go to :meth:`_catch_up`, the producer's wake-up and the end of the
        stream to :meth:`_drained`.
        """
        due = self._next_due
        if due > horizon:
            return
        if self.held:
            self.metrics.stalled_ticks += 1
            return
        index = self._index + 1
        next_due = self._t0 + index * self._period
        late = now - due
        if next_due <= horizon or (late >= 0.001 and self._index == self._restart):
            # More than one frame due, or a late frame that (re)starts the schedule.
            self._catch_up(now, horizon)
            return
        buf = self._buf
        try:
            self._write(buf.popleft())
        except BaseException as exc:  # the sink refused: fail this stream only
            self.abort(exc)
            return
        self._index = index
        self._next_due = next_due
        metrics = self.metrics
        metrics.frames_sent += 1
        start = metrics.bytes_sent
        metrics.bytes_sent = start + self._frame_bytes
        metrics._paced_frames += 1
        if late >= 0.001:  # a tick a little late (timers fire up to 1 ms late)
            metrics._record_late(late * 1000.0)
        if due <= before:
            # An earlier tick reached this frame and did not write it (the stream was
            # held, or its schedule started on a tick that had already run): its time
            # is not that tick's, so the send log gets the write itself.
            self._log.mark(start, now)
        elif not self._run_open:  # the first frame on schedule since the log's last entry
            self._open_run(start, index - 1)
        if len(buf) <= self._low_water:
            self._drained()

    def _catch_up(self, now: float, horizon: float) -> None:
        """Write a late frame, or a backlog of frames due (after a stall, or a loop too
        busy to tick on time) in **one** write: catching up then costs one system call
        per session, not one per frame, so a loop that fell behind recovers fast. A
        stream (re)starting its schedule has no backlog: it starts at this tick."""
        buf = self._buf
        metrics = self.metrics
        index = self._index
        due = self._next_due
        if index == self._restart:
            # The frame that (re)starts the schedule, and this tick runs late (the loop
            # was busy, e.g. with a herd of producers framing their first audio), or
            # after ticks it missed (the stream was held). Nothing of this run went out
            # yet, so nothing is owed: the schedule starts at the next tick, which
            # should be on time, or, if this frame already waited for one, at this
            # tick (as late as the tick, under one tick). Nothing after it is due yet:
            # no burst.
            pacer = self._pacer
            due = max(due, pacer._tick_before(horizon))
            if now - due >= 0.001 and not self._restart_waited:
                due += pacer.tick
                self._restart_waited = True
            self._t0 = due - index * self._period
            due = self._t0 + index * self._period  # as in _append
            self._log.close_run()  # the schedule moved
            if index == 0:
                self._start = due
            if due > horizon:
                self._next_due = due
                return
        t0, period = self._t0, self._period
        frames: list[bytes] = []
        while buf and due <= horizon:
            frames.append(buf.popleft())
            lateness_ms = (now - due) * 1000.0
            if lateness_ms >= 1.0:
                metrics._record_late(lateness_ms)
            index += 1
            due = t0 + index * period
        try:
            self._write(frames[0] if len(frames) == 1 else b"".join(frames))
        except BaseException as exc:  # the sink refused: fail this stream only
            self.abort(exc)
            return
        self._index = index
        self._next_due = due
        self._log.mark(metrics.bytes_sent, now)
        metrics.frames_sent += len(frames)
        metrics.bytes_sent += len(frames) * self._frame_bytes
        metrics._paced_frames += len(frames)
        if len(buf) <= self._low_water:
            self._drained()

    def _open_run(self, start: int, index: int) -> None:
        """Frame ``index``, at stream offset ``start``, went out on schedule after an
        entry of the send log: from it on, frames on schedule extend one run."""
        self._run_open = True
        # Weakly: a finished session's metrics (and log) must not keep its stream, and
        # through it the connection, alive.
        on_close = weakref.WeakMethod(self._end_run)
        self._log.open_run(
            start, index, self._t0, self._period, self._frame_bytes, self._pacer.tick_log, on_close
        )

    def _end_run(self) -> None:
        self._run_open = False

    def _drained(self) -> None:
        """The buffer is at or below its low-water mark after a write: wake the producer
        (if the pacer's wake-ups for this tick are used up, at a later tick, unless the
        buffer is nearly empty); if it is empty, wait for more (or end the stream after
        its last frame)."""
        buf = self._buf
        if not buf:
            self._next_due = float("inf")
            if self._closed:
                if self._tail:  # the last frame was the short one
                    self.metrics.bytes_sent -= self._frame_bytes - self._tail
                self._pacer._detach(self)
                if self._done is not None and not self._done.done():
                    self._done.set_result(None)
        space = self._space
        if space is not None and not space.done():
            pacer = self._pacer
            if pacer._wakes_left > 0 or len(buf) <= self._urgent:
                pacer._wakes_left -= 1
                space.set_result(None)
            elif not self._wake_queued:
                self._wake_queued = True
                pacer._deferred.append(self)

    def _wake(self) -> None:
        """The pacer's deferred wake-up: wake the producer if it still waits."""
        self._wake_queued = False
        space = self._space
        if space is not None and not space.done():
            space.set_result(None)


class Pacer:
    """Writes due frames of every :class:`PacedStream` on one event loop, from one timer.

    ``clock`` is the monotonic time source (default: the loop's). With ``autorun=False``
    no timer is ever set and the owner calls :meth:`run_due` itself (tests, custom loops).
    ``tick`` is the timer period; each tick sends the frames due within ``tolerance``
    seconds after it (timers may fire up to the clock's resolution early). Ticks are
    due at ``origin + k * tick``; the origin is the clock's time when a stream registers
    while none is open (and, with the timer, none is armed).
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
        self._origin = 0.0  # the grid of ticks: origin + k * tick
        self._tick_index = 0  # k of the tick the timer is armed for
        #: The horizon of the latest run_due: frames due by then that were not in their
        #: stream's buffer missed their tick (an underrun).
        self._ran_until = float("-inf")
        #: When recent ticks ran, for the sessions' send logs (frames written on their
        #: schedule log nothing of their own: see :class:`~.latency.SendLog`).
        self.tick_log = TickLog()
        #: Timer wake-ups so far (one per tick, however many sessions it serves).
        self.ticks = 0
        # Producer wake-ups: how many this tick may still do, and the streams whose
        # producers wait for a later tick (see PacedStream._drained), in order.
        self._wakes_left = 0
        self._deferred: deque[PacedStream] = deque()
        #: Producer wake-ups deferred to a later tick so far (a herd spread over ticks).
        self.deferred_wakes = 0
        # Called first at every tick (with the tick's time): streams that take their
        # audio from a queue at the tick rather than from a producer task.
        self._taps: dict[Callable[[float], None], None] = {}
        # What the taps put this tick, encoded together once they have all run.
        self._batch: list[tuple[PacedStream, bytes]] = []

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
        frame_bytes: int = FRAME_BYTES,
    ) -> PacedStream:
        """A new paced stream of ``frame_bytes`` frames to ``sink`` at ``bytes_per_second``."""
        return PacedStream(self, sink, bytes_per_second, metrics, max_ahead_bytes, frame_bytes)

    @property
    def pending(self) -> int:
        """Streams currently open on this pacer (with or without frames buffered)."""
        return len(self._streams)

    def _register(self, stream: PacedStream) -> float:
        """Register ``stream``, whose first frame is ready now, and return when that
        frame is due: the first tick from now (now, if the pacer was idle)."""
        now = self._busy()
        self._streams[stream] = None
        return self._tick_after(now)

    def _busy(self) -> float:
        """The clock's time; if the pacer was idle, a new grid of ticks starts now."""
        now = self.clock()
        idle = self._timer is None if self.autorun else not (self._streams or self._taps)
        if idle:  # a new grid of ticks, its first tick now
            self._origin = now
            self._tick_index = 0
            if self.autorun:
                self._arm()
        return now

    def add_tap(self, tap: Callable[[float], None]) -> None:
        """Call ``tap(now)`` at the start of every tick until :meth:`remove_tap` (ticking
        meanwhile, even with no stream open). It must not raise: it runs in the tick
        that serves every session."""
        self._busy()
        self._taps[tap] = None

    def remove_tap(self, tap: Callable[[float], None]) -> None:
        self._taps.pop(tap, None)

    def _tick_after(self, when: float) -> float:
        """The first tick at or after ``when``."""
        k = math.ceil((when - self._origin) / self.tick - _GRID_EPS)
        return self._origin + k * self.tick

    def _tick_before(self, when: float) -> float:
        """The last tick at or before ``when``."""
        k = math.floor((when - self._origin) / self.tick + _GRID_EPS)
        return self._origin + k * self.tick

    def _encode_batch(self) -> None:
        """Encode the frames the taps put this tick (:meth:`PacedStream.put_batched`):
        one pass per encoder and frame size, instead of one per stream."""
        batch, self._batch = self._batch, []
        groups: dict[
            tuple[Callable[[bytes, int], list[bytes]], int], list[tuple[PacedStream, bytes]]
        ] = {}
        for stream, block in batch:
            groups.setdefault((stream._encode, stream._frame_bytes), []).append((stream, block))
        for (encode, size), puts in groups.items():
            frames = encode(b"".join(block for _, block in puts), size)
            i = 0
            for stream, block in puts:
                n = len(block) // size
                if not stream.finished:
                    stream._append(frames[i : i + n])
                i += n

    def _detach(self, stream: PacedStream) -> None:
        self._streams.pop(stream, None)

    def _arm(self) -> None:
        when = self._origin + self._tick_index * self.tick
        loop_when = when if self._loop_clock else self.loop.time() + (when - self.clock())
        self._timer = self.loop.call_at(loop_when, self._on_timer)

    def _on_timer(self) -> None:
        # self._timer stays set while the tick runs: a stream that a tap registers now
        # must find the pacer busy (not start a new grid and a second timer).
        self.ticks += 1
        now = self.clock()
        try:
            self.run_due(now, early=self.tolerance)
        finally:
            if self._streams or self._taps:
                # Stay on the grid origin + k * tick (drift-free); if the loop was so
                # busy that ticks were missed, skip them rather than fire in a burst.
                k = self._tick_index + 1
                if self._origin + k * self.tick <= now:
                    k = math.floor((now - self._origin) / self.tick + _GRID_EPS) + 1
                self._tick_index = k
                self._arm()
            else:
                self._timer = None

    def run_due(self, now: float | None = None, *, early: float = 0.0) -> int:
        """Write every frame due at ``now`` (default: the clock) for every stream, and
        those due within ``early`` seconds after it.

        Returns how many streams are open. Streams whose sink is backed up are skipped
        until the next call; a failing sink fails only its own stream.
        """
        if now is None:
            now = self.clock()
        horizon = now + early
        streams = self._streams
        wakes = max(_MIN_WAKES_PER_TICK, -(-len(streams) // _WAKE_SPREAD_TICKS))
        deferred = self._deferred
        if now + early - self._ran_until >= 2 * self.tick - _GRID_EPS:
            # A tick or more was missed since the last run: the loop is overloaded and
            # frames go out in catch-up batches, so a producer left waiting could
            # underrun. Wake every one whose buffer is low, as if there were no bound.
            wakes = len(streams) + len(deferred)
        if self._taps:
            # Before _ran_until moves: audio a tap queues now for a frame due at this
            # tick is on time, not an underrun.
            for tap in list(self._taps):
                tap(now)
            self._encode_batch()
        # The previous tick's horizon: a frame due by then and written now missed its
        # first tick (PacedStream.run_due).
        before, self._ran_until = self._ran_until, horizon
        self.tick_log.record(horizon, now)
        while deferred and wakes > 0:  # those that waited first
            deferred.popleft()._wake()
            wakes -= 1
        self._wakes_left = wakes
        queued = len(deferred)
        # A copy of the streams: ending ones leave the dict meanwhile.
        for stream in list(streams):
            stream.run_due(now, horizon, before)
        self.deferred_wakes += len(deferred) - queued
        return len(streams)
