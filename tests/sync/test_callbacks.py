"""The blocking sessions' callback executors (``nlsstream.sync._callbacks``): order per
session, isolation between sessions, a bounded pool, and a producer (the loop thread)
that never waits, wherever a worker happens to be."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from types import CodeType, FrameType
from typing import Any

import pytest

from nlsstream.sync import _callbacks
from nlsstream.sync._callbacks import CallbackQueue, Workers

WAIT = 10.0  # bound on every wait for work that should happen at once


def _wait_until(check: Callable[[], bool], timeout: float = WAIT) -> bool:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True


@pytest.fixture(autouse=True)
def quick_idle_exit(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """Idle workers end after 50 ms: the boundary is reached quickly, and no test's
    workers outlive it for long (other tests count the process's threads)."""
    monkeypatch.setattr(_callbacks, "IDLE_EXIT", 0.05)
    yield


def test_a_queue_runs_its_calls_in_order_one_at_a_time() -> None:
    q = CallbackQueue(10_000, pool=Workers(max_workers=8))
    seen: list[int] = []
    running = [0, 0]  # now, most at once

    def call(i: int) -> None:
        running[0] += 1
        running[1] = max(running)
        seen.append(i)
        if i % 50 == 0:
            time.sleep(0.001)  # let a put land while a drain runs
        running[0] -= 1

    for i in range(500):
        assert q.put(call, i)
        if i % 100 == 0:
            time.sleep(0.002)  # and some after a drain ended
    assert q.join(WAIT)
    assert seen == list(range(500))
    assert running[1] == 1


def test_puts_from_two_threads_each_run_once_and_never_together() -> None:
    q = CallbackQueue(100_000, pool=Workers(max_workers=8))
    seen: list[tuple[str, int]] = []
    active = threading.Lock()

    def call(who: str, i: int) -> None:
        assert active.acquire(blocking=False), "two calls of one queue ran at once"
        seen.append((who, i))
        active.release()

    def producer(who: str) -> None:
        for i in range(2000):
            q.put(call, who, i)

    threads = [threading.Thread(target=producer, args=(w,)) for w in "ab"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(WAIT)
    assert q.join(WAIT)
    assert len(seen) == 4000
    for who in "ab":  # each producer's calls in its own order
        assert [i for w, i in seen if w == who] == list(range(2000))


def test_a_blocked_queue_holds_up_only_itself() -> None:
    pool = Workers(max_workers=8)
    slow, fast = CallbackQueue(100, pool=pool), CallbackQueue(100, pool=pool)
    release = threading.Event()
    fast_seen: list[int] = []
    slow.put(release.wait, WAIT)
    slow.put(fast_seen.append, -1)  # behind the blocked call: waits for it
    for i in range(5):
        fast.put(fast_seen.append, i)
    assert fast.join(WAIT)
    assert fast_seen == [0, 1, 2, 3, 4]
    assert not slow.join(0.05)  # still blocked
    release.set()
    assert slow.join(WAIT)
    assert fast_seen[-1] == -1


def test_join_from_inside_a_call_returns_at_once() -> None:
    q = CallbackQueue(100, pool=Workers(max_workers=2))
    answers: list[bool] = []
    q.put(lambda: answers.append(q.join(WAIT)))
    q.put(time.sleep, 0.01)
    assert q.join(WAIT)
    assert answers == [True]
    assert q.in_callback is False


def test_the_limit_refuses_a_put_and_put_always_ignores_it() -> None:
    q = CallbackQueue(2, pool=Workers(max_workers=2))
    release = threading.Event()
    q.put(release.wait, WAIT)
    assert _wait_until(lambda: q.thread is not None)  # the first call is running
    assert q.put(print) and q.put(print)
    assert not q.put(print)  # two waiting: the limit
    q.put_always(print)
    release.set()
    assert q.join(WAIT)


def test_the_pool_is_bounded_and_a_backlogged_job_runs_once_a_worker_is_free() -> None:
    pool = Workers(max_workers=2)
    gates = [threading.Event(), threading.Event()]
    done: list[int] = []
    for gate in gates:
        pool.submit(lambda gate=gate: gate.wait(WAIT))
    for i in range(3):
        pool.submit(lambda i=i: done.append(i))
    assert _wait_until(lambda: pool.threads == 2)
    time.sleep(0.05)
    assert done == [] and pool.threads == 2  # no third thread, the jobs wait
    gates[0].set()
    assert _wait_until(lambda: sorted(done) == [0, 1, 2])
    gates[1].set()


def test_idle_workers_end_and_jobs_at_the_idle_boundary_still_run() -> None:
    pool = Workers(max_workers=4)
    done: list[int] = []
    for i in range(200):
        pool.submit(lambda i=i: done.append(i))
        # Around the workers' 50 ms idle exit, so that some submits meet a worker that
        # is just giving up.
        time.sleep((i % 7) * 0.01)
    assert _wait_until(lambda: len(done) == 200)
    assert sorted(done) == list(range(200))
    assert _wait_until(lambda: pool.threads == 0)


# --------------------------------------------------------------------------- never waits


def _worker_code() -> list[CodeType]:
    """The worker side's code: where a worker can be preempted."""
    names = ("_drain", "_work", "_next", "_leave_idle")
    return [
        getattr(cls, name).__code__
        for cls in (CallbackQueue, Workers)
        for name in names
        if hasattr(cls, name)
    ]


def _paused_at(code: CodeType, line: int) -> tuple[bool, float]:
    """Pause a worker at ``line`` of ``code`` (reached by a drain, its end, a worker going
    idle, a later drain; idle exit 50 ms) and time the producer's puts meanwhile:
    (reached, seconds the puts took)."""
    paused, go = threading.Event(), threading.Event()

    def local(frame: FrameType, event: str, arg: Any) -> Any:
        if event == "line" and frame.f_lineno == line and not paused.is_set():
            paused.set()
            go.wait(WAIT)
        return local

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        return local if frame.f_code is code else None

    pool = Workers(max_workers=4)
    queues = [CallbackQueue(100, pool=pool) for _ in range(2)]
    threading.settrace(tracer)  # the pool's threads start from now on: each is traced
    try:
        for _ in range(3):
            queues[0].put(time.sleep, 0.001)
            if paused.wait(0.1):
                break
        else:
            return False, 0.0
        start = time.monotonic()
        for q in queues:
            q.put(time.sleep, 0)
            q.put_always(time.sleep, 0)
        return True, time.monotonic() - start
    finally:
        threading.settrace(None)  # type: ignore[arg-type]
        go.set()
        for q in queues:
            assert q.join(WAIT)


def test_a_put_never_waits_for_a_worker_wherever_it_is_paused() -> None:
    """A worker stopped at any line of its code (as one waiting for the GIL behind many
    threads is) must not hold up the loop thread's puts, to its own queue or another's:
    a lock shared with the workers would (the worker paused while holding it)."""
    reached, waited = [], []
    for code in _worker_code():
        for line in sorted({line for _, _, line in code.co_lines() if line is not None}):
            hit, took = _paused_at(code, line)
            if hit:
                reached.append(f"{code.co_name}:{line}")
                if took > 1.0:
                    waited.append(f"{code.co_name}:{line} ({took:.1f} s)")
    assert not waited, f"a put waited for a worker paused at {waited}"
    # The scenario reaches the drain's loop and the worker's idle wait, and most lines.
    assert len(reached) >= 25, reached


def test_a_submit_that_needs_a_new_worker_does_not_wait_for_it_to_start(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``Thread.start()`` waits until the new thread runs (which, behind hundreds of
    threads, can take long): a submit must not call it."""
    pool = Workers(max_workers=4, name="slow-start")
    go = threading.Event()
    start_thread = threading.Thread.start

    def slow_start(thread: threading.Thread) -> None:
        if thread.name.startswith("slow-start-"):  # the pool's workers, as if late
            go.wait(WAIT)
        start_thread(thread)

    monkeypatch.setattr(threading.Thread, "start", slow_start)
    done = threading.Event()
    try:
        start = time.monotonic()
        pool.submit(done.set)
        took = time.monotonic() - start
    finally:
        go.set()
    assert took < 1.0, f"submit waited {took:.1f} s for the new worker to start"
    assert done.wait(WAIT)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_runs_callbacks_on_a_pool_of_its_own(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A child has none of its parent's threads: the shared pool's idle workers do not
    exist there, and a job handed to one would never run."""
    monkeypatch.setattr(_callbacks, "IDLE_EXIT", WAIT)  # the parent's worker stays idle
    pool = _callbacks.workers()
    ran = threading.Event()
    pool.submit(ran.set)
    assert ran.wait(WAIT)
    assert _wait_until(lambda: len(pool._idle) > 0)  # an idle worker, at the fork
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report whether a callback job runs, then leave at once
        try:
            done = threading.Event()
            _callbacks.workers().submit(done.set)
            os.write(write, b"ran" if done.wait(WAIT) else b"lost")
        finally:
            os._exit(0)
    os.close(write)
    try:
        with os.fdopen(read, "rb") as pipe:
            answer = pipe.read()
    finally:
        os.waitpid(pid, 0)
    assert answer == b"ran"
