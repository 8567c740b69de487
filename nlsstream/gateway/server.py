"""The local NLS gateway: a websockets server speaking the cloud's real-time protocols.

Reference: ``shared/reference/nls-protocol.md`` §1 (handshake, auth), §3
(SpeechTranscriber), §4 (SpeechRecognizer), §5.4 and §6 (limits, status codes).

One coroutine serves each connection and handles its messages in order; recognition
runs in a bounded thread pool. Per audio frame the server does a little arithmetic and
one numpy pass (VAD), never JSON and never a new task. Limits: messages over
``max_size`` bytes close that connection (1009); a recognizer task holds at most 60 s of
audio, a transcriber sentence is cut at 60 s; only that connection is affected by its
own bad input.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import threading
import types
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from ..errors import STATUS_CODES, SUCCESS
from ..protocol import (
    NAMESPACES,
    DirectiveError,
    Namespace,
    ServerState,
    ServerTask,
    build_event,
    build_task_failed,
    encode,
    parse_directive,
    parse_start_params,
)
from .engine import (
    RecognizerSpec,
    RecognizerTask,
    SphinxRecognizer,
    TranscriberTask,
    resolve_recognizer,
)
from .faults import MALFORMED_TEXT, FaultPoint, Faults

__all__ = ["Gateway", "GatewayThread", "SessionRecord"]

log = logging.getLogger("nlsstream.gateway")

PATH = "/ws/v1"
DEFAULT_TOKEN = "local-token"
DEFAULT_APPKEY = "local-appkey"
MAX_WAV_HEADER = 4096


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


def _first(values: list[str]) -> str | None:
    return values[0] if values else None


class Gateway:
    """A local NLS gateway on ``ws://host:port/ws/v1``.

    Args:
        host, port: where to listen (``port=0``: a free port, see :attr:`url`).
        tokens: accepted tokens (header ``X-NLS-Token`` or query ``?token=``); ``None``
            accepts any token, or none. A wrong token gets HTTP 403.
        appkeys: accepted appkeys; ``None`` accepts any. Else TaskFailed 40020105.
        recognizer: ``"auto"`` (PocketSphinx if installed, else ``"span"``),
            ``"sphinx"``, ``"span"``, a :class:`~nlsstream.gateway.engine.Recognizer` or a
            callable ``fn(pcm, sample_rate) -> str``.
        faults: :class:`Faults` for every connection (see also :meth:`queue_faults`).
        idle_timeout: seconds without any message before TaskFailed 40000004.
        max_size: largest accepted WebSocket message in bytes.
        ping_interval: seconds between server pings (``None``: no pings).
        max_workers: threads for recognition (CPU work, off the event loop).

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
        max_size: int = 1 << 20,
        ping_interval: float | None = 20.0,
        max_workers: int = 2,
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
        self.max_size = max_size
        self.ping_interval = ping_interval
        self.max_workers = max_workers
        self.sessions: list[SessionRecord] = []
        self._queued: collections.deque[Faults] = collections.deque()
        self._server: Server | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._connections: set[_Connection] = set()

    # ---------------------------------------------------------------- public API

    @property
    def url(self) -> str:
        """``ws://host:port/ws/v1`` (the real port once started)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"ws://{host}:{self.port}{PATH}"

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
        return self._server is not None

    async def start(self) -> None:
        """Start listening; returns once the port is bound (:attr:`url` is final)."""
        if self._server is not None:
            raise RuntimeError("gateway already started")
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=self.max_workers, thread_name_prefix="nls-recognize"
        )
        if isinstance(self.recognizer, SphinxRecognizer):
            await asyncio.get_running_loop().run_in_executor(
                self._executor, self.recognizer.warm_up
            )
        self._server = await serve(
            self._handle,
            self.host,
            self.port,
            process_request=self._process_request,
            max_size=self.max_size,
            ping_interval=self.ping_interval,
            compression=None,
            close_timeout=2,
        )
        sock = next(iter(self._server.sockets))
        self.port = sock.getsockname()[1]
        log.info("NLS gateway listening on %s (recognizer %s)", self.url, self.recognizer.name)

    async def close(self) -> None:
        """Stop listening, close every connection (1001) and the recognition pool."""
        server, self._server = self._server, None
        if server is not None:
            server.close()
            try:
                await asyncio.wait_for(server.wait_closed(), 5)
            except asyncio.TimeoutError:
                log.warning("some connections did not close in time")
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    async def serve_forever(self) -> None:
        """Start (if needed) and serve until cancelled."""
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

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

    # ---------------------------------------------------------------- internals

    def _next_faults(self) -> Faults:
        try:
            return self._queued.popleft()
        except IndexError:
            return self.faults

    def _process_request(self, connection: ServerConnection, request: Request) -> Response | None:
        headers = request.headers
        # The official Python SDK sends its own Sec-WebSocket-Key/Version *and* a fixed
        # pair (reference §1.3); it checks the accept header against the first key, as
        # the cloud answers.
        for name in ("Sec-WebSocket-Key", "Sec-WebSocket-Version"):
            values = headers.get_all(name)
            if len(values) > 1:
                del headers[name]
                headers[name] = values[0]
        url = urlsplit(request.path)
        if url.path.rstrip("/") != PATH:
            return connection.respond(404, f"Gateway:NOT_FOUND:No endpoint at '{url.path}'!\n")
        token = _first(headers.get_all("X-NLS-Token")) or _first(
            parse_qs(url.query).get("token", [])
        )
        if self.tokens is not None and token not in self.tokens:
            log.info("handshake rejected: %s", "invalid token" if token else "no token")
            if not token:
                body = "Gateway:ACCESS_DENIED:Missing authorization header!"
            else:
                body = f"Meta:ACCESS_DENIED:The token '{token}' is invalid!"
            return connection.respond(403, body)
        return None

    async def _handle(self, ws: ServerConnection) -> None:
        conn = _Connection(self, ws, self._next_faults())
        self._connections.add(conn)
        try:
            await conn.run()
        finally:
            self._connections.discard(conn)

    def _run(self, fn: Any, /, *args: Any) -> asyncio.Future[Any]:
        if self._executor is None:
            raise ConnectionAbortedError("gateway is closing")
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)


class _Abort(Exception):
    """Stop serving this connection now (dropped, failed or closing)."""


class _Stalled(Exception):
    """An injected stall: ignore this and every later message, keep the socket open."""


class _Connection:
    """One client connection; tasks run one after another on it."""

    def __init__(self, gateway: Gateway, ws: ServerConnection, faults: Faults) -> None:
        self.gw = gateway
        self.ws = ws
        self.faults = faults
        self.loop = asyncio.get_running_loop()
        self.record = SessionRecord(faults=faults if faults.active else None)
        gateway.sessions.append(self.record)
        self.ns: Namespace | None = None
        self.task: TranscriberTask | RecognizerTask | None = None
        self.task_id = ""
        self.state = "idle"  # idle, started, stopping
        self.done_task_id: str | None = None  # last task that completed on this connection
        self.done_early = False  # ... by voice detection, not by Stop
        self.last_directive = "None"
        self.last_activity = self.loop.time()
        self.busy = False
        self.stalled = False
        self.closing = False
        self.malformed_pending = False
        self.malformed_used = False
        self.wav_header: bytearray | None = None
        self.idle_timer: asyncio.TimerHandle | None = None
        self.idle_task: asyncio.Task[None] | None = None

    # ---------------------------------------------------------------- main loop

    async def run(self) -> None:
        self._arm_idle(self.gw.idle_timeout)
        try:
            async for message in self.ws:
                self.last_activity = self.loop.time()
                if self.stalled:
                    continue
                self.busy = True
                try:
                    if isinstance(message, str):
                        await self._on_text(message)
                    else:
                        await self._on_audio(message)
                except DirectiveError as exc:
                    await self._fail(exc.status, exc.status_text, exc.task_id)
                except _Stalled:
                    pass
                finally:
                    self.busy = False
                if self.closing:
                    break
        except (ConnectionClosed, _Abort, ConnectionAbortedError):
            pass
        except Exception:
            # A bug in one session must not take down the server or other sessions.
            log.exception("session %s failed", self.task_id or "-")
            with contextlib.suppress(ConnectionClosed, _Abort):
                await self._fail(50000000, "Gateway:SERVER_ERROR:Internal error!")
        finally:
            if self.idle_timer is not None:
                self.idle_timer.cancel()
            await self._finish()

    async def _finish(self) -> None:
        if self.task is not None:
            if self.record.outcome == "open":
                self.record.status = 40010004
                self.record.status_text = (
                    "Gateway:CLIENT_DISCONNECT:Client disconnected before task finished!"
                )
                self.record.outcome = "disconnected"
            task, self.task = self.task, None
            try:
                await task.close()
            except Exception:  # the pool may be gone at shutdown
                log.debug("releasing the decoder failed", exc_info=True)
            self._log_record()
        elif self.record.task_id is None and self.record.outcome in ("open", "failed"):
            if self.record.outcome == "open":
                self.record.outcome = "disconnected"
            self._log_record()
        if not self.closing or self.record.outcome != "dropped":
            with contextlib.suppress(asyncio.TimeoutError, ConnectionClosed):
                await asyncio.wait_for(self.ws.close(), 3)

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

    def _arm_idle(self, delay: float) -> None:
        self.idle_timer = self.loop.call_later(max(delay, 0.01), self._check_idle)

    def _check_idle(self) -> None:
        if self.closing or self.stalled:
            return
        elapsed = self.loop.time() - self.last_activity
        if self.busy or elapsed < self.gw.idle_timeout:
            self._arm_idle(self.gw.idle_timeout - elapsed if not self.busy else 0.5)
            return
        self.idle_task = self.loop.create_task(self._idle_fail())

    async def _idle_fail(self) -> None:
        try:
            await self._fail(
                40000004,
                "Gateway:IDLE_TIMEOUT:Websocket session is idle for too long time, "
                f"the last directive is '{self.last_directive}'!",
            )
            await self.ws.close()
        except (ConnectionClosed, _Abort):
            pass

    # ---------------------------------------------------------------- sending

    async def _emit(self, name: str, payload: dict[str, Any] | None) -> None:
        """Send one event of the current task (what the engine calls)."""
        if self.stalled:
            raise _Stalled
        if self.closing:
            raise _Abort
        assert self.ns is not None
        if self.malformed_pending:
            self.malformed_pending = False
            text = MALFORMED_TEXT
            self.record.events.append("<malformed>")
        else:
            text = encode(build_event(self.ns.name, name, self.task_id, payload))
            self.record.events.append(name)
        await self.ws.send(text)

    async def _fail(self, status: int, status_text: str, task_id: str | None = None) -> None:
        """Send TaskFailed and end the connection (the task is dead, reference §3.5)."""
        if self.closing:
            return
        if self.record.task_id is not None and self.record.outcome != "open":
            # The failing directive belongs to a new task on a reused connection.
            self._new_record()
        self.closing = True
        self.record.status = status
        self.record.status_text = status_text
        self.record.outcome = "failed"
        if self.record.task_id is None and task_id:
            self.record.task_id = task_id
        self.record.events.append("TaskFailed")
        level = logging.INFO if status < 50000000 else logging.WARNING
        log.log(level, "task %s failed: %s %s", task_id or self.task_id or "-", status, status_text)
        await self.ws.send(encode(build_task_failed(task_id or self.task_id, status, status_text)))

    def _new_record(self) -> None:
        self.record = SessionRecord(faults=self.record.faults)
        self.gw.sessions.append(self.record)

    async def _fault(self, point: FaultPoint, *, malformed: bool = True) -> None:
        """Apply the faults due at ``point``; raises :class:`_Abort` when the task ends."""
        f, n = self.faults, self.record.audio_bytes
        if f.drops(point, n):
            self.record.outcome = "dropped"
            self.closing = True
            log.info("task %s: injected drop at %s", self.task_id, point)
            transport = self.ws.transport
            transport.abort()
            raise _Abort
        if f.fails(point, n):
            assert f.fail_status is not None
            known = STATUS_CODES.get(f.fail_status)
            name = known.name if known is not None else "INJECTED_FAULT"
            await self._fail(f.fail_status, f"Gateway:{name}:Injected fault at {point}!")
            raise _Abort
        if f.stalls(point, n):
            self.stalled = True
            self.record.outcome = "stalled"
            log.info("task %s: injected stall at %s", self.task_id, point)
            raise _Stalled
        if malformed and not self.malformed_used and f.malforms(point, n):
            self.malformed_used = True
            self.malformed_pending = True

    # ---------------------------------------------------------------- directives

    async def _on_text(self, text: str) -> None:
        try:
            d = parse_directive(text)
        except DirectiveError as exc:
            exc.task_id = exc.task_id if exc.task_id and self.state == "idle" else self.task_id
            raise
        self.last_directive = d.name
        ns = NAMESPACES[d.namespace]
        if d.name == ns.start:
            if self.state != "idle":
                raise DirectiveError(
                    40010005,
                    "Gateway:TASK_STATE_ERROR:Got start directive while task is running!",
                    self.task_id,
                )
            await self._start(ns, d.task_id, d.appkey, d.payload)
        elif d.name == ns.stop:
            await self._stop(ns, d.task_id)
        elif d.name == ns.control:
            self._check_task(ns, d.task_id, "control")
            assert isinstance(self.task, TranscriberTask)
            task = ServerTask()
            task.state, task.namespace, task.task_id = ServerState.STARTED, ns, d.task_id
            task.params = self.task.params
            accepted = task.receive(text)
            assert accepted is not None and accepted.params is not None
            self.task.control(accepted.params)
        else:
            raise DirectiveError(
                40010002,
                f"Gateway:DIRECTIVE_NOT_SUPPORTED:Directive '{d.name}' is not supported "
                f"in namespace '{d.namespace}'!",
                d.task_id,
            )

    def _check_task(self, ns: Namespace, task_id: str, what: str) -> None:
        if self.state == "idle":
            raise DirectiveError(
                40010005,
                f"Gateway:TASK_STATE_ERROR:Got {what} directive before the task started!",
                task_id,
            )
        if task_id != self.task_id or ns is not self.ns:
            raise DirectiveError(
                40000002,
                f"Gateway:MESSAGE_INVALID:Task id '{task_id}' ({ns.name}) does not match "
                f"the running task!",
                self.task_id,
            )
        if self.state == "stopping":
            raise DirectiveError(
                40010005,
                f"Gateway:TASK_STATE_ERROR:Got {what} directive while task is stopping!",
                task_id,
            )

    async def _start(self, ns: Namespace, task_id: str, appkey: str, payload: Any) -> None:
        if self.record.task_id is not None:
            self._new_record()
        self.task_id = task_id
        self.ns = ns
        self.record.task_id = task_id
        self.record.namespace = ns.name
        self.record.params = dict(payload)
        self.done_task_id = None
        if self.gw.appkeys is not None and appkey not in self.gw.appkeys:
            raise DirectiveError(40020105, "Meta:APPKEY_NOT_EXIST:Appkey not exist!", task_id)
        params = parse_start_params(ns.name, payload)
        cls = TranscriberTask if ns.name == "SpeechTranscriber" else RecognizerTask
        self.task = cls(params, self.gw.recognizer, self.gw._run, self._emit)
        self.record.sentences = self.task.sentences
        self.wav_header = bytearray() if params.format == "wav" else None
        await self._fault("start")
        if self.faults.start_delay:
            await asyncio.sleep(self.faults.start_delay)
        self.state = "started"
        await self._emit(ns.started, None)

    async def _stop(self, ns: Namespace, task_id: str) -> None:
        if self.state == "idle" and task_id == self.done_task_id:
            if self.done_early:
                return  # voice detection already completed it: a late Stop is a no-op
            raise DirectiveError(
                40010005,
                "Gateway:TASK_STATE_ERROR:Got stop directive while task is stopping!",
                task_id,
            )
        self._check_task(ns, task_id, "stop")
        self.state = "stopping"
        await self._fault("stop", malformed=False)
        assert self.task is not None
        payload = None
        if isinstance(self.task, TranscriberTask):
            await self.task.stop()
        else:
            payload = await self.task.stop()
        await self._fault("stop")  # a malformed event replaces Completed, not the flush
        await self._complete(payload, early=False)

    async def _complete(self, payload: dict[str, Any] | None, *, early: bool) -> None:
        assert self.ns is not None
        if self.faults.complete_delay:
            await asyncio.sleep(self.faults.complete_delay)
        await self._emit(self.ns.completed, payload)
        self.record.status = SUCCESS
        self.record.status_text = "Gateway:SUCCESS:Success."
        self.record.outcome = "completed"
        self.state = "idle"
        self.done_task_id = self.task_id
        self.done_early = early
        self.task = None
        self._log_record()

    # ---------------------------------------------------------------- audio

    async def _on_audio(self, data: bytes) -> None:
        if self.state != "started" or self.task is None:
            if self.state == "stopping" or (self.done_task_id and not self.done_early):
                raise DirectiveError(
                    40010005,
                    "Gateway:TASK_STATE_ERROR:Got audio data after the stop directive!",
                    self.task_id,
                )
            if self.done_task_id and self.done_early:
                return  # the task already completed on its own; the cloud ignores the rest
            raise DirectiveError(
                40010005,
                "Gateway:TASK_STATE_ERROR:Got audio data before the task started!",
                self.task_id,
            )
        self.record.audio_bytes += len(data)
        await self._fault("audio")
        pcm = data if self.wav_header is None else self._strip_wav(data)
        if not pcm:
            return
        if isinstance(self.task, RecognizerTask):
            payload = await self.task.audio(pcm)
            if payload is not None:
                await self._complete(payload, early=True)
        else:
            await self.task.audio(pcm)

    def _strip_wav(self, data: bytes) -> bytes:
        """Collect and check the RIFF header; return the PCM after it (maybe empty)."""
        assert self.wav_header is not None and self.task is not None
        self.wav_header += data
        header = bytes(self.wav_header)
        end = _wav_data_offset(header, self.task.params.sample_rate, self.task_id)
        if end is None:
            if len(header) > MAX_WAV_HEADER:
                raise DirectiveError(
                    40000009, "Gateway:INVALID_AUDIO_HEADER:Too large wav header!", self.task_id
                )
            return b""
        self.wav_header = None
        return header[end:]


def _wav_data_offset(header: bytes, rate: int, task_id: str) -> int | None:
    """Offset of the PCM after a RIFF/WAVE header, or ``None`` if more bytes are needed.

    Raises :class:`DirectiveError`: 40000009 for a header that is not RIFF/WAVE,
    40010003 for a valid one describing anything but PCM16 mono at ``rate``.
    """

    def bad(text: str) -> DirectiveError:
        return DirectiveError(
            40000009, f"Gateway:INVALID_AUDIO_HEADER:Invalid wav header: {text}!", task_id
        )

    if len(header) < 12:
        if not (b"RIFF"[: len(header)] == header[:4]):
            raise bad("it does not start with RIFF")
        return None
    if header[:4] != b"RIFF" or header[8:12] != b"WAVE":
        raise bad("it does not start with RIFF....WAVE")
    pos = 12
    fmt_seen = False
    while pos + 8 <= len(header):
        chunk, size = header[pos : pos + 4], int.from_bytes(header[pos + 4 : pos + 8], "little")
        body = pos + 8
        if chunk == b"data":
            if not fmt_seen:
                raise bad("data chunk before fmt chunk")
            return body
        if body + size > len(header):
            return None
        if chunk == b"fmt ":
            if size < 16:
                raise bad("fmt chunk too short")
            tag = int.from_bytes(header[body : body + 2], "little")
            channels = int.from_bytes(header[body + 2 : body + 4], "little")
            srate = int.from_bytes(header[body + 4 : body + 8], "little")
            bits = int.from_bytes(header[body + 14 : body + 16], "little")
            problems = []
            if tag not in (1, 0xFFFE):
                problems.append(f"encoding tag {tag} (only 1 = PCM)")
            if bits != 16:
                problems.append(f"{bits}-bit samples (only 16-bit)")
            if channels != 1:
                problems.append(f"{channels} channels (only mono)")
            if srate != rate:
                problems.append(f"{srate} Hz (the task declared sample_rate {rate})")
            if problems:
                raise DirectiveError(
                    40010003,
                    "Gateway:DIRECTIVE_INVALID:Unsupported wav audio: " + ", ".join(problems) + "!",
                    task_id,
                )
            fmt_seen = True
        pos = body + size + (size & 1)
    return None


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
