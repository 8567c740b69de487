"""The event router of a session: the one path every server event and every failure
takes to the user.

For each event, :meth:`EventRouter.deliver` does everything, in this order: metrics,
the task's record (final sentences, the Completed event), every iterator's bounded queue
(:mod:`nlsstream.realtime.events`), the user's callback, then the task's lifecycle (Started
confirms the start, Completed and TaskFailed end the task). A failure that is not an event
(a lost connection, a timeout) takes the same path through :meth:`EventRouter.fail`.

Events are delivered synchronously, on the connection's data path, in arrival order;
at 1,000 sessions the gateway sends 2,000 events a second, and a task per event would
cost more than the parsing. A coroutine callback is awaited by one drain task of the
session, and events arriving meanwhile wait behind it, so callbacks always see events in
order and a slow one delays only its own session.
"""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Any

from ..errors import CallbackError, NlsError, ProtocolError, redact, task_error
from ..redaction import get_logger
from .events import EventHub
from .pacing import Metrics
from .protocol import (
    ClientTask,
    Completed,
    Event,
    ResultChanged,
    SentenceBegin,
    SentenceEnd,
    Started,
    TaskFailed,
)

__all__ = ["Callback", "EventRouter"]

logger = get_logger("nlsstream.realtime.session")

#: A user callback: a plain function or a coroutine function.
Callback = Callable[[Any], object]


class _Failure:
    """A queued report of a failure that is not an event (see :meth:`EventRouter.fail`)."""

    __slots__ = ("error",)

    def __init__(self, error: NlsError) -> None:
        self.error = error


class EventRouter:
    """Routes one task's events to iterators, callbacks, the result and the metrics, and
    decides when the task has ended (and why).

    ``callbacks`` maps event classes to user callbacks; ``on_error`` receives every
    :class:`~nlsstream.errors.NlsError` (the task's failure, and a
    :class:`~nlsstream.errors.CallbackError` for each callback that raised);
    ``on_end(error)`` is called once, synchronously, when the task ends;
    ``keep_sentences`` bounds how many final sentences are kept for the result.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        callbacks: dict[type[Event], Callback | None],
        on_error: Callable[[NlsError], object] | None,
        on_end: Callable[[NlsError | None], None],
        hub: EventHub | None = None,
        keep_sentences: int | None = None,
        rebase: Callable[[Event], Event | None] | None = None,
        recover: Callable[[NlsError], bool] | None = None,
        observe: Callable[[Event], None] | None = None,
    ) -> None:
        self.task: ClientTask | None = None
        self.metrics = metrics
        self.hub = hub if hub is not None else EventHub()
        self.callbacks = callbacks
        self._on_error = on_error
        self._on_end = on_end
        #: The final sentences, in order (the last ``keep_sentences`` of them, if given:
        #: a stream of many hours would otherwise keep every one); Completed once it came.
        self.sentences: deque[SentenceEnd] = deque(maxlen=keep_sentences)
        self.completed: Completed | None = None
        #: Set once the task ended: why (``None`` after Completed).
        self.error: NlsError | None = None
        self.ended = False
        #: Secrets to hide from the server's texts (the session's token).
        self.secrets: tuple[str, ...] = ()
        #: When the first audio was sent and when Stop was, on the loop's clock.
        self.first_audio_at: float | None = None
        self.stop_sent_at: float | None = None
        #: When the last message came from the gateway (its progress, for ``stop()``).
        self.last_message_at: float | None = None
        loop = asyncio.get_running_loop()
        self._loop = loop
        #: The current task's Started (see :meth:`attach`), and the end of the stream.
        self.started_future: asyncio.Future[None] = loop.create_future()
        self.ended_future: asyncio.Future[None] = loop.create_future()
        #: Given by a session that can survive failures (see :mod:`nlsstream.realtime.resume`):
        #: ``rebase(event)`` puts an event on the stream's timeline (``None``: drop it);
        #: ``recover(error)`` returns True if the session takes over a retryable failure
        #: instead of ending the task.
        self.rebase = rebase
        self.recover = recover
        #: Told of every event delivered (telemetry), before anything else.
        self._observe = observe
        #: The error of a TaskFailed received but not yet delivered (events ahead of it
        #: wait for a coroutine callback): calls that check the task see it at once.
        self.failing: NlsError | None = None
        self._queue: deque[Event | _Failure] = deque()
        self._drainer: asyncio.Task[None] | None = None
        # Sentences begun whose first intermediate result has not come: index -> ms.
        self._begins: dict[int, int] = {}

    # ---------------------------------------------------------------- input

    def attach(self, task: ClientTask) -> asyncio.Future[None]:
        """Route the events of ``task`` from now on (a session's first task, or the new
        task of a resume); returns the future its Started resolves."""
        self.task = task
        if self.started_future.done():
            self.started_future = self._loop.create_future()
        return self.started_future

    @property
    def task_id(self) -> str:
        assert self.task is not None
        return self.task.task_id

    def message(self, text: str) -> None:
        """A text message from the gateway (the connection's ``on_message``)."""
        if self.ended:
            return  # the task is over: what still arrives is not read
        self.last_message_at = self._loop.time()
        assert self.task is not None
        try:
            event = self.task.receive(text)
        except ProtocolError as exc:
            error = ProtocolError(f"task {self.task_id}: {exc}; connection aborted")
            error.__cause__ = exc
            self.fail(error)
            return
        if isinstance(event, TaskFailed):
            event = self._redacted(event)
            failure = task_error(event.status, event.status_text, event.task_id)
            if self.recover is not None and self.recover(failure):
                return  # the session resumes: the stream goes on
            self.failing = failure
        elif self.rebase is not None:
            rebased = self.rebase(event)
            if rebased is None:
                return
            event = rebased
        self.deliver(self._measured(event))

    def _measured(self, event: Event) -> Event:
        """``event`` with its latency, measured at its arrival (now) against when the
        audio it answers went out (see :mod:`nlsstream.realtime.latency`)."""
        metrics = self.metrics
        if isinstance(event, SentenceBegin):
            self._begins[event.index] = event.time
            if len(self._begins) > 64:  # sentences that never got a partial
                del self._begins[next(iter(self._begins))]
            return event
        if isinstance(event, SentenceEnd):
            at, histogram = event.time, metrics.final_latency
            self._begins.pop(event.index, None)
        elif (
            isinstance(event, ResultChanged)
            and event.index is not None
            and event.index in self._begins
        ):
            at, histogram = self._begins.pop(event.index), metrics.first_partial_latency
        else:
            return event  # not a sentence's first partial
        sent = metrics.send_log.sent_at(at * metrics.sample_rate // 500, metrics.bytes_sent)
        if sent is None:
            return event
        latency = (self._loop.time() - sent) * 1000.0
        histogram.record(latency)
        return dataclasses.replace(event, latency_ms=round(latency))

    def _redacted(self, event: TaskFailed) -> TaskFailed:
        """``event`` without the token the gateway may quote in its text
        (``The token '...' has expired!``): what iterators, callbacks and the error see."""
        text = redact(event.status_text, *self.secrets)
        raw = redact(event.raw_text, *self.secrets)
        if text == event.status_text and raw == event.raw_text:
            return event
        return dataclasses.replace(event, status_text=text, raw_text=raw)

    def deliver(self, event: Event) -> None:
        """Deliver ``event`` now, or after the coroutine callbacks ahead of it."""
        if self._observe is not None:
            self._observe(event)
        if self._drainer is not None:
            self._queue.append(event)
            return
        pending = self._route(event)
        if pending is not None:
            self._drain(pending)

    def fail(self, error: NlsError, *, report: bool = True) -> None:
        """End the task with ``error`` (if it has not ended) and, if ``report``, tell
        ``on_error``, after any callback still running."""
        if self.ended:
            return
        self._end(error)
        if not report:
            return
        if self._drainer is not None:
            self._queue.append(_Failure(error))
            return
        pending = self._report(error)
        if pending is not None:
            self._drain(pending)

    async def settle(self) -> None:
        """Wait until every queued event and report has been handled (what a caller
        does before raising the task's error, so that ``on_error`` has run)."""
        drainer = self._drainer
        if drainer is not None and drainer is not asyncio.current_task():
            await asyncio.wait([drainer])

    def close(self) -> None:
        """The session is done: coroutine callbacks not yet awaited are dropped."""
        self._queue.clear()
        if self._drainer is not None and not self._drainer.done():
            self._drainer.cancel()

    # ---------------------------------------------------------------- the one path

    def _route(self, event: Event) -> Awaitable[None] | None:
        """Everything delivering ``event`` means; returns what is left to await."""
        metrics = self.metrics
        if metrics.time_to_first_partial_ms is None and self.first_audio_at is not None:
            has_text = isinstance(event, (ResultChanged, SentenceEnd)) or (
                isinstance(event, Completed) and bool(event.text)
            )
            if has_text:
                metrics.time_to_first_partial_ms = (self._loop.time() - self.first_audio_at) * 1e3
        if isinstance(event, SentenceEnd):
            self.sentences.append(event)
        elif isinstance(event, Completed):
            self.completed = event
            if self.stop_sent_at is not None:
                metrics.stop_to_completed_ms = (self._loop.time() - self.stop_sent_at) * 1e3
        if isinstance(event, TaskFailed):
            error = self.failing
            assert error is not None  # set by message(), the only way a TaskFailed comes
            self.hub.publish(event)
            self._end(error)
            return self._report(error)
        self.hub.publish(event)
        callback = self.callbacks.get(type(event))
        pending = self._call(callback, event) if callback is not None else None
        if pending is None:
            self._lifecycle(event)
            return None
        return self._then(pending, event)

    def _lifecycle(self, event: Event) -> None:
        if isinstance(event, Started):
            if not self.started_future.done():
                self.started_future.set_result(None)
        elif isinstance(event, Completed):
            self._end(None)

    async def _then(self, pending: Awaitable[None], event: Event) -> None:
        await pending
        self._lifecycle(event)

    def _end(self, error: NlsError | None) -> None:
        """The one place the task ends."""
        if self.ended:
            return
        self.ended = True
        self.error = error
        if error is not None and self.task is not None:
            self.task.fail()
        self.hub.close(error)
        for future in (self.started_future, self.ended_future):
            if not future.done():
                future.set_result(None)
        self._on_end(error)

    # ---------------------------------------------------------------- callbacks

    async def call(self, callback: Callable[[], object], name: str) -> None:
        """Run a callback that is not an event's (``on_close``) as event callbacks run:
        awaited if it returns an awaitable; a failure goes to ``on_error`` (or the log)."""
        try:
            result = callback()
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            error = CallbackError(f"{name} callback raised {type(exc).__name__}: {exc}")
            pending = self._report(error, exc)
            if pending is not None:
                await pending

    def _call(self, callback: Callback, arg: object) -> Awaitable[None] | None:
        try:
            result = callback(arg)
        except Exception as exc:
            return self._report(_callback_error(callback, exc), exc)
        if inspect.isawaitable(result):
            return self._await_callback(callback, result)
        return None

    async def _await_callback(self, callback: Callback, result: Awaitable[object]) -> None:
        try:
            await result
        except Exception as exc:
            pending = self._report(_callback_error(callback, exc), exc)
            if pending is not None:
                await pending

    def _report(
        self, error: NlsError, cause: BaseException | None = None
    ) -> Awaitable[None] | None:
        """Tell ``on_error`` about ``error``; a failing callback without an ``on_error``
        is logged, since nobody else would hear of it."""
        if cause is not None:
            error.__cause__ = cause
        if self._on_error is None:
            if isinstance(error, CallbackError):
                logger.error("task %s: %s", self.task_id, error, exc_info=cause)
            return None
        try:
            result = self._on_error(error)
        except Exception:
            logger.exception("task %s: on_error callback raised", self.task_id)
            return None
        if inspect.isawaitable(result):
            return self._await_on_error(result)
        return None

    async def _await_on_error(self, result: Awaitable[object]) -> None:
        try:
            await result
        except Exception:
            logger.exception("task %s: on_error callback raised", self.task_id)

    def _drain(self, first: Awaitable[None]) -> None:
        self._drainer = self._loop.create_task(
            self._run_queue(first), name=f"nlsstream-callbacks-{self.task_id}"
        )

    async def _run_queue(self, first: Awaitable[None]) -> None:
        """Await ``first``, then deliver what queued up behind it, in order."""
        try:
            await first
            while self._queue:
                item = self._queue.popleft()
                if isinstance(item, _Failure):
                    pending = self._report(item.error)
                else:
                    pending = self._route(item)
                if pending is not None:
                    await pending
        finally:
            self._drainer = None


def _callback_error(callback: Callback, exc: Exception) -> CallbackError:
    name = getattr(callback, "__name__", repr(callback))
    return CallbackError(f"callback {name} raised {type(exc).__name__}: {exc}")
