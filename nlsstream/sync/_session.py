"""The blocking real-time sessions: :class:`Transcriber` and :class:`Recognizer`.

One blocking session is one :class:`nlsstream.Transcriber` / :class:`nlsstream.Recognizer`
on the shared loop thread, plus what blocking code needs: an audio queue that
``send_audio()`` fills without waiting (:mod:`._feed`) and a serial executor that runs the
session's callbacks off the loop thread (:mod:`._callbacks`). :mod:`nlsstream.compat.nls`
is a thin adapter over these classes.
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any, TypeVar

from .. import audio
from ..auth import TokenSource
from ..errors import (
    AudioFormatError,
    CallbackError,
    EventOverflowError,
    InvalidStateError,
    NlsError,
)
from ..realtime import session as _session
from ..realtime.events import EventStream
from ..realtime.options import DEFAULT_EVENT_QUEUE_SIZE
from ..realtime.pacing import Metrics
from ..realtime.protocol import MAX_SPEECH_MS, Event, ResultChanged, SentenceEnd, State
from ..redaction import get_logger
from ._bridge import CALL_MARGIN, BlockingFacade, BlockingIterator
from ._callbacks import CallbackQueue
from ._feed import AudioFeed

__all__ = ["BlockingSession", "Recognizer", "Transcriber"]

logger = get_logger("nlsstream.sync")

S = TypeVar("S", bound=_session.Session)
E = TypeVar("E", bound=Event)
T = TypeVar("T")

#: The callbacks that receive an event (each queued; see ``event_queue_size``).
EVENT_CALLBACKS = (
    "on_start",
    "on_sentence_begin",
    "on_sentence_end",
    "on_result_changed",
    "on_completed",
    "on_resume",
)


class BlockingSession(BlockingFacade[S]):
    """What the blocking :class:`Transcriber` and :class:`Recognizer` share: the same
    arguments as the async session, blocking methods (see the package docstring for how
    each call is bounded and where callbacks run)."""

    _async_class: type[S]

    def __init__(self, appkey: str, token: TokenSource, **kwargs: Any) -> None:
        limit = kwargs.get("event_queue_size", DEFAULT_EVENT_QUEUE_SIZE)
        self._callbacks = CallbackQueue(limit, on_raise=self._callback_raised)
        self._user_on_error: Callable[[NlsError], object] | None = kwargs.get("on_error")
        self._overflow: EventOverflowError | None = None
        for name in (*EVENT_CALLBACKS, "on_error", "on_close"):
            callback = kwargs.get(name)
            if callback is None:
                continue
            if inspect.iscoroutinefunction(callback):
                raise TypeError(
                    f"{name} is a coroutine function: nlsstream.sync callbacks are plain "
                    "functions (they run on a worker thread); use the async classes for "
                    "coroutine callbacks"
                )
            if name in EVENT_CALLBACKS:
                kwargs[name] = self._queue_event(callback)
        if self._user_on_error is not None:
            kwargs["on_error"] = self._queue_error
        on_close = kwargs.get("on_close")
        if on_close is not None:
            kwargs["on_close"] = lambda: self._callbacks.put_always(on_close)
        super().__init__(self._async_class(appkey, token, **kwargs))
        s = self.wrapped
        one_task = s.connect_timeout + s.start_timeout
        self.call_timeout = one_task + 2 * s.stop_timeout + CALL_MARGIN
        policy = s.config.reconnect
        if policy is not None:  # a call may wait for a resume: every attempt of it
            self.call_timeout += policy.attempts * (policy.max_backoff + one_task)
        limit_bytes = None
        if s._max_audio_ms is not None and s.format == "pcm":
            limit_bytes = s._max_audio_ms * 2 * s.sample_rate // 1000
        self._feed = AudioFeed(s, self._runner.loop, limit_bytes)

    # ------------------------------------------------------------ callbacks (loop thread)

    def _queue_event(self, callback: Callable[[Any], object]) -> Callable[[Event], None]:
        put = self._callbacks.put

        def queue(event: Event) -> None:
            if not put(callback, event):
                self._overflowed()

        return queue

    def _queue_error(self, error: NlsError) -> None:
        assert self._user_on_error is not None
        self._callbacks.put_always(self._user_on_error, error)

    def _overflowed(self) -> None:
        """The callbacks fell ``event_queue_size`` events behind: the session fails with
        :class:`~nlsstream.errors.EventOverflowError` (after the queued callbacks) rather
        than buffer without bound or drop events silently."""
        if self._overflow is not None:
            return
        limit = self._callbacks.limit
        error = self._overflow = EventOverflowError(limit)
        error.args = (
            f"task {self.task_id}: callbacks fell behind: more than {limit} events were "
            "waiting for them (a callback blocks?); the session was aborted (create it "
            "with a larger event_queue_size to wait longer)",
        )
        self._feed.refuse(error)
        self._runner.loop.create_task(self.wrapped.abort())
        if self._user_on_error is not None:
            self._callbacks.put_always(self._user_on_error, error)

    def _callback_raised(self, callback: Callable[..., object], exc: Exception) -> None:
        """On the worker: a callback raised; as the async session does, ``on_error`` hears
        of it as a CallbackError and the session goes on."""
        name = getattr(callback, "__name__", repr(callback))
        error = CallbackError(f"callback {name} raised {type(exc).__name__}: {exc}")
        error.__cause__ = exc
        if self._user_on_error is None or callback is self._user_on_error:
            _log_callback_error(self.task_id, error)
            return
        self._user_on_error(error)

    def wait_callbacks(self, timeout: float) -> bool:
        """Wait until the callbacks queued so far have run; False after ``timeout`` s.
        Called from inside one of them, returns at once."""
        return self._callbacks.join(timeout)

    def _join_callbacks(self) -> None:
        bound = self.wrapped.stop_timeout + CALL_MARGIN
        if not self._callbacks.join(bound):
            raise TimeoutError(
                f"the callbacks of task {self.task_id} have not finished within {bound:g} s "
                "(does a callback block?)"
            )

    # ------------------------------------------------------------ the blocking calls

    def start(self) -> None:
        """Connect, send Start and wait for Started (and for ``on_start`` to have run)."""
        try:
            self._run(self.wrapped.start, bounded=True)
        finally:
            self._callbacks.join(self.call_timeout or CALL_MARGIN)

    def send_audio(self, data: bytes | bytearray | memoryview) -> None:
        """Queue ``data`` for the task and return at once (no waiting on the loop thread).

        The loop streams the queued audio at real time (PCM: 640-byte frames on the
        pacer's ticks, 60-80 ms behind the caller; other formats: one message per
        call), in order, before a later ``stream()``, ``ctrl()`` or ``stop()``. Raises
        InvalidStateError before Started or once the task stopped, the task's error if it
        failed, AudioFormatError for an odd number of PCM bytes or past a Recognizer's
        60 s; waits (at most 60 s, then TimeoutError) while more than 1 MiB is queued.
        """
        feed = self._feed
        if feed.refused is not None or self.wrapped.state is not State.STARTED:
            self._refuse_audio()
        n = len(data)
        if not n:
            return
        if n % 2 and feed._pcm:
            raise AudioFormatError(f"PCM16 audio must be an even number of bytes, got {n}")
        if feed.max_bytes is not None and feed.put_bytes + n > feed.max_bytes:
            raise AudioFormatError(
                f"{(feed.put_bytes + n) / feed.max_bytes * MAX_SPEECH_MS / 1000:.1f} s of "
                f"audio is more than a Recognizer's limit of {MAX_SPEECH_MS // 1000} s per "
                "task; this chunk was not sent: use a Transcriber for longer audio"
            )
        feed.put(data if type(data) is bytes else bytes(data))

    def _refuse_audio(self) -> None:
        """Raise why audio is not accepted now."""
        error = self._overflow or self.wrapped.error or self._feed.refused
        if error is not None and not isinstance(error, InvalidStateError):
            raise error
        state = self.wrapped.state
        if state is State.IDLE or state is State.STARTING:
            raise InvalidStateError("send_audio() called before the session was started")
        raise InvalidStateError(f"task {self.task_id} is {state.value}: it takes no more audio")

    def stream(
        self,
        source: audio.AudioSource,
        pace: float | None = 1.0,
        *,
        sample_rate: float | None = None,
    ) -> None:
        """:meth:`nlsstream.Transcriber.stream`, blocking: after the audio queued by
        ``send_audio()``; returns once the last frame is written."""

        async def run() -> None:
            await self._feed.finish()
            await self.wrapped.stream(source, pace, sample_rate=sample_rate)

        self._run_task(run, bounded=False)

    def stop(self, timeout: float | None = None) -> _session.Result:
        """Send the queued audio, then Stop; wait for Completed and return the
        :class:`~nlsstream.Result` once the callbacks queued by then have run (from a
        callback: at once, without them). As long as the gateway makes progress (see
        :meth:`nlsstream.Transcriber.stop`); raises the task's error if it failed."""

        async def run() -> _session.Result:
            await self._feed.finish()
            return await self.wrapped.stop(timeout)

        try:
            return self._run_task(run, bounded=False)
        finally:
            self._join_callbacks()

    def _run_task(self, make: Callable[[], Awaitable[T]], bounded: bool) -> T:
        """Run ``make()`` on the loop; a session aborted because its callbacks fell
        behind raises that overflow rather than "aborted"."""
        try:
            return self._run(make, bounded)
        except InvalidStateError:
            if self._overflow is not None:
                raise self._overflow from None
            raise

    def abort(self) -> None:
        """Close the connection now, without Stop; queued audio is dropped."""

        async def run() -> None:
            self._feed.cancel()
            await self.wrapped.abort()

        self._run(run, bounded=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Leaving stops the task: as long as stop() (the gateway's progress bounds it).
        async def run() -> None:
            if exc_type is None:
                await self._feed.finish()
            else:
                self._feed.cancel()
            await self.wrapped.__aexit__(exc_type, exc, tb)

        try:
            self._run(run, bounded=False)
        finally:
            if exc_type is None:
                self._join_callbacks()
            else:  # already failing: wait for on_close, but raise nothing else
                self._callbacks.join(self.wrapped.stop_timeout + CALL_MARGIN)

    def close(self) -> None:
        """Stop (if running) and close the connection, as leaving ``with`` does."""
        self.__exit__(None, None, None)

    # ------------------------------------------------------------ iterators

    def events(self) -> BlockingIterator[Event]:
        """A blocking iterator over every event (see :meth:`nlsstream.Transcriber.events`)."""
        return self._iterate(self.wrapped.events())

    def results(self) -> BlockingIterator[ResultChanged]:
        """A blocking iterator over intermediate results."""
        return self._iterate(self.wrapped.results())

    def _iterate(self, stream: EventStream[E]) -> BlockingIterator[E]:
        return BlockingIterator(self, stream)

    # ------------------------------------------------------------ state

    @property
    def task_id(self) -> str:
        """The task's 32-hex id."""
        return self.wrapped.task_id

    @property
    def state(self) -> State:
        """Where the task is (see :class:`~nlsstream.State`)."""
        return self.wrapped.state

    @property
    def result(self) -> _session.Result | None:
        """The result once the task completed, else ``None``."""
        return self.wrapped.result

    @property
    def error(self) -> NlsError | None:
        """Why the task failed, once it has."""
        return self._overflow or self.wrapped.error

    @property
    def metrics(self) -> Metrics:
        """The session's :class:`~nlsstream.Metrics`."""
        return self.wrapped.metrics


def _log_callback_error(task_id: str, error: CallbackError) -> None:
    logger.error("task %s: %s", task_id, error, exc_info=error.__cause__)


class Transcriber(BlockingSession[_session.Transcriber]):
    """Blocking :class:`nlsstream.Transcriber` (continuous transcription): same
    arguments, results and errors; callbacks run on a worker thread, in order (see the
    package docstring).

    To consume sentences while audio is sent, subscribe first, then send from another
    thread (or send all, stop, and read the buffered sentences afterwards)::

        with nlsstream.sync.Transcriber(appkey=..., token=...) as t:
            sentences = t.sentences()  # subscribed now: misses nothing
            sender = threading.Thread(target=lambda: (t.stream(path), t.stop()))
            sender.start()
            for s in sentences:  # ends at Completed
                print(s.text)
            sender.join()
    """

    _async_class = _session.Transcriber

    def ctrl(self, **params: Any) -> None:
        """:meth:`nlsstream.Transcriber.ctrl`, after the audio queued so far."""

        async def run() -> None:
            await self._feed.finish()
            await self.wrapped.ctrl(**params)

        self._run(run, bounded=True)

    def sentences(self) -> BlockingIterator[SentenceEnd]:
        """A blocking iterator over final sentences, until Completed."""
        return self._iterate(self.wrapped.sentences())


class Recognizer(BlockingSession[_session.Recognizer]):
    """Blocking :class:`nlsstream.Recognizer` (one sentence, at most 60 s): same
    arguments, results and errors; callbacks run on a worker thread, in order."""

    _async_class = _session.Recognizer
