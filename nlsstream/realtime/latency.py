"""The latencies a voice bot is judged by, measured on the stream's own clock.

*Final latency* of a sentence: from the moment the audio at the sentence's end was
written to the socket to the moment its ``SentenceEnd`` arrived. *First-partial latency*:
from the moment the audio at the sentence's beginning was written to the moment the
sentence's first intermediate result arrived. Both need to know when a given byte of the
stream went out: :class:`SendLog` remembers that for the last writes (a ring, a few
seconds of audio at real time), which is all a latency needs, since the gateway answers
within seconds of the audio it recognises. :class:`LatencyHistogram` keeps the figures
in bounded memory for percentiles.
"""

from __future__ import annotations

from array import array
from bisect import bisect_left

__all__ = ["LatencyHistogram", "SendLog"]

#: Writes remembered (at real time one per 20 ms tick: about 10 s of audio).
SEND_LOG_SIZE = 512
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


class SendLog:
    """When recent audio went out: after each write, the stream offset it reached (PCM
    bytes) and the loop's time. Offsets only grow (the stream's clock)."""

    __slots__ = ("_count", "_ends", "_times")

    def __init__(self, size: int = SEND_LOG_SIZE) -> None:
        self._ends = array("q", bytes(8 * size))
        self._times = array("d", bytes(8 * size))
        self._count = 0  # writes recorded so far (the ring's next slot is count % size)

    def mark(self, end: int, when: float) -> None:
        """The stream reached offset ``end`` with a write at ``when``."""
        i = self._count % len(self._ends)
        self._ends[i] = end
        self._times[i] = when
        self._count += 1

    def sent_at(self, offset: int) -> float | None:
        """When the byte before stream offset ``offset`` went out (the first write that
        reached it); ``None`` if it did not yet, or too long ago to be remembered."""
        ends, count = self._ends, self._count
        size = len(ends)
        if count == 0:
            return None
        # A binary search of the ring in place (it runs once per sentence event, for
        # every session): its oldest writes are at [next slot, size), the newest at
        # [0, next slot); offsets grow across the two.
        if count <= size:
            k = bisect_left(ends, offset, 0, count)
            return self._times[k] if k < count else None
        oldest = count % size
        if oldest and offset > ends[size - 1]:  # in the newer part, or beyond it
            k = bisect_left(ends, offset, 0, oldest)
            return self._times[k] if k < oldest else None
        k = bisect_left(ends, offset, oldest, size)
        if k in (oldest, size):  # before the oldest write remembered, or not sent
            return None
        return self._times[k]


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
