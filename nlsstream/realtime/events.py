"""Fan-out of a session's events to any number of async iterators.

Each iterator owns a bounded queue, registered the moment it is created (not when the
first ``__anext__`` runs), so no event between its creation and its first read is lost.
Publishing never blocks the session's reader: an iterator whose queue is full is failed
with :class:`~nlsstream.errors.EventOverflowError` (it first yields everything it had
buffered, so the gap is exactly where the error is) and unsubscribed. When the task ends,
every iterator finishes after its buffered events, or raises the task's error.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator
from typing import Generic, TypeVar

from ..errors import EventOverflowError
from .protocol import Event

__all__ = ["EventHub", "EventStream"]

E = TypeVar("E", bound=Event)


class EventStream(AsyncIterator[E], Generic[E]):
    """An async iterator over one session's events of the given kinds.

    Ends when the task completes; raises the task's error (e.g.
    :class:`~nlsstream.errors.TaskFailedError`) if it fails, or
    :class:`~nlsstream.errors.EventOverflowError` if it fell more than ``maxsize``
    events behind. :meth:`aclose` (or leaving ``async with``) unsubscribes early.
    """

    __slots__ = ("_buf", "_ended", "_error", "_hub", "_kinds", "_waiter", "maxsize")

    def __init__(self, hub: EventHub, kinds: tuple[type[Event], ...], maxsize: int) -> None:
        self._hub = hub
        self._kinds = kinds
        self.maxsize = maxsize
        self._buf: deque[E] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._ended = False
        self._error: BaseException | None = None

    def _wants(self, event: Event) -> bool:
        return isinstance(event, self._kinds)

    def _push(self, event: E) -> bool:
        """Queue ``event``; False (and the stream fails) if the queue is full."""
        if self._ended:
            return False
        if len(self._buf) >= self.maxsize:
            self._end(EventOverflowError(self.maxsize))
            return False
        self._buf.append(event)
        self._wake()
        return True

    def _end(self, error: BaseException | None) -> None:
        if not self._ended:
            self._ended = True
            self._error = error
            self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def __aiter__(self) -> EventStream[E]:
        return self

    async def __anext__(self) -> E:
        while not self._buf:
            if self._ended:
                if self._error is not None:
                    if self._error is self._hub._error:
                        self._hub.error_delivered = True
                    raise self._error
                raise StopAsyncIteration
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        return self._buf.popleft()

    async def aclose(self) -> None:
        """Stop receiving events; buffered ones are discarded."""
        self._hub._unsubscribe(self)
        self._buf.clear()
        self._end(None)

    async def __aenter__(self) -> EventStream[E]:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class EventHub:
    """Publishes events to every subscribed :class:`EventStream` without blocking."""

    def __init__(self) -> None:
        self._streams: list[EventStream[Event]] = []
        self._ended = False
        self._error: BaseException | None = None
        #: Whether an iterator has raised the hub's closing error to user code.
        self.error_delivered = False

    @property
    def subscribers(self) -> int:
        return len(self._streams)

    def subscribe(self, kinds: tuple[type[E], ...], maxsize: int) -> EventStream[E]:
        """A new iterator over events of ``kinds``; already ended if the hub is closed."""
        if maxsize < 1:
            raise ValueError(f"event queue size must be at least 1, got {maxsize}")
        stream: EventStream[E] = EventStream(self, kinds, maxsize)
        if self._ended:
            stream._end(self._error)
        else:
            self._streams.append(stream)  # type: ignore[arg-type]
        return stream

    def _unsubscribe(self, stream: EventStream[E]) -> None:
        with contextlib.suppress(ValueError):
            self._streams.remove(stream)  # type: ignore[arg-type]

    def publish(self, event: Event) -> None:
        """Hand ``event`` to every interested iterator; overflowing ones are dropped
        from the hub after being failed with :class:`EventOverflowError`."""
        overflowed = None
        for stream in self._streams:
            if stream._wants(event) and not stream._push(event):
                overflowed = overflowed or []
                overflowed.append(stream)
        if overflowed:
            for stream in overflowed:
                self._unsubscribe(stream)

    def close(self, error: BaseException | None = None) -> None:
        """End every iterator (after its buffered events), with ``error`` if given."""
        if self._ended:
            return
        self._ended = True
        self._error = error
        streams, self._streams = self._streams, []
        for stream in streams:
            stream._end(error)
