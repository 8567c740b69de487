"""The local gateway's FileTrans tasks and the downloads of recordings (``file_link``,
``audio_address``).

Tasks move QUEUEING → RUNNING → SUCCESS (or a documented error) on at most
``file_workers`` at once; the newest ``max_file_tasks`` are kept. A task belongs to the
AccessKey that submitted it: another key asking for it gets the answer for an unknown
task (41050010).

Downloads: ``http(s)://`` links are fetched with a deadline (:data:`DOWNLOAD_TIMEOUT`)
into a spooled file; ``file://`` links (a local emulator's convenience) name a local
**regular** file (a FIFO or device is refused without blocking), only under ``file_root``
when the gateway has one (``serve --file-root``). What went wrong is logged; the answer
carries only the documented status.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import stat
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from aiohttp import ClientError, ClientSession, ClientTimeout

from ..realtime.protocol import DirectiveError
from ..recordings import wire
from ..recordings.wire import Recognised, Refusal
from ..redaction import get_logger
from .faults import Faults
from .http import HttpLimits, spool_body

__all__ = ["CALLBACK_TIMEOUT", "DOWNLOAD_TIMEOUT", "Downloads", "FileTask", "FileTrans"]

log = get_logger("nlsstream.gateway.filetrans")

#: Seconds a download (file_link, audio_address) or a callback POST may take.
DOWNLOAD_TIMEOUT = 60.0
CALLBACK_TIMEOUT = 10.0
#: Largest Task JSON accepted (a real one is a few hundred bytes).
MAX_TASK_BYTES = 64 * 1024
#: Recognition of a task's audio: ``await recognise(file, size, first_channel_only)``
#: gives its sentences and its duration in ms.
Recognise = Callable[[IO[bytes], int, bool], Awaitable[tuple[list[Recognised], int]]]


class Downloads:
    """Fetches recordings for the gateway (see the module's docstring)."""

    def __init__(self, limits: HttpLimits, file_root: Path | None) -> None:
        self.limits = limits
        self.file_root = file_root.resolve() if file_root is not None else None
        self._http: ClientSession | None = None

    async def close(self) -> None:
        if self._http is not None:
            await self._http.close()
            self._http = None

    def client(self) -> ClientSession:
        if self._http is None:
            self._http = ClientSession(timeout=ClientTimeout(total=DOWNLOAD_TIMEOUT))
        return self._http

    async def fetch(self, url: str, limit: int) -> tuple[IO[bytes], int]:
        """The recording at ``url`` as an open file (at 0) and its size; :class:`Refusal`
        with the FileTrans download status otherwise (the details only in the log)."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "file":
            return await asyncio.wait_for(self._local(parts.path, limit), DOWNLOAD_TIMEOUT)
        if parts.scheme not in ("http", "https"):
            raise Refusal(41050011, f"unsupported link scheme {parts.scheme!r}")
        try:
            async with self.client().get(url, allow_redirects=False) as r:
                if r.status == 404:
                    raise Refusal(41050024, "the file server answered 404")
                if r.status == 403:
                    raise Refusal(41050025, "the file server answered 403")
                if r.status >= 500:
                    raise Refusal(41050026, f"the file server answered {r.status}")
                if r.status != 200:
                    raise Refusal(41050002, f"the file server answered {r.status}")
                too_large = Refusal(41050004, f"the file is larger than {limit} bytes")
                return await spool_body(
                    r.content,
                    limit=limit,
                    limits=self.limits,
                    declared=r.content_length,
                    too_large=too_large,
                )
        except (ClientError, asyncio.TimeoutError) as exc:
            raise Refusal(41050002, f"download failed: {type(exc).__name__}") from None
        except Refusal as exc:
            if exc.status == 40000004:
                raise Refusal(41050002, "the download stalled") from None
            raise

    async def _local(self, url_path: str, limit: int) -> tuple[IO[bytes], int]:
        path = Path(urllib.request.url2pathname(url_path))
        if self.file_root is not None:
            resolved = await asyncio.to_thread(path.resolve)
            if not resolved.is_relative_to(self.file_root):
                raise Refusal(41050002, f"{path} is outside the file root")
            path = resolved
        try:
            # O_NONBLOCK: opening a FIFO must not wait for a writer; only regular files
            # are read (a FIFO or a device would never end).
            fd = await asyncio.to_thread(
                os.open, path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0)
            )
        except OSError as exc:
            raise Refusal(41050002, f"cannot open {path}: {exc.strerror}") from None
        try:
            info = os.fstat(fd)
            if not stat.S_ISREG(info.st_mode):
                raise Refusal(41050002, f"{path} is not a regular file")
            if info.st_size > limit:
                raise Refusal(41050004, f"{path} is larger than {limit} bytes")
            os.set_blocking(fd, True)
            return os.fdopen(fd, "rb"), info.st_size
        except BaseException:
            os.close(fd)
            raise


@dataclass
class FileTask:
    """One FileTrans task as the gateway keeps it (:attr:`FileTrans.tasks`)."""

    task_id: str
    task: dict[str, Any]
    faults: Faults
    request_time: int  # epoch ms
    #: The AccessKeyId that submitted it (only it may read the result).
    owner: str = ""
    status: int = 21050002
    biz_duration: int = 0
    solve_time: int | None = None
    result: dict[str, Any] | None = None
    #: Loop times of the GetTaskResult requests for this task.
    polls: list[float] = field(default_factory=list)
    #: HTTP status of the callback POST (``None``: not sent or failed to connect).
    callback_status: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)

    def answer(self) -> dict[str, Any]:
        """The GetTaskResult body (without RequestId)."""
        out: dict[str, Any] = {
            "TaskId": self.task_id,
            "StatusText": wire.status_name(self.status),
            "StatusCode": self.status,
        }
        if self.status != 21050002:  # 0 while RUNNING, as the cloud reports it
            out["BizDuration"] = self.biz_duration if self.done.is_set() else 0
        if self.solve_time is not None:
            out["SolveTime"] = self.solve_time
        if self.result is not None:
            out["Result"] = self.result
        return out


def parse_task(text: str | None, appkeys: list[str] | None) -> dict[str, Any]:
    """SubmitTask's ``Task`` JSON, checked; :class:`Refusal` with the FileTrans status."""
    if not text or len(text) > MAX_TASK_BYTES:
        raise Refusal(41050013, "Task is empty or too long")
    try:
        task = json.loads(text)
    except (ValueError, RecursionError):  # bad JSON, a 5,000-digit number, deep nesting
        raise Refusal(41050013, "Task is not JSON") from None
    if not isinstance(task, dict):
        raise Refusal(41050013, "Task is not a JSON object")
    appkey = task.get("appkey") or task.get("app_key")
    if not appkey:
        raise Refusal(41050014, "no appkey")
    if not isinstance(appkey, str) or (appkeys is not None and appkey not in appkeys):
        raise Refusal(41050015, "unknown appkey")
    link = task.get("file_link")
    if not isinstance(link, str) or urllib.parse.urlsplit(link).scheme not in (
        "http",
        "https",
        "file",
    ):
        raise Refusal(41050011, "bad file_link")
    if task.get("enable_callback"):
        callback = task.get("callback_url")
        if not isinstance(callback, str) or urllib.parse.urlsplit(callback).scheme not in (
            "http",
            "https",
        ):
            raise Refusal(41050012, "bad callback_url")
    return task


class FileTrans:
    """The FileTrans tasks of one gateway: submitted, run on ``workers`` at once, kept
    (the newest ``max_tasks``), answered to their owner."""

    def __init__(
        self, downloads: Downloads, recognise: Recognise, workers: int, max_tasks: int
    ) -> None:
        self.downloads = downloads
        self.recognise = recognise
        self.max_tasks = max_tasks
        #: FileTrans tasks by TaskId, oldest first (at most ``max_tasks``).
        self.tasks: collections.OrderedDict[str, FileTask] = collections.OrderedDict()
        self._workers = asyncio.Semaphore(workers)
        self._running: set[asyncio.Task[None]] = set()

    async def close(self) -> None:
        """Cancel the running tasks (shutdown never waits for a download)."""
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.wait(self._running, timeout=5)

    def submit(self, task: dict[str, Any], faults: Faults, owner: str) -> FileTask | None:
        """A new task, running; ``None`` when every kept task is unfinished."""
        self._evict()
        if len(self.tasks) >= self.max_tasks:
            return None
        ft = FileTask(uuid.uuid4().hex, task, faults, int(time.time() * 1000), owner)
        self.tasks[ft.task_id] = ft
        runner = asyncio.create_task(self._run(ft))
        self._running.add(runner)
        runner.add_done_callback(self._running.discard)
        log.info("FileTrans task %s submitted", ft.task_id)
        return ft

    def get(self, task_id: str, owner: str) -> FileTask | None:
        """The task, if ``owner`` submitted it (tenants apart: else as if unknown)."""
        ft = self.tasks.get(task_id)
        return ft if ft is not None and ft.owner == owner else None

    def _evict(self) -> None:
        """Forget the oldest finished tasks beyond ``max_tasks``."""
        excess = len(self.tasks) - self.max_tasks + 1
        for task_id in [t for t, ft in self.tasks.items() if ft.done.is_set()][: max(excess, 0)]:
            del self.tasks[task_id]

    async def _run(self, ft: FileTask) -> None:
        """One FileTrans task: QUEUEING until a worker is free, RUNNING, then done."""
        try:
            async with self._workers:
                ft.status = 21050001
                try:
                    await self._work(ft)
                except Refusal as exc:
                    ft.status = exc.status
                    log.info("FileTrans task %s failed: %s %s", ft.task_id, exc.status, exc.detail)
                except DirectiveError as exc:  # no decoder free in time
                    ft.status = 51050002
                    log.warning("FileTrans task %s: %s", ft.task_id, exc.status_text)
                except asyncio.TimeoutError:
                    ft.status = 41050002
                    log.info("FileTrans task %s: the download timed out", ft.task_id)
                except Exception:
                    ft.status = 51050000
                    log.exception("FileTrans task %s failed", ft.task_id)
                ft.solve_time = int(time.time() * 1000)
        finally:
            ft.done.set()
        log.info(
            "FileTrans task=%s audio=%.2fs status=%s",
            ft.task_id,
            ft.biz_duration / 1000,
            ft.status,
        )
        if ft.task.get("enable_callback"):
            await self._callback(ft)

    async def _work(self, ft: FileTask) -> None:
        if ft.faults.complete_delay:
            await asyncio.sleep(ft.faults.complete_delay)
        if ft.faults.fail_status is not None:
            raise Refusal(ft.faults.fail_status, "injected fault")
        file, size = await self.downloads.fetch(ft.task["file_link"], wire.FILE_TRANS_MAX_BYTES)
        try:
            first_only = bool(ft.task.get("first_channel_only"))
            sentences, ft.biz_duration = await self.recognise(file, size, first_only)
        finally:
            file.close()
        if not sentences:
            ft.status = 21050003
            return
        ft.result = wire.file_trans_answer(sentences, bool(ft.task.get("enable_words")))
        ft.status = 21050000

    async def _callback(self, ft: FileTask) -> None:
        """POST the 4.0 callback body (the polled answer plus RequestTime)."""
        body = {**ft.answer(), "RequestTime": ft.request_time}
        url = ft.task["callback_url"]
        try:
            async with self.downloads.client().post(
                url, json=body, timeout=ClientTimeout(total=CALLBACK_TIMEOUT)
            ) as r:
                ft.callback_status = r.status
            log.info("FileTrans task %s: callback answered HTTP %s", ft.task_id, r.status)
        except (ClientError, asyncio.TimeoutError) as exc:
            log.warning("FileTrans task %s: callback failed: %s", ft.task_id, type(exc).__name__)
