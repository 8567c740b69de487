"""The client's WebSocket connection: nlsstream's own :class:`asyncio.Protocol` driving
websockets' documented sans-I/O :class:`websockets.client.ClientProtocol`.

websockets does the WebSocket work (handshake, frame parsing, control frames, the
closing handshake); this module does the I/O, so the transport is ours. That makes three
things legitimate that a session needs at scale and that no websockets connection class
offers through its API:

* **audio frames written by the pacer**: 640-byte binary frames are masked ahead of time,
  in batches (:func:`client_frames`), and written straight to the transport, one write per
  session per pacer tick, never through a coroutine;
* **flow control** from *our* protocol's ``pause_writing()`` / ``resume_writing()``;
* **the audio gate**: the paced stream is held whenever a frame cannot be written now
  (transport backed up, closing handshake started, connection lost), so no audio is ever
  written after a Close frame, and none is buffered without bound.

Every wait here is bounded: the handshake by ``open_timeout``, the closing handshake by
``close_timeout``, and a connection that answers no keepalive ping within
``ping_timeout`` is aborted (which also ends a write that waits for a peer that stopped
reading). Nothing here logs or raises the token.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import socket
import ssl
import struct
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal, cast

import numpy as np
from websockets.client import ClientProtocol
from websockets.exceptions import InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import Frame, Opcode
from websockets.protocol import State as WsState
from websockets.uri import WebSocketURI, parse_uri

from ..errors import AuthenticationError, GatewayConnectionError, ProtocolError, redact
from ..proxies import redact_proxy, system_proxy
from ..redaction import get_logger

if TYPE_CHECKING:
    from .pacing import PacedStream

__all__ = ["Connection", "client_frame", "client_frames", "connect"]

logger = get_logger("nlsstream.realtime.connection")

#: ``proxy=`` of a session: ``True`` for the system's settings, a URL, or ``None``.
ProxySetting = str | Literal[True] | None


# --------------------------------------------------------------------------- framing

_pack_header16 = struct.Struct("!BBH").pack
_pack_header64 = struct.Struct("!BBQ").pack


def _mask(data: bytes, key: bytes) -> bytes:
    """``data`` XOR-ed with the repeated 4-byte ``key`` (RFC 6455 §5.3)."""
    n = len(data)
    padded = data + b"\x00" * (-n % 4)
    words = np.frombuffer(padded, dtype=np.uint32) ^ np.frombuffer(key, dtype=np.uint32)[0]
    masked: bytes = words.tobytes()[:n]
    return masked


def client_frame(data: bytes) -> bytes:
    """``data`` as one masked binary WebSocket frame (client to server, no extensions),
    with a fresh random masking key, as RFC 6455 §5.3 requires."""
    n = len(data)
    if n < 126:
        header = bytes((0x82, 0x80 | n))
    elif n < 65536:
        header = _pack_header16(0x82, 0xFE, n)
    else:
        header = _pack_header64(0x82, 0xFF, n)
    key = os.urandom(4)
    return b"".join((header, key, _mask(data, key)))


def client_frames(pcm: bytes, frame_bytes: int) -> list[bytes]:
    """``pcm`` cut into ``frame_bytes`` pieces (the last may be shorter), each as one masked
    binary WebSocket frame with its own random key, as :func:`client_frame` makes them.

    For 16 kHz and 8 kHz frames (a multiple of 4 bytes, 126 to 65,535 long) the whole
    block is masked in one vectorised pass (one ``os.urandom`` call for every key): the
    framing then costs a fraction of a microsecond per frame, paid by the producer ahead of
    time rather than by the pacer.
    """
    if frame_bytes <= 0:
        raise ValueError(f"frame_bytes must be positive, got {frame_bytes}")
    count, rest = divmod(len(pcm), frame_bytes)
    if count < 4 or frame_bytes % 4 or not 126 <= frame_bytes < 65536:
        return [client_frame(pcm[i : i + frame_bytes]) for i in range(0, len(pcm), frame_bytes)]
    words = frame_bytes // 4
    # One row per frame, in 32-bit words: header (4 bytes), key (4 bytes), masked data.
    # XOR-ing a word with the key read as a word masks its 4 bytes as RFC 6455 §5.3 says.
    rows = np.empty((count, 2 + words), dtype=np.uint32)
    rows[:, 0] = np.frombuffer(_pack_header16(0x82, 0xFE, frame_bytes), dtype=np.uint32)[0]
    keys = np.frombuffer(os.urandom(4 * count), dtype=np.uint32)
    rows[:, 1] = keys
    data = np.frombuffer(pcm, dtype=np.uint32, count=count * words).reshape(count, words)
    np.bitwise_xor(data, keys[:, None], out=rows[:, 2:])
    blob = rows.tobytes()
    size = frame_bytes + 8
    frames = [blob[i : i + size] for i in range(0, len(blob), size)]
    if rest:
        frames.append(client_frame(pcm[count * frame_bytes :]))
    return frames


# --------------------------------------------------------------------------- connection


class Connection(asyncio.Protocol):
    """One client WebSocket connection (see the module docstring).

    ``on_message`` gets every complete text message, in order, from ``data_received``;
    ``on_lost`` is called once when an open connection is gone, however it ended (read
    :attr:`failure` and :meth:`describe_close` to say why). Both run synchronously on the
    loop and must not raise.

    As a :class:`~nlsstream.realtime.pacing.FrameSink`: :attr:`write_frames` writes already
    encoded frames (the transport's own ``write``, bound once), :meth:`encode_frames`
    encodes them, and :meth:`attach` holds a paced stream whenever frames cannot go out.
    """

    def __init__(
        self,
        protocol: ClientProtocol,
        token: str,
        *,
        on_message: Callable[[str], None],
        on_lost: Callable[[], None],
        ping_interval: float | None,
        ping_timeout: float | None,
        close_timeout: float,
    ) -> None:
        self._ws = protocol
        self._token = token
        self._on_message = on_message
        self._on_lost = on_lost
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.close_timeout = close_timeout
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._transport: asyncio.Transport | None = None
        self._opened: asyncio.Future[None] = loop.create_future()
        self._lost: asyncio.Future[None] = loop.create_future()
        self._paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._stream: PacedStream | None = None
        self._text: list[bytes] | None = None  # fragments of a text message in progress
        self._ping_handle: asyncio.TimerHandle | None = None
        self._pong_deadline: asyncio.TimerHandle | None = None
        # When the gateway last sent anything: a gateway still sending results is alive
        # even when its pong waits behind the audio it has not read yet (backpressure).
        self._heard_at = 0.0
        self._close_handle: asyncio.TimerHandle | None = None
        self._stall_handle: asyncio.TimerHandle | None = None
        #: How long the gateway may take no byte while writes are paused (the keepalive
        #: bound, ``ping_timeout``, or 20 s without one).
        self.stall_timeout = ping_timeout if ping_timeout is not None else 20.0
        #: Why the connection failed on our side (keepalive timeout, invalid data from
        #: the gateway), if it did; ``None`` for a connection the peer closed or lost.
        self.failure: GatewayConnectionError | ProtocolError | None = None
        #: Writes encoded frames now (see :meth:`attach` for when that is allowed).
        self.write_frames: Callable[[bytes], object] = _not_connected

    # ---------------------------------------------------------------- state

    @property
    def open(self) -> bool:
        """Whether messages can be sent: the handshake is done, no close has begun and the
        transport has not failed (a write that hit a reset socket closes it at once, before
        ``connection_lost`` runs; writing on would only be discarded)."""
        transport = self._transport
        return (
            self._ws.state is WsState.OPEN and transport is not None and not transport.is_closing()
        )

    @property
    def writable(self) -> bool:
        """Whether an audio frame can be written right now without growing the transport's
        buffer past its high-water mark or following a Close frame."""
        transport = self._transport
        return (
            self._ws.state is WsState.OPEN
            and not self._paused
            and transport is not None
            and not transport.is_closing()
        )

    def describe_close(self) -> str:
        """How the connection ended, in words, for error messages."""
        code = self._ws.close_code
        if code is None or code == 1006:
            return "no close frame"
        reason = self._ws.close_reason
        return f"close code {code}" + (f", reason {reason!r}" if reason else "")

    @property
    def closed(self) -> bool:
        """True once the TCP connection is gone."""
        return self._lost.done()

    # ---------------------------------------------------------------- the audio gate

    def attach(self, stream: PacedStream | None) -> None:
        """Hold ``stream`` (a paced stream writing through :attr:`write_frames`) whenever
        a frame cannot be written; ``None`` detaches it."""
        self._stream = stream
        self._sync_gate()

    def _sync_gate(self) -> None:
        # Called on every change of what `writable` depends on: flow control, a close
        # frame sent or received, the connection lost.
        stream = self._stream
        if stream is not None:
            stream.held = not self.writable

    @staticmethod
    def encode_frames(pcm: bytes, frame_bytes: int) -> list[bytes]:
        """Frames for :attr:`write_frames`: :func:`client_frames`."""
        return client_frames(pcm, frame_bytes)

    # ---------------------------------------------------------------- asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A stream transport (uvloop's implement the interface without subclassing it).
        transport = cast(asyncio.Transport, transport)
        self._transport = transport
        # compression is never negotiated (no extensions offered), so encoded frames go
        # to the transport as they are.
        self.write_frames = transport.write
        request = self._ws.connect()
        request.headers["X-NLS-Token"] = self._token
        self._ws.send_request(request)
        self._flush()

    def data_received(self, data: bytes) -> None:
        self._heard_at = self._loop.time()
        try:
            self._ws.receive_data(data)
            self._flush()
            for event in self._ws.events_received():
                if isinstance(event, Frame):
                    self._frame(event)
                elif not self._opened.done():  # the handshake response
                    exc = self._ws.handshake_exc
                    if exc is None:
                        self._opened.set_result(None)
                        self._schedule_ping()
                    else:
                        self._opened.set_exception(exc)
                if self._transport is None or self._transport.is_closing():
                    break  # aborted while handling this event: ignore the rest
        except Exception as exc:  # a bug must not leave the session hanging
            logger.exception("connection: failed to handle incoming data")
            self._fail(ProtocolError(f"internal error handling the gateway's data: {exc!r}"))
            return
        self._after_receive()

    def _frame(self, frame: Frame) -> None:
        opcode = frame.opcode
        if opcode is Opcode.TEXT or (opcode is Opcode.CONT and self._text is not None):
            parts = self._text or []
            parts.append(bytes(frame.data))
            if not frame.fin:
                self._text = parts
                return
            self._text = None
            data = b"".join(parts) if len(parts) > 1 else parts[0]
            try:
                text = data.decode("utf-8")
            except UnicodeDecodeError:
                self._fail(ProtocolError("gateway sent a text message that is not UTF-8"), 1007)
                return
            self._on_message(text)
        elif opcode is Opcode.BINARY or opcode is Opcode.CONT:
            self._fail(ProtocolError("gateway sent a binary message on an ASR task"), 1003)
        elif opcode is Opcode.PONG and self._pong_deadline is not None:
            self._pong_deadline.cancel()
            self._pong_deadline = None
            self._schedule_ping()
        # PING is answered by websockets (the pong is in data_to_send); CLOSE too.

    def eof_received(self) -> None:
        self._ws.receive_eof()
        self._flush()  # syncs the audio gate: the state may have changed
        self._after_receive()

    def _after_receive(self) -> None:
        if self._ws.close_expected() and self._close_handle is None:
            # The closing handshake has begun: the gateway closes TCP; bound the wait.
            self._close_handle = self._loop.call_later(self.close_timeout, self.abort)

    def connection_lost(self, exc: Exception | None) -> None:
        self._ws.receive_eof()  # idempotent: the state is CLOSED from now on
        self._transport = None
        self.write_frames = _not_connected
        handles = (self._ping_handle, self._pong_deadline, self._close_handle, self._stall_handle)
        for handle in handles:
            if handle is not None:
                handle.cancel()
        self._lost.set_result(None)
        self._wake_drain(ConnectionError("connection lost"))
        self._sync_gate()
        opened = self._opened
        if not opened.done():  # connect() raises; there is nothing to tell
            opened.set_exception(
                ConnectionError(f"connection closed during the handshake ({exc or 'EOF'})")
            )
            opened.exception()  # connect() may have given up already: don't log it twice
        elif not opened.cancelled() and opened.exception() is None:
            self._on_lost()

    def pause_writing(self) -> None:
        self._paused = True
        self._sync_gate()
        self._watch_stall(None)

    def resume_writing(self) -> None:
        self._paused = False
        if self._stall_handle is not None:
            self._stall_handle.cancel()
            self._stall_handle = None
        self._wake_drain(None)
        self._sync_gate()

    def _watch_stall(self, buffered: int | None) -> None:
        """While writing is paused: fail the connection once the gateway has taken no
        byte for ``stall_timeout`` seconds (a slow reader that makes progress is fine).
        This bounds every wait on a peer that stopped reading, keepalive or not."""
        transport = self._transport
        if transport is None or not self._paused:
            return
        now = transport.get_write_buffer_size()
        if buffered is not None and now >= buffered:
            self._fail(
                GatewayConnectionError(
                    f"the gateway accepted no data for {self.stall_timeout:g} s "
                    f"({now} bytes waiting to be sent)"
                ),
                1011,
            )
            return
        self._stall_handle = self._loop.call_later(self.stall_timeout, self._watch_stall, now)

    # ---------------------------------------------------------------- sending

    def _flush(self) -> None:
        transport = self._transport
        for data in self._ws.data_to_send():
            if transport is None:
                return
            if data:
                transport.write(data)
            elif transport.can_write_eof():
                transport.write_eof()
        self._sync_gate()

    def send_text(self, text: str) -> None:
        """Send one text message now (directives are small: no flow control)."""
        if not self.open:
            raise ConnectionError("the connection is not open")
        self._ws.send_text(text.encode("utf-8"))
        self._flush()

    async def send_binary(self, data: bytes) -> None:
        """Send one binary message, then wait while the transport is backed up (bounded by
        the keepalive: a peer that stops reading is cut off after ``ping_timeout``)."""
        if not self.open:
            raise ConnectionError("the connection is not open")
        self._ws.send_binary(data)
        self._flush()
        if self._paused:
            self._drain_waiter = self._loop.create_future()
            await self._drain_waiter

    def _wake_drain(self, exc: BaseException | None) -> None:
        waiter, self._drain_waiter = self._drain_waiter, None
        if waiter is not None and not waiter.done():
            if exc is None:
                waiter.set_result(None)
            else:
                waiter.set_exception(exc)

    # ---------------------------------------------------------------- keepalive

    def _schedule_ping(self) -> None:
        if self.ping_interval is not None:
            self._ping_handle = self._loop.call_later(self.ping_interval, self._ping)

    def _ping(self) -> None:
        self._ping_handle = None
        if self._ws.state is not WsState.OPEN:
            return
        self._ws.send_ping(os.urandom(4))
        self._flush()
        if self.ping_timeout is not None:
            self._pong_deadline = self._loop.call_later(self.ping_timeout, self._no_pong)
        else:
            self._schedule_ping()

    def _no_pong(self) -> None:
        self._pong_deadline = None
        timeout = self.ping_timeout
        assert timeout is not None
        heard = self._heard_at + timeout - self._loop.time()
        if heard > 0:
            # No pong yet, but the gateway is sending: its pong is queued behind the
            # audio it is still working through. Wait for it while it keeps talking.
            self._pong_deadline = self._loop.call_later(heard, self._no_pong)
            return
        self._fail(
            GatewayConnectionError(
                f"the gateway answered no keepalive ping and sent nothing for {timeout:g} s"
            ),
            1011,
        )

    # ---------------------------------------------------------------- closing

    def _fail(self, error: GatewayConnectionError | ProtocolError, code: int = 1002) -> None:
        """End the connection because of ``error``: a close frame if one can go out,
        then the TCP connection at once (the gateway is not trusted to answer)."""
        if self.failure is None:
            self.failure = error
        if self._ws.state is WsState.OPEN:
            self._ws.fail(code)
            self._flush()
        self.abort()

    def abort(self) -> None:
        """Drop the TCP connection now."""
        if self._transport is not None:
            self._transport.abort()

    async def close(self, code: int = 1000) -> None:
        """The closing handshake (``code`` 1000, §1.4), bounded by ``close_timeout``;
        then the TCP connection is dropped if it is still there."""
        if self._ws.state is WsState.OPEN and self._transport is not None:
            self._ws.send_close(code)
            self._flush()
            self._after_receive()
        await self.wait_closed(self.close_timeout)

    async def wait_closed(self, timeout: float) -> None:
        """Wait up to ``timeout`` s for the TCP connection to go, then drop it."""
        if not self._lost.done():
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._lost), timeout)
        if not self._lost.done():
            self.abort()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._lost), timeout)


class _RedactingLogger(logging.LoggerAdapter):  # type: ignore[type-arg]
    """websockets' logger for one connection, with the token taken out of every line
    (at DEBUG it logs the handshake's headers, ``X-NLS-Token`` among them)."""

    def __init__(self, logger: logging.Logger, secret: str) -> None:
        super().__init__(logger, {})
        self.secret = secret

    def log(self, level: int, msg: object, *args: object, **kwargs: Any) -> None:
        if self.isEnabledFor(level):
            text = str(msg) % args if args else str(msg)
            kwargs.setdefault("stacklevel", 2)
            self.logger.log(level, "%s", redact(text, self.secret), **kwargs)


def _not_connected(data: bytes) -> None:
    raise ConnectionError("the connection is not open")


# --------------------------------------------------------------------------- connecting


def _shown(url: str, token: str) -> str:
    """``url`` as an error message may show it: no token, nor a password."""
    return redact_proxy(redact(url, token))


async def connect(
    url: str,
    token: str,
    *,
    on_message: Callable[[str], None],
    on_lost: Callable[[], None],
    proxy: ProxySetting = True,
    open_timeout: float = 10.0,
    ping_interval: float | None = 8.0,
    ping_timeout: float | None = 20.0,
    close_timeout: float = 10.0,
    max_size: int = 1 << 20,
) -> Connection:
    """Open a WebSocket connection to the gateway at ``url`` with the token in
    ``X-NLS-Token`` (§1.2) and return it once the handshake is done.

    Raises ValueError for an invalid URL, :class:`~nlsstream.errors.AuthenticationError`
    for a 401/403 answer, :class:`~nlsstream.errors.GatewayConnectionError` for anything
    else (refused, DNS, TLS, timeout, another HTTP status; a redirect is not followed,
    so the token is never sent anywhere but ``url``). No message contains the token.
    """
    try:
        uri = parse_uri(url)
    except InvalidURI as exc:
        raise ValueError(f"invalid gateway url {redact(url, token)!r}: {exc}") from None
    loop = asyncio.get_running_loop()
    wire_log = _RedactingLogger(logging.getLogger("websockets.client"), token)
    conn = Connection(
        ClientProtocol(uri, max_size=max_size, logger=wire_log),
        token,
        on_message=on_message,
        on_lost=on_lost,
        ping_interval=ping_interval,
        ping_timeout=ping_timeout,
        close_timeout=close_timeout,
    )

    async def open_() -> None:
        sock = await _proxy_socket(uri, proxy, open_timeout)
        context = ssl.create_default_context() if uri.secure else None
        if sock is not None:
            hostname = uri.host if context is not None else None
            await loop.create_connection(
                lambda: conn, sock=sock, ssl=context, server_hostname=hostname
            )
        else:
            await loop.create_connection(lambda: conn, uri.host, uri.port, ssl=context)
        await conn._opened

    # The error is raised outside the except blocks, so that no exception context (a
    # handshake response whose body quotes the token) travels with it.
    error: Exception | None = None
    try:
        await asyncio.wait_for(open_(), open_timeout)
    except (asyncio.TimeoutError, TimeoutError):
        error = GatewayConnectionError(
            f"timed out after {open_timeout:.3g} s connecting to {_shown(url, token)}"
        )
    except InvalidStatus as exc:
        error = _status_error(exc, _shown(url, token), token)
    except InvalidHandshake as exc:
        error = GatewayConnectionError(
            f"gateway at {_shown(url, token)} sent an invalid handshake: {redact(str(exc), token)}"
        )
    except (OSError, ConnectionError) as exc:
        error = GatewayConnectionError(
            f"cannot connect to {_shown(url, token)}: {redact(str(exc), token)}"
        )
        if isinstance(exc, OSError) and exc.errno is not None:
            error.__cause__ = OSError(exc.errno, exc.strerror)  # the errno, nothing else
    if error is not None:
        conn.abort()
        raise error
    return conn


def _status_error(exc: InvalidStatus, shown: str, token: str) -> Exception:
    response = exc.response
    status = response.status_code
    body = redact(response.body.decode("utf-8", "replace").strip(), token) if response.body else ""
    detail = f"HTTP {status}" + (f": {body}" if body else "")
    if status in (401, 403):
        return AuthenticationError(
            f"gateway at {shown} rejected the token ({detail})",
            status_text=body,
            http_status=status,
        )
    if 300 <= status < 400:
        location = response.headers.get("Location")
        return GatewayConnectionError(
            f"gateway at {shown} redirected the WebSocket upgrade to "
            f"{redact(location or '(no Location)', token)} ({detail}); redirects are not "
            "followed, so that the token goes nowhere else: use that URL if you trust it"
        )
    return GatewayConnectionError(f"gateway at {shown} refused the WebSocket upgrade ({detail})")


@functools.lru_cache(maxsize=64)
def proxy_for(secure: bool, host: str) -> str | None:
    """The proxy the system's settings name for a gateway (``wss_proxy``/``https_proxy``,
    ``ws_proxy``/``http_proxy``, ``all_proxy``, minus ``no_proxy``; never for a loopback
    host), or ``None``: :func:`nlsstream.proxies.system_proxy`, the rule every client follows.

    Read once per address per process: the lookup scans the whole environment, which
    thousands of connects need not repeat."""
    return system_proxy("wss" if secure else "ws", host)


async def _proxy_socket(
    uri: WebSocketURI, proxy: ProxySetting, timeout: float
) -> socket.socket | None:
    """A socket already tunnelled to the gateway through ``proxy``, or ``None`` to
    connect directly."""
    url = proxy_for(uri.secure, uri.host) if proxy is True else proxy
    if url is None:
        return None
    try:
        from python_socks.async_.asyncio import Proxy
    except ImportError:
        raise GatewayConnectionError(
            f"a proxy is configured for {uri.host} ({redact_proxy(url)}) but python-socks is "
            "not installed: pip install 'nlsstream[proxy]', or pass proxy=None to connect "
            "directly"
        ) from None
    try:
        sock: socket.socket = await Proxy.from_url(url).connect(uri.host, uri.port, timeout=timeout)
        return sock
    except Exception as exc:
        raise GatewayConnectionError(
            f"cannot connect to {uri.host}:{uri.port} through the proxy {redact_proxy(url)}: {exc}"
        ) from None
