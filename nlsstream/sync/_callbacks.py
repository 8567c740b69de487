"""Where the blocking sessions' callbacks run: off the event-loop thread, each session's
in order, no session's waiting for another's.

Each session has a :class:`CallbackQueue`, a serial executor: the loop thread appends a
call, and one worker at a time runs the session's calls in order. The workers are a
shared, bounded pool of daemon threads (:class:`Workers`) that grows only while callbacks
run at the same time (a worker per session whose callbacks are running now, not per
session) and shrinks again when they are idle: a callback that blocks holds one worker,
and the other sessions' calls go to other workers.

The loop thread never waits here, not even for a moment on a lock: it serves every
session, and a worker holding a lock the loop thread needs may itself be waiting for the
GIL, behind hundreds of application threads (official-SDK-style code: a thread per
session), so the loop thread would wait for all of them. (With a lock shared between the
two sides, a worker paused inside it held up the loop thread's every put; the test
``tests/sync/test_callbacks.py`` pauses a worker at each line of its code in turn.) So
the loop thread's side uses only operations that cannot block: deque appends and pops,
:class:`queue.SimpleQueue` puts, and a non-blocking ``Lock.acquire(False)`` as a
test-and-set.
"""

from __future__ import annotations

import _thread
import os
import queue
import threading
import time
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
#: Seconds a job waits for a busy worker to be free before the pool grows by one.
GROW_AFTER = 0.005

Job = Callable[[], None]
#: Put in an idle worker's mailbox: take a job from the backlog (if one is left).
_FROM_BACKLOG: Job = lambda: None  # noqa: E731


class Workers:
    """A bounded pool of daemon threads that grows on demand and shrinks when idle.

    Unlike :class:`concurrent.futures.ThreadPoolExecutor`, its threads are daemons (a
    callback blocked at interpreter exit does not hold the exit up), idle ones end, and
    :meth:`submit` never blocks: an idle worker gets the job in its own mailbox, else
    the job waits in a backlog that busy workers take from as they finish; a job still
    waiting after :data:`GROW_AFTER` s (its session's and the others' callbacks are
    running, or blocked) gets a new worker, up to :attr:`max_workers`.
    """

    def __init__(self, max_workers: int = MAX_WORKERS, name: str = "nlsstream-callbacks") -> None:
        self.max_workers = max_workers
        self.name = name
        # Idle workers' mailboxes, the latest idle last (taken first: the others idle out).
        self._idle: deque[queue.SimpleQueue[Job]] = deque()
        # One per worker that may still start; a worker gives its slot back as it ends.
        self._slots: deque[int] = deque(range(max_workers))
        self._backlog: queue.SimpleQueue[Job] = queue.SimpleQueue()
        # Held while a grower thread runs (see _grow): started with
        # ``_thread.start_new_thread``, which does not wait for the thread to run (as
        # ``Thread.start()`` does, which a submit must not).
        self._growing = threading.Lock()

    @property
    def threads(self) -> int:
        """Worker threads alive now."""
        return self.max_workers - len(self._slots)

    def submit(self, job: Job) -> None:
        """Run ``job()`` on a worker: an idle one, else the first one free, else a new
        one (up to :attr:`max_workers`). Never blocks."""
        if self._hand_to_idle(job):
            return
        self._backlog.put(job)
        # A worker that went idle meanwhile would not look at the backlog again.
        if not self._hand_to_idle(_FROM_BACKLOG) and self._growing.acquire(False):
            _thread.start_new_thread(self._grow, ())

    def _hand_to_idle(self, job: Job) -> bool:
        """Give ``job`` to the latest idle worker; False if none is idle."""
        try:
            mailbox = self._idle.pop()
        except IndexError:
            return False
        mailbox.put(job)
        return True

    def _grow(self) -> None:
        """While jobs wait in the backlog, start a worker every :data:`GROW_AFTER` s
        (at once if there is none): a short callback's worker is soon free to take the
        next job, and only callbacks that run long (block) make the pool grow."""
        backlog = self._backlog
        while True:
            if self.threads:
                time.sleep(GROW_AFTER)
            if backlog.empty():
                self._growing.release()
                # A job backlogged after the look above, whose submit found this running.
                if backlog.empty() or not self._growing.acquire(False):
                    return
                continue
            try:
                slot = self._slots.pop()
            except IndexError:  # at the bound: the first worker free takes the job
                self._growing.release()
                return
            name = f"{self.name}-{slot}"
            try:
                threading.Thread(
                    target=self._work, args=(slot, _FROM_BACKLOG), name=name, daemon=True
                ).start()
            except Exception:  # no thread to be had now: the next worker free takes it
                logger.exception("could not start a callback worker")
                self._slots.append(slot)
                self._growing.release()
                return

    def _work(self, slot: int, job: Job) -> None:
        mailbox: queue.SimpleQueue[Job] = queue.SimpleQueue()
        try:
            while True:
                self._run(job)  # _FROM_BACKLOG does nothing
                next_job = self._next(mailbox)
                if next_job is None:
                    return
                job = next_job
        finally:
            self._slots.append(slot)

    def _next(self, mailbox: queue.SimpleQueue[Job]) -> Job | None:
        """The worker's next job: from the backlog, else from its mailbox once idle;
        None once it has been idle for :data:`IDLE_EXIT` s."""
        try:
            return self._backlog.get_nowait()
        except queue.Empty:
            pass
        self._idle.append(mailbox)
        if not self._backlog.empty() and self._leave_idle(mailbox):
            # Backlogged after the look above, by a submit that found no idle worker.
            return _FROM_BACKLOG
        try:
            return mailbox.get(timeout=IDLE_EXIT)
        except queue.Empty:
            pass
        if self._leave_idle(mailbox):
            return None
        # A submit took this mailbox off the idle list just now: its job is on its way.
        return mailbox.get()

    def _leave_idle(self, mailbox: queue.SimpleQueue[Job]) -> bool:
        """Take ``mailbox`` off the idle list; False if a submit took it first."""
        try:
            self._idle.remove(mailbox)
        except ValueError:
            return False
        return True

    @staticmethod
    def _run(job: Job) -> None:
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


def _forget_workers() -> None:
    # A forked child has none of the parent's threads (its spawner included): a new pool.
    global _workers, _workers_lock
    _workers, _workers_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_workers)


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
        # Held from when a drain of this queue is submitted until it ends: taken with
        # acquire(False) only, a test-and-set that never waits.
        self._draining = threading.Lock()
        # Notified when a drain ends, for join() (the loop thread never touches it).
        self._drained = threading.Condition(threading.Lock())
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
        self._calls.append((fn, args))
        if self._draining.acquire(False):
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
        with self._drained:
            return self._drained.wait_for(self._idle, timeout)

    def _idle(self) -> bool:
        return not self._calls and not self._draining.locked()

    def _drain(self) -> None:
        calls = self._calls
        while True:
            self.thread = threading.current_thread()
            try:
                while calls:  # only the drain holding _draining takes calls
                    fn, args = calls.popleft()
                    self._run(fn, args)
            finally:
                self.thread = None
                self._draining.release()
            with self._drained:
                self._drained.notify_all()
            # A call queued after the last look, whose put found this drain running.
            if not (calls and self._draining.acquire(False)):
                return

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
