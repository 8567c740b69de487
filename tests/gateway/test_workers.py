"""Worker-thread jobs a cancelled caller waits for (nlsstream.gateway.workers).

A cancelled ``run_in_executor`` future lets its caller close a file the thread is still
reading: libsndfile then raised an unraisable ValueError from its callback, which
failed an unrelated test in CI.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import io
import threading
from typing import Any

import pytest
from helpers import FIXTURES

from nlsstream.gateway import Gateway
from nlsstream.gateway.workers import in_thread, until_done

WAIT = 10.0


def _blocking(started: threading.Event, release: threading.Event, log: list[str]) -> str:
    started.set()
    assert release.wait(WAIT)
    log.append("finished")
    return "done"


async def test_a_cancelled_caller_waits_for_the_running_job() -> None:
    started, release = threading.Event(), threading.Event()
    log: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        caller = asyncio.ensure_future(in_thread(pool, _blocking, started, release, log))
        assert await asyncio.to_thread(started.wait, WAIT)
        caller.cancel()
        # Cancelled twice: the second cancel must not end the wait either.
        await asyncio.sleep(0)
        caller.cancel()
        done, _ = await asyncio.wait([caller], timeout=0.2)
        assert not done, "the caller returned while its job was still running"
        release.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(caller, WAIT)
        assert log == ["finished"]


async def test_a_job_not_started_is_dropped() -> None:
    started, release = threading.Event(), threading.Event()
    log: list[str] = []
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        busy = asyncio.ensure_future(in_thread(pool, _blocking, started, release, log))
        assert await asyncio.to_thread(started.wait, WAIT)
        queued = asyncio.ensure_future(in_thread(pool, log.append, "queued ran"))
        await asyncio.sleep(0)
        queued.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(queued, WAIT)  # at once: nothing to wait for
        release.set()
        assert await asyncio.wait_for(busy, WAIT) == "done"
    assert log == ["finished"]


async def test_results_and_errors_pass_through() -> None:
    assert await in_thread(None, sum, [1, 2, 3]) == 6
    with pytest.raises(ZeroDivisionError):
        await in_thread(None, divmod, 1, 0)


async def test_until_done_keeps_a_cancel_for_after_the_job() -> None:
    loop = asyncio.get_running_loop()
    job: asyncio.Future[None] = loop.create_future()
    waiter = asyncio.ensure_future(until_done(job))
    await asyncio.sleep(0)
    waiter.cancel()
    done, _ = await asyncio.wait([waiter], timeout=0.05)
    assert not done
    job.set_result(None)
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(waiter, WAIT)


class _SlowFile(io.BytesIO):
    """An upload whose reads wait until released (a slow disk, a busy machine)."""

    def __init__(self, data: bytes) -> None:
        super().__init__(data)
        self.entered, self.release = threading.Event(), threading.Event()
        self.reading = 0

    def readinto(self, buffer: Any) -> int:
        return self._slowly(super().readinto, buffer)

    def read(self, size: int | None = -1) -> bytes:
        return self._slowly(super().read, size)

    def _slowly(self, fn: Any, arg: Any) -> Any:
        self.reading += 1
        self.entered.set()
        try:
            assert self.release.wait(WAIT)
            return fn(arg)
        finally:
            self.reading -= 1


@pytest.mark.parametrize("fmt", ["wav", "pcm"])
async def test_a_cancelled_recognition_leaves_the_file_to_its_caller_only_once_unread(
    fmt: str,
) -> None:
    audio = (FIXTURES / "hello.wav").read_bytes()
    file = _SlowFile(audio if fmt == "wav" else audio[44:])
    async with Gateway(recognizer="span") as gw:
        assert gw.recordings is not None
        recognising = asyncio.ensure_future(
            gw.recordings.recognise(
                file, len(file.getvalue()), fmt=fmt, max_seconds=60, too_long=41010104
            )
        )
        assert await asyncio.to_thread(file.entered.wait, WAIT)
        recognising.cancel()
        done, _ = await asyncio.wait([recognising], timeout=0.2)
        assert not done, "recognise returned while a worker was reading its file"
        file.release.set()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(recognising, WAIT)
        assert file.reading == 0
        file.close()
