"""The local NLS gateway: an aiohttp server speaking the cloud's real-time protocols.

Protocol: ``docs/protocol.md`` §1 (handshake, auth), §3
(SpeechTranscriber), §4 (SpeechRecognizer), §5.4 and §6 (limits, status codes).

One aiohttp application serves every endpoint on one port: the WebSocket ``/ws/v1``
today, plain HTTP routes later (see :meth:`Gateway._routes`). Token checks are one
shared method, :meth:`Gateway._authorize`, for any route that needs a token.

One coroutine serves each connection and handles its messages in order; the task rules
(which directive or audio is allowed when, and every reply's text) are
:class:`~nlsstream.realtime.protocol.ServerTask`'s, recognition runs in a bounded thread pool.
Per audio frame the server does a little arithmetic and one numpy pass (VAD), never
JSON and never a new task. Limits: messages over ``max_size`` bytes close that
connection (1009); a recognizer task holds at most 60 s of audio, a transcriber sentence
is cut at 60 s; only that connection is affected by its own bad input.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import threading
import time
import types
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

try:
    from aiohttp import WSCloseCode, WSMsgType, web
except ImportError as exc:  # pragma: no cover - depends on the install
    raise ImportError("the local gateway needs aiohttp: pip install 'nlsstream[local]'") from exc

from ..errors import SUCCESS, status_text
from ..realtime.protocol import (
    SUCCESS_TEXT,
    TRANSCRIBER,
    Accepted,
    DirectiveError,
    ServerTask,
)
from ..redaction import get_logger
from .engine import (
    DecoderSlots,
    RecognizerSpec,
    RecognizerTask,
    SphinxRecognizer,
    TranscriberTask,
    resolve_recognizer,
)
from .faults import MALFORMED_TEXT, FaultPoint, Faults
from .filetrans import FileTrans
from .http import Deadlines, HttpLimits, install_accept_throttle
from .recordings import RECORDINGS, Needs, Recordings, application, pop_routes
from .wav import WavStripper
from .workers import in_thread

__all__ = ["Gateway", "GatewayThread", "SessionRecord"]

log = get_logger("nlsstream.gateway")

PATH = "/ws/v1"
DEFAULT_TOKEN = "local-token"
DEFAULT_APPKEY = "local-appkey"
#: Seconds a closing handshake may take, and shutdown may wait for open connections.
CLOSE_TIMEOUT = 2.0
SHUTDOWN_TIMEOUT = 5.0


@dataclass
class SessionRecord:
    """What the gateway saw of one task (or of a connection that never started one).

    ``status`` is the final status (20000000 after Completed, the TaskFailed status,
    40010004 when the client left early, ``None`` while running or after an injected
    drop/stall); ``outcome`` says the same in a word.
    """

    task_id: str | None = None
    namespace: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    audio_bytes: int = 0
    sentences: list[str] = field(default_factory=list)
    status: int | None = None
    status_text: str = ""
    outcome: str = "open"  # open, completed, failed, disconnected, dropped, stalled
    events: list[str] = field(default_factory=list)
    faults: Faults | None = None

    @property
    def sample_rate(self) -> int:
        rate = self.params.get("sample_rate", 16000)
        return rate if isinstance(rate, int) and rate > 0 else 16000

    @property
    def audio_seconds(self) -> float:
        return self.audio_bytes / (2 * self.sample_rate)


class Gateway:
    """A local NLS gateway on ``ws://host:port/ws/v1``.

    Args:
        host, port: where to listen (``port=0``: a free port, see :attr:`url`).
        tokens: accepted tokens (header ``X-NLS-Token`` or query ``?token=``); ``None``
            accepts any token, or none. A wrong token gets HTTP 403.
        appkeys: accepted appkeys; ``None`` accepts any. Else TaskFailed 40020105.
        recognizer: ``"auto"`` (PocketSphinx if installed, else ``"span"``),
            ``"sphinx"``, ``"span"``, a :class:`~nlsstream.gateway.engine.SpeechEngine` or a
            callable ``fn(pcm, sample_rate) -> str``.
        faults: :class:`Faults` for every connection (see also :meth:`queue_faults`).
        idle_timeout: seconds without any message before TaskFailed 40000004.
        send_timeout: seconds a send may wait for a client that reads nothing; then the
            connection is dropped (its events would otherwise pile up without bound).
        max_size: largest accepted WebSocket message in bytes.
        ping_interval: seconds between server pings (``None``: no pings).
        max_workers: threads for recognition (CPU work, off the event loop).
        max_decoders, decoder_wait: at most ``max_decoders`` sentences are decoded at
            once (a PocketSphinx decoder holds ~45 MB); a sentence that finds none free
            within ``decoder_wait`` seconds fails its task with 52010001
            INSTANCE_POOL_EXHAUSTED (retryable), and the other tasks go on.
        max_records: how many :class:`SessionRecord` s :attr:`sessions` keeps (the
            newest); a gateway that runs for days must not keep every connection.
        access_keys: ``{AccessKeyId: secret}`` for the POP RPC on ``/`` (FileTrans'
            SubmitTask/GetTaskResult, CreateToken): the signature is checked against
            them; ``None`` accepts any AccessKey without checking signatures. Every
            POP request's Timestamp must be within 15 min and its SignatureNonce
            unused. Tokens that CreateToken issues are accepted everywhere (until they
            expire) when AccessKeys are configured; a gateway with ``tokens`` but no
            ``access_keys`` issues none (InvalidAccessKeyId.NotFound).
        file_workers: FileTrans tasks recognised at once (the rest wait, QUEUEING).
        max_file_tasks: FileTrans tasks kept (the oldest finished ones are forgotten;
            when all are unfinished, SubmitTask answers Throttling.User).
        http_limits: the bounds of the HTTP side (:class:`~nlsstream.gateway.http.
            HttpLimits`: header and body deadlines, uploads in flight, spooling).
        file_root: ``file://`` links (FileTrans ``file_link``, Flash ``audio_address``)
            may name only regular files under this directory; ``None`` allows any
            regular file the process can read (fine on loopback, not when exposed).

    Besides ``/ws/v1`` the same port serves ``/stream/v1/FlashRecognizer``,
    ``/stream/v1/asr`` and POP RPC on ``/`` (see :mod:`nlsstream.gateway.recordings`
    and :attr:`endpoints`).

    Use ``async with Gateway() as gw`` (or :meth:`start` / :meth:`close`), or
    :meth:`run_in_thread` from synchronous code.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        tokens: str | Iterable[str] | None = None,
        appkeys: str | Iterable[str] | None = None,
        recognizer: RecognizerSpec = "auto",
        faults: Faults | None = None,
        idle_timeout: float = 10.0,
        send_timeout: float = 10.0,
        max_size: int = 1 << 20,
        ping_interval: float | None = 20.0,
        max_workers: int = 2,
        max_decoders: int = 8,
        decoder_wait: float = 5.0,
        max_records: int = 1000,
        access_keys: Mapping[str, str] | None = None,
        file_workers: int = 2,
        max_file_tasks: int = 1000,
        http_limits: HttpLimits | None = None,
        file_root: str | os.PathLike[str] | None = None,
    ) -> None:
        self.host = host
        self.port = port
        self.tokens = [tokens] if isinstance(tokens, str) else list(tokens or []) or None
        if tokens is not None and not self.tokens:
            raise ValueError("tokens must be None (accept any) or name at least one token")
        self.appkeys = [appkeys] if isinstance(appkeys, str) else list(appkeys or []) or None
        self.recognizer = resolve_recognizer(recognizer)
        self.faults = faults or Faults()
        self.idle_timeout = idle_timeout
        self.send_timeout = send_timeout
        self.max_size = max_size
        self.ping_interval = ping_interval
        self.max_workers = max_workers
        if max_records < 1:
            raise ValueError(f"max_records must be at least 1, got {max_records}")
        self.max_records = max_records
        self.max_decoders = max_decoders
        self.decoder_wait = decoder_wait
        self._slots: DecoderSlots | None = None  # made on the serving loop, in start()
        self.access_keys = dict(access_keys) if access_keys is not None else None
        if file_workers < 1 or max_file_tasks < 1:
            raise ValueError("file_workers and max_file_tasks must be at least 1")
        self.file_workers = file_workers
        self.max_file_tasks = max_file_tasks
        self.http_limits = http_limits or HttpLimits()
        self.file_root = Path(file_root) if file_root is not None else None
        if self.file_root is not None and not self.file_root.is_dir():
            raise ValueError(f"file_root {self.file_root} is not a directory")
        #: The recording services (made in :meth:`start`).
        self.recordings: Recordings | None = None
        #: FileTrans (made in :meth:`start`): its tasks in ``.tasks``.
        self.files: FileTrans | None = None
        self._deadlines: Deadlines | None = None
        self._server: asyncio.AbstractServer | None = None
        self._restore_handler: Callable[[], None] | None = None
        self._issued: collections.OrderedDict[str, float] = collections.OrderedDict()
        #: What the gateway saw of its most recent connections, oldest first (at most
        #: ``max_records``).
        self.sessions: list[SessionRecord] = []
        self._queued: collections.deque[Faults] = collections.deque()
        self._runner: web.AppRunner | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._connections: set[_Connection] = set()

    # ---------------------------------------------------------------- public API

    @property
    def url(self) -> str:
        """``ws://host:port/ws/v1`` (the real port once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}{PATH}"

    @property
    def http_url(self) -> str:
        """``http://host:port`` (the base of the recording services and POP RPC)."""
        return self.url.replace("ws://", "http://", 1)[: -len(PATH)]

    @property
    def endpoints(self) -> dict[str, str]:
        """What this gateway serves: a description for each URL."""
        base = self.http_url
        return {
            self.url: "real-time recognition (SpeechTranscriber, SpeechRecognizer)",
            base + "/stream/v1/FlashRecognizer": "FlashRecognizer (recordings, one request)",
            base + "/stream/v1/asr": "one-sentence REST recognition (<= 60 s)",
            base + "/": "POP RPC: FileTrans SubmitTask/GetTaskResult, CreateToken",
        }

    @property
    def token(self) -> str:
        """The first accepted token (any value works when ``tokens=None``)."""
        return self.tokens[0] if self.tokens else DEFAULT_TOKEN

    @property
    def appkey(self) -> str:
        """The first accepted appkey (any value works when ``appkeys=None``)."""
        return self.appkeys[0] if self.appkeys else DEFAULT_APPKEY

    def queue_faults(self, faults: Faults) -> None:
        """Use ``faults`` for the next connection only (FIFO); thread-safe."""
        self._queued.append(faults)

    @property
    def running(self) -> bool:
        return self._runner is not None

    async def start(self) -> None:
        """Start listening; returns once the port is bound (:attr:`url` is final)."""
        if self._runner is not None:
            raise RuntimeError("gateway already started")
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.max_workers, thread_name_prefix="nls-recognize"
        )
        self._slots = DecoderSlots(self.max_decoders, self.decoder_wait)
        limits = self.http_limits
        needs = Needs(
            recognizer=self.recognizer,
            run=self._run,
            slots=self._slots,
            next_faults=self._next_faults,
            token_refusal=self._token_refusal,
            issue_token=self._issue_token,
            appkeys=self.appkeys,
            access_keys=self.access_keys,
            tokens_restricted=self.tokens is not None,
            limits=limits,
            file_workers=self.file_workers,
            max_file_tasks=self.max_file_tasks,
            file_root=self.file_root,
        )
        self.recordings = Recordings(needs)
        self.files = self.recordings.filetrans
        app = web.Application(middlewares=[self._received])
        app[RECORDINGS] = self.recordings
        app.add_routes(self._routes())
        app.add_subapp("/stream/v1", application())
        app.on_shutdown.append(self._going_away)
        # No access log: a request line may carry ?token=. Idle keep-alive connections
        # close after the header deadline (a request must start within it anyway).
        runner = web.AppRunner(
            app,
            access_log=None,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
            keepalive_timeout=limits.header_timeout,
            # After a refusal, unread body is drained at most this long (default 10 s).
            lingering_time=min(limits.header_timeout, 2.0),
        )
        loop = asyncio.get_running_loop()
        try:
            if isinstance(self.recognizer, SphinxRecognizer):
                await loop.run_in_executor(self._executor, self.recognizer.warm_up)
            await runner.setup()
            self._runner = runner
            assert runner.server is not None
            self._deadlines = Deadlines(runner.server, limits.header_timeout, limits.log_interval)
            self._restore_handler = install_accept_throttle(loop, limits.log_interval)
            self._server = await loop.create_server(self._deadlines, self.host, self.port)
        except BaseException:
            await self.close()
            raise
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("NLS gateway listening on %s (recognizer %s)", self.url, self.recognizer.name)

    async def close(self) -> None:
        """Stop listening, close every connection (1001) and the recognition pool."""
        server, self._server = self._server, None
        if server is not None:
            server.close()  # stop listening; the runner closes the connections
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()
        if self.recordings is not None:
            await self.recordings.close()
        restore, self._restore_handler = self._restore_handler, None
        if restore is not None:
            restore()
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def serve_forever(self) -> None:
        """Start (if needed) and serve until cancelled; then close."""
        if self._runner is None:
            await self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await self.close()

    async def __aenter__(self) -> Gateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def run_in_thread(self) -> GatewayThread:
        """A context manager running this gateway on its own event loop in a background
        thread: ``with gw.run_in_thread(): ...`` (for blocking clients such as the
        official SDK)."""
        return GatewayThread(self)

    # ---------------------------------------------------------------- HTTP

    def _routes(self) -> list[web.RouteDef]:
        """The endpoints of the main application (the recordings' sub-application adds
        ``/stream/v1/...``); paths not listed get 404."""
        return [
            web.get(PATH, self._websocket),
            web.get(PATH + "/", self._websocket),
            *pop_routes(),
        ]

    @web.middleware
    async def _received(
        self,
        request: web.Request,
        handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
    ) -> web.StreamResponse:
        """Every request: its headers arrived (the header deadline is off until the
        answer is sent); an unexpected failure is one log line and HTTP 500."""
        done = self._deadlines.started(request) if self._deadlines is not None else None
        try:
            return await handler(request)
        except (web.HTTPException, asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:
            log.error("%s %s failed: %s", request.method, request.path, type(exc).__name__)
            log.debug("the failure", exc_info=True)
            return web.json_response({"status": 50000000, "message": "Internal error"}, status=500)
        finally:
            if done is not None:
                done()

    def _issue_token(self, token: str, expire_time: float) -> None:
        """Accept ``token`` until ``expire_time`` (Unix seconds): CreateToken's tokens."""
        self._issued[token] = expire_time
        while len(self._issued) > 10000:
            self._issued.popitem(last=False)

    def _token_refusal(self, request: web.BaseRequest) -> str | None:
        """``None`` if the request carries an accepted token (header ``X-NLS-Token``,
        else query ``token``), else the cloud's status text. Never logs the token."""
        token = request.headers.get("X-NLS-Token") or request.query.get("token")
        if self.tokens is None or token in self.tokens:
            return None
        # CreateToken's tokens count only where the AccessKeys that got them are known.
        issued = self.access_keys is not None and token is not None
        if issued and self._issued.get(token or "", 0.0) > time.time():
            return None
        log.info(
            "%s %s rejected: %s",
            request.method,
            request.path,
            "invalid token" if token else "no token",
        )
        if not token:
            return status_text(40000001, "Missing authorization header!")
        return status_text(40000001, f"The token '{token}' is invalid!", source="Meta")

    def _authorize(self, request: web.Request) -> None:
        """Raise HTTP 403 with the cloud's text unless the request carries an accepted
        token (see :meth:`_token_refusal`)."""
        refusal = self._token_refusal(request)
        if refusal is not None:
            raise web.HTTPForbidden(text=refusal)

    async def _websocket(self, request: web.Request) -> web.StreamResponse:
        """``/ws/v1``: one connection, its tasks one after another.

        The official Python SDK sends ``Sec-WebSocket-Key``/``Version`` twice
        (§1.3) and checks the answer against the first key; aiohttp answers
        the first occurrence of a header, as the cloud does.
        """
        self._authorize(request)
        ws = web.WebSocketResponse(
            timeout=CLOSE_TIMEOUT,
            heartbeat=self.ping_interval,
            compress=False,
            max_msg_size=self.max_size,
        )
        await ws.prepare(request)
        conn = _Connection(self, ws, request.transport, self._next_faults())
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)
        return ws

    async def _going_away(self, app: web.Application) -> None:
        """On shutdown: close every connection with 1001."""
        await asyncio.gather(
            *(c.ws.close(code=WSCloseCode.GOING_AWAY) for c in list(self._connections)),
            return_exceptions=True,
        )

    # ---------------------------------------------------------------- internals

    def _next_faults(self) -> Faults:
        try:
            return self._queued.popleft()
        except IndexError:
            return self.faults

    def _record(self, faults: Faults | None) -> SessionRecord:
        record = SessionRecord(faults=faults)
        self.sessions.append(record)
        if len(self.sessions) > self.max_records:
            del self.sessions[: len(self.sessions) - self.max_records]
        return record

    async def _run(self, fn: Any, /, *args: Any) -> Any:
        if self._executor is None:
            raise ConnectionAbortedError("gateway is closing")
        return await in_thread(self._executor, fn, *args)


class _Abort(Exception):
    """Stop serving this connection now (dropped, failed or closing)."""


class _Stalled(Exception):
    """An injected stall: ignore this and every later message, keep the socket open."""


class _Connection:
    """One client connection; its tasks run one after another, by the rules of one
    :class:`ServerTask`. ``engine`` recognises the running task's audio."""

    def __init__(
        self,
        gateway: Gateway,
        ws: web.WebSocketResponse,
        transport: asyncio.Transport | None,
        faults: Faults,
    ) -> None:
        self.gw = gateway
        self.ws = ws
        self.transport = transport
        self.faults = faults
        self.loop = asyncio.get_running_loop()
        self.task = ServerTask(gateway.appkeys)
        self.engine: TranscriberTask | RecognizerTask | None = None
        self.wav: WavStripper | None = None
        self.record = gateway._record(faults if faults.active else None)
        self.closing = False  # TaskFailed sent, or the connection was dropped
        self.stalled = False  # an injected stall: ignore everything from now on
        self.malformed: str | None = None  # "due", then "sent": one malformed event at most
        self.idle_since: float | None = self.loop.time()  # None while handling a message
        self.idle_timer: asyncio.TimerHandle | None = None
        self.idle_task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- main loop

    async def run(self) -> None:
        self.idle_timer = self.loop.call_later(self.gw.idle_timeout, self._watch_idle)
        try:
            async for message in self.ws:
                if self.stalled:
                    continue
                if message.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    break  # an error: aiohttp has closed the connection (e.g. 1009)
                self.idle_since = None
                try:
                    if message.type is WSMsgType.TEXT:
                        await self._on_text(message.data)
                    else:
                        await self._on_audio(message.data)
                except DirectiveError as exc:
                    await self._refuse(exc)
                except _Stalled:
                    pass
                self.idle_since = self.loop.time()
                if self.closing:
                    break
        except (_Abort, ConnectionError):
            pass
        except Exception:
            # A bug in one session must not take down the server or other sessions.
            log.exception("session %s failed", self.task.task_id or "-")
            with contextlib.suppress(_Abort, ConnectionError):
                await self._refuse(
                    DirectiveError(50000000, status_text(50000000, "Internal error!"))
                )
        finally:
            if self.idle_timer is not None:
                self.idle_timer.cancel()
            await self._finish()

    async def _finish(self) -> None:
        r = self.record
        if self.engine is not None:
            if r.outcome == "open":
                r.status = 40010004
                r.status_text = status_text(40010004, "Client disconnected before task finished!")
                r.outcome = "disconnected"
            engine, self.engine = self.engine, None
            try:
                await engine.close()
            except Exception:  # the pool may be gone at shutdown
                log.debug("releasing the decoder failed", exc_info=True)
            self._log_record()
        elif r.task_id is None and r.outcome in ("open", "failed"):
            if r.outcome == "open":
                r.outcome = "disconnected"
            self._log_record()
        if r.outcome != "dropped":
            with contextlib.suppress(asyncio.TimeoutError, ConnectionError):
                await asyncio.wait_for(self.ws.close(), CLOSE_TIMEOUT + 1)

    def _log_record(self) -> None:
        r = self.record
        log.info(
            "session task=%s namespace=%s audio=%.2fs sentences=%d status=%s outcome=%s",
            r.task_id or "-",
            r.namespace or "-",
            r.audio_seconds,
            len(r.sentences),
            r.status,
            r.outcome,
        )

    # ---------------------------------------------------------------- idle timer

    def _watch_idle(self) -> None:
        """Timer: TaskFailed 40000004 once no message came for ``idle_timeout`` seconds
        (time spent handling a message does not count)."""
        if self.closing or self.stalled:
            return
        due = self.gw.idle_timeout
        if self.idle_since is not None:
            due += self.idle_since - self.loop.time()
        if self.idle_since is None or due > 0:
            self.idle_timer = self.loop.call_later(max(due, 0.01), self._watch_idle)
            return
        self.idle_task = self.loop.create_task(self._idle_fail())

    async def _idle_fail(self) -> None:
        detail = (
            "Websocket session is idle for too long time, "
            f"the last directive is '{self.task.last_directive}'!"
        )
        with contextlib.suppress(_Abort, ConnectionError):
            await self._refuse(DirectiveError(40000004, status_text(40000004, detail)))
            await self.ws.close()

    # ---------------------------------------------------------------- sending

    async def _send(self, text: str, name: str) -> None:
        """Send one event of the task (``name`` is for the record), or the malformed
        text an injected fault put in its place."""
        if self.stalled:
            raise _Stalled
        if self.closing or self.ws.closed:
            raise _Abort
        if self.malformed == "due":
            self.malformed = "sent"
            text, name = MALFORMED_TEXT, "<malformed>"
        self.record.events.append(name)
        await self._write(text)

    def _alive(self) -> bool:
        """Whether the client is still connected (and this connection still serving)."""
        transport = self.transport
        return not self.closing and transport is not None and not transport.is_closing()

    async def _write(self, text: str) -> None:
        """Send ``text``, waiting at most ``send_timeout`` for a client that reads
        nothing; then drop the connection."""
        try:
            await asyncio.wait_for(self.ws.send_str(text), self.gw.send_timeout)
        except asyncio.TimeoutError:
            log.info(
                "task %s: the client read nothing for %g s; dropping it",
                self.task.task_id or "-",
                self.gw.send_timeout,
            )
            self.closing = True
            if self.transport is not None:
                self.transport.abort()
            raise _Abort from None

    async def _emit(self, name: str, payload: dict[str, Any] | None) -> None:
        """What the engine calls to send one of its events."""
        if self.faults.event_delay and name == "SentenceEnd":
            await asyncio.sleep(self.faults.event_delay)
        await self._send(self.task.event(name, payload), name)

    async def _refuse(self, exc: DirectiveError) -> None:
        """Send TaskFailed and end the connection (the task is dead, §3.5)."""
        if self.closing:
            return
        self.closing = True
        text = self.task.refusal(exc)
        task_id = exc.task_id or self.task.task_id
        if self.record.task_id is not None and self.record.outcome != "open":
            # The refused directive belongs to a new task on a reused connection.
            self.record = self.gw._record(self.record.faults)
        r = self.record
        r.status, r.status_text, r.outcome = exc.status, exc.status_text, "failed"
        if r.task_id is None and task_id:
            r.task_id = task_id
            if self.task.namespace is not None and self.task.task_id == task_id:
                r.namespace = self.task.namespace.name
        r.events.append("TaskFailed")
        level = logging.INFO if exc.status < 50000000 else logging.WARNING
        log.log(level, "task %s failed: %s %s", task_id or "-", exc.status, exc.status_text)
        await self._write(text)

    async def _fault(self, point: FaultPoint, *, malformed: bool = True) -> None:
        """Apply the faults due at ``point``: raises :class:`_Abort` (drop),
        :class:`DirectiveError` (fail) or :class:`_Stalled`, or arms a malformed event."""
        f, n = self.faults, self.record.audio_bytes
        if f.drops(point, n):
            self.record.outcome = "dropped"
            self.closing = True
            log.info("task %s: injected drop at %s", self.task.task_id, point)
            if self.transport is not None:
                self.transport.abort()
            raise _Abort
        if f.fails(point, n):
            assert f.fail_status is not None
            raise DirectiveError(
                f.fail_status, status_text(f.fail_status, f"Injected fault at {point}!")
            )
        if f.stalls(point, n):
            self.stalled = True
            self.record.outcome = "stalled"
            log.info("task %s: injected stall at %s", self.task.task_id, point)
            raise _Stalled
        if malformed and self.malformed is None and f.malforms(point, n):
            self.malformed = "due"

    # ---------------------------------------------------------------- directives

    async def _on_text(self, text: str) -> None:
        accepted = self.task.receive(text)
        if accepted is None:
            return  # a late Stop after voice detection completed the task
        if accepted.kind == "start":
            await self._start(accepted)
        elif accepted.kind == "stop":
            await self._stop()
        else:
            assert isinstance(self.engine, TranscriberTask) and accepted.params is not None
            self.engine.control(accepted.params)

    async def _start(self, accepted: Accepted) -> None:
        d, params = accepted.directive, accepted.params
        assert params is not None and self.task.namespace is not None
        if self.record.task_id is not None:
            self.record = self.gw._record(self.record.faults)
        r = self.record
        r.task_id, r.namespace, r.params = d.task_id, d.namespace, dict(d.payload)
        engine = TranscriberTask if d.namespace == TRANSCRIBER.name else RecognizerTask
        self.engine = engine(
            params, self.gw.recognizer, self.gw._run, self._emit, self.gw._slots, self._alive
        )
        r.sentences = self.engine.sentences
        self.wav = WavStripper(params.sample_rate) if params.format == "wav" else None
        await self._fault("start")
        if self.faults.start_delay:
            await asyncio.sleep(self.faults.start_delay)
        await self._send(self.task.started(), self.task.namespace.started)

    async def _stop(self) -> None:
        await self._fault("stop", malformed=False)
        assert self.engine is not None
        payload = await self.engine.stop()
        await self._fault("stop")  # a malformed event replaces Completed, not the flush
        await self._complete(payload, early=False)

    async def _complete(self, payload: dict[str, Any] | None, *, early: bool) -> None:
        assert self.task.namespace is not None
        if self.faults.complete_delay:
            await asyncio.sleep(self.faults.complete_delay)
        name = self.task.namespace.completed
        await self._send(self.task.completed(payload, early=early), name)
        r = self.record
        r.status, r.status_text, r.outcome = SUCCESS, SUCCESS_TEXT, "completed"
        self.engine = None
        self._log_record()

    # ---------------------------------------------------------------- audio

    async def _on_audio(self, data: bytes) -> None:
        if not self.task.receive_audio():
            return  # voice detection completed the task: the cloud ignores the rest
        assert self.engine is not None
        self.record.audio_bytes += len(data)
        await self._fault("audio")
        pcm = data if self.wav is None else self.wav.feed(data)
        if not pcm:
            return
        if isinstance(self.engine, RecognizerTask):
            payload = await self.engine.audio(pcm)
            if payload is not None:
                await self._complete(payload, early=True)
        else:
            await self.engine.audio(pcm)


class GatewayThread:
    """Runs a :class:`Gateway` on its own event loop in one background thread.

    ``with GatewayThread(gw) as gw: ...`` returns once the gateway listens; leaving the
    block closes it and joins the thread. :meth:`start` / :meth:`stop` do the same.
    """

    def __init__(self, gateway: Gateway, *, timeout: float = 30.0) -> None:
        self.gateway = gateway
        self.timeout = timeout
        self.loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._stop_event: asyncio.Event | None = None
        self._error: BaseException | None = None

    def start(self) -> Gateway:
        if self._thread is not None:
            raise RuntimeError("gateway thread already started")
        self._thread = threading.Thread(target=self._main, name="nls-gateway", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.timeout):
            raise TimeoutError("the gateway did not start in time")
        if self._error is not None:
            raise self._error
        return self.gateway

    def _main(self) -> None:
        try:
            asyncio.run(self._amain())
        except BaseException as exc:  # reported to the starting thread
            self._error = exc
            self._ready.set()

    async def _amain(self) -> None:
        self.loop = asyncio.get_running_loop()
        self._stop_event = asyncio.Event()
        await self.gateway.start()
        self._ready.set()
        try:
            await self._stop_event.wait()
        finally:
            await self.gateway.close()

    def stop(self) -> None:
        """Close the gateway and join its thread."""
        if self._thread is None:
            return
        if self.loop is not None and self._stop_event is not None:
            self.loop.call_soon_threadsafe(self._stop_event.set)
        self._thread.join(self.timeout)
        self._thread = None

    def __enter__(self) -> Gateway:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()
