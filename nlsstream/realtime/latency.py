"""The latencies a voice bot is judged by, measured on the stream's own clock.

*Final latency* of a sentence: from the moment the audio at the sentence's end was
written to the socket to the moment its ``SentenceEnd`` arrived. *First-partial latency*:
from the moment the audio at the sentence's beginning was written to the moment the
sentence's first intermediate result arrived. Both need to know when a given byte of the
stream went out: :class:`SendLog` remembers that for the recent audio (a ring of writes
and of runs of on-schedule writes: at least seconds of audio), which is all a latency
needs, since the gateway answers within seconds of the audio it recognises.
:class:`LatencyHistogram` keeps the figures in bounded memory for percentiles.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable

__all__ = ["LatencyHistogram", "SendLog", "TickLog"]

#: Entries remembered: one per write that leaves a paced stream's schedule, one per run
#: of writes on it (at least 256 writes, about 5 s of audio at real time, even when
#: every write leaves the schedule; usually all of the tick log's 20 s).
SEND_LOG_SIZE = 256
#: Pacer ticks remembered: 20 s at the default 20 ms tick.
TICK_LOG_SIZE = 1024
#: Histogram buckets: 1 ms wide up to 100 ms (loopback and LAN latencies), then 10 ms
#: wide up to 10 s; later figures share the last bucket.
_FINE_MS = 100
_COARSE_MS = 10
_BUCKETS = _FINE_MS + (10_000 - _FINE_MS) // _COARSE_MS


def _bucket(ms: float) -> int:
    whole = max(int(ms), 0)
    if whole < _FINE_MS:
        return whole
    return min(_FINE_MS + (whole - _FINE_MS) // _COARSE_MS, _BUCKETS - 1)


def _upper_edge(bucket: int) -> float:
    if bucket < _FINE_MS:
        return float(bucket + 1)
    return float(_FINE_MS + (bucket - _FINE_MS + 1) * _COARSE_MS)


def _last_at_or_before(keys: array[int], count: int, key: int) -> int | None:
    """The slot of the last entry of a ring whose key is <= ``key``; ``None`` if that is
    before the oldest remembered. ``count`` entries were written in turn (the next slot is
    ``count % len(keys)``) with keys that only grow: the ring is searched in place, its
    oldest entries at [next slot, size), the newest at [0, next slot)."""
    size = len(keys)
    lo, hi = 0, min(count, size)
    oldest = count % size
    if count > size and oldest:
        lo, hi = (0, oldest) if key >= keys[0] else (oldest, size)
    k = bisect_right(keys, key, lo, hi) - 1
    return k if k >= lo else None


def _first_at_or_after(keys: array[float], count: int, key: float) -> int | None:
    """The slot of the first entry of a ring (as above) whose key is >= ``key``; ``None``
    if none is, or if it is the oldest remembered after the ring wrapped (an entry that
    came before it, and was forgotten, may be the first)."""
    size = len(keys)
    lo, hi = 0, min(count, size)
    oldest = count % size
    if count > size:
        lo, hi = oldest, size
        if oldest and key > keys[size - 1]:
            lo, hi = 0, oldest
    k = bisect_left(keys, key, lo, hi)
    if k == hi or (count > size and k == oldest):
        return None
    return k


class TickLog:
    """When the pacer's recent ticks ran: each tick's horizon (it wrote every frame due by
    then) and its time. A frame written on its stream's schedule went out at the first
    tick whose horizon reached its due time, so a run of such frames (see
    :class:`SendLog`) needs no record of its own: the pacer records one entry per tick
    for every stream on its loop."""

    __slots__ = ("_count", "_horizons", "_times")

    def __init__(self, size: int = TICK_LOG_SIZE) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self._horizons = array("d", bytes(8 * size))
        self._times = array("d", bytes(8 * size))
        self._count = 0

    def record(self, horizon: float, when: float) -> None:
        """A tick ran at ``when`` and wrote what was due by ``horizon``."""
        size = len(self._horizons)
        i = self._count % size
        if self._count:  # kept non-decreasing for the search: a run_due called by hand
            # between ticks may have a lower horizon; what it covered, an earlier one did
            horizon = max(horizon, self._horizons[(self._count - 1) % size])
        self._horizons[i] = horizon
        self._times[i] = when
        self._count += 1

    def time_of(self, due: float) -> float | None:
        """When the first tick that reached ``due`` ran; ``None`` if none did yet, or it
        is no longer remembered."""
        k = _first_at_or_after(self._horizons, self._count, due)
        return None if k is None else self._times[k]


class SendLog:
    """When recent audio went out, by stream offset (PCM bytes; offsets only grow).

    Each entry starts at an offset, and lasts until the next one starts (the newest,
    until the stream's ``written`` offset): a single write at a time (:meth:`mark`), or a
    *run* (:meth:`open_run`) of frames written on a paced stream's schedule, each at the
    first pacer tick that reached its due time (from the pacer's :class:`TickLog`). A
    run costs its writer nothing per frame: a tick writing a thousand sessions' frames
    logs only the frames that leave their schedule (a catch-up batch, a frame that
    missed its tick, a restart after an underrun).
    """

    __slots__ = (
        "_count",
        "_indexes",
        "_on_close",
        "_periods",
        "_sizes",
        "_starts",
        "_ticks",
        "_times",
    )

    def __init__(self, size: int = SEND_LOG_SIZE) -> None:
        if size < 1:
            raise ValueError(f"size must be at least 1, got {size}")
        self._starts = array("q", bytes(8 * size))
        # A single write: its time, period 0. A run: its schedule's origin t0 and period,
        # its frames' size and the index of its first frame on that schedule (frame k
        # is due at t0 + k * period, computed as the pacer computes it).
        self._times = array("d", bytes(8 * size))
        self._periods = array("d", bytes(8 * size))
        self._sizes = array("q", bytes(8 * size))
        self._indexes = array("q", bytes(8 * size))
        self._count = 0
        self._ticks: TickLog | None = None  # the pacer's, for the runs
        # Called when the open run ends (another entry starts): its writer's cue to open
        # a new one for its next frame on schedule. A weak reference (the writer may be
        # gone): it gives the callable, or None.
        self._on_close: Callable[[], Callable[[], None] | None] | None = None

    @property
    def entries(self) -> int:
        """Entries recorded (single writes and runs), remembered or not, since the log
        began, or began afresh for another loop's pacer."""
        return self._count

    def mark(self, start: int, when: float) -> None:
        """A write starting at stream offset ``start`` went out at ``when``."""
        self._add(start, when, 0.0, 0, 0)

    def open_run(
        self,
        start: int,
        index: int,
        t0: float,
        period: float,
        size: int,
        ticks: TickLog,
        on_close: Callable[[], Callable[[], None] | None],
    ) -> None:
        """From offset ``start``: frames of ``size`` bytes, the first being frame
        ``index`` of the schedule ``t0 + k * period``, each written at the first tick of
        ``ticks`` that reached its due time; until another entry starts. ``on_close`` is a
        weak reference (``weakref.WeakMethod``) to what to call then."""
        if ticks is not self._ticks:
            if self._ticks is not None:  # runs from another loop's pacer: start afresh
                self._count = 0
            self._ticks = ticks
        self._add(start, t0, period, size, index)
        self._on_close = on_close

    def close_run(self) -> None:
        """End the open run, if any (its writer left its schedule)."""
        ref, self._on_close = self._on_close, None
        on_close = ref() if ref is not None else None
        if on_close is not None:
            on_close()

    def _add(self, start: int, when: float, period: float, size: int, index: int) -> None:
        self.close_run()
        i = self._count % len(self._starts)
        self._starts[i] = start
        self._times[i] = when
        self._periods[i] = period
        self._sizes[i] = size
        self._indexes[i] = index
        self._count += 1

    def sent_at(self, offset: int, written: int) -> float | None:
        """When the byte before stream offset ``offset`` went out, given that the stream
        has written ``written`` bytes; ``None`` if it was not written yet, or too long
        ago to be remembered."""
        if offset > written:
            return None
        byte = max(offset, 1) - 1
        k = _last_at_or_before(self._starts, self._count, byte)
        if k is None:
            return None
        period = self._periods[k]
        if not period:
            return self._times[k]
        ticks = self._ticks
        if ticks is None:  # pragma: no cover - a run is only opened with a tick log
            return None
        frame = self._indexes[k] + (byte - self._starts[k]) // self._sizes[k]
        return ticks.time_of(self._times[k] + frame * period)


class LatencyHistogram:
    """Latencies in ms, in bounded memory (1 ms buckets to 100 ms, 10 ms ones to 10 s)."""

    __slots__ = ("_buckets", "count", "max_ms")

    def __init__(self) -> None:
        self._buckets: list[int] | None = None  # allocated by the first figure
        self.count = 0
        self.max_ms = 0.0

    def record(self, ms: float) -> None:
        if self._buckets is None:
            self._buckets = [0] * _BUCKETS
        self._buckets[_bucket(ms)] += 1
        self.count += 1
        self.max_ms = max(self.max_ms, ms)

    def percentile(self, q: float) -> float | None:
        """The ``q``-th percentile (0 < q <= 100): the upper edge of its bucket (1 ms
        resolution below 100 ms, 10 ms above), at most the largest figure; ``None`` before
        the first figure."""
        if not 0 < q <= 100:
            raise ValueError(f"percentile must be in (0, 100], got {q!r}")
        if self._buckets is None:
            return None
        rank = max(1, -(-self.count * q // 100))  # ceil: figures at or below the result
        seen = 0
        for i, n in enumerate(self._buckets):
            seen += n
            if seen >= rank:
                return self.max_ms if i == _BUCKETS - 1 else min(_upper_edge(i), self.max_ms)
        return self.max_ms  # pragma: no cover - counts always reach rank
