"""Blocking work in worker threads, which a cancelled caller waits for.

``loop.run_in_executor`` hands back a future that is cancelled together with its
caller while the thread goes on running. A caller that then closes the file, or
returns the decoder, the job was using races the thread: libsndfile reading a closed
file (an unraisable ``ValueError`` from its callback), a PocketSphinx decoder fed in one
thread while another resets it for the next session. :func:`in_thread` drops a job that
has not started and waits for one that has; each job is a bounded piece of work (a
block, a header, a chunk of audio), so the wait is too.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections.abc import Callable
from typing import Any, TypeVar

__all__ = ["in_thread", "until_done"]

T = TypeVar("T")


async def in_thread(
    executor: concurrent.futures.Executor | None, fn: Callable[..., T], /, *args: Any
) -> T:
    """``fn(*args)`` on ``executor`` (``None``: the loop's default pool). When the caller
    is cancelled, a job not yet started is dropped and a running one is waited for
    before :class:`asyncio.CancelledError` propagates: what the job uses may then be
    closed."""
    loop = asyncio.get_running_loop()
    work: concurrent.futures.Future[T] | None = None
    if executor is None:
        job: asyncio.Future[T] = loop.run_in_executor(None, fn, *args)
    else:
        work = executor.submit(fn, *args)
        job = asyncio.wrap_future(work, loop=loop)
    try:
        return await asyncio.shield(job)
    except asyncio.CancelledError:
        if work is None or not work.cancel():
            await until_done(job)
        raise


async def until_done(job: asyncio.Future[Any]) -> None:
    """Wait until ``job`` is done, through any cancellation of the caller (re-raised
    once the job is done). Its result or exception is left for its owner."""
    cancelled: asyncio.CancelledError | None = None
    while not job.done():
        try:
            await asyncio.wait([job])
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        raise cancelled
