"""A light NLS load-gateway: speaks the protocol, recognises nothing, measures lateness.

Used by the scale benchmark (``benchmarks/concurrency.py``) to stand in for the cloud
gateway. It answers SpeechTranscriber (and SpeechRecognizer) tasks with the real event
sequence (``docs/protocol.md`` §3, §4): Started, then during streaming one
SentenceBegin/SentenceEnd pair per ``sentence_ms`` of audio received (numbered, with
``time``/``begin_time``, so a client can prove that no event was lost), a SentenceEnd
for the tail on Stop, then Completed. Which directive is allowed when, and the status of
every refusal, come from :class:`~nlsstream.realtime.protocol.ServerTask`, the rule book the full
gateway uses too; after a TaskFailed the gateway closes the connection (1000).

For every binary (audio) message it records the arrival time and its lateness against
the ideal schedule of that session: message *k* starting at byte offset ``b_k`` should
arrive at ``t_first + b_k / byte_rate`` (for 640-byte frames at 16 kHz: ``t_first +
k * 20 ms``), lateness ``= max(0, arrival - ideal)``. ``t_first`` is the arrival of
the session's first audio message. Statistics (per session and pooled p50/p99/max,
the gateway's own CPU time and event-loop lag) come from :meth:`LightGateway.stats`
in-process, or in a JSON file on SIGINT/SIGTERM (``nlsstream serve --light
--stats-file FILE``, the one way to start it from a shell). Nothing unauthenticated
listens: only ``/ws/v1`` is served (404 elsewhere), and the HTTP control endpoints
``GET /stats`` (``?reset=1``) and ``GET /reset`` exist only when the gateway is started
with ``control=True`` (``serve --light --control``), which requires a token; they answer
only requests carrying it in ``X-NLS-Token``.

The WebSocket layer is picows: its Cython parser reads frames, so the per-frame cost
in Python is one callback. The fast path of an audio frame is one clock reading, a
check that the task is STARTED and :meth:`SessionStats.record` (arrival time and
size); the payload is never copied into a Python object. picows unmasks every payload
in place (SIMD; there is no option to skip it), which costs far less than the callback.
``benchmarks/gateway_overhead.py`` measures the CPU per frame against other servers.

RFC 6455 duties: picows itself refuses HTTP/1.0 and non-GET requests, a handshake
without ``Upgrade: websocket`` / ``Connection: Upgrade`` or with a bad key or version
(400), unmasked client frames, control frames over 125 bytes or fragmented, and close
frames with a 1-byte payload or a bad code (1002); it answers pings. This module adds
what is about messages rather than frames: UTF-8 of text messages (1007), a
continuation without a message or a new message inside a fragmented one (1002), the
size of a whole message (1009); and the path and token checks of the upgrade.

Handshake quirk (§1.3): the official Python SDK sends ``Sec-WebSocket-Key`` and
``Sec-WebSocket-Version`` twice; picows reads the first occurrence, the key the SDK
checks the accept value against.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import resource
import time
from array import array
from collections.abc import Collection
from typing import Any
from urllib.parse import parse_qs, urlsplit

import numpy as np
from picows import (
    WSCloseCode,
    WSFrame,
    WSListener,
    WSMsgType,
    WSTransport,
    WSUpgradeRequest,
    WSUpgradeResponse,
    WSUpgradeResponseWithListener,
    ws_create_server,
)

from ..errors import status_text
from ..realtime.protocol import (
    NAMESPACES,
    TRANSCRIBER,
    DirectiveError,
    Namespace,
    ServerState,
    ServerTask,
)
from ..redaction import get_logger

__all__ = ["PATH", "LightGateway", "SessionStats"]

logger = get_logger("nlsstream.gateway.light")

PATH = "/ws/v1"
_CONTROL_PATHS = ("/stats", "/reset")
_MAX_TEXT = 64 * 1024

_BINARY = WSMsgType.BINARY
_TEXT = WSMsgType.TEXT
_CONTINUATION = WSMsgType.CONTINUATION
_CLOSE = WSMsgType.CLOSE
_STARTED = ServerState.STARTED
#: Close codes that mean the gateway failed the connection (counted as protocol errors).
_ERROR_CODES = frozenset(
    {WSCloseCode.PROTOCOL_ERROR, WSCloseCode.INVALID_TEXT, WSCloseCode.MESSAGE_TOO_BIG}
)

_clock = time.perf_counter


def _percentiles_ms(values: np.ndarray[Any, Any]) -> dict[str, float]:
    if values.size == 0:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    p50, p99 = np.percentile(values, [50, 99])
    return {
        "p50_ms": round(float(p50) * 1000, 3),
        "p99_ms": round(float(p99) * 1000, 3),
        "max_ms": round(float(values.max()) * 1000, 3),
    }


#: The answer to any path but /ws/v1 (the recordings and POP RPC need the full gateway).
_NOT_HERE = (
    "Not Found: the light gateway serves only /ws/v1 (FlashRecognizer, REST, FileTrans "
    "and CreateToken need the full gateway: nlsstream serve without --light)"
)


class SessionStats:
    """What the gateway recorded for one task."""

    __slots__ = (
        "begin_sent",
        "byte_rate",
        "closed_early",
        "completed",
        "drift",
        "failed",
        "first",
        "last",
        "lateness",
        "namespace",
        "next_sentence",
        "received",
        "sentence_bytes",
        "sentences_sent",
        "task_id",
    )

    def __init__(self, namespace: Namespace, task_id: str, sample_rate: int, sentence_ms: int):
        self.namespace = namespace
        self.task_id = task_id
        # 16-bit mono PCM; other formats get a lateness that is only indicative.
        self.byte_rate = float(sample_rate * 2)
        bytes_per_sentence = int(self.byte_rate * sentence_ms / 1000)
        self.sentence_bytes = bytes_per_sentence if namespace is TRANSCRIBER else 0
        self.next_sentence = self.sentence_bytes or -1
        self.begin_sent = False
        self.sentences_sent = 0
        self.received = 0
        self.first = -1.0
        self.last = -1.0
        #: Signed lateness of the latest message (its arrival minus its ideal time): the
        #: session's clock drift at the end of a long stream.
        self.drift = 0.0
        #: Lateness in seconds of each audio message, in arrival order (clamped at 0).
        self.lateness = array("d")
        self.completed = False
        self.failed: str | None = None
        self.closed_early = False

    def record(self, size: int, now: float) -> None:
        """Count one audio message of ``size`` bytes that arrived at ``now`` (seconds)."""
        if self.first < 0:
            self.first = now
            self.lateness.append(0.0)
        else:
            # Ideal arrival: the session's first message plus the audio time before this one.
            late = now - self.first - self.received / self.byte_rate
            self.drift = late
            self.lateness.append(late if late > 0.0 else 0.0)
        self.last = now
        self.received += size

    @property
    def active(self) -> bool:
        return not (self.completed or self.failed or self.closed_early)

    def summary(self) -> dict[str, Any]:
        values = np.frombuffer(self.lateness, dtype=np.float64)
        out: dict[str, Any] = {
            "task_id": self.task_id,
            "namespace": self.namespace.name,
            "frames": len(self.lateness),
            "bytes": self.received,
            "audio_s": round(self.received / self.byte_rate, 3),
            "span_s": round(self.last - self.first, 3) if self.first >= 0 else 0.0,
            "last_frame_drift_ms": round(self.drift * 1000, 3),
            "sentence_end_sent": self.sentences_sent,
            "completed": self.completed,
            "failed": self.failed,
            "closed_early": self.closed_early,
        }
        out.update(_percentiles_ms(values))
        return out


class _Connection(WSListener):
    """One upgraded client connection: its task (a :class:`ServerTask`) and statistics."""

    def __init__(self, gateway: LightGateway) -> None:
        super().__init__()
        self.gw = gateway
        self.task = ServerTask(gateway.appkeys)
        self.transport: WSTransport | None = None
        self.session: SessionStats | None = None
        #: The session whose whole binary frames take the fast path: the current one
        #: while no fragmented message is open and the connection is not closing.
        self.streaming: SessionStats | None = None
        self.partial: WSMsgType | None = None  # type of the fragmented message in progress
        self.msg_bytes = 0  # bytes of the fragmented binary message so far
        self.text_parts: list[bytes] = []
        self.closing = False
        self.last_activity = _clock()
        self.stuck: asyncio.TimerHandle | None = None  # armed while the client reads nothing

    # ------------------------------------------------------------------ picows callbacks

    def pause_writing(self) -> None:
        # The client has stopped reading what we send: give it send_timeout to resume.
        self.stuck = asyncio.get_running_loop().call_later(self.gw.send_timeout, self._stuck)

    def resume_writing(self) -> None:
        if self.stuck is not None:
            self.stuck.cancel()
            self.stuck = None

    def _stuck(self) -> None:
        self.stuck = None
        logger.info("disconnecting a client that read nothing for %g s", self.gw.send_timeout)
        if self.transport is not None:
            self.transport.disconnect(graceful=False)

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        self.gw._connections.add(self)
        self.gw.connections_total += 1

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.gw._connections.discard(self)
        self.resume_writing()
        handshake = transport.close_handshake
        sent = handshake.sent if handshake is not None else None
        if sent is not None and sent.code in _ERROR_CODES:
            self.gw.protocol_errors += 1
        s = self.session
        if s is not None and s.active:
            s.closed_early = True  # the cloud would say 40010004 CLIENT_DISCONNECT
        self.session = self.streaming = None

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        now = _clock()
        # Fast path, the common case under load: a whole audio frame of a started task.
        s = self.streaming
        if (
            s is not None
            and frame.msg_type is _BINARY
            and frame.fin
            and self.task.state is _STARTED
        ):
            s.record(frame.payload_size, now)
            if s.sentence_bytes and (not s.begin_sent or s.received >= s.next_sentence):
                self._sentences(s)
            return
        self.last_activity = now
        self._frame(transport, frame, now)

    # ------------------------------------------------------------------ messages

    def _frame(self, transport: WSTransport, frame: WSFrame, now: float) -> None:
        kind = frame.msg_type
        if kind is _CLOSE:
            if not self.closing:  # echo the client's code (RFC 6455 §5.5.1)
                code = frame.get_close_code()
                transport.send_close(WSCloseCode.OK if code is WSCloseCode.NO_INFO else code)
                self.closing = True
            self.streaming = None
            transport.disconnect()
            return
        if kind is _CONTINUATION:
            if self.partial is None:
                self._fail(WSCloseCode.PROTOCOL_ERROR, "continuation without a message")
                return
            kind = self.partial
        elif kind is _TEXT or kind is _BINARY:
            if self.partial is not None:
                self._fail(WSCloseCode.PROTOCOL_ERROR, "new message inside a fragmented one")
                return
        else:
            return  # a pong (picows answers pings itself)
        if self.closing:
            return
        if kind is _BINARY:
            self._binary(frame, now)
        else:
            self._text(frame)

    def _binary(self, frame: WSFrame, now: float) -> None:
        self.msg_bytes += frame.payload_size
        if self.msg_bytes > self.gw.max_message:
            self._fail(WSCloseCode.MESSAGE_TOO_BIG, "audio message too big")
            return
        if not frame.fin:
            self.partial, self.streaming = _BINARY, None
            return
        size, self.msg_bytes, self.partial = self.msg_bytes, 0, None
        try:
            if not self.task.receive_audio():
                return  # voice detection already completed the task: ignored
        except DirectiveError as exc:
            self._task_failed(exc)
            return
        s = self.session
        assert s is not None
        self.streaming = s
        s.record(size, now)
        if s.sentence_bytes:
            self._sentences(s)

    def _text(self, frame: WSFrame) -> None:
        self.text_parts.append(frame.get_payload_as_bytes())
        if sum(map(len, self.text_parts)) > _MAX_TEXT:
            self._fail(WSCloseCode.MESSAGE_TOO_BIG, "text message too big")
            return
        if not frame.fin:
            self.partial, self.streaming = _TEXT, None
            return
        data = b"".join(self.text_parts)
        self.text_parts, self.partial = [], None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            self._fail(WSCloseCode.INVALID_TEXT, "invalid UTF-8 in a text message")
            return
        self._directive(text)
        if self.task.state is _STARTED and not self.closing:
            self.streaming = self.session

    # ------------------------------------------------------------------ NLS protocol

    def _directive(self, text: str) -> None:
        try:
            accepted = self.task.receive(text)
        except DirectiveError as exc:
            self._task_failed(exc)
            return
        if accepted is None or accepted.kind == "control":
            return  # a late Stop to ignore; a Control is not acknowledged (§3.3)
        if accepted.kind == "start":
            assert accepted.params is not None
            d = accepted.directive
            new = SessionStats(
                NAMESPACES[d.namespace], d.task_id, accepted.params.sample_rate, self.gw.sentence_ms
            )
            self.session = new
            self.gw._sessions.append(new)
            self._send(self.task.started())
            return
        s = self.session  # a Stop
        assert s is not None
        self.streaming = None
        if s.namespace is TRANSCRIBER:
            if s.begin_sent:  # the tail of the audio is one more sentence
                self._sentence_end(s, s.received)
            payload = None
        else:
            payload = {"result": "", "duration": _ms(s, s.received)}
        self._send(self.task.completed(payload))
        s.completed = True

    def _sentences(self, s: SessionStats) -> None:
        """Emit the SentenceBegin/SentenceEnd events the audio received so far calls for."""
        if not s.begin_sent:
            self._sentence_begin(s)
        while s.received >= s.next_sentence:
            self._sentence_end(s, s.next_sentence)
            s.next_sentence += s.sentence_bytes
            if s.received > s.next_sentence - s.sentence_bytes:
                self._sentence_begin(s)

    def _sentence_begin(self, s: SessionStats) -> None:
        s.begin_sent = True
        begin = s.next_sentence - s.sentence_bytes
        index = s.sentences_sent + 1
        self._send(self.task.event("SentenceBegin", {"index": index, "time": _ms(s, begin)}))

    def _sentence_end(self, s: SessionStats, offset: int) -> None:
        s.begin_sent = False
        s.sentences_sent += 1
        begin = s.next_sentence - s.sentence_bytes
        index = s.sentences_sent
        payload = {
            "index": index,
            "time": _ms(s, offset),
            "begin_time": _ms(s, begin),
            "result": f"sentence {index}",
            "confidence": 1.0,
            "words": [],
            "status": 20000000,
            # When the gateway sent it, on the machine's monotonic clock (Linux:
            # perf_counter and time.monotonic are both CLOCK_MONOTONIC), so a client
            # on the same machine can measure event delivery latency.
            "gateway_sent_monotonic": _clock(),
        }
        self._send(self.task.event("SentenceEnd", payload))

    def _task_failed(self, exc: DirectiveError) -> None:
        """Answer ``exc`` with TaskFailed, then close the connection (§3.5)."""
        if self.closing:
            return  # one TaskFailed per connection, and nothing after our close frame
        s = self.session
        if s is not None and s.active:
            s.failed = f"{exc.status} {exc.status_text}"
        self.gw.task_failures += 1
        self._send(self.task.refusal(exc))
        self._close(WSCloseCode.OK, "")

    # ------------------------------------------------------------------ output, closing

    def _send(self, text: str) -> None:
        if self.transport is not None:
            self.transport.send(_TEXT, text.encode())

    def _close(self, code: WSCloseCode, reason: str) -> None:
        """Start the close handshake; drop the connection if the client does not answer."""
        if self.closing or self.transport is None:
            return
        self.closing = True
        self.streaming = None
        self.transport.send_close(code, reason.encode())
        asyncio.get_running_loop().call_later(
            self.gw.close_timeout, self.transport.disconnect, False
        )

    def _fail(self, code: WSCloseCode, reason: str) -> None:
        logger.debug("failing connection: %d %s", code.value, reason)
        self._close(code, reason)

    def idle_check(self, now: float) -> None:
        """TaskFailed 40000004 when nothing arrived for ``idle_timeout`` seconds."""
        last = self.last_activity
        if self.streaming is not None:
            last = max(last, self.streaming.last)
        if self.closing or now - last <= self.gw.idle_timeout:
            return
        detail = (
            "Websocket session is idle for too long time, "
            f"the last directive is '{self.task.last_directive}'!"
        )
        self._task_failed(DirectiveError(40000004, status_text(40000004, detail)))


def _ms(s: SessionStats, offset: int) -> int:
    return int(offset * 1000 / s.byte_rate)


class LightGateway:
    """A measuring NLS gateway without recognition (see the module docstring).

    ``async with LightGateway() as gw:`` serves on ``gw.url`` (``port=0`` picks a free
    port). ``sentence_ms`` sets how much audio makes one SentenceEnd; ``token`` (one
    token or several), when given, is required as ``X-NLS-Token`` (or ``?token=``), else
    any token is accepted; ``appkeys``, when given, are the accepted appkeys (else any);
    connections silent for ``idle_timeout`` seconds get TaskFailed 40000004; a client
    that reads nothing for ``send_timeout`` seconds while events wait for it is
    disconnected (its events would otherwise pile up here without bound). Messages
    over ``max_message`` bytes fail the connection (close 1009). ``control=True`` serves
    ``GET /stats`` and ``GET /reset`` to requests carrying a valid ``X-NLS-Token``; it
    requires a token.
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        sentence_ms: int = 1000,
        token: str | Collection[str] | None = None,
        appkeys: Collection[str] | None = None,
        idle_timeout: float = 10.0,
        close_timeout: float = 3.0,
        send_timeout: float = 10.0,
        max_message: int = 1 << 20,
        lag_interval: float = 0.01,
        reuse_port: bool = False,
        control: bool = False,
    ) -> None:
        if sentence_ms <= 0:
            raise ValueError("sentence_ms must be positive")
        self.tokens = frozenset((token,) if isinstance(token, str) else token or ())
        if token is not None and not all(self.tokens):
            raise ValueError("tokens must not be empty")
        if control and not self.tokens:
            raise ValueError("the control endpoints require a token")
        self.host = host
        self.port = port
        self.sentence_ms = sentence_ms
        self.appkeys = None if appkeys is None else frozenset(appkeys)
        self.idle_timeout = idle_timeout
        self.close_timeout = close_timeout
        self.send_timeout = send_timeout
        self.max_message = max_message
        self.lag_interval = lag_interval
        self.reuse_port = reuse_port
        self.control = control
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._sessions: list[SessionStats] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._lag = array("d")
        self.connections_total = 0
        self.upgrades_accepted = 0  # upgrade requests that passed the path and token checks
        self.handshakes_refused = 0  # by this gateway: wrong path or token
        self.protocol_errors = 0
        self.task_failures = 0
        self._t0 = _clock()
        self._cpu0 = time.process_time()

    @property
    def url(self) -> str:
        """The WebSocket URL clients connect to."""
        return f"ws://{self.host}:{self.port}{PATH}"

    @property
    def handshake_errors(self) -> int:
        """Upgrades refused: by this gateway (path, token), or by picows after passing
        those checks (bad upgrade headers; it answers those within the same call)."""
        rejected_by_picows = self.upgrades_accepted - self.connections_total
        return self.handshakes_refused + max(0, rejected_by_picows)

    async def start(self) -> None:
        """Listen; ``self.port`` is the bound port afterwards."""
        self._server = await ws_create_server(
            self._route,
            self.host,
            self.port,
            max_frame_size=self.max_message,
            backlog=4096,
            reuse_port=self.reuse_port or None,
        )
        self.port = self._server.sockets[0].getsockname()[1]
        self.reset()
        self._tasks = [
            asyncio.create_task(self._measure_lag()),
            asyncio.create_task(self._sweep_idle()),
        ]

    async def close(self) -> None:
        """Stop listening and drop every connection."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._server is not None:
            self._server.close()
            for conn in list(self._connections):
                if conn.transport is not None:
                    conn.transport.disconnect(False)
            await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def __aenter__(self) -> LightGateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ------------------------------------------------------------------ the upgrade

    def _route(
        self, request: WSUpgradeRequest
    ) -> _Connection | WSUpgradeResponseWithListener | None:
        """picows' listener factory: a listener for ``/ws/v1``, an HTTP answer otherwise
        (picows then checks the upgrade headers of a request given a listener)."""
        url = urlsplit(request.path.decode("latin-1"))
        header_token = request.headers.get("X-NLS-Token")
        if url.path == PATH:
            query_token = parse_qs(url.query).get("token", [None])[0]
            if self.tokens and not self.tokens.intersection((header_token, query_token)):
                return self._refuse(403, status_text(40000001, "The token is invalid!"))
            self.upgrades_accepted += 1
            return _Connection(self)
        if self.control and url.path in _CONTROL_PATHS:
            # The token in a header only: a URL can end up in logs.
            if header_token not in self.tokens:
                return self._refuse(403, status_text(40000001, "The token is invalid!"))
            body = self._control(url.path, parse_qs(url.query))
            return WSUpgradeResponseWithListener(
                WSUpgradeResponse.create_ok_response(
                    json.dumps(body).encode(), extra_headers={"Content-Type": "application/json"}
                ),
                None,
            )
        # Say why (picows' own 404 says nothing). picows answers any method but GET
        # itself, before this factory runs: a POST gets its 400.
        return self._refuse(404, _NOT_HERE)

    def _refuse(self, status: int, body: str) -> WSUpgradeResponseWithListener:
        # Never echo the token (the cloud does; we do not repeat secrets).
        self.handshakes_refused += 1
        return WSUpgradeResponseWithListener(
            WSUpgradeResponse.create_error_response(status, body.encode()), None
        )

    def _control(self, path: str, query: dict[str, list[str]]) -> dict[str, Any]:
        if path == "/reset":
            self.reset()
            return {"reset": True}
        body = self.stats()
        if query.get("reset", ["0"])[0] in ("1", "true"):
            self.reset()
        return body

    # ------------------------------------------------------------------ measurements

    async def _measure_lag(self) -> None:
        # How late the loop wakes up: if this grows, lateness is the gateway's fault.
        # perf_counter, not loop.time(): uvloop's loop clock has 1 ms resolution.
        while True:
            due = _clock() + self.lag_interval
            await asyncio.sleep(self.lag_interval)
            lag = _clock() - due
            self._lag.append(lag if lag > 0 else 0.0)

    async def _sweep_idle(self) -> None:
        while True:
            await asyncio.sleep(min(1.0, self.idle_timeout / 2))
            now = _clock()
            for conn in list(self._connections):
                conn.idle_check(now)

    def reset(self) -> None:
        """Forget finished sessions and restart the CPU, wall-clock and lag counters."""
        self._sessions = [s for s in self._sessions if s.active]
        self._lag = array("d")
        self.connections_total = self.upgrades_accepted = self.handshakes_refused = 0
        self.protocol_errors = self.task_failures = 0
        self._t0 = _clock()
        self._cpu0 = time.process_time()

    def stats(self) -> dict[str, Any]:
        """Everything measured since the last :meth:`reset`, as JSON-ready data.

        ``overall`` pools every audio message of every session; ``worst_session_p99_ms``
        is the largest per-session p99 (the scale criterion is on *every* session).
        """
        wall = _clock() - self._t0
        cpu = time.process_time() - self._cpu0
        sessions = [s.summary() for s in self._sessions]
        arrays = [np.frombuffer(s.lateness, dtype=np.float64) for s in self._sessions]
        pooled = np.concatenate(arrays) if arrays else np.zeros(0)
        overall: dict[str, Any] = {
            "sessions": len(sessions),
            "frames": int(pooled.size),
            "audio_s": round(sum(x["audio_s"] for x in sessions), 3),
            "sentence_end_sent": sum(x["sentence_end_sent"] for x in sessions),
            "completed": sum(1 for x in sessions if x["completed"]),
            "failed": sum(1 for x in sessions if x["failed"]),
            "closed_early": sum(1 for x in sessions if x["closed_early"]),
            "worst_session_p99_ms": max((x["p99_ms"] for x in sessions), default=0.0),
            "sessions_p99_over_20ms": sum(1 for x in sessions if x["p99_ms"] > 20.0),
            "peak_concurrent": _peak_concurrent(self._sessions),
        }
        overall.update(_percentiles_ms(pooled))
        usage = resource.getrusage(resource.RUSAGE_SELF)
        return {
            "wall_s": round(wall, 3),
            "cpu_s": round(cpu, 3),
            "cpu_share": round(cpu / wall, 4) if wall > 0 else 0.0,
            "max_rss_kib": usage.ru_maxrss,
            "loop": _loop_name(),
            "loop_lag": _percentiles_ms(np.frombuffer(self._lag, dtype=np.float64)),
            "connections_total": self.connections_total,
            "connections_open": len(self._connections),
            "handshake_errors": self.handshake_errors,
            "protocol_errors": self.protocol_errors,
            "task_failures": self.task_failures,
            "overall": overall,
            "sessions": sessions,
        }


def _peak_concurrent(sessions: list[SessionStats]) -> int:
    """The most sessions streaming at once (between their first and last audio message)."""
    edges = [(s.first, 1) for s in sessions if s.first >= 0]
    edges += [(s.last, -1) for s in sessions if s.first >= 0]
    edges.sort()  # at equal times the end (-1) sorts first: touching is not overlapping
    peak = live = 0
    for _, step in edges:
        live += step
        peak = max(peak, live)
    return peak


def _loop_name() -> str:
    try:
        loop = asyncio.get_running_loop()
    except RuntimeError:
        return "none"
    return type(loop).__module__.split(".")[0]
