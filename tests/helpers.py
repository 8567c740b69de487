"""Helpers shared by the tests (test modules import from here, never from each other):
fixtures on disk, raw gateway tasks, directives as text, raw RFC 6455 frames and a
raw-socket WebSocket client (for probes a well-behaved client library will not send),
a fake CreateToken service, and the command line run as a subprocess.

Fixtures that several modules use live in ``conftest.py``.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import io
import json
import os
import re
import select
import subprocess
import sys
import threading
import time
import urllib.parse
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import IO, Any, AnyStr

import pytest
import soundfile as sf
from websockets.asyncio.client import ClientConnection, connect

from nlsstream.gateway import Gateway
from nlsstream.realtime import protocol as p
from nlsstream.realtime.protocol import RECOGNIZER, TRANSCRIBER, build_directive, encode

FIXTURES = Path(__file__).parent / "fixtures"
TOKEN, APPKEY = "tok-123", "app-456"


FRAME = b"\x01\x00" * 320  # 640 bytes = 20 ms at 16 kHz


def directive(
    ns: str, name: str, task_id: str, payload: dict[str, Any] | None = None, appkey: str = APPKEY
) -> str:
    return encode(build_directive(ns, name, task_id=task_id, appkey=appkey, payload=payload))


def start(task_id: str, ns: str = TRANSCRIBER.name, appkey: str = APPKEY, **payload: Any) -> str:
    name = TRANSCRIBER.start if ns == TRANSCRIBER.name else RECOGNIZER.start
    return directive(
        ns, name, task_id, {"format": "pcm", "sample_rate": 16000, **payload}, appkey=appkey
    )


async def recv_json(ws: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
    return data


async def events_until(ws: Any, last: str) -> list[dict[str, Any]]:
    out = []
    while True:
        event = await recv_json(ws)
        out.append(event)
        if event["header"]["name"] in (last, "TaskFailed"):
            return out


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    """One client frame, masked unless ``masked=False`` (a protocol error)."""
    mask = os.urandom(4)
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    mbit = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 65536:
        head = bytes((b0, mbit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, mbit | 127)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


def accept_value(key: str) -> bytes:
    digest = hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    return base64.b64encode(digest)


async def http_request(
    host: str, port: int, request: str
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Send a raw HTTP request; return the stream and the response head."""
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(request.encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    return reader, writer, head


def upgrade_request(
    key: str, extra: str = "", path: str = "/ws/v1", version: str = "HTTP/1.1"
) -> str:
    return (
        f"GET {path} {version}\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
        f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
    )


async def raw_upgrade(
    host: str, port: int, extra: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw-socket WebSocket connection (the 101 and its accept value checked)."""
    key = base64.b64encode(os.urandom(16)).decode()
    reader, writer, head = await http_request(host, port, upgrade_request(key, extra))
    assert head.startswith(b"HTTP/1.1 101"), head
    assert accept_value(key) in head
    return reader, writer


async def read_server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(opcode, payload) of the next server frame."""
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return b0 & 0x0F, await reader.readexactly(n)


async def close_code_after(reader: asyncio.StreamReader) -> int:
    """Read server frames up to its close frame; return the close code."""
    while True:
        opcode, body = await read_server_frame(reader)
        if opcode == 0x8:
            return int.from_bytes(body[:2], "big")


async def read_client_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    """(opcode, unmasked payload) of the next client frame."""
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    key = await reader.readexactly(4) if b1 & 0x80 else b"\x00" * 4
    body = await reader.readexactly(n)
    return b0 & 0x0F, bytes(b ^ key[i % 4] for i, b in enumerate(body))


def server_frame(opcode: int, payload: bytes) -> bytes:
    """One unmasked (server) frame."""
    return client_frame(opcode, payload, masked=False)


RawHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_ws_server(handler: RawHandler) -> AsyncIterator[int]:
    """A WebSocket server of the test's own on a free loopback port (yielded): it answers
    the upgrade, then hands the stream to ``handler``. It reads only what the handler
    reads, so a handler that stops reading never answers a ping: the misbehaving gateway
    a well-behaved library will not play (asyncio's documented streams, no websockets
    internals). On exit every handler is cancelled and its connection aborted; a
    handler's own failure (an assertion on what the client sent) fails the test."""
    writers: list[asyncio.StreamWriter] = []
    tasks: list[asyncio.Task[None]] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        found = re.search(rb"(?im)^sec-websocket-key:\s*(\S+)", head)
        assert found, head
        writer.write(
            b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            b"Connection: Upgrade\r\nSec-WebSocket-Accept: "
            + accept_value(found.group(1).decode())
            + b"\r\n\r\n"
        )
        await handler(reader, writer)

    def connected(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        # A plain callback, so that the tasks are ours to cancel and to collect.
        writers.append(writer)
        tasks.append(asyncio.ensure_future(serve(reader, writer)))

    server = await asyncio.start_server(connected, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        for writer in writers:
            writer.transport.abort()
        outcomes = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 5)
        await server.wait_closed()
    for outcome in outcomes:
        if isinstance(outcome, Exception):
            raise outcome


async def wait_until(condition: Callable[[], bool], timeout: float = 10.0) -> None:
    """Return as soon as ``condition()`` holds; fail after ``timeout`` seconds. For state
    that signals no event (a gateway's counters and connection set, a session's
    metrics): polled every 10 ms, so the wait lasts as long as the thing takes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"still not true after {timeout:g} s: {condition}")
        await asyncio.sleep(0.01)


def read_pcm(name: str) -> tuple[bytes, int]:
    """PCM16 mono bytes and sample rate of a fixture WAV."""
    data, rate = sf.read(FIXTURES / name, dtype="int16")
    return data.tobytes(), int(rate)


# --------------------------------------------------------------------------- gateway clients

TRANSCRIPTS: dict[str, list[str]] = json.loads((FIXTURES / "transcripts.json").read_text())


class RawTask:
    """A bare websockets client for one task: sends exactly what a test asks for."""

    def __init__(
        self, ws: ClientConnection, namespace: str = "SpeechTranscriber", appkey: str = APPKEY
    ) -> None:
        self.ws = ws
        self.ns = p.NAMESPACES[namespace]
        self.appkey = appkey
        self.task_id = p.new_id()
        self.events: list[dict[str, Any]] = []

    async def directive(
        self, name: str, payload: dict[str, Any] | None = None, task_id: str | None = None
    ) -> None:
        message = p.build_directive(
            self.ns.name,
            name,
            task_id=task_id or self.task_id,
            appkey=self.appkey,
            payload=payload,
        )
        await self.ws.send(p.encode(message))

    async def start(self, **params: Any) -> dict[str, Any]:
        await self.directive(self.ns.start, p.start_payload(**params))
        return await self.recv()

    async def stop(self) -> None:
        await self.directive(self.ns.stop)

    async def audio(self, pcm: bytes, chunk: int = 3200) -> None:
        for i in range(0, len(pcm), chunk):
            await self.ws.send(pcm[i : i + chunk])

    async def recv(self, timeout: float = 10.0) -> dict[str, Any]:
        text = await asyncio.wait_for(self.ws.recv(), timeout)
        assert isinstance(text, str)
        event: dict[str, Any] = json.loads(text)
        self.events.append(event)
        return event

    async def until_end(self, timeout: float = 20.0) -> list[dict[str, Any]]:
        """Events up to and including Completed or TaskFailed."""
        out = []
        while True:
            event = await self.recv(timeout)
            out.append(event)
            if event["header"]["name"] in (self.ns.completed, "TaskFailed"):
                return out


def names(events: list[dict[str, Any]]) -> list[str]:
    return [e["header"]["name"] for e in events]


def payloads(events: list[dict[str, Any]], name: str) -> list[dict[str, Any]]:
    return [e["payload"] for e in events if e["header"]["name"] == name]


def open_ws(gateway: Gateway, token: str = TOKEN, **kwargs: Any) -> Any:
    return connect(gateway.url, additional_headers={"X-NLS-Token": token}, **kwargs)


def silence(ms: int, rate: int = 16000) -> bytes:
    return b"\x00\x00" * (rate * ms // 1000)


def word_errors(ref: str, hyp: str) -> int:
    """Word-level edit distance (substitutions + deletions + insertions)."""
    r, h = ref.split(), hyp.split()
    row = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, row[0] = row[0], i
        for j, hw in enumerate(h, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
    return row[-1]


# --------------------------------------------------------------------------- subtitles

_TIMING = re.compile(
    r"(\d{2,}):(\d{2}):(\d{2})([,.])(\d{3}) --> (\d{2,}):(\d{2}):(\d{2})([,.])(\d{3})"
)


def parse_subtitles(text: str, fmt: str) -> list[tuple[int, int, str]]:
    """Parse SRT or WebVTT strictly enough to catch format mistakes: returns
    (start_ms, end_ms, text) per cue; asserts the numbering, header and separators."""
    sep = "," if fmt == "srt" else "."
    if fmt == "vtt":
        assert text.startswith("WEBVTT\n\n") or text == "WEBVTT\n"
        text = text[len("WEBVTT\n") :].lstrip("\n")
    cues = []
    for n, block in enumerate(b for b in text.split("\n\n") if b.strip()):
        lines = block.strip("\n").split("\n")
        if fmt == "srt":
            assert lines[0] == str(n + 1), f"cue {n + 1} is numbered {lines[0]!r}"
            lines = lines[1:]
        m = _TIMING.fullmatch(lines[0])
        assert m, f"bad timing line {lines[0]!r}"
        assert m.group(4) == sep and m.group(9) == sep
        g = [int(x) for x in m.group(1, 2, 3, 5, 6, 7, 8, 10)]
        start = ((g[0] * 60 + g[1]) * 60 + g[2]) * 1000 + g[3]
        end = ((g[4] * 60 + g[5]) * 60 + g[6]) * 1000 + g[7]
        assert start <= end
        assert len(lines) == 2 and lines[1], f"cue text must be one non-empty line: {lines}"
        cues.append((start, end, lines[1]))
    return cues


# --------------------------------------------------------------------------- command line


def readline_within(stream: IO[AnyStr], timeout: float) -> AnyStr:
    """The next line of a subprocess's pipe; fails if nothing comes within ``timeout``.

    Reads the pipe's descriptor a byte at a time: ``stream.readline()`` would buffer
    what follows the line inside ``stream``, where a later ``communicate()`` (which
    reads the descriptor) never sees it, and a test would miss output that came.
    """
    fd = stream.fileno()
    deadline = time.monotonic() + timeout
    line = bytearray()
    while not line.endswith(b"\n"):
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            if line:
                break
            raise AssertionError(f"no output within {timeout} s")
        byte = os.read(fd, 1)
        if not byte:  # end of the pipe
            break
        line += byte
    if isinstance(stream, io.TextIOBase):
        return line.decode()  # type: ignore[return-value]
    return bytes(line)  # type: ignore[return-value]


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any NLS/Alibaba Cloud settings, plus ``extra``."""
    prefixes = ("NLS_", "ALIYUN_", "ALIBABA_CLOUD_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(prefixes)}
    env.update(extra)
    return env


# --------------------------------------------------------------------------- CreateToken

AK_ID = "LTAI5tTestKeyId0001"
AK_SECRET = "s3cr3t-Value/With+Chars=="


def _ref_sign(method: str, params: dict[str, str], secret: str) -> str:
    """Independent §8.2 signer (quote_plus-based, like the old official SDK)."""

    def enc(s: str) -> str:
        return (
            urllib.parse.quote_plus(s).replace("+", "%20").replace("*", "%2A").replace("%7E", "~")
        )

    pairs = sorted((enc(k), enc(v)) for k, v in params.items() if k != "Signature")
    query = "&".join(f"{k}={v}" for k, v in pairs)
    msg = f"{method}&{enc('/')}&{enc(query)}"
    mac = hmac.new(f"{secret}&".encode(), msg.encode(), hashlib.sha1).digest()
    return base64.b64encode(mac).decode()


@dataclass
class FakeTokenService:
    keys: dict[str, str] = field(default_factory=lambda: {AK_ID: AK_SECRET})
    lifetime: int = 3600
    delay: float = 0.0
    #: "ok", "error500", "garbage", "throttle", "echo_secret"
    mode: str = "ok"
    requests: list[tuple[str, dict[str, str]]] = field(default_factory=list)
    nonces: set[str] = field(default_factory=set)
    issued: int = 0
    url: str = ""
    lock: threading.Lock = field(default_factory=threading.Lock)

    def handle(self, method: str, params: dict[str, str]) -> tuple[int, dict[str, object] | bytes]:
        time.sleep(self.delay)
        rid = str(uuid.uuid4()).upper()
        with self.lock:
            self.requests.append((method, params))

        def err(status: int, code: str, message: str) -> tuple[int, dict[str, object]]:
            return status, {"Code": code, "Message": message, "RequestId": rid}

        if self.mode == "error500":
            return err(500, "InternalError", "The request processing has failed.")
        if self.mode == "garbage":
            return 502, b"<html>bad gateway</html>"
        if self.mode == "throttle":
            return err(400, "Throttling.User", "Request was denied due to user flow control.")
        if self.mode == "echo_secret":
            return err(400, "Forbidden", f"leaky server says {AK_SECRET}")
        required = {
            "AccessKeyId",
            "Action",
            "Format",
            "RegionId",
            "SignatureMethod",
            "SignatureNonce",
            "SignatureVersion",
            "Timestamp",
            "Version",
            "Signature",
        }
        missing = sorted(required - params.keys())
        if missing:
            return err(400, "MissingParameter", f"missing {missing}")
        if params["Action"] != "CreateToken" or params["Version"] != "2019-02-28":
            return err(400, "InvalidAction", "bad action/version")
        if (params["SignatureMethod"], params["SignatureVersion"]) != ("HMAC-SHA1", "1.0"):
            return err(400, "InvalidSignatureMethod", "bad signature method")
        if not re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", params["Timestamp"]):
            return err(400, "InvalidTimeStamp.Format", "bad timestamp")
        if not re.fullmatch(r"[0-9a-f]{8}(-[0-9a-f]{4}){3}-[0-9a-f]{12}", params["SignatureNonce"]):
            return err(400, "InvalidSignatureNonce", "bad nonce")
        with self.lock:
            if params["SignatureNonce"] in self.nonces:
                return err(400, "SignatureNonceUsed", "nonce reused")
            self.nonces.add(params["SignatureNonce"])
        secret = self.keys.get(params["AccessKeyId"])
        if secret is None:
            return err(404, "InvalidAccessKeyId.NotFound", "Specified access key is not found.")
        if params["Signature"] != _ref_sign(method, params, secret):
            return err(
                400,
                "SignatureDoesNotMatch",
                "Specified signature is not matched with our calculation.",
            )
        with self.lock:
            self.issued += 1
            n = self.issued
        return 200, {
            "NlsRequestId": uuid.uuid4().hex,
            "RequestId": rid,
            "Token": {
                "Id": f"token-{n}-{uuid.uuid4().hex}",
                "ExpireTime": int(time.time()) + self.lifetime,
                "UserId": "1234567890",
            },
        }


def _make_handler(service: FakeTokenService) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def _serve(self, method: str) -> None:
            split = urllib.parse.urlsplit(self.path)
            params = dict(urllib.parse.parse_qsl(split.query, keep_blank_values=True))
            if method == "POST":
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length).decode()
                params.update(urllib.parse.parse_qsl(body, keep_blank_values=True))
            status, answer = service.handle(method, params)
            payload = answer if isinstance(answer, bytes) else json.dumps(answer).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            self._serve("GET")

        def do_POST(self) -> None:
            self._serve("POST")

        def log_message(self, format: str, *args: object) -> None:
            pass

    return Handler


@contextlib.contextmanager
def token_service() -> Iterator[FakeTokenService]:
    """A :class:`FakeTokenService` on a free loopback port, in a thread."""
    svc = FakeTokenService()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _make_handler(svc))
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, args=(0.02,), daemon=True)
    thread.start()
    svc.url = f"http://127.0.0.1:{server.server_address[1]}/"
    try:
        yield svc
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# --------------------------------------------------------------------------- the CLI

THREE = str(FIXTURES / "three_sentences.wav")
HELLO = str(FIXTURES / "hello.wav")
CLI = [sys.executable, "-m", "nlsstream"]
TIMEOUT = 60  # for runs that recognise nothing (or only the fast span recogniser)


def sphinx_timeout(path: str) -> float:
    """The CLI's ``--timeout`` for a PocketSphinx run over ``path``: at ``--pace 0`` the
    whole file arrives at once and is recognised after Stop, so the stop timeout must
    cover recognising all of it on a loaded machine (ten times real time, plus start-up)."""
    return round(30 + 10 * float(sf.info(path).duration))


def sphinx_args(path: str) -> list[str]:
    return [path, "--pace", "0", "--timeout", str(sphinx_timeout(path))]


def process_timeout(cli_timeout: float) -> float:
    """How long a CLI run may take in all: connect, start and stop each get ``--timeout``."""
    return 3 * cli_timeout + TIMEOUT


def run_cli(
    *args: str,
    env: Mapping[str, str] | None = None,
    input: bytes | None = None,
    timeout: float = TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [*CLI, *args],
        input=input,
        capture_output=True,
        env=dict(env) if env is not None else clean_env(),
        timeout=timeout,
    )
    return subprocess.CompletedProcess(
        proc.args, proc.returncode, proc.stdout.decode(), proc.stderr.decode()
    )


def run_together(
    commands: Mapping[str, list[str]], timeout: float
) -> dict[str, tuple[int, str, str]]:
    """Run CLI commands at once, each within ``timeout``: ``{name: (status, stdout,
    stderr)}``."""
    procs = {
        name: subprocess.Popen(
            [*CLI, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=clean_env()
        )
        for name, args in commands.items()
    }
    results: dict[str, tuple[int, str, str]] = {}
    try:
        for name, proc in procs.items():
            out, err = proc.communicate(timeout=timeout)
            results[name] = (proc.returncode, out.decode(), err.decode())
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def run_with_terminal(
    *args: str, stream: str, env: Mapping[str, str] | None = None
) -> tuple[int, str, str]:
    """Run the CLI with ``stream`` ("stdout" or "stderr") on a pseudo-terminal; returns
    (status, what the terminal showed, the other stream). ``env`` as for :func:`run_cli`."""
    pty = pytest.importorskip("pty")
    master, slave = pty.openpty()
    with os.fdopen(master, "rb", buffering=0) as terminal:
        proc = subprocess.Popen(
            [*CLI, *args],
            stdout=slave if stream == "stdout" else subprocess.PIPE,
            stderr=slave if stream == "stderr" else subprocess.PIPE,
            env=dict(env) if env is not None else clean_env(),
        )
        os.close(slave)
        shown = b""
        deadline = time.monotonic() + process_timeout(sphinx_timeout(HELLO))
        while True:
            left = deadline - time.monotonic()
            if not select.select([terminal], [], [], max(left, 0))[0]:
                proc.kill()
                proc.wait()
                raise AssertionError(f"the CLI did not finish in time; it showed {shown!r}")
            try:
                data = terminal.read(4096)
            except OSError:  # EIO: the child closed the terminal
                break
            if not data:
                break
            shown += data
        out, err = proc.communicate(timeout=TIMEOUT)
    other = err if stream == "stdout" else out
    return proc.returncode, shown.decode(), other.decode()
