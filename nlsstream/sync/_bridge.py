"""The bridge between blocking code and nlsstream's one event-loop thread: the
thread itself (:class:`LoopThread`) and the blocking face of any async object
(:class:`BlockingFacade`, :class:`blocking`, :class:`iterating`)."""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import contextlib
import functools
import inspect
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from types import TracebackType
from typing import Any, Concatenate, Generic, ParamSpec, TypeVar, overload

__all__ = [
    "CALL_MARGIN",
    "SHUTDOWN_TIMEOUT",
    "STUCK_AFTER",
    "BlockingFacade",
    "BlockingIterator",
    "LoopThread",
    "blocking",
    "iterating",
    "loop_thread",
]

from ..redaction import get_logger

logger = get_logger("nlsstream.sync")

T = TypeVar("T")
P = ParamSpec("P")
A = TypeVar("A")
R = TypeVar("R")
F = TypeVar("F", bound="BlockingFacade[Any]")


#: How long a wait sleeps before checking that the loop thread is still alive.
_WAIT_SLICE = 1.0
#: Added to a session's own timeouts to bound a blocking call (scheduling delays).
CALL_MARGIN = 10.0
#: How long the loop thread may not run at all before a waiting call gives up on it:
#: a callback blocks it (see :attr:`LoopThread.stuck_after`).
STUCK_AFTER = CALL_MARGIN
#: How long interpreter exit waits for the loop thread to close what is left.
SHUTDOWN_TIMEOUT = 5.0


class LoopThread:
    """An event loop running forever in one daemon thread; coroutines are handed to it
    from other threads. Use :func:`loop_thread` for the process's shared one."""

    #: Seconds the loop thread may not run before a waiting call gives up on it.
    stuck_after: float = STUCK_AFTER

    def __init__(self, name: str = "nlsstream-loop") -> None:
        self.loop = asyncio.new_event_loop()
        self._ready = threading.Event()
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.start()
        if not self._ready.wait(SHUTDOWN_TIMEOUT):
            raise RuntimeError("nlsstream's event-loop thread did not start")

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.call_soon(self._ready.set)
        try:
            self.loop.run_forever()
        finally:
            self._finish()

    def _finish(self) -> None:
        """On the loop thread, once stopped: cancel what is left (sessions abort and
        close their sockets), bounded, then close the loop."""
        loop = self.loop
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.wait(tasks, timeout=SHUTDOWN_TIMEOUT))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()

    @property
    def alive(self) -> bool:
        return self.thread.is_alive() and not self.loop.is_closed()

    def check_caller(self) -> None:
        """Raise RuntimeError if the calling thread runs an event loop: a blocking call
        there would stall it (or, on the loop thread itself, deadlock)."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        if threading.current_thread() is self.thread:
            raise RuntimeError(
                "a blocking nlsstream call was made on nlsstream's event-loop thread "
                "(from a coroutine callback?): it would deadlock the loop"
            )
        raise RuntimeError(
            "a blocking nlsstream call was made inside a running event loop: use the "
            "async API there (await nlsstream.Transcriber/Recognizer), or call the "
            "blocking API from a worker thread (loop.run_in_executor)"
        )

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the loop; the future is thread-safe."""
        if not self.alive:
            coro.close()
            raise RuntimeError("nlsstream's event-loop thread has stopped")
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, make: Callable[[], Awaitable[T]], timeout: float | None) -> T:
        """Await ``make()`` on the loop and return its result (or raise its exception).

        ``timeout`` bounds the wait; ``None`` waits while the loop thread lives (for
        awaitables that bound themselves by progress). On timeout or an interrupt in
        the waiting thread (Ctrl-C), the coroutine is cancelled.
        """
        self.check_caller()
        future = self.submit(_call(make))
        try:
            self._wait(future, timeout)
        except BaseException:
            future.cancel()
            raise
        return future.result()

    def _wait(self, future: concurrent.futures.Future[Any], timeout: float | None) -> None:
        """Wait for ``future``: at most ``timeout`` s (``None``: while it takes), and
        only while the loop thread runs; a loop that has not run a posted probe for
        :attr:`stuck_after` s is stuck (a callback blocks) and ends the wait too."""
        began = time.monotonic()
        probe: threading.Event | None = None
        probed_at = began
        while True:
            step = _WAIT_SLICE
            if timeout is not None:
                step = min(step, began + timeout - time.monotonic())
            done, _ = concurrent.futures.wait([future], max(step, 0.0))
            if done:
                return
            now = time.monotonic()
            if not self.thread.is_alive():
                raise RuntimeError("nlsstream's event-loop thread stopped during the call")
            if timeout is not None and now - began >= timeout:
                raise TimeoutError(
                    f"a blocking nlsstream call did not finish within {timeout:g} s: "
                    "nlsstream's event-loop thread seems stuck (does a callback block?)"
                )
            if probe is not None and now - probed_at >= self.stuck_after and not probe.is_set():
                raise TimeoutError(
                    f"nlsstream's event-loop thread has not run for {now - probed_at:.0f} s "
                    "(does a callback block?); the call was cancelled"
                )
            if probe is None or probe.is_set():
                probe, probed_at = threading.Event(), now
                with contextlib.suppress(RuntimeError):  # closed: the next slice says so
                    self.loop.call_soon_threadsafe(probe.set)

    def stop(self, timeout: float = SHUTDOWN_TIMEOUT) -> None:
        """Stop the loop (what is left is cancelled) and join the thread, bounded."""
        if self.alive:
            with contextlib.suppress(RuntimeError):  # closed meanwhile
                self.loop.call_soon_threadsafe(self.loop.stop)
        if threading.current_thread() is not self.thread:
            self.thread.join(timeout)


_shared: LoopThread | None = None
_shared_lock = threading.Lock()


def loop_thread() -> LoopThread:
    """The process's shared loop thread, started on first use (and again after a fork
    or an earlier shutdown); stopped at interpreter exit."""
    global _shared
    with _shared_lock:
        if _shared is None or not _shared.alive:
            _shared = LoopThread()
            logger.debug("started the event-loop thread %s", _shared.thread.name)
        return _shared


@atexit.register
def _shutdown() -> None:
    with _shared_lock:
        shared = _shared
    if shared is not None:
        shared.stop()


class BlockingFacade(Generic[A]):
    """The blocking face of one async object ``wrapped``, run on :func:`loop_thread`.

    Subclasses declare the async object's methods as class attributes
    (``stop = blocking(nlsstream.Transcriber.stop)``); :attr:`call_timeout` bounds the
    calls that end by themselves.
    """

    #: Seconds a bounded call may take (``None``: it bounds itself).
    call_timeout: float | None = None

    def __init__(self, wrapped: A) -> None:
        self.wrapped = wrapped
        self._runner = loop_thread()

    def __repr__(self) -> str:
        return f"<blocking {self.wrapped!r}>"

    def _run(self, make: Callable[[], Awaitable[T]], bounded: bool, extra: float = 0.0) -> T:
        timeout = None
        if bounded and self.call_timeout is not None:
            timeout = self.call_timeout + extra
        return self._runner.run(make, timeout)

    # For a wrapped async context manager: ``with`` enters and leaves it.

    def __enter__(self: F) -> F:
        self._run(self._async_cm().__aenter__, bounded=True)
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._run(lambda: self._async_cm().__aexit__(exc_type, exc, tb), bounded=True)

    def _async_cm(self) -> contextlib.AbstractAsyncContextManager[Any]:
        if not isinstance(self.wrapped, contextlib.AbstractAsyncContextManager):
            raise TypeError(f"{type(self.wrapped).__name__} is not an async context manager")
        return self.wrapped


class blocking(Generic[P, T]):
    """A blocking method made from the async ``method`` of the wrapped object.

    ``bounded``: the call ends by itself, so its wait is bounded by the facade's
    :attr:`~BlockingFacade.call_timeout` plus the call's ``timeout`` argument, if it has
    one (given, or its default); ``False`` for calls as long as the audio. ``wrap``
    turns what the method returns into what the blocking call returns (e.g. the
    blocking face of a returned async object), on the calling thread.
    """

    @overload
    def __init__(
        self: blocking[P, T],
        method: Callable[Concatenate[Any, P], Awaitable[T]],
        *,
        bounded: bool = True,
    ) -> None: ...
    @overload
    def __init__(
        self: blocking[P, T],
        method: Callable[Concatenate[Any, P], Awaitable[R]],
        *,
        bounded: bool = True,
        wrap: Callable[[R], T],
    ) -> None: ...
    # A method taking ``**kwargs`` (mypy cannot separate its ``self`` from them):
    # the arguments go unchecked, the result is typed.
    @overload
    def __init__(
        self: blocking[..., T],
        method: Callable[..., Awaitable[T]],
        *,
        bounded: bool = True,
    ) -> None: ...
    @overload
    def __init__(
        self: blocking[..., T],
        method: Callable[..., Awaitable[R]],
        *,
        bounded: bool = True,
        wrap: Callable[[R], T],
    ) -> None: ...
    def __init__(
        self,
        method: Callable[..., Awaitable[Any]],
        *,
        bounded: bool = True,
        wrap: Callable[[Any], Any] | None = None,
    ) -> None:
        self.method = method
        self.bounded = bounded
        self.wrap = wrap
        self.__doc__ = method.__doc__
        signature = inspect.signature(method)
        #: The method's signature, when it has a ``timeout`` parameter (which extends
        #: the bound of the wait, by the value given or by its default).
        self._signature = signature if "timeout" in signature.parameters else None

    def _extra(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> float:
        """The call's ``timeout`` (given or default) in seconds; 0 if it has none."""
        if self._signature is None:
            return 0.0
        try:
            bound = self._signature.bind(None, *args, **kwargs)
        except TypeError:
            return 0.0  # the method itself raises, at once
        bound.apply_defaults()
        value = bound.arguments.get("timeout")
        return float(value) if isinstance(value, (int, float)) else 0.0

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> blocking[P, T]: ...
    @overload
    def __get__(self, obj: BlockingFacade[Any], owner: type[Any]) -> Callable[P, T]: ...
    def __get__(
        self, obj: BlockingFacade[Any] | None, owner: type[Any]
    ) -> blocking[P, T] | Callable[P, T]:
        if obj is None:
            return self
        method, bounded, wrap = self.method, self.bounded, self.wrap

        @functools.wraps(method)
        def call(*args: P.args, **kwargs: P.kwargs) -> T:
            result = obj._run(
                lambda: method(obj.wrapped, *args, **kwargs), bounded, self._extra(args, kwargs)
            )
            return wrap(result) if wrap is not None else result  # type: ignore[no-any-return]

        return call


class iterating(Generic[P, T]):
    """A method returning a :class:`BlockingIterator` over the async iterator that the
    wrapped object's ``method`` returns (created at once, so it misses no event)."""

    def __init__(self, method: Callable[Concatenate[Any, P], AsyncIterator[T]]) -> None:
        self.method = method
        self.__doc__ = method.__doc__

    @overload
    def __get__(self, obj: None, owner: type[Any]) -> iterating[P, T]: ...
    @overload
    def __get__(
        self, obj: BlockingFacade[Any], owner: type[Any]
    ) -> Callable[P, BlockingIterator[T]]: ...
    def __get__(
        self, obj: BlockingFacade[Any] | None, owner: type[Any]
    ) -> iterating[P, T] | Callable[P, BlockingIterator[T]]:
        if obj is None:
            return self
        method = self.method

        @functools.wraps(method)
        def call(*args: P.args, **kwargs: P.kwargs) -> BlockingIterator[T]:
            return BlockingIterator(obj, method(obj.wrapped, *args, **kwargs))

        return call


class BlockingIterator(Iterator[T]):
    """A blocking iterator over an async iterator run on the loop thread. Each
    ``next()`` waits as long as the async iterator does; :meth:`close` (or leaving
    ``with``) ends it early."""

    def __init__(self, facade: BlockingFacade[Any], source: AsyncIterator[T]) -> None:
        self._facade = facade
        self._source = source

    def __iter__(self) -> BlockingIterator[T]:
        return self

    def __next__(self) -> T:
        try:
            return self._facade._run(self._source.__anext__, bounded=False)
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        aclose = getattr(self._source, "aclose", None)
        if aclose is not None:
            self._facade._run(aclose, bounded=True)

    def __enter__(self) -> BlockingIterator[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def _call(make: Callable[[], Awaitable[T]]) -> T:
    """Create the awaitable on the loop thread (nothing is left unawaited if the call
    is refused) and await it."""
    return await make()
