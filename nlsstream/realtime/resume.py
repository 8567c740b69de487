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

import asyncio
import dataclasses
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import (
    AuthenticationError,
    GatewayConnectionError,
    NlsError,
    TaskFailedError,
    is_server_side,
    with_note,
)
from ..redaction import get_logger
from ..retry import backoff
from .protocol import Event, ResultChanged, Resumed, SentenceBegin, SentenceEnd, Word

if TYPE_CHECKING:
    from .taskrun import TaskRun

__all__ = ["Reconnect", "ReplayBuffer", "Resumer", "Timeline"]

logger = get_logger("nlsstream.realtime.session")


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
        return backoff(attempt, self.backoff, self.max_backoff)


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


#: One attempt at a new run: the run once its task started, else the error that ended it.
OpenRun = Callable[[], Awaitable["TaskRun | NlsError"]]


class Resumer:
    """What a session with a :class:`Reconnect` policy keeps to survive a failure, and the
    decision and the attempts themselves: the replay buffer, the timeline, and how many
    connection attempts have been made since the last final sentence (the session's
    progress: a gateway that fails every task before a sentence can finish cannot keep
    the session resuming forever).

    The session hands over the stream (:meth:`~nlsstream.realtime.sending.AudioSender.retarget`)
    once :meth:`reconnect` returns a new run.
    """

    def __init__(self, policy: Reconnect, sample_rate: int, replay_bytes: int) -> None:
        self.policy = policy
        self.replay = ReplayBuffer(replay_bytes)
        self.timeline = Timeline(sample_rate)
        self._bytes_per_s = 2 * sample_rate
        #: Connection attempts, and resumes, since the last final sentence.
        self.attempts = 0
        self.resumes = 0
        #: What made the session resume, until a new final sentence shows progress.
        self.cause: NlsError | None = None
        #: Why the attempt under way failed (``None`` while it may still succeed).
        self.attempt_error: NlsError | None = None
        #: Connection attempts the last resume took.
        self.last_attempts = 0
        #: The task doing the resume, while it runs.
        self.task: asyncio.Task[None] | None = None

    @property
    def resuming(self) -> bool:
        return self.task is not None and not self.task.done()

    async def wait(self, timeout: float | None = None) -> bool:
        """Wait for a resume in progress, if any (bounded by its attempts and their
        timeouts, and by ``timeout`` if given); True if it finished meanwhile."""
        task = self.task
        if task is None or task.done() or task is asyncio.current_task():
            return False
        if timeout is not None and timeout <= 0:
            return False
        await asyncio.wait([task], timeout=timeout)
        return task.done()

    def cancel(self) -> None:
        task = self.task
        if task is not None and task is not asyncio.current_task():
            task.cancel()

    @staticmethod
    def cures(error: NlsError, refreshable: bool) -> bool:
        """Whether a new task can take up where ``error`` stopped this one: a lost
        connection, a failure of the service's own (see :func:`errors.is_server_side`),
        or a token that expired mid-task when the provider can fetch a fresh one
        (``refreshable``)."""
        if isinstance(error, GatewayConnectionError):
            return True
        if isinstance(error, AuthenticationError):
            return refreshable
        return isinstance(error, TaskFailedError) and is_server_side(error.status)

    def rebase(self, event: Event) -> Event | None:
        """``event`` on the whole stream's timeline (``None``: already delivered)."""
        rebased = self.timeline.rebase(event)
        if isinstance(rebased, SentenceEnd):
            self.replay.trim(self.timeline.sentence_end_bytes(rebased))
            # Progress: the attempts are the next failure's.
            self.attempts = self.resumes = 0
            self.cause = None
        return rebased

    def replay_for(self, cause: NlsError, bytes_sent: int) -> bytes | NlsError:
        """The audio a new task must be given again, or the error to end with when the
        bound dropped some of the sentence in progress."""
        replay = self.replay.replay(bytes_sent, self.timeline.open_since)
        if replay is not None:
            return replay
        behind = (bytes_sent - self.replay.mark) / self._bytes_per_s
        return with_note(
            cause,
            f"cannot resume: the gateway had not finished the {behind:.1f} s of audio "
            "since its last final sentence, more than the replay buffer keeps "
            f"({self.policy.replay_seconds:g} s, Reconnect.replay_seconds)",
        )

    async def reconnect(self, cause: NlsError, open_run: OpenRun) -> TaskRun | NlsError:
        """Try new runs, with backoff, until one starts or the attempts since the last
        final sentence run out; the run, or the error to end the session with."""
        self.cause = cause if self.cause is None else self.cause
        self.resumes += 1
        attempt = self.last_attempts = 0
        last: NlsError | None = None
        while self.attempts < self.policy.attempts:
            attempt = self.last_attempts = attempt + 1
            self.attempts += 1
            await asyncio.sleep(self.policy.delay(attempt))
            outcome = await open_run()
            if not isinstance(outcome, NlsError):
                self.timeline.resume_at(self.replay.replay_start())
                return outcome
            last = outcome
            if not outcome.retryable:
                break
        return self.gave_up(cause, last)

    def gave_up(self, cause: NlsError, last: NlsError | None = None) -> NlsError:
        """The error that made the session resume, saying that resuming did not help."""
        tail = f", the last: {last}" if last is not None else ""
        return with_note(
            cause,
            f"gave up resuming after {self.attempts} connection attempt(s) in "
            f"{self.resumes} resume(s) without a new final sentence{tail}",
        )

    def real_cause(self, timed_out: NlsError) -> NlsError:
        """``timed_out`` (a stop that timed out), or, when the session has been resuming
        since its last final sentence, the failure that made it resume, saying so, with
        ``timed_out`` as its context."""
        if self.cause is None:
            return timed_out
        error = with_note(
            self.cause,
            f"resumed {self.resumes} time(s) without a new final sentence; {timed_out}",
        )
        error.__context__ = timed_out
        return error

    def resumed(
        self,
        namespace: str,
        task_id: str,
        previous: str,
        cause: NlsError,
        gap_s: float,
        replayed: int,
    ) -> Resumed:
        """The :class:`~nlsstream.Resumed` event of a resume that succeeded."""
        return Resumed(
            name="Resumed",
            namespace=namespace,
            task_id=task_id,
            previous_task_id=previous,
            cause=str(cause),
            attempts=self.last_attempts,
            gap_ms=round(gap_s * 1000),
            replayed_ms=replayed * 1000 // self._bytes_per_s,
        )
