"""The local gateway's recording services: an aiohttp sub-application (docs/protocol.md
§11, docs/recordings.md).

* ``POST /stream/v1/FlashRecognizer``: the audio in the body, or ``audio_address=`` (GET
  or POST); token in the query (or ``X-NLS-Token``);
* ``POST /stream/v1/asr``: the one-sentence REST API, ≤ 60 s;
* POP RPC on ``/`` (a route of the main application: a sub-application needs a
  prefix): ``Action=SubmitTask`` / ``GetTaskResult`` (FileTrans) and ``CreateToken``,
  signed with an AccessKey, parameters in the query or a form body.

The sub-application gets what it needs from its gateway as one :class:`Needs` object,
stored under the :data:`RECORDINGS` ``web.AppKey`` (with the state in
:class:`Recordings`). Every limit is checked before the work it bounds: the upload
slots and the byte count before the body is read, the header (rate, channels,
duration) before a sample is decoded (:mod:`~nlsstream.gateway.decode`), and the decode
streams block by block into the recogniser. Faults (``Gateway.faults`` /
``queue_faults``) apply to each HTTP request: ``start_delay`` delays the answer,
``http_status`` answers that HTTP status, ``drop_at`` drops the connection,
``fail_status`` is the status answered (FileTrans: the status the submitted task ends
with), ``complete_delay`` keeps a FileTrans task RUNNING longer.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
import uuid
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from aiohttp import web

from ..errors import SUCCESS, status_text
from ..realtime.protocol import TRANSCRIBER, DirectiveError, StartParams
from ..recordings import wire
from ..recordings.wire import Recognised, Refusal
from ..redaction import get_logger
from .decode import BlockDecoder, probe
from .engine import DecoderSlots, SpeechEngine, TranscriberTask
from .faults import Faults
from .filetrans import Downloads, FileTrans, parse_task
from .http import Deadlines, HttpLimits, UploadSlots, spool_body
from .pop import PopGuard, PopRefusal
from .workers import until_done

__all__ = ["RECORDINGS", "Needs", "Recordings", "application", "pop_routes"]

log = get_logger("nlsstream.gateway.recordings")

#: Lifetime of the tokens CreateToken issues.
TOKEN_LIFETIME = 24 * 3600
#: PCM fed to a channel's segmenter at once (1 s at 16 kHz).
_FEED_BYTES = 32000
_FLASH_FORMATS = frozenset({"wav", "mp3", "opus", "aac", "mp4", "pcm", "ogg", "flac"})
#: Suffixes a local file needs to be read as headerless PCM (``format=pcm``): any other
#: file's duration would tell its size.
_PCM_SUFFIXES = frozenset({".pcm", ".raw"})


@dataclass
class Needs:
    """What the recordings get from their gateway (no gateway internals beyond these)."""

    recognizer: SpeechEngine
    #: Runs blocking work in a worker (cancelled: waits for a running job first).
    run: Callable[..., Awaitable[Any]]
    slots: DecoderSlots
    next_faults: Callable[[], Faults]
    #: ``None`` if the request carries an accepted token, else the refusal's text.
    token_refusal: Callable[[web.BaseRequest], str | None]
    issue_token: Callable[[str, float], None]
    appkeys: list[str] | None
    access_keys: Mapping[str, str] | None
    #: Whether the gateway accepts only some tokens (then CreateToken needs AccessKeys).
    tokens_restricted: bool
    limits: HttpLimits
    file_workers: int
    max_file_tasks: int
    file_root: Path | None = None
    deadlines: Deadlines | None = None


class Recordings:
    """The state of one gateway's recording services."""

    def __init__(self, needs: Needs) -> None:
        self.needs = needs
        self.uploads = UploadSlots(needs.limits.max_uploads)
        self.pop = PopGuard(needs.access_keys)
        self.downloads = Downloads(needs.limits, needs.file_root)
        self.filetrans = FileTrans(
            self.downloads, self._recognise_task, needs.file_workers, needs.max_file_tasks
        )

    async def close(self) -> None:
        await self.filetrans.close()
        await self.downloads.close()

    # ------------------------------------------------------------ recognition

    async def recognise(
        self,
        file: IO[bytes],
        size: int,
        *,
        fmt: str = "",
        rate: int = 16000,
        max_seconds: float,
        too_long: int,
        mix: bool = False,
        first_only: bool = False,
    ) -> tuple[list[Recognised], int]:
        """Every channel's sentences in time order, and the audio's length in ms. The
        header is checked first; then blocks are decoded and fed to one segmenter per
        channel (each sentence on the gateway's decoder pool)."""
        run = self.needs.run
        info = await run(probe, file, size, fmt, rate, max_seconds, too_long)
        decoder = BlockDecoder(file, info, max_seconds, too_long, mix=mix)
        channels = 1 if first_only else decoder.channels
        sentences: list[Recognised] = []
        params = StartParams(TRANSCRIBER.name, sample_rate=info.target_rate, enable_words=True)
        tasks: list[TranscriberTask] = []
        reading: asyncio.Task[Any] | None = None  # a block being decoded in a worker
        try:
            tasks = [
                # batch: each sentence is decoded with its own cepstral mean (all known)
                TranscriberTask(
                    params,
                    self.needs.recognizer,
                    run,
                    _collect(c, sentences),
                    self.needs.slots,
                    batch=True,
                )
                for c in range(channels)
            ]
            block = await run(decoder.read)
            while block is not None:
                # The next block is decoded while this one is recognised.
                reading = asyncio.ensure_future(run(decoder.read))
                await asyncio.gather(*(_feed(t, pcm) for t, pcm in zip(tasks, block, strict=False)))
                block = await reading
            await asyncio.gather(*(t.stop() for t in tasks))
        finally:
            # The worker must be done with the file before the decoder, then the file, is
            # closed (also when this is cancelled, e.g. at shutdown): else libsndfile reads
            # a closed file from its worker thread.
            if reading is not None:
                reading.cancel()  # a job not started is dropped, a running one waited for
                await until_done(reading)
                if not reading.cancelled():
                    reading.exception()  # seen: a later block's failure is not news now
            for t in tasks:
                await t.close()
            decoder.close()
        sentences.sort(key=lambda s: (s.begin, s.channel))
        return sentences, round(decoder.seconds * 1000)

    async def _recognise_task(
        self, file: IO[bytes], size: int, first_only: bool
    ) -> tuple[list[Recognised], int]:
        try:
            return await self.recognise(
                file,
                size,
                max_seconds=wire.FILE_TRANS_MAX_SECONDS,
                too_long=41050103,
                first_only=first_only,
            )
        except Refusal as exc:
            if exc.status in (40270003, 40270004, 41010101):
                raise Refusal(41050003, exc.detail) from None
            raise

    # ------------------------------------------------------------ every request

    async def guarded(
        self,
        request: web.Request,
        handler: Callable[[web.Request, Faults], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Every recording endpoint: this request's faults applied (delay, drop, HTTP
        status), then ``handler``; a client that left is no error of the gateway's."""
        faults = self.needs.next_faults()
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
            # connection serves no other request.
            answer.force_close()
        return answer

    # ------------------------------------------------------------ Flash and REST

    async def token_service(
        self, request: web.Request, faults: Faults, *, flash: bool
    ) -> web.StreamResponse:
        """What Flash and REST share: the token and appkey checks, the upload slot, the
        injected status, the JSON answer, one log line."""
        started = time.monotonic()
        task_id = uuid.uuid4().hex
        service = "flash" if flash else "rest"
        stats: dict[str, Any] = {}
        try:
            refusal = self.needs.token_refusal(request)
            if refusal is not None:
                raise Refusal(40000001, refusal)
            appkey = request.query.get("appkey", "")
            if not appkey:
                raise Refusal(41000002, "Appkey is empty!")
            if self.needs.appkeys is not None and appkey not in self.needs.appkeys:
                raise Refusal(40020105, "Appkey not exist!")
            if faults.fail_status is not None:
                raise Refusal(faults.fail_status, "Injected fault!")
            self.uploads.take()
            try:
                fields = await self._answer(request, flash, started, stats)
            finally:
                self.uploads.give()
            body = {"task_id": task_id, **fields, "status": SUCCESS, "message": "SUCCESS"}
            http = 200
        except (Refusal, DirectiveError) as exc:  # DirectiveError: no decoder free in time
            if isinstance(exc, DirectiveError):
                status, text = exc.status, exc.status_text
            else:
                status = exc.status
                text = exc.detail if status == 40000001 else status_text(status, exc.detail)
            body = {"task_id": task_id, "result": "", "status": status, "message": text}
            http = wire.http_status(status)
        log.info(
            "%s task=%s audio=%.2fs sentences=%s status=%s http=%d in %.2fs",
            service,
            task_id,
            stats.get("ms", 0) / 1000,
            stats.get("sentences", "-"),
            body["status"],
            http,
            time.monotonic() - started,
        )
        return web.json_response(body, status=http, headers={"X-NLS-TaskId": task_id})

    async def _answer(
        self, request: web.Request, flash: bool, started: float, stats: dict[str, Any]
    ) -> dict[str, Any]:
        query = request.query
        fmt = query.get("format", "pcm" if not flash else "").lower()
        if flash and fmt and fmt not in _FLASH_FORMATS:
            raise Refusal(40270001, f"Unsupported format {fmt[:20]}!")
        rate_text = query.get("sample_rate", "16000")
        if not (rate_text.isascii() and rate_text.isdigit() and len(rate_text) <= 6):
            raise Refusal(40000003, "sample_rate must be an integer!")
        file, size, local = await self._audio(request, fmt)
        try:
            sentences, ms = await self._recognise_local(
                local,
                file,
                size,
                fmt=fmt,
                rate=int(rate_text),
                max_seconds=wire.FLASH_MAX_SECONDS if flash else wire.REST_MAX_SECONDS,
                too_long=40000000 if flash else 41010104,
                mix=not flash,
                first_only=flash and query.get("first_channel_only") == "true",
            )
        finally:
            file.close()
        stats.update(ms=ms, sentences=len(sentences))
        if not flash:
            return {"result": " ".join(s.text for s in sentences)}
        latency = round((time.monotonic() - started) * 1000)
        words = query.get("enable_word_level_result") == "true"
        return wire.flash_answer(sentences, ms, latency, words=words)

    async def _recognise_local(
        self, local: bool, file: IO[bytes], size: int, **how: Any
    ) -> tuple[list[Recognised], int]:
        """:meth:`recognise`; a local file (a ``file://`` link) that is no audio the
        service takes is a download failure: whether a path holds something is not told."""
        try:
            return await self.recognise(file, size, **how)
        except Refusal as exc:
            if local and exc.status in (40270003, 40270004, 41010101):
                log.info("audio_address: a local file that is no audio: %s", exc.detail)
                raise Refusal(40270006, "File download failed!") from None
            raise

    async def _audio(self, request: web.Request, fmt: str) -> tuple[IO[bytes], int, bool]:
        """The request's audio (body or ``audio_address``) as a file, its size, and
        whether it is a local file."""
        limits = self.needs.limits
        address = request.query.get("audio_address")
        if (
            address is None
            and request.method == "POST"
            and request.content_type.endswith("x-www-form-urlencoded")
        ):
            form = await _form(request, limits)
            value = form.get("audio_address")
            address = value if isinstance(value, str) else None
        if address:
            file, size = await self._download(address, fmt)
            return file, size, urllib.parse.urlsplit(address).scheme == "file"
        too_large = Refusal(
            40000000, f"The audio is larger than {wire.FLASH_MAX_BYTES // (1 << 20)} MB!"
        )
        file, size = await spool_body(
            request.content,
            limit=wire.FLASH_MAX_BYTES,
            limits=limits,
            declared=request.content_length,
            too_large=too_large,
        )
        return file, size, False

    async def _download(self, address: str, fmt: str) -> tuple[IO[bytes], int]:
        """An ``audio_address``: whatever fails is the generic download error (what
        went wrong, whether a path exists or a port is open, is only logged)."""
        parts = urllib.parse.urlsplit(address)
        try:
            if (
                parts.scheme == "file"
                and fmt == "pcm"
                and Path(parts.path).suffix.lower() not in _PCM_SUFFIXES
            ):
                raise Refusal(41050002, "format=pcm needs a .pcm or .raw file")
            return await self.downloads.fetch(address, wire.FLASH_MAX_BYTES)
        except (Refusal, asyncio.TimeoutError) as exc:
            detail = exc.detail if isinstance(exc, Refusal) else "timed out"
            log.info("audio_address %s: %s", _shown(address), detail)
            raise Refusal(40270006, "File download failed!") from None


def _shown(url: str) -> str:
    """A link as logged: no query (it may carry a signature or token)."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))[:200]


async def _form(request: web.Request, limits: HttpLimits) -> Mapping[str, Any]:
    """A form body (aiohttp bounds its size), received within the header deadline."""
    try:
        return await asyncio.wait_for(request.post(), limits.header_timeout)
    except asyncio.TimeoutError:
        raise Refusal(40000004, "The request body was not received in time!") from None
    except (ValueError, UnicodeDecodeError):
        raise Refusal(40000003, "The form body is malformed!") from None


def _collect(
    channel: int, sentences: list[Recognised]
) -> Callable[[str, dict[str, Any] | None], Awaitable[None]]:
    async def emit(name: str, payload: dict[str, Any] | None) -> None:
        if name == "SentenceEnd" and payload is not None and payload["result"]:
            words = [(w["text"], w["startTime"], w["endTime"]) for w in payload["words"]]
            # A recording's sentence spans its words (the decoder hears some audio
            # before the voice detector's start).
            begin = min([payload["begin_time"], *(b for _, b, _ in words)])
            end = max([payload["time"], *(e for _, _, e in words)])
            sentences.append(Recognised(channel, begin, end, payload["result"], words))

    return emit


async def _feed(task: TranscriberTask, pcm: bytes) -> None:
    for i in range(0, len(pcm), _FEED_BYTES):
        await task.audio(pcm[i : i + _FEED_BYTES])


#: The recordings of the gateway whose application (or parent application) holds it.
RECORDINGS = web.AppKey("nlsstream.recordings", Recordings)


def _recordings(request: web.Request) -> Recordings:
    return request.config_dict[RECORDINGS]


async def _flash(request: web.Request) -> web.StreamResponse:
    rec = _recordings(request)

    async def handle(request: web.Request, faults: Faults) -> web.StreamResponse:
        return await rec.token_service(request, faults, flash=True)

    return await rec.guarded(request, handle)


async def _rest(request: web.Request) -> web.StreamResponse:
    rec = _recordings(request)

    async def handle(request: web.Request, faults: Faults) -> web.StreamResponse:
        return await rec.token_service(request, faults, flash=False)

    return await rec.guarded(request, handle)


def application() -> web.Application:
    """The sub-application for ``/stream/v1`` (Flash, REST); its parent holds the
    :data:`RECORDINGS` key."""
    app = web.Application()
    prefix = "/stream/v1"
    app.add_routes(
        [
            web.post(wire.FLASH_PATH.removeprefix(prefix), _flash),
            web.get(wire.FLASH_PATH.removeprefix(prefix), _flash),
            web.post(wire.REST_PATH.removeprefix(prefix), _rest),
        ]
    )
    return app


# --------------------------------------------------------------------------- POP RPC


def pop_routes() -> list[web.RouteDef]:
    """POP RPC on ``/`` (GET and POST)."""
    return [web.get(wire.POP_PATH, _pop), web.post(wire.POP_PATH, _pop)]


async def _pop(request: web.Request) -> web.StreamResponse:
    rec = _recordings(request)

    async def handle(request: web.Request, faults: Faults) -> web.StreamResponse:
        try:
            return await _pop_service(rec, request, faults)
        except PopRefusal as exc:
            http, body = exc.answer()
            log.info("POP %s refused: %s", request.method, exc.code)
            return web.json_response({"RequestId": _request_id(), **body}, status=http)

    return await rec.guarded(request, handle)


async def _pop_service(rec: Recordings, request: web.Request, faults: Faults) -> web.Response:
    """Query and form body merged, the common parameters checked, dispatched."""
    params: dict[str, str] = dict(request.query)
    if request.method == "POST" and request.content_type in (
        "application/x-www-form-urlencoded",
        "",
    ):
        try:
            form = await _form(request, rec.needs.limits)
        except Refusal:
            raise PopRefusal("InvalidParameter", "body") from None
        params.update({k: v for k, v in form.items() if isinstance(v, str)})
    action = params.get("Action", "")
    handlers = {"SubmitTask": _submit, "GetTaskResult": _get_result, "CreateToken": _create_token}
    if action not in handlers:
        raise PopRefusal("InvalidAction.NotFound")
    key_id = rec.pop.check(request.method, params)
    return await handlers[action](rec, params, faults, key_id)


async def _create_token(
    rec: Recordings, params: Mapping[str, str], faults: Faults, key_id: str
) -> web.Response:
    if rec.needs.access_keys is None and rec.needs.tokens_restricted:
        # A gateway that restricts tokens hands out none to AccessKeys it cannot check.
        log.info("CreateToken refused: the gateway has tokens but no AccessKeys")
        raise PopRefusal("InvalidAccessKeyId.NotFound")
    if faults.fail_status is not None:
        raise PopRefusal("InternalError")
    token = uuid.uuid4().hex
    expire = int(time.time()) + TOKEN_LIFETIME
    rec.needs.issue_token(token, expire)
    log.info("CreateToken: issued a token for %s", key_id[:4] + "***")
    return web.json_response(
        {
            "NlsRequestId": uuid.uuid4().hex,
            "RequestId": _request_id(),
            "ErrMsg": "",
            "Token": {"Id": token, "ExpireTime": expire, "UserId": "local"},
        }
    )


async def _submit(
    rec: Recordings, params: Mapping[str, str], faults: Faults, key_id: str
) -> web.Response:
    try:
        task = parse_task(params.get("Task"), rec.needs.appkeys)
    except Refusal as exc:
        log.info("SubmitTask refused: %s %s", exc.status, exc.detail)
        return _status(None, exc.status)
    ft = rec.filetrans.submit(task, faults, key_id)
    if ft is None:
        raise PopRefusal("Throttling.User")
    return _status(ft.task_id, 21050000)


async def _get_result(
    rec: Recordings, params: Mapping[str, str], faults: Faults, key_id: str
) -> web.Response:
    task_id = params.get("TaskId", "")
    ft = rec.filetrans.get(task_id, key_id)
    if ft is None:
        return _status(task_id[:64], 41050010)
    ft.polls.append(asyncio.get_running_loop().time())
    if faults.fail_status is not None:
        return _status(task_id, faults.fail_status)
    return web.json_response({**ft.answer(), "RequestId": _request_id()})


def _request_id() -> str:
    return str(uuid.uuid4()).upper()


def _status(task_id: str | None, status: int) -> web.Response:
    body: dict[str, Any] = {
        "RequestId": _request_id(),
        "StatusText": wire.status_name(status),
        "StatusCode": status,
    }
    if task_id:
        body["TaskId"] = task_id
    return web.json_response(body)
