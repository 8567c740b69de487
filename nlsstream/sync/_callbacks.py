"""Where the blocking sessions' callbacks run: off the event-loop thread, each session's
in order, no session's waiting for another's.

Each session has a :class:`CallbackQueue`, a serial executor: the loop thread appends a
call (never waiting), and one worker at a time runs the session's calls in order. The
workers are a shared, bounded pool of daemon threads (:class:`Workers`) that grows only
while callbacks run at the same time (a worker per session whose callbacks are running
now, not per session) and shrinks again when they are idle: a callback that blocks
holds one worker, and the other sessions' calls go to other workers.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Any

__all__ = ["MAX_WORKERS", "CallbackQueue", "Workers", "workers"]

from ..redaction import get_logger

logger = get_logger("nlsstream.sync")

#: Most worker threads running callbacks at once, process-wide: as many sessions' callbacks
#: can block at the same time before a further session's callbacks wait for a worker.
MAX_WORKERS = 512
#: Seconds an idle worker waits for work before it ends.
IDLE_EXIT = 5.0


class Workers:
    """A bounded pool of daemon threads that grows on demand and shrinks when idle.

    Unlike :class:`concurrent.futures.ThreadPoolExecutor`, its threads are daemons (a
    callback blocked at interpreter exit does not hold the exit up) and idle ones end.
    """

    def __init__(self, max_workers: int = MAX_WORKERS, name: str = "nlsstream-callbacks") -> None:
        self.max_workers = max_workers
        self.name = name
        self._jobs: deque[Callable[[], None]] = deque()
        self._cond = threading.Condition(threading.Lock())
        self._count = 0  # live workers
        self._idle = 0  # workers waiting for a job
        self._serial = 0

    @property
    def threads(self) -> int:
        """Worker threads alive now."""
        return self._count

    def submit(self, job: Callable[[], None]) -> None:
        """Run ``job()`` on a worker: an idle one, else a new one (up to
        :attr:`max_workers`; beyond, it waits for the first worker to be free)."""
        with self._cond:
            self._jobs.append(job)
            if len(self._jobs) > self._idle and self._count < self.max_workers:
                self._count += 1
                self._serial += 1
                name = f"{self.name}-{self._serial}"
                threading.Thread(target=self._work, name=name, daemon=True).start()
            else:
                self._cond.notify()

    def _work(self) -> None:
        cond = self._cond
        while True:
            with cond:
                while not self._jobs:
                    self._idle += 1
                    cond.wait(IDLE_EXIT)
                    self._idle -= 1
                    if not self._jobs:
                        self._count -= 1
                        return
                job = self._jobs.popleft()
            try:
                job()
            except BaseException:  # a job never raises (CallbackQueue catches); be safe
                logger.exception("callback worker job raised")


_workers: Workers | None = None
_workers_lock = threading.Lock()


def workers() -> Workers:
    """The process's shared callback workers."""
    global _workers
    with _workers_lock:
        if _workers is None:
            _workers = Workers()
        return _workers


class CallbackQueue:
    """One session's callbacks, run in order on the shared :class:`Workers`.

    :meth:`put` (from the loop thread) never waits: it returns False when ``limit`` calls
    are already waiting (the caller decides what an overflow means). :meth:`put_always`
    ignores the limit (the session's last few calls: its error and its close). An
    exception in a call goes to ``on_raise(exc)`` (on the same worker, in order), or is
    logged.
    """

    def __init__(
        self,
        limit: int,
        *,
        on_raise: Callable[[Callable[..., object], Exception], None] | None = None,
        pool: Workers | None = None,
    ) -> None:
        self.limit = limit
        self._pool = pool or workers()
        self._on_raise = on_raise
        self._calls: deque[tuple[Callable[..., object], tuple[Any, ...]]] = deque()
        self._lock = threading.Lock()
        self._scheduled = False  # a drain of this queue is submitted or running
        self._idle = threading.Event()
        self._idle.set()
        #: The worker thread running this queue's calls now, if any.
        self.thread: threading.Thread | None = None

    def put(self, fn: Callable[..., object], *args: Any) -> bool:
        """Queue ``fn(*args)``; False (nothing queued) if ``limit`` calls are waiting."""
        if len(self._calls) >= self.limit:
            return False
        self.put_always(fn, *args)
        return True

    def put_always(self, fn: Callable[..., object], *args: Any) -> None:
        """Queue ``fn(*args)`` whatever the limit."""
        with self._lock:
            self._calls.append((fn, args))
            if self._scheduled:
                return
            self._scheduled = True
            self._idle.clear()
        self._pool.submit(self._drain)

    @property
    def in_callback(self) -> bool:
        """Whether the calling thread is running one of this queue's calls."""
        return self.thread is threading.current_thread()

    def join(self, timeout: float) -> bool:
        """Wait until every queued call has run; False after ``timeout`` s. From inside
        one of the calls, returns True at once (the rest runs after it)."""
        if self.in_callback:
            return True
        return self._idle.wait(timeout)

    def _drain(self) -> None:
        self.thread = threading.current_thread()
        try:
            while True:
                with self._lock:
                    if not self._calls:
                        self._scheduled = False
                        self._idle.set()
                        return
                    fn, args = self._calls.popleft()
                self._run(fn, args)
        finally:
            self.thread = None

    def _run(self, fn: Callable[..., object], args: tuple[Any, ...]) -> None:
        try:
            fn(*args)
        except Exception as exc:
            if self._on_raise is None:
                logger.exception("callback %s raised", getattr(fn, "__name__", fn))
                return
            try:
                self._on_raise(fn, exc)
            except Exception:
                logger.exception("callback error handler raised")
