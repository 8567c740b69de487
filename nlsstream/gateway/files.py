"""The local gateway's recording services, on the port of ``/ws/v1`` (docs/protocol.md §11).

* ``POST /stream/v1/FlashRecognizer``: the audio in the body, or ``audio_address=`` (GET
  or POST); token in the query (or ``X-NLS-Token``);
* ``POST /stream/v1/asr``: the one-sentence REST API, ≤ 60 s;
* POP RPC on ``/``: ``Action=SubmitTask`` / ``GetTaskResult`` (FileTrans) and
  ``Action=CreateToken``, signed with an AccessKey (§8.2), parameters in the query or a
  form body, as real clients send them.

Every recording is decoded with soundfile and each channel is recognised by the
gateway's engine (the same segmentation and recogniser as the real-time transcriber),
on the gateway's recognition pool. FileTrans tasks move QUEUEING → RUNNING → SUCCESS (or
a documented error) on at most ``file_workers`` at once; the newest ``max_file_tasks``
are kept. Faults (``Gateway.faults`` / ``queue_faults``) apply to each HTTP request:
``start_delay`` delays the answer, ``http_status`` answers that HTTP status, ``drop_at``
drops the connection, ``fail_status`` is the status answered (FileTrans: the status the
submitted task ends with), ``complete_delay`` keeps a FileTrans task RUNNING longer.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import hmac
import json
import logging
import time
import urllib.parse
import urllib.request
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import ClientError, ClientSession, ClientTimeout, web

from .. import auth
from ..audio import decode_channels
from ..errors import STATUS_CODES, SUCCESS, AudioFormatError, status_text
from ..realtime.protocol import TRANSCRIBER, DirectiveError, StartParams
from ..recordings.clients import read_bounded
from .engine import TranscriberTask
from .faults import Faults

if TYPE_CHECKING:
    from .server import Gateway

__all__ = ["FileServices", "FileTask"]

log = logging.getLogger("nlsstream.gateway.files")

FLASH_PATH = "/stream/v1/FlashRecognizer"
REST_PATH = "/stream/v1/asr"
POP_PATH = "/"
#: Largest recording the FlashRecognizer takes (body or audio_address), and FileTrans.
FLASH_MAX_BYTES = 100 * 1024 * 1024
FILE_TRANS_MAX_BYTES = 512 * 1024 * 1024
FLASH_MAX_MS = 2 * 3600 * 1000
REST_MAX_MS = 60 * 1000
#: Seconds a download (file_link, audio_address) or a callback POST may take.
DOWNLOAD_TIMEOUT = 60.0
CALLBACK_TIMEOUT = 10.0
#: Lifetime of the tokens CreateToken issues.
TOKEN_LIFETIME = 24 * 3600
MAX_ISSUED_TOKENS = 10000
#: PCM fed to a channel's segmenter at once (1 s at 16 kHz).
_FEED_BYTES = 32000
_FLASH_FORMATS = frozenset({"wav", "mp3", "opus", "aac", "mp4", "pcm", "ogg", "flac"})


class _Failure(Exception):
    """A request or task fails with a documented status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


def _name(status: int) -> str:
    known = STATUS_CODES.get(status)
    return known.name if known is not None else "INJECTED_FAULT"


def _request_id() -> str:
    return str(uuid.uuid4()).upper()


@dataclass
class Sentence:
    """One recognised sentence of one channel (times in ms)."""

    channel: int
    begin: int
    end: int
    text: str
    words: list[tuple[str, int, int]]


@dataclass
class FileTask:
    """One FileTrans task as the gateway keeps it (:attr:`FileServices.tasks`)."""

    task_id: str
    task: dict[str, Any]
    faults: Faults
    request_time: int  # epoch ms
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
            "StatusText": _name(self.status),
            "StatusCode": self.status,
        }
        if self.status != 21050002:  # 0 while RUNNING, as the cloud reports it
            out["BizDuration"] = self.biz_duration if self.done.is_set() else 0
        if self.solve_time is not None:
            out["SolveTime"] = self.solve_time
        if self.result is not None:
            out["Result"] = self.result
        return out


class FileServices:
    """The recording endpoints of one :class:`~nlsstream.gateway.Gateway`."""

    def __init__(self, gateway: Gateway) -> None:
        self.gw = gateway
        #: FileTrans tasks by TaskId, oldest first (at most ``gateway.max_file_tasks``).
        self.tasks: collections.OrderedDict[str, FileTask] = collections.OrderedDict()
        self._workers = asyncio.Semaphore(gateway.file_workers)
        self._running: set[asyncio.Task[None]] = set()
        self._http: ClientSession | None = None

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post(FLASH_PATH, self._flash),
            web.get(FLASH_PATH, self._flash),
            web.post(REST_PATH, self._rest),
            web.get(POP_PATH, self._pop),
            web.post(POP_PATH, self._pop),
        ]

    async def close(self) -> None:
        """Cancel the running tasks and close the HTTP client."""
        for task in list(self._running):
            task.cancel()
        if self._running:
            await asyncio.wait(self._running, timeout=5)
        if self._http is not None:
            await self._http.close()
            self._http = None

    def _client(self) -> ClientSession:
        if self._http is None:
            self._http = ClientSession(timeout=ClientTimeout(total=DOWNLOAD_TIMEOUT))
        return self._http

    # ------------------------------------------------------------ faults, bodies

    async def _guarded(
        self,
        request: web.Request,
        handler: Callable[[web.Request, Faults], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Every recording endpoint: this request's faults applied (delay, drop, HTTP
        status), then ``handler``; a client that left is no error of the gateway's."""
        faults = self.gw._next_faults()
        if faults.start_delay:
            await asyncio.sleep(faults.start_delay)
        if faults.drop_at is not None:
            log.info("%s %s: injected drop", request.method, request.path)
            if request.transport is not None:
                request.transport.abort()
            return web.Response(status=499)  # reaches nobody
        if faults.http_status is not None:
            answer: web.StreamResponse = web.Response(
                status=faults.http_status, text="injected fault"
            )
        else:
            try:
                answer = await handler(request, faults)
            except ConnectionError:
                log.info("%s %s: the client left before the answer", request.method, request.path)
                return web.Response(status=499)
        if not request.content.at_eof() and not answer.prepared:
            # Answered without reading the upload (a refusal, an injected fault): this
            # connection serves no other request (aiohttp 3.9 would parse the rest of
            # the body as the next one, or reset the client's pooled connection).
            answer.force_close()
        return answer

    async def _body(self, request: web.Request, limit: int) -> bytes:
        if request.content_length is not None and request.content_length > limit:
            raise _Failure(40000000, f"The audio is larger than {limit // (1024 * 1024)} MB!")
        data = await read_bounded(request.content, limit)
        if data is None:
            raise _Failure(40000000, f"The audio is larger than {limit // (1024 * 1024)} MB!")
        return data

    # ------------------------------------------------------------ recognition

    async def recognise(self, channels: list[bytes], rate: int) -> list[Sentence]:
        """Every channel's sentences, in time order (channels run concurrently, each
        sentence on the gateway's decoder pool)."""
        per_channel = await asyncio.gather(
            *(self._channel(i, pcm, rate) for i, pcm in enumerate(channels))
        )
        out = [s for sentences in per_channel for s in sentences]
        out.sort(key=lambda s: (s.begin, s.channel))
        return out

    async def _channel(self, channel: int, pcm: bytes, rate: int) -> list[Sentence]:
        sentences: list[Sentence] = []

        async def emit(name: str, payload: dict[str, Any] | None) -> None:
            if name == "SentenceEnd" and payload is not None and payload["result"]:
                words = [(w["text"], w["startTime"], w["endTime"]) for w in payload["words"]]
                # A recording's sentence spans its words (the decoder hears some audio
                # before the voice detector's start).
                begin = min([payload["begin_time"], *(b for _, b, _ in words)])
                end = max([payload["time"], *(e for _, _, e in words)])
                sentences.append(Sentence(channel, begin, end, payload["result"], words))

        params = StartParams(TRANSCRIBER.name, sample_rate=rate, enable_words=True)
        task = TranscriberTask(
            params, self.gw.recognizer, self.gw._run, emit, self.gw._slots, batch=True
        )
        try:
            for i in range(0, len(pcm), _FEED_BYTES):
                await task.audio(pcm[i : i + _FEED_BYTES])
            await task.stop()
        finally:
            await task.close()
        return sentences

    async def _decode(
        self, data: bytes, fmt: str, rate: int, *, mix: bool
    ) -> tuple[list[bytes], int]:
        if fmt == "pcm":
            if rate not in (8000, 16000):
                raise _Failure(41010101, f"Unsupported sample rate {rate}!")
            if len(data) % 2 or not data:
                raise _Failure(40270003, "PCM16 audio must be a non-empty, even number of bytes!")
            return [data], rate
        try:
            channels, rate = await self.gw._run(functools.partial(decode_channels, data, mix=mix))
        except AudioFormatError as exc:
            raise _Failure(40270003, f"Audio decode error: {exc}!") from None
        return channels, rate

    # ------------------------------------------------------------ downloads

    async def download(self, url: str, limit: int) -> bytes:
        """The bytes at ``url`` (http(s) or file://); :class:`_Failure` with the
        FileTrans download status otherwise."""
        parts = urllib.parse.urlsplit(url)
        if parts.scheme == "file":
            path = Path(urllib.request.url2pathname(parts.path))
            try:
                data = await asyncio.to_thread(_read_file, path, limit)
            except OSError as exc:
                raise _Failure(41050002, f"Cannot read {path}: {exc.strerror}!") from None
            if data is None:
                raise _Failure(41050004, f"The file is larger than {limit} bytes!")
            return data
        try:
            async with self._client().get(url) as r:
                if r.status == 404:
                    raise _Failure(41050024, "The file server answered 404!")
                if r.status == 403:
                    raise _Failure(41050025, "The file server answered 403!")
                if r.status >= 500:
                    raise _Failure(41050026, f"The file server answered {r.status}!")
                if r.status != 200:
                    raise _Failure(41050002, f"The file server answered {r.status}!")
                data = await read_bounded(r.content, limit)
        except (ClientError, asyncio.TimeoutError) as exc:
            raise _Failure(41050002, f"Download failed: {type(exc).__name__}!") from None
        if data is None:
            raise _Failure(41050004, f"The file is larger than {limit} bytes!")
        return data

    # ------------------------------------------------------------ Flash and REST

    async def _flash(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, self._flash_service)

    async def _rest(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, self._rest_service)

    async def _pop(self, request: web.Request) -> web.StreamResponse:
        return await self._guarded(request, self._pop_service)

    async def _flash_service(self, request: web.Request, faults: Faults) -> web.StreamResponse:
        return await self._token_service(request, faults, self._flash_answer)

    async def _rest_service(self, request: web.Request, faults: Faults) -> web.StreamResponse:
        return await self._token_service(request, faults, self._rest_answer)

    async def _token_service(
        self,
        request: web.Request,
        faults: Faults,
        answer: Callable[[web.Request], Awaitable[dict[str, Any]]],
    ) -> web.StreamResponse:
        """What Flash and REST share: the token and appkey checks, the injected status,
        the JSON answer ``{"task_id", "result", "status", "message", ...}``."""
        task_id = uuid.uuid4().hex
        refusal = self.gw._token_refusal(request)
        try:
            if refusal is not None:
                raise _Failure(40000001, refusal)
            appkey = request.query.get("appkey", "")
            if not appkey:
                raise _Failure(41000002, "Appkey is empty!")
            if self.gw.appkeys is not None and appkey not in self.gw.appkeys:
                raise _Failure(40020105, "Appkey not exist!")
            if faults.fail_status is not None:
                raise _Failure(faults.fail_status, "Injected fault!")
            body = {"task_id": task_id, **(await answer(request))}
            body.update(status=SUCCESS, message="SUCCESS")
            http = 200
        except (_Failure, DirectiveError) as exc:  # DirectiveError: no decoder free in time
            if isinstance(exc, DirectiveError):
                text = exc.status_text
            else:
                text = exc.detail if exc.status == 40000001 else status_text(exc.status, exc.detail)
            body = {"task_id": task_id, "result": "", "status": exc.status, "message": text}
            http = 403 if exc.status == 40000001 else 400 if exc.status < 50000000 else 500
            log.info("%s %s failed: %s", request.method, request.path, exc.status)
        return web.json_response(body, status=http, headers={"X-NLS-TaskId": task_id})

    async def _audio(
        self, request: web.Request, limit: int, max_ms: int, too_long: int, *, mix: bool = False
    ) -> tuple[list[bytes], int, int]:
        """The request's audio (body or ``audio_address``) decoded: channels, rate, ms."""
        query = request.query
        fmt = query.get("format", "pcm").lower()
        try:
            rate = int(query.get("sample_rate", "16000"))
        except ValueError:
            raise _Failure(40000003, "sample_rate must be an integer!") from None
        address = query.get("audio_address")
        if (
            address is None
            and request.method == "POST"
            and request.content_type.endswith("x-www-form-urlencoded")
        ):
            address = (await request.post()).get("audio_address")  # type: ignore[assignment]
        if address:
            try:
                data = await self.download(str(address), limit)
            except _Failure as exc:
                raise _Failure(40270006, f"File download failed: {exc.detail}") from None
        else:
            data = await self._body(request, limit)
        if not data:
            raise _Failure(40000000, "No audio data!")
        channels, rate = await self._decode(data, fmt, rate, mix=mix)
        ms = len(channels[0]) * 1000 // (2 * rate)
        if ms > max_ms:
            raise _Failure(too_long, f"The audio is longer than {max_ms // 1000} s!")
        return channels, rate, ms

    async def _flash_answer(self, request: web.Request) -> dict[str, Any]:
        started = time.monotonic()
        fmt = request.query.get("format", "").lower()
        if fmt and fmt not in _FLASH_FORMATS:
            raise _Failure(40270001, f"Unsupported format {fmt}!")
        channels, rate, ms = await self._audio(request, FLASH_MAX_BYTES, FLASH_MAX_MS, 40000000)
        if request.query.get("first_channel_only") == "true":
            channels = channels[:1]
        sentences = await self.recognise(channels, rate)
        words = request.query.get("enable_word_level_result") == "true"
        return {
            "result": "",
            "flash_result": {
                "duration": ms,
                "completed": True,
                "latency": round((time.monotonic() - started) * 1000),
                "sentences": [
                    {
                        "text": s.text,
                        "begin_time": s.begin,
                        "end_time": s.end,
                        "channel_id": s.channel,
                        **(
                            {
                                "words": [
                                    {"text": t, "begin_time": b, "end_time": e, "punc": ""}
                                    for t, b, e in s.words
                                ]
                            }
                            if words
                            else {}
                        ),
                    }
                    for s in sentences
                ],
            },
        }

    async def _rest_answer(self, request: web.Request) -> dict[str, Any]:
        channels, rate, _ = await self._audio(
            request, FLASH_MAX_BYTES, REST_MAX_MS, 41010104, mix=True
        )
        sentences = await self.recognise(channels, rate)
        return {"result": " ".join(s.text for s in sentences)}

    # ------------------------------------------------------------ POP RPC

    async def _pop_service(self, request: web.Request, faults: Faults) -> web.StreamResponse:
        """POP RPC on ``/``: query and form body merged, signature checked, dispatched."""
        params: dict[str, str] = dict(request.query)
        if request.method == "POST" and request.content_type in (
            "application/x-www-form-urlencoded",
            "",
        ):
            form = await request.post()
            params.update({k: v for k, v in form.items() if isinstance(v, str)})
        action = params.get("Action", "")
        handlers = {
            "SubmitTask": self._submit,
            "GetTaskResult": self._get_result,
            "CreateToken": self._create_token,
        }
        if action not in handlers:
            return _pop_error(404, "InvalidAction.NotFound", "Specified api is not found.")
        refusal = self._check_signature(request.method, params)
        if refusal is not None:
            return refusal
        return await handlers[action](params, faults)

    def _check_signature(self, method: str, params: Mapping[str, str]) -> web.Response | None:
        keys = self.gw.access_keys
        missing = [
            k
            for k in ("AccessKeyId", "Signature", "SignatureNonce", "Timestamp")
            if not params.get(k)
        ]
        if missing:
            return _pop_error(
                400, "MissingParameter", f"The input parameter {missing[0]} is missing."
            )
        if keys is None:
            return None
        secret = keys.get(params["AccessKeyId"])
        if secret is None:
            return _pop_error(
                404, "InvalidAccessKeyId.NotFound", "Specified access key is not found."
            )
        expected = auth.pop_signature(method, params, secret)
        if hmac.compare_digest(expected, params["Signature"]):
            return None
        log.info("POP %s: signature mismatch", params.get("Action"))
        return _pop_error(
            400,
            "SignatureDoesNotMatch",
            "Specified signature is not matched with our calculation. server string to sign is:"
            + auth.string_to_sign(method, params),
        )

    async def _create_token(self, params: Mapping[str, str], faults: Faults) -> web.Response:
        if faults.fail_status is not None:
            return _pop_error(500, "InternalError", "Injected fault.")
        token = uuid.uuid4().hex
        expire = int(time.time()) + TOKEN_LIFETIME
        self.gw._issue_token(token, expire)
        log.info("CreateToken: issued a token for %s", params["AccessKeyId"][:4] + "***")
        return web.json_response(
            {
                "NlsRequestId": uuid.uuid4().hex,
                "RequestId": _request_id(),
                "ErrMsg": "",
                "Token": {"Id": token, "ExpireTime": expire, "UserId": "local"},
            }
        )

    async def _submit(self, params: Mapping[str, str], faults: Faults) -> web.Response:
        try:
            task = self._parse_task(params.get("Task"))
        except _Failure as exc:
            return _status(None, exc.status)
        self._evict()
        if len(self.tasks) >= self.gw.max_file_tasks:
            return _pop_error(
                400, "Throttling.User", "Request was denied due to user flow control."
            )
        ft = FileTask(uuid.uuid4().hex, task, faults, int(time.time() * 1000))
        self.tasks[ft.task_id] = ft
        runner = asyncio.create_task(self._run(ft))
        self._running.add(runner)
        runner.add_done_callback(self._running.discard)
        log.info("FileTrans task %s submitted", ft.task_id)
        return _status(ft.task_id, 21050000)

    def _parse_task(self, text: str | None) -> dict[str, Any]:
        try:
            task = json.loads(text or "")
        except json.JSONDecodeError:
            raise _Failure(41050013, "Task is not JSON") from None
        if not isinstance(task, dict):
            raise _Failure(41050013, "Task is not a JSON object")
        appkey = task.get("appkey") or task.get("app_key")
        if not appkey:
            raise _Failure(41050014, "no appkey")
        if self.gw.appkeys is not None and appkey not in self.gw.appkeys:
            raise _Failure(41050015, "unknown appkey")
        link = task.get("file_link")
        if not isinstance(link, str) or urllib.parse.urlsplit(link).scheme not in (
            "http",
            "https",
            "file",
        ):
            raise _Failure(41050011, "bad file_link")
        if task.get("enable_callback"):
            callback = task.get("callback_url")
            if not isinstance(callback, str) or urllib.parse.urlsplit(callback).scheme not in (
                "http",
                "https",
            ):
                raise _Failure(41050012, "bad callback_url")
        return task

    def _evict(self) -> None:
        """Forget the oldest finished tasks beyond ``max_file_tasks``."""
        excess = len(self.tasks) - self.gw.max_file_tasks + 1
        for task_id in [t for t, ft in self.tasks.items() if ft.done.is_set()][: max(excess, 0)]:
            del self.tasks[task_id]

    async def _get_result(self, params: Mapping[str, str], faults: Faults) -> web.Response:
        task_id = params.get("TaskId", "")
        ft = self.tasks.get(task_id)
        if ft is None:
            return _status(task_id, 41050010)
        ft.polls.append(asyncio.get_running_loop().time())
        if faults.fail_status is not None:
            return _status(task_id, faults.fail_status)
        return web.json_response({**ft.answer(), "RequestId": _request_id()})

    async def _run(self, ft: FileTask) -> None:
        """One FileTrans task: QUEUEING until a worker is free, RUNNING, then done."""
        try:
            async with self._workers:
                ft.status = 21050001
                try:
                    await self._work(ft)
                except _Failure as exc:
                    ft.status = exc.status
                    log.info("FileTrans task %s failed: %s %s", ft.task_id, exc.status, exc.detail)
                except DirectiveError as exc:  # no decoder free in time
                    ft.status = 51050002
                    log.warning("FileTrans task %s: %s", ft.task_id, exc.status_text)
                except Exception:
                    ft.status = 51050000
                    log.exception("FileTrans task %s failed", ft.task_id)
                ft.solve_time = int(time.time() * 1000)
        finally:
            ft.done.set()
        if ft.task.get("enable_callback"):
            await self._callback(ft)

    async def _work(self, ft: FileTask) -> None:
        if ft.faults.complete_delay:
            await asyncio.sleep(ft.faults.complete_delay)
        if ft.faults.fail_status is not None:
            raise _Failure(ft.faults.fail_status, "injected fault")
        data = await self.download(ft.task["file_link"], FILE_TRANS_MAX_BYTES)
        try:
            channels, rate = await self.gw._run(decode_channels, data)
        except AudioFormatError as exc:
            raise _Failure(41050003, str(exc)) from None
        ft.biz_duration = len(channels[0]) * 1000 // (2 * rate)
        if ft.task.get("first_channel_only"):
            channels = channels[:1]
        sentences = await self.recognise(channels, rate)
        if not sentences:
            ft.status = 21050003
            return
        ft.result = _file_trans_result(sentences, bool(ft.task.get("enable_words")))
        ft.status = 21050000

    async def _callback(self, ft: FileTask) -> None:
        """POST the 4.0 callback body (the polled answer plus RequestTime)."""
        body = {**ft.answer(), "RequestTime": ft.request_time}
        url = ft.task["callback_url"]
        try:
            async with self._client().post(
                url, json=body, timeout=ClientTimeout(total=CALLBACK_TIMEOUT)
            ) as r:
                ft.callback_status = r.status
            log.info("FileTrans task %s: callback answered HTTP %s", ft.task_id, r.status)
        except (ClientError, asyncio.TimeoutError) as exc:
            log.warning("FileTrans task %s: callback failed: %s", ft.task_id, type(exc).__name__)


def _read_file(path: Path, limit: int) -> bytes | None:
    """The file's bytes, or ``None`` if it is larger than ``limit``."""
    with path.open("rb") as f:
        data = f.read(limit + 1)
    return None if len(data) > limit else data


def _file_trans_result(sentences: list[Sentence], words: bool) -> dict[str, Any]:
    """The documented Result: Sentences (with SilenceDuration in s since the channel's
    previous sentence, SpeechRate in words per minute, a neutral EmotionValue) and, when
    asked for, the flat Words list."""
    previous_end: dict[int, int] = {}
    out: list[dict[str, Any]] = []
    for s in sentences:
        span = max(s.end - s.begin, 1)
        out.append(
            {
                "ChannelId": s.channel,
                "BeginTime": s.begin,
                "EndTime": s.end,
                "Text": s.text,
                "SilenceDuration": max(s.begin - previous_end.get(s.channel, 0), 0) // 1000,
                "SpeechRate": round(len(s.text.split()) * 60000 / span),
                "EmotionValue": 5.0,
            }
        )
        previous_end[s.channel] = s.end
    result: dict[str, Any] = {"Sentences": out}
    if words:
        result["Words"] = [
            {"ChannelId": s.channel, "Word": t, "BeginTime": b, "EndTime": e}
            for s in sentences
            for t, b, e in s.words
        ]
    return result


def _status(task_id: str | None, status: int) -> web.Response:
    body: dict[str, Any] = {
        "RequestId": _request_id(),
        "StatusText": _name(status),
        "StatusCode": status,
    }
    if task_id:
        body["TaskId"] = task_id
    return web.json_response(body)


def _pop_error(http: int, code: str, message: str) -> web.Response:
    """The generic POP error envelope."""
    return web.json_response(
        {
            "RequestId": _request_id(),
            "HostId": "127.0.0.1",
            "Code": code,
            "Message": message,
            "Recommend": f"https://next.api.aliyun.com/troubleshoot?q={code}",
        },
        status=http,
    )
