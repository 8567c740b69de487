"""The blocking face of nlsstream: the same sessions, for code that is not asyncio.

:class:`Transcriber` and :class:`Recognizer` take the same arguments as
:class:`nlsstream.Transcriber` and :class:`nlsstream.Recognizer`, return the same
:class:`~nlsstream.Result` and events, and raise the same typed errors; their methods
block instead of being awaited::

    with nlsstream.sync.Transcriber(appkey="APPKEY", token="TOKEN") as t:
        t.stream("meeting.wav")
        result = t.stop()

**One loop thread.** Every blocking session of a process runs on one background
event-loop thread, ``nlsstream-loop``, started on first use and stopped at interpreter
exit; there is no thread per session. Each blocking call hands its coroutine to that
loop (:func:`asyncio.run_coroutine_threadsafe`) and waits for it. Calls that end by
themselves (connect, start, send_audio, ctrl, abort) wait at most the session's own
timeouts (those of a resume included) plus a margin
(:attr:`BlockingFacade.call_timeout`): beyond that the loop thread is stuck (usually a
callback that blocks) and the call raises ``TimeoutError``. Calls whose length is the
audio's or the gateway's progress (``stream()``, iterating events, ``stop()`` and
leaving ``with``) wait for as long as the session makes progress; the session bounds
them itself (keepalive, ``stop_timeout`` of silence, task end). Every wait also ends
with ``TimeoutError`` when the loop thread has not run at all for :data:`STUCK_AFTER`
seconds.

**Callbacks run on the loop thread**, shared by every blocking session of the process.
They must return quickly and must not block (no ``time.sleep``, no waiting on a lock
held by a thread that waits for nlsstream, no blocking nlsstream call: those raise
``RuntimeError``). Hand slow work to your own thread or queue.

Blocking calls are thread-safe: one thread may ``stream()`` while another iterates
``sentences()``. Calling them from inside a running event loop (an ``async def``, or a
callback) raises ``RuntimeError``: use the async classes there.

The recording clients have blocking faces too: :class:`FlashRecognizer`,
:class:`RestRecognizer` and :class:`FileTranscriber` (whose ``submit()`` returns a
blocking :class:`FileTransTask`), with the same arguments, results and errors. Their
calls wait at most two requests' ``timeout`` plus a margin; ``wait()``,
``transcribe()`` and ``result()`` also their own ``timeout`` (default 3600 s).

Other async objects get a blocking face the same way: subclass :class:`BlockingFacade`
and list their coroutine methods with :class:`blocking` and their async iterators with
:class:`iterating`.
"""

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

from .auth import TokenSource
from .realtime import session as _session
from .realtime.pacing import Metrics
from .realtime.protocol import State
from .recordings import services as _files
from .redaction import get_logger

__all__ = [
    "BlockingFacade",
    "BlockingIterator",
    "FileTransTask",
    "FileTranscriber",
    "FlashRecognizer",
    "LoopThread",
    "Recognizer",
    "RestRecognizer",
    "Transcriber",
    "blocking",
    "iterating",
    "loop_thread",
]

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
#: How long :meth:`LoopThread.post` lets posts gather before running them (s).
POST_WINDOW = 0.002
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
        self._posted: list[Callable[[], object]] = []
        self._post_lock = threading.Lock()
        self._post_pending = False
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
                "a blocking nlsstream call was made from a callback: callbacks run on "
                "nlsstream's event-loop thread and must not block; hand the work to "
                "another thread"
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

    def post(self, callback: Callable[[], object]) -> None:
        """Run ``callback()`` on the loop thread within about :data:`POST_WINDOW`
        seconds, in posting order, never waiting. For work posted often by many
        threads (audio frames): after running a batch, the loop collects what is posted
        during the next window and runs it together, so a busy process pays one loop
        wake-up per window instead of one per call; a post to an idle loop runs at
        once. An exception is logged."""
        with self._post_lock:
            self._posted.append(callback)
            if self._post_pending:
                return
            self._post_pending = True
        self.loop.call_soon_threadsafe(self._run_posted)

    def _run_posted(self) -> None:
        with self._post_lock:
            batch, self._posted = self._posted, []
            if not batch:
                self._post_pending = False
                return
        # Still pending: what is posted meanwhile waits for this timer, not a wake-up.
        self.loop.call_later(POST_WINDOW, self._run_posted)
        for callback in batch:
            try:
                callback()
            except Exception:
                logger.exception("callback posted to the loop thread raised")

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


S = TypeVar("S", bound=_session.Session)


class _BlockingSession(BlockingFacade[S]):
    """What the blocking :class:`Transcriber` and :class:`Recognizer` share."""

    _async_class: type[S]

    def __init__(self, appkey: str, token: TokenSource, **kwargs: Any) -> None:
        super().__init__(self._async_class(appkey, token, **kwargs))
        s = self.wrapped
        one_task = s.connect_timeout + s.start_timeout
        self.call_timeout = one_task + 2 * s.stop_timeout + CALL_MARGIN
        policy = s.config.reconnect
        if policy is not None:  # a call may wait for a resume: every attempt of it
            self.call_timeout += policy.attempts * (policy.max_backoff + one_task)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        # Leaving stops the task: as long as stop() (the gateway's progress bounds it).
        self._run(lambda: self.wrapped.__aexit__(exc_type, exc, tb), bounded=False)

    # What the async session offers, blocking. stop() waits while the gateway makes
    # progress (a backlog of audio sent faster than real time can take minutes), so it
    # is bounded by the session (stop_timeout of silence, or its timeout argument).
    start = blocking(_session.Session.start)
    stop = blocking(_session.Session.stop, bounded=False)
    abort = blocking(_session.Session.abort)
    send_audio = blocking(_session.Session.send_audio)
    stream = blocking(_session.Session.stream, bounded=False)
    events = iterating(_session.Session.events)
    results = iterating(_session.Session.results)

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
    def metrics(self) -> Metrics:
        """The session's :class:`~nlsstream.Metrics`."""
        return self.wrapped.metrics


async def _ctrl(t: _session.Transcriber, /, **params: Any) -> None:
    await t.ctrl(**params)


_ctrl.__doc__ = _session.Transcriber.ctrl.__doc__


class Transcriber(_BlockingSession[_session.Transcriber]):
    """Blocking :class:`nlsstream.Transcriber` (continuous transcription): same
    arguments, results and errors. Callbacks run on the shared loop thread and must not
    block (see the module docstring).

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
    ctrl = blocking(_ctrl)
    sentences = iterating(_session.Transcriber.sentences)


class Recognizer(_BlockingSession[_session.Recognizer]):
    """Blocking :class:`nlsstream.Recognizer` (one sentence, at most 60 s): same
    arguments, results and errors. Callbacks run on the shared loop thread and must not
    block (see the module docstring)."""

    _async_class = _session.Recognizer


# --------------------------------------------------------------------------- recordings

#: Added to a recording request's bound for preparing the audio (decoding, resampling a
#: long recording in a worker thread) and getting a token.
PREPARE_MARGIN = 60.0

C = TypeVar("C", bound=_files._Client)


class _BlockingClient(BlockingFacade[C]):
    """What the blocking recording clients share: the same constructor arguments as the
    async client; ``with`` (or :meth:`close`) closes its HTTP connections."""

    _async_class: type[C]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(self._async_class(*args, **kwargs))
        # A rejected token is refreshed and the request tried once more: two requests.
        self.call_timeout = 2 * self.wrapped.timeout + PREPARE_MARGIN + CALL_MARGIN

    close = blocking(_files._Client.close)


class FlashRecognizer(_BlockingClient[_files.FlashRecognizer]):
    """Blocking :class:`nlsstream.FlashRecognizer`: same arguments, results
    (:class:`~nlsstream.FileResult`) and errors::

        with nlsstream.sync.FlashRecognizer(appkey, token) as flash:
            result = flash.recognize("meeting.mp3")
    """

    _async_class = _files.FlashRecognizer
    recognize = blocking(_files.FlashRecognizer.recognize)


class RestRecognizer(_BlockingClient[_files.RestRecognizer]):
    """Blocking :class:`nlsstream.RestRecognizer` (one sentence, ≤ 60 s): same
    arguments, results and errors."""

    _async_class = _files.RestRecognizer
    recognize = blocking(_files.RestRecognizer.recognize)


class FileTransTask(BlockingFacade[_files.FileTransTask]):
    """Blocking :class:`nlsstream.FileTransTask`, as :meth:`FileTranscriber.submit`
    returns it: ``task_id``, ``status``, :meth:`poll` and :meth:`wait`. ``wait(timeout=)``
    blocks up to ``timeout`` (default 3600 s), then raises :class:`TimeoutError`; the
    task goes on."""

    def __init__(self, task: _files.FileTransTask) -> None:
        super().__init__(task)
        # One request, after up to a second's wait for the service's poll budget.
        self.call_timeout = task.client.timeout + _files.MIN_POLL_INTERVAL + CALL_MARGIN

    poll = blocking(_files.FileTransTask.poll)
    wait = blocking(_files.FileTransTask.wait)

    @property
    def task_id(self) -> str:
        """The service's task id."""
        return self.wrapped.task_id

    @property
    def status(self) -> int:
        """The last StatusCode seen (21050002 QUEUEING, 21050001 RUNNING, ...)."""
        return self.wrapped.status


class FileTranscriber(_BlockingClient[_files.FileTranscriber]):
    """Blocking :class:`nlsstream.FileTranscriber` (FileTrans): same arguments, results
    and errors. :meth:`submit` returns a blocking :class:`FileTransTask`;
    :meth:`transcribe` and :meth:`result` block up to their ``timeout`` (default 3600 s)::

        with nlsstream.sync.FileTranscriber(ak_id, ak_secret, appkey=appkey) as ft:
            task = ft.submit("https://example.com/call.wav")
            result = task.wait(timeout=600)
    """

    _async_class = _files.FileTranscriber
    submit = blocking(_files.FileTranscriber.submit, wrap=FileTransTask)
    transcribe = blocking(_files.FileTranscriber.transcribe)
    result = blocking(_files.FileTranscriber.result)

    def task(self, task_id: str) -> FileTransTask:
        """A handle on a task submitted elsewhere (no request is made)."""
        return FileTransTask(self.wrapped.task(task_id))
