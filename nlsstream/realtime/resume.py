"""What a session needs to survive a dropped connection: the policy, the audio to replay
and the re-basing of the new task's events onto the timeline of the whole stream.

When the connection drops, or the gateway fails the task with a retryable status
(5xxxxxxx, throttling), a session with a :class:`Reconnect` policy connects again, starts
a new task with the same parameters and replays the audio sent since the end of the last
final sentence. The gateway recognises that audio afresh, so the new task's first
sentence is the one that was in progress; :class:`Timeline` shifts its index and times by
what came before, so the user sees one stream: indices without a gap or a repeat, times
from the start of the whole stream.

:class:`ReplayBuffer` holds that audio, bounded: it keeps the PCM from the end of the last
final sentence on, and past its bound drops the oldest, which is harmless while no
sentence has begun there (silence) and makes a resume impossible once one has.
"""

from __future__ import annotations

import dataclasses
import random
from collections import deque
from dataclasses import dataclass

from .protocol import Event, ResultChanged, SentenceBegin, SentenceEnd, Word

__all__ = ["Reconnect", "ReplayBuffer", "Timeline"]


@dataclass(frozen=True)
class Reconnect:
    """How a session resumes after a dropped connection or a retryable failure.

    Attributes:
        attempts: connections tried before giving up (the original error is then raised).
        backoff: seconds before the first attempt; doubled for each next one, up to
            ``max_backoff``, each with up to 50 % random jitter (so that many sessions
            cut off at once do not all come back at the same instant).
        max_backoff: the longest wait between attempts.
        replay_seconds: the bound of the replay buffer, in seconds of audio (a
            :class:`~nlsstream.Recognizer` always keeps its whole 60 s).
    """

    attempts: int = 5
    backoff: float = 0.2
    max_backoff: float = 5.0
    replay_seconds: float = 30.0

    def __post_init__(self) -> None:
        if self.attempts < 1:
            raise ValueError(f"Reconnect.attempts must be at least 1, got {self.attempts}")
        if self.backoff < 0 or self.max_backoff < self.backoff:
            raise ValueError("Reconnect needs 0 <= backoff <= max_backoff")
        if not self.replay_seconds > 0:
            raise ValueError(
                f"Reconnect.replay_seconds must be positive, got {self.replay_seconds}"
            )

    def delay(self, attempt: int) -> float:
        """Seconds to wait before attempt ``attempt`` (1-based), jittered."""
        base = min(self.max_backoff, self.backoff * 2.0 ** (attempt - 1))
        return base * (0.5 + random.random() / 2)


class ReplayBuffer:
    """The PCM a session handed to the gateway from the end of the last final sentence
    on (offsets are byte positions in the whole stream), at most ``limit`` bytes."""

    __slots__ = ("_chunks", "_mark", "_start", "end", "limit")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._chunks: deque[bytes] = deque()
        self._start = 0  # stream offset of the first byte kept
        self._mark = 0  # where a replay begins: the end of the last final sentence
        #: Stream offset after the last byte added.
        self.end = 0

    def add(self, pcm: bytes) -> None:
        """Keep ``pcm`` (the next audio of the stream); drops whole old chunks past the
        bound."""
        self._chunks.append(pcm)
        self.end += len(pcm)
        chunks = self._chunks
        while len(chunks) > 1 and self.end - self._start - len(chunks[0]) >= self.limit:
            self._start += len(chunks.popleft())

    def trim(self, offset: int) -> None:
        """A final sentence ended at ``offset``: the audio before it is never replayed."""
        if offset <= self._mark:
            return
        self._mark = min(offset, self.end)
        chunks = self._chunks
        while chunks and self._start + len(chunks[0]) <= self._mark:
            self._start += len(chunks.popleft())

    @property
    def mark(self) -> int:
        """Where a replay begins (stream offset)."""
        return self._mark

    def replay(self, upto: int, open_since: int | None) -> bytes | None:
        """The audio from :meth:`replay_start` to stream offset ``upto``; ``None`` when
        the bound dropped audio of the sentence in progress (which began at stream offset
        ``open_since``; ``None`` if no sentence is open, so that only silence was lost)."""
        start = self.replay_start()
        if start > self._mark and open_since is not None and open_since < start:
            return None
        data = b"".join(self._chunks)
        return data[start - self._start : upto - self._start]

    def replay_start(self) -> int:
        """The stream offset a replay starts from."""
        return max(self._mark, self._start)


class Timeline:
    """Re-bases the events of a resumed task onto the whole stream: ``offset_ms`` is
    where the new task's audio began, ``index_offset`` how many sentences came before.

    Also remembers what was delivered, so that a sentence is never delivered twice.
    """

    __slots__ = ("_begun", "_ended", "bytes_per_ms", "index_offset", "offset_ms", "open_since")

    def __init__(self, sample_rate: int) -> None:
        self.bytes_per_ms = 2 * sample_rate // 1000
        self.offset_ms = 0
        self.index_offset = 0
        self._begun = 0  # the highest sentence index whose SentenceBegin was delivered
        self._ended = 0  # the highest sentence index whose SentenceEnd was delivered
        #: Stream offset (bytes) of the open sentence's start, if one has begun.
        self.open_since: int | None = None

    def resume_at(self, offset_bytes: int) -> None:
        """A new task starts with the audio from ``offset_bytes`` of the stream."""
        self.offset_ms = offset_bytes // self.bytes_per_ms
        self.index_offset = self._ended

    def rebase(self, event: Event) -> Event | None:
        """``event`` on the stream's timeline, or ``None`` if it was already delivered."""
        shift, step = self.offset_ms, self.index_offset
        if isinstance(event, SentenceBegin):
            index = event.index + step
            if index <= self._begun:
                return None  # the resumed task begins again the sentence that was open
            self._begun = index
            time = event.time + shift
            self.open_since = time * self.bytes_per_ms
            if shift or step:
                event = dataclasses.replace(event, index=index, time=time)
            return event
        if isinstance(event, SentenceEnd):
            index = event.index + step
            if index <= self._ended:
                return None
            self._ended = self._begun = max(self._begun, index)
            self.open_since = None
            if shift or step:
                event = dataclasses.replace(
                    event,
                    index=index,
                    time=event.time + shift,
                    begin_time=event.begin_time + shift,
                    words=_shift_words(event.words, shift),
                )
            return event
        if isinstance(event, ResultChanged) and (shift or step) and event.index is not None:
            return dataclasses.replace(
                event,
                index=event.index + step,
                time=None if event.time is None else event.time + shift,
                words=_shift_words(event.words, shift),
            )
        return event

    def sentence_end_bytes(self, event: SentenceEnd) -> int:
        """Where ``event`` (already re-based) ended, as a stream offset."""
        return event.time * self.bytes_per_ms


def _shift_words(words: tuple[Word, ...], shift: int) -> tuple[Word, ...]:
    if not shift or not words:
        return words
    return tuple(Word(w.text, w.start_time + shift, w.end_time + shift) for w in words)
