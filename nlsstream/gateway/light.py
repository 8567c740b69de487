"""A light NLS load-gateway: speaks the protocol, recognises nothing, measures lateness.

Used by the scale benchmark (``benchmarks/concurrency.py``) to stand in for the cloud
gateway. It answers SpeechTranscriber (and SpeechRecognizer) tasks with the real event
sequence (reference ``nls-protocol.md`` §3, §4): Started, then during streaming one
SentenceBegin/SentenceEnd pair per ``sentence_ms`` of audio received (numbered, with
``time``/``begin_time``, so a client can prove that no event was lost), a SentenceEnd
for the tail on Stop, then Completed.

For every binary (audio) message it records the arrival time and its lateness against
the ideal schedule of that session: message *k* starting at byte offset ``b_k`` should
arrive at ``t_first + b_k / byte_rate`` (for 640-byte frames at 16 kHz: ``t_first +
k * 20 ms``), lateness ``= max(0, arrival - ideal)``. ``t_first`` is the arrival of
the session's first audio message. Statistics (per session and pooled p50/p99/max,
the gateway's own CPU time and event-loop lag) come from :meth:`LightGateway.stats`,
over plain HTTP ``GET /stats`` on the same port, or in a JSON file on SIGINT/SIGTERM.

Why not the ``websockets`` library: at 1,000-2,000 sessions x 50 frames/s the gateway
must handle 50k-100k frames/s on one core. ``websockets`` parses, unmasks and queues
every frame through its sans-I/O core and an ``async for`` in a task per connection;
measured on this machine (``benchmarks/gateway_overhead.py``) that costs several times
more CPU per frame than this module, which is the difference between having headroom
and being the bottleneck. So this is a minimal RFC 6455 server on ``asyncio.Protocol``:
``data_received`` parses frames in bulk from one buffer, takes one clock reading per
read, never unmasks audio (only its header and length are needed), unmasks only text
frames (directives), answers pings and does the close handshake. Only what a load
gateway needs: no extensions, no subprotocols, no TLS.

Handshake quirk (§1.3): the official Python SDK sends ``Sec-WebSocket-Key`` and
``Sec-WebSocket-Version`` twice; the client checks the accept value against the *first*
key, so the first occurrence of every header wins here.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import hashlib
import json
import logging
import os
import resource
import signal
import sys
import time
from array import array
from collections.abc import Sequence
from typing import Any, cast
from urllib.parse import parse_qs, urlsplit

import numpy as np

from ..protocol import (
    NAMESPACES,
    TRANSCRIBER,
    DirectiveError,
    Namespace,
    build_event,
    build_task_failed,
    encode,
    parse_directive,
)

__all__ = ["LightGateway", "SessionStats", "main"]

logger = logging.getLogger("nlsstream.gateway.light")

_GUID = b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11"
_MAX_HEADER = 16 * 1024
_MAX_TEXT = 64 * 1024

# Opcodes (RFC 6455 §5.2).
_CONT, _TEXT, _BINARY, _CLOSE, _PING, _PONG = 0x0, 0x1, 0x2, 0x8, 0x9, 0xA

_clock = time.perf_counter


def _accept_key(key: str) -> str:
    return base64.b64encode(hashlib.sha1(key.encode("ascii") + _GUID).digest()).decode("ascii")


def _unmask(payload: bytes | bytearray, mask: bytes | bytearray) -> bytes:
    """XOR ``payload`` with the 4-byte ``mask`` using one big-integer operation."""
    n = len(payload)
    if n == 0:
        return b""
    key = (bytes(mask) * (n // 4 + 1))[:n]
    return (int.from_bytes(payload, "big") ^ int.from_bytes(key, "big")).to_bytes(n, "big")


def _frame(opcode: int, payload: bytes) -> bytes:
    """A server frame (unmasked, final)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 127)) + n.to_bytes(8, "big")
    return head + payload


def _percentiles_ms(values: np.ndarray[Any, Any]) -> dict[str, float]:
    if values.size == 0:
        return {"p50_ms": 0.0, "p99_ms": 0.0, "max_ms": 0.0}
    p50, p99 = np.percentile(values, [50, 99])
    return {
        "p50_ms": round(float(p50) * 1000, 3),
        "p99_ms": round(float(p99) * 1000, 3),
        "max_ms": round(float(values.max()) * 1000, 3),
    }


class SessionStats:
    """What the gateway recorded for one task."""

    __slots__ = (
        "accepting",
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
        "stopping",
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
        self.stopping = False
        #: Audio is welcome: started, not stopping, not failed, not disconnected.
        self.accepting = True
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


class _Connection(asyncio.Protocol):
    """One client connection: HTTP upgrade (or a control request), then WebSocket frames."""

    def __init__(self, gateway: LightGateway) -> None:
        self.gw = gateway
        self.transport: asyncio.Transport | None = None
        self.upgraded = False
        self.closing = False
        self.buf = bytearray()
        self.skip = 0  # bytes of a binary payload still to come (skipped, never copied)
        self.skip_fin = False
        self.msg_bytes = 0  # bytes of the binary message in progress (fragmented messages)
        self.frag_opcode = 0  # opcode of the fragmented message in progress, 0 if none
        self.text_parts: list[bytes] = []
        self.session: SessionStats | None = None
        self.last_activity = _clock()

    # ------------------------------------------------------------------ asyncio callbacks

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports implement the interface without subclassing it.
        self.transport = cast(asyncio.Transport, transport)
        self.gw._connections.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.gw._connections.discard(self)
        s = self.session
        if s is not None and s.active:
            s.closed_early = True  # the cloud would say 40010004 CLIENT_DISCONNECT
            s.accepting = False
        self.session = None
        self.transport = None

    def data_received(self, data: bytes) -> None:
        now = _clock()  # one clock reading per read: the arrival time of every frame in it
        self.last_activity = now
        # Fast path, the common case under load: the read is exactly one final, masked
        # binary frame with a 16-bit length (a 640-byte audio frame), nothing pending.
        s = self.session
        if (
            s is not None
            and s.accepting
            and len(data) >= 8
            and data[0] == 0x82
            and data[1] == 0xFE
            and len(data) == 8 + ((data[2] << 8) | data[3])
            and not self.buf
            and not self.skip
            and not self.frag_opcode
        ):
            s.record(len(data) - 8, now)
            if s.sentence_bytes and (not s.begin_sent or s.received >= s.next_sentence):
                self._sentences(s)
            return
        if not self.upgraded:
            self.buf += data
            self._http(now)
            return
        self._frames(data, now)

    # ------------------------------------------------------------------ HTTP

    def _http(self, now: float) -> None:
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > _MAX_HEADER:
                self._http_reply(431, "Request Header Fields Too Large", b"header too large\n")
            return
        head = bytes(self.buf[:end]).decode("latin-1")
        rest = bytes(self.buf[end + 4 :])
        self.buf.clear()
        lines = head.split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            self._http_reply(400, "Bad Request", b"bad request line\n")
            return
        method, target = parts[0], parts[1]
        headers: dict[str, str] = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if not sep:
                self._http_reply(400, "Bad Request", b"bad header line\n")
                return
            # First occurrence wins: the official Python SDK repeats the key (§1.3).
            headers.setdefault(name.strip().lower(), value.strip())
        url = urlsplit(target)
        if method == "GET" and url.path in ("/stats", "/reset", "/health"):
            self._control(url.path, parse_qs(url.query))
            return
        if method != "GET" or "websocket" not in headers.get("upgrade", "").lower():
            self._http_reply(400, "Bad Request", b"expected a WebSocket upgrade\n")
            return
        key = headers.get("sec-websocket-key", "")
        try:
            valid_key = len(base64.b64decode(key, validate=True)) == 16
        except ValueError:
            valid_key = False
        if not valid_key or headers.get("sec-websocket-version") != "13":
            self._http_reply(400, "Bad Request", b"invalid Sec-WebSocket-Key or version\n")
            return
        if self.gw.token is not None:
            query_token = parse_qs(url.query).get("token", [""])[0]
            if self.gw.token not in (headers.get("x-nls-token"), query_token):
                # Never echo the token back (the cloud does; we do not log or repeat secrets).
                self._http_reply(403, "Forbidden", b"Meta:ACCESS_DENIED:The token is invalid!")
                return
        assert self.transport is not None
        self.transport.write(
            (
                "HTTP/1.1 101 Switching Protocols\r\n"
                "Upgrade: websocket\r\n"
                "Connection: Upgrade\r\n"
                f"Sec-WebSocket-Accept: {_accept_key(key)}\r\n"
                "Server: nlsstream-light\r\n\r\n"
            ).encode("ascii")
        )
        self.upgraded = True
        self.gw.connections_total += 1
        if rest:
            self._frames(rest, now)

    def _http_reply(self, status: int, reason: str, body: bytes, ctype: str = "text/plain") -> None:
        if status >= 400:
            self.gw.handshake_errors += 1
        assert self.transport is not None
        self.transport.write(
            (
                f"HTTP/1.1 {status} {reason}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode("ascii")
            + body
        )
        self.transport.close()
        self.closing = True

    def _control(self, path: str, query: dict[str, list[str]]) -> None:
        if path == "/health":
            self._http_reply(200, "OK", b"ok\n")
            return
        if path == "/stats":
            body = self.gw.stats()
            if query.get("reset", ["0"])[0] in ("1", "true"):
                self.gw.reset()
        else:
            self.gw.reset()
            body = {"reset": True}
        self._http_reply(200, "OK", json.dumps(body).encode(), "application/json")

    # ------------------------------------------------------------------ WebSocket frames

    def _frames(self, data: bytes, now: float) -> None:
        buf: bytes | bytearray
        if self.buf:
            self.buf += data
            buf = self.buf
        else:
            buf = data  # fast path: parse the read itself, no copy
        end = len(buf)
        pos = 0
        if self.skip:
            if end < self.skip:
                self.skip -= end
                return
            pos = self.skip
            self.skip = 0
            self._binary_frame(self.skip_fin, now)
        while end - pos >= 2:
            b0 = buf[pos]
            b1 = buf[pos + 1]
            if b0 & 0x70 or not b1 & 0x80:
                # Reserved bits without an extension, or an unmasked client frame.
                self._fail_connection(1002, "protocol error")
                return
            opcode = b0 & 0x0F
            fin = b0 & 0x80
            n = b1 & 0x7F
            head = 6
            if n == 126:
                head = 8
                if end - pos < head:
                    break
                n = (buf[pos + 2] << 8) | buf[pos + 3]
            elif n == 127:
                head = 14
                if end - pos < head:
                    break
                n = int.from_bytes(buf[pos + 2 : pos + 10], "big")
            elif end - pos < head:
                break
            if opcode == _BINARY or (opcode == _CONT and self.frag_opcode == _BINARY):
                if opcode == _BINARY and self.frag_opcode:
                    self._fail_connection(1002, "new message inside a fragmented one")
                    return
                if self.msg_bytes + n > self.gw.max_message:
                    self._fail_connection(1009, "audio message too big")
                    return
                start = pos + head
                self.msg_bytes += n
                if start + n > end:
                    # Partial payload: skip the rest as it arrives; record at its last byte.
                    self.skip = start + n - end
                    self.skip_fin = bool(fin)
                    self.frag_opcode = _BINARY
                    pos = end
                    break
                pos = start + n
                self._binary_frame(bool(fin), now)
                continue
            if n > _MAX_TEXT:
                self._fail_connection(1009, "message too big")
                return
            if end - pos < head + n:
                break
            payload = _unmask(buf[pos + head : pos + head + n], buf[pos + head - 4 : pos + head])
            pos += head + n
            if not self._other_frame(opcode, bool(fin), payload):
                return
        if pos >= end:
            self.buf.clear()
        elif buf is self.buf:
            del self.buf[:pos]
        else:
            self.buf = bytearray(buf[pos:])

    def _binary_frame(self, fin: bool, now: float) -> None:
        if not fin:
            self.frag_opcode = _BINARY
            return
        size = self.msg_bytes
        self.msg_bytes = 0
        self.frag_opcode = 0
        s = self.session
        if s is None or not s.accepting:
            self._task_failed(40000002, "Gateway:MESSAGE_INVALID:Audio outside a started task!")
            return
        s.record(size, now)
        if s.sentence_bytes:
            self._sentences(s)

    def _sentences(self, s: SessionStats) -> None:
        """Emit the SentenceBegin/SentenceEnd events the audio received so far calls for."""
        if not s.begin_sent:
            self._sentence_begin(s)
        while s.received >= s.next_sentence:
            self._sentence_end(s, s.next_sentence)
            s.next_sentence += s.sentence_bytes
            if s.received > s.next_sentence - s.sentence_bytes:
                self._sentence_begin(s)

    def _other_frame(self, opcode: int, fin: bool, payload: bytes) -> bool:
        """Handle a text or control frame; False when the connection is being failed."""
        if opcode == _TEXT or (opcode == _CONT and self.frag_opcode == _TEXT):
            if opcode == _TEXT and self.frag_opcode:
                self._fail_connection(1002, "new message inside a fragmented one")
                return False
            self.text_parts.append(payload)
            if sum(map(len, self.text_parts)) > _MAX_TEXT:
                self._fail_connection(1009, "message too big")
                return False
            if not fin:
                self.frag_opcode = _TEXT
                return True
            self.frag_opcode = 0
            text = b"".join(self.text_parts)
            self.text_parts = []
            self._directive(text)
            return True
        if opcode == _PING:
            self._write(_frame(_PONG, payload))
            return True
        if opcode == _PONG:
            return True
        if opcode == _CLOSE:
            if not self.closing:
                # Echo the client's code (RFC 6455 §5.5.1), then the server closes TCP.
                self._write(_frame(_CLOSE, payload[:2]))
            self.closing = True
            if self.transport is not None:
                self.transport.close()
            return False
        self._fail_connection(1002, f"unexpected opcode {opcode:#x}")
        return False

    # ------------------------------------------------------------------ NLS protocol

    def _directive(self, text: bytes) -> None:
        if self.closing:
            return
        try:
            d = parse_directive(text)
        except DirectiveError as exc:
            self._task_failed(exc.status, exc.status_text, exc.task_id)
            return
        ns = NAMESPACES[d.namespace]
        s = self.session
        if d.name == ns.start:
            if s is not None and s.active:
                self._task_failed(
                    40000002, "Gateway:MESSAGE_INVALID:Task already started!", d.task_id
                )
                return
            rate = d.payload.get("sample_rate", 16000)
            if rate not in (8000, 16000):
                self._task_failed(
                    41010101, f"UNSUPPORTED_SAMPLE_RATE:sample rate {rate!r}", d.task_id
                )
                return
            s = SessionStats(ns, d.task_id, rate, self.gw.sentence_ms)
            self.session = s
            self.gw._sessions.append(s)
            self._event(ns.started)
            return
        if s is None or not s.active or s.task_id != d.task_id or s.namespace is not ns:
            self._task_failed(
                40000002, f"Gateway:MESSAGE_INVALID:No started task for {d.name}!", d.task_id
            )
            return
        if d.name == ns.stop:
            if s.stopping:
                self._task_failed(
                    40010005, "Gateway:TASK_STATE_ERROR:Got stop directive while task is stopping!"
                )
                return
            s.stopping = True
            s.accepting = False
            if ns is TRANSCRIBER:
                if s.begin_sent:  # the tail of the audio is one more sentence
                    self._sentence_end(s, s.received)
                self._event(ns.completed)
            else:
                duration = int(s.received * 1000 / s.byte_rate)
                self._event(ns.completed, {"result": "", "duration": duration})
            s.completed = True
            return
        if d.name == ns.control:
            return  # accepted, no acknowledgement (reference §3.3)
        self._task_failed(
            40010003, f"Gateway:DIRECTIVE_INVALID:Unknown directive '{d.name}'!", d.task_id
        )

    def _ms(self, s: SessionStats, offset: int) -> int:
        return int(offset * 1000 / s.byte_rate)

    def _sentence_begin(self, s: SessionStats) -> None:
        s.begin_sent = True
        begin = s.next_sentence - s.sentence_bytes
        self._event("SentenceBegin", {"index": s.sentences_sent + 1, "time": self._ms(s, begin)})

    def _sentence_end(self, s: SessionStats, offset: int) -> None:
        s.begin_sent = False
        s.sentences_sent += 1
        begin = s.next_sentence - s.sentence_bytes
        index = s.sentences_sent
        self._event(
            "SentenceEnd",
            {
                "index": index,
                "time": self._ms(s, offset),
                "begin_time": self._ms(s, begin),
                "result": f"sentence {index}",
                "confidence": 1.0,
                "words": [],
                "status": 20000000,
                # When the gateway sent it, on the machine's monotonic clock (Linux:
                # perf_counter and time.monotonic are both CLOCK_MONOTONIC), so a client
                # on the same machine can measure event delivery latency.
                "gateway_sent_monotonic": _clock(),
            },
        )

    def _event(self, name: str, payload: dict[str, Any] | None = None) -> None:
        s = self.session
        assert s is not None
        text = encode(build_event(s.namespace.name, name, s.task_id, payload))
        self._write(_frame(_TEXT, text.encode()))

    def _task_failed(self, status: int, status_text: str, task_id: str | None = None) -> None:
        if self.closing:
            return  # one TaskFailed per connection, and nothing after our close frame
        s = self.session
        if s is not None and s.active:
            s.failed = f"{status} {status_text}"
            s.accepting = False
        self.gw.task_failures += 1
        tid = task_id or (s.task_id if s is not None else "")
        self._write(_frame(_TEXT, encode(build_task_failed(tid, status, status_text)).encode()))
        self._close(1000, "")

    # ------------------------------------------------------------------ closing

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)

    def _close(self, code: int, reason: str) -> None:
        """Start the close handshake; abort if the client does not answer in time."""
        if self.closing:
            return
        self.closing = True
        self._write(_frame(_CLOSE, code.to_bytes(2, "big") + reason.encode()[:120]))
        asyncio.get_running_loop().call_later(self.gw.close_timeout, self._abort)

    def _fail_connection(self, code: int, reason: str) -> None:
        self.gw.protocol_errors += 1
        logger.debug("failing connection: %d %s", code, reason)
        self._close(code, reason)
        if self.transport is not None:
            self.transport.close()

    def _abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()

    def idle_check(self, now: float) -> None:
        if now - self.last_activity <= self.gw.idle_timeout or self.closing:
            return
        if self.upgraded:
            s = self.session
            last = s.namespace.start if s is not None else "None"
            self._task_failed(
                40000004,
                "Gateway:IDLE_TIMEOUT:Websocket session is idle for too long time, "
                f"the last directive is '{last}'!",
            )
        else:
            self._abort()


class LightGateway:
    """A measuring NLS gateway without recognition (see the module docstring).

    ``async with LightGateway() as gw:`` serves on ``gw.url`` (``port=0`` picks a free
    port). ``sentence_ms`` sets how much audio makes one SentenceEnd; ``token``, when
    given, is required as ``X-NLS-Token`` (or ``?token=``), else any token is accepted;
    connections silent for ``idle_timeout`` seconds get TaskFailed 40000004.
    Audio messages over ``max_message`` bytes fail the connection (close 1009).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        sentence_ms: int = 1000,
        token: str | None = None,
        idle_timeout: float = 10.0,
        close_timeout: float = 3.0,
        max_message: int = 1 << 20,
        lag_interval: float = 0.01,
        reuse_port: bool = False,
    ) -> None:
        if sentence_ms <= 0:
            raise ValueError("sentence_ms must be positive")
        self.host = host
        self.port = port
        self.sentence_ms = sentence_ms
        self.token = token
        self.idle_timeout = idle_timeout
        self.close_timeout = close_timeout
        self.max_message = max_message
        self.lag_interval = lag_interval
        self.reuse_port = reuse_port
        self._server: asyncio.Server | None = None
        self._connections: set[_Connection] = set()
        self._sessions: list[SessionStats] = []
        self._tasks: list[asyncio.Task[None]] = []
        self._lag = array("d")
        self.connections_total = 0
        self.handshake_errors = 0
        self.protocol_errors = 0
        self.task_failures = 0
        self._t0 = _clock()
        self._cpu0 = time.process_time()

    @property
    def url(self) -> str:
        """The WebSocket URL clients connect to."""
        return f"ws://{self.host}:{self.port}/ws/v1"

    async def start(self) -> None:
        """Listen; ``self.port`` is the bound port afterwards."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(
            lambda: _Connection(self),
            self.host,
            self.port,
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
                conn._abort()
            await asyncio.wait_for(self._server.wait_closed(), 5)
            self._server = None

    async def __aenter__(self) -> LightGateway:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

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
            await asyncio.sleep(1.0)
            now = _clock()
            for conn in list(self._connections):
                conn.idle_check(now)

    def reset(self) -> None:
        """Forget finished sessions and restart the CPU, wall-clock and lag counters."""
        self._sessions = [s for s in self._sessions if s.active]
        self._lag = array("d")
        self.connections_total = self.handshake_errors = 0
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


def _raise_nofile_limit() -> None:
    # Thousands of sockets need more than the usual 1024 descriptors.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _nap(seconds: float) -> None:
    """Poll instead of sleeping in the kernel: nap ``seconds`` between loop iterations.

    On loopback a client's ``send`` runs the receiver's TCP input in the client's own
    system call, including waking the receiver if it sleeps in ``epoll_wait`` (an
    inter-processor interrupt, costly in a VM). Over a real network that work is the
    receiving machine's. While this task keeps a callback ready the loop polls with a
    zero timeout and never sleeps in ``epoll_wait``, so clients are charged for their
    sends only; arrival times are then read up to ``seconds`` late (same for every
    frame of a session, so lateness is barely affected).
    """
    # A deliberate block of the loop, bounded by ``seconds`` per iteration: the sockets
    # are polled between naps, so nothing waits longer than that.
    time.sleep(seconds)
    asyncio.get_running_loop().call_soon(_nap, seconds)


async def _serve(args: argparse.Namespace) -> dict[str, Any]:
    gw = LightGateway(
        args.host,
        args.port,
        sentence_ms=args.sentence_ms,
        token=os.environ.get("NLS_LIGHT_TOKEN") or None,
        idle_timeout=args.idle_timeout,
        reuse_port=args.reuse_port,
    )
    await gw.start()
    if args.nap_us > 0:
        asyncio.get_running_loop().call_soon(_nap, args.nap_us / 1e6)
    print(f"nlsstream-light listening on {gw.url} (loop: {_loop_name()})", flush=True)
    done = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    try:
        await done.wait()
        return gw.stats()
    finally:
        await gw.close()


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m nlsstream.gateway.light``: serve until SIGINT/SIGTERM, then write stats."""
    parser = argparse.ArgumentParser(
        prog="python -m nlsstream.gateway.light",
        description="Light NLS load-gateway: no recognition, measures per-frame lateness. "
        "GET /stats (?reset=1) and /reset on the same port. A required token can be set "
        "with the NLS_LIGHT_TOKEN environment variable (default: any token is accepted).",
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port")
    parser.add_argument("--stats-file", help="write the stats JSON here on exit")
    parser.add_argument("--sentence-ms", type=int, default=1000, help="audio per SentenceEnd")
    parser.add_argument("--idle-timeout", type=float, default=10.0)
    parser.add_argument("--reuse-port", action="store_true", help="set SO_REUSEPORT")
    parser.add_argument(
        "--nap-us",
        type=int,
        default=0,
        help="poll the sockets, napping this long between loop iterations, instead of "
        "sleeping in epoll (0: off); see _nap()",
    )
    parser.add_argument(
        "--loop", choices=("auto", "uvloop", "asyncio"), default="auto", help="event loop"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    _raise_nofile_limit()
    use_uvloop = args.loop == "uvloop"
    if args.loop == "auto":
        try:
            import uvloop

            use_uvloop = True
        except ImportError:
            use_uvloop = False
    if use_uvloop:
        import uvloop

        stats = uvloop.run(_serve(args))
    else:
        stats = asyncio.run(_serve(args))
    if args.stats_file:
        with open(args.stats_file, "w", encoding="utf-8") as fh:
            json.dump(stats, fh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
