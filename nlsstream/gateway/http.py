"""The gateway's HTTP guards: deadlines on requests, uploads in flight, spooled bodies,
and a log that a full accept queue cannot flood.

* :class:`HttpLimits`: every bound of the HTTP side (``Gateway(http_limits=...)``).
* :class:`Deadlines`: wraps each connection's aiohttp protocol (the documented low-level
  ``web.Server`` factory, delegated to, not subclassed) and aborts a connection whose
  request headers have not all arrived within ``header_timeout`` seconds of its first
  byte (or of the connection). Handlers mark a request as started with
  :meth:`Deadlines.started`; aiohttp's ``keepalive_timeout`` closes idle connections.
* :func:`spool_body`: a request body read with a deadline per read and on the whole,
  into a temporary file once it outgrows ``spool_bytes`` (never whole in RAM).
* :class:`UploadSlots`: at most ``max_uploads`` bodies in flight; one more is refused
  at once (40000005, the vendor's throttling status).
* :class:`ThrottledLog`: one log line per interval for a repeated condition (a full
  accept queue, connections closed by a deadline), with the count it stands for.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import IO, Any, cast

from aiohttp import web

from ..recordings.wire import Refusal
from ..redaction import get_logger
from .workers import in_thread

__all__ = [
    "Deadlines",
    "HttpLimits",
    "ThrottledLog",
    "UploadSlots",
    "install_accept_throttle",
    "spool_body",
]

log = get_logger("nlsstream.gateway.http")


@dataclass(frozen=True)
class HttpLimits:
    """Bounds of the gateway's HTTP side.

    Args:
        header_timeout: seconds a connection may take to send a request's headers
            (counted from its first byte, or from the connection); then it is closed.
        body_timeout: seconds a request body may take in all; and no read of it may
            wait more than ``header_timeout``. Then HTTP 408 (status 40000004).
        max_uploads: request bodies (Flash, REST) received at once; one more gets
            HTTP 429, status 40000005 TOO_MANY_REQUESTS, before its body is read.
        spool_bytes: a body (or download) larger than this goes to a temporary file
            instead of memory.
        log_interval: seconds between two log lines about the same repeated condition.
    """

    header_timeout: float = 30.0
    body_timeout: float = 300.0
    max_uploads: int = 16
    spool_bytes: int = 1 << 20
    log_interval: float = 10.0

    def __post_init__(self) -> None:
        if self.header_timeout <= 0 or self.body_timeout <= 0 or self.log_interval <= 0:
            raise ValueError("header_timeout, body_timeout and log_interval must be positive")
        if self.max_uploads < 1 or self.spool_bytes < 0:
            raise ValueError("max_uploads must be at least 1 and spool_bytes not negative")


class ThrottledLog:
    """``log.log(level, ...)`` at most once per ``interval`` seconds; the next line says
    how many were held back."""

    def __init__(self, logger: logging.Logger, interval: float) -> None:
        self.logger = logger
        self.interval = interval
        self._last = -float("inf")
        self._held = 0

    def __call__(self, level: int, message: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.interval:
            self._held += 1
            return
        held, self._held, self._last = self._held, 0, now
        if held:
            message += f" (and {held} more in the last {self.interval:g} s)"
        self.logger.log(level, message, *args)


_RESOURCE_ERRNOS = frozenset({errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM})


def install_accept_throttle(loop: asyncio.AbstractEventLoop, interval: float) -> Callable[[], None]:
    """Route the loop's "socket.accept() out of system resource" reports (the process
    ran out of file descriptors) through a :class:`ThrottledLog`; other reports go to
    the handler that was installed before. Returns the function that restores it."""
    previous = loop.get_exception_handler()
    throttled = ThrottledLog(log, interval)

    def handler(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and exc.errno in _RESOURCE_ERRNOS:
            throttled(
                logging.WARNING,
                "cannot accept connections: %s (the open-file limit is reached); "
                "serving the open ones",
                exc.strerror,
            )
            return
        if previous is not None:
            previous(loop, context)
        else:
            loop.default_exception_handler(context)

    loop.set_exception_handler(handler)
    return lambda: loop.set_exception_handler(previous)


class _Guarded(asyncio.Protocol):
    """One connection: aiohttp's protocol, plus the header deadline."""

    def __init__(self, inner: Any, owner: Deadlines) -> None:
        self._inner = inner
        self._owner = owner
        self._transport: asyncio.Transport | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._busy = False  # a request's headers arrived; its handler runs

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses: no isinstance check.
        self._transport = cast(asyncio.Transport, transport)
        self._owner.open[self._transport] = self
        self._arm()
        self._inner.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        if not self._busy and self._timer is None:
            self._arm()
        self._inner.data_received(data)

    def eof_received(self) -> bool | None:
        result: bool | None = self._inner.eof_received()
        return result

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        if self._transport is not None:
            self._owner.open.pop(self._transport, None)
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    def _arm(self) -> None:
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self._owner.timeout, self._expired)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expired(self) -> None:
        self._timer = None
        if self._busy or self._transport is None or self._transport.is_closing():
            return
        self._owner.expired += 1
        self._owner.note(
            logging.INFO,
            "closed a connection that sent no complete request within %g s",
            self._owner.timeout,
        )
        self._transport.abort()

    def started(self) -> None:
        self._busy = True
        self._disarm()

    def finished(self) -> None:
        self._busy = False


class Deadlines:
    """The protocol factory for ``loop.create_server``: aiohttp's ``web.Server`` with a
    header deadline on every connection (see the module's docstring)."""

    def __init__(self, server: web.Server, timeout: float, log_interval: float) -> None:
        self.server = server
        self.timeout = timeout
        self.open: dict[asyncio.Transport, _Guarded] = {}
        #: Connections closed because their request headers came too slowly.
        self.expired = 0
        self.note = ThrottledLog(log, log_interval)

    def __call__(self) -> _Guarded:
        return _Guarded(self.server(), self)

    def started(self, request: web.BaseRequest) -> Callable[[], None]:
        """Mark ``request`` as received (its headers): the deadline is off until the
        answer is sent. Returns the function to call then."""
        guarded = self.open.get(request.transport) if request.transport is not None else None
        if guarded is None:
            return lambda: None
        guarded.started()
        return guarded.finished


class UploadSlots:
    """At most ``limit`` request bodies received at once (refused beyond, not queued:
    a client that waits is better told to back off)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_flight = 0
        #: The most bodies in flight at once so far.
        self.peak = 0

    def take(self) -> None:
        """Take a slot or raise :class:`Refusal` 40000005."""
        if self.in_flight >= self.limit:
            raise Refusal(
                40000005, f"Too many uploads at once (at most {self.limit}): retry later!"
            )
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)

    def give(self) -> None:
        self.in_flight -= 1


async def spool_body(
    stream: Any,
    *,
    limit: int,
    limits: HttpLimits,
    declared: int | None,
    too_large: Refusal,
) -> tuple[IO[bytes], int]:
    """Read a body (an aiohttp ``StreamReader``) into a file (memory while small, a
    temporary file beyond ``limits.spool_bytes``): ``(file, size)``, the file at 0.

    Raises ``too_large`` before reading when ``declared`` (Content-Length) exceeds
    ``limit``, or as soon as the body does; :class:`Refusal` 40000004 when a read
    waits more than ``header_timeout`` or the whole takes more than ``body_timeout``.
    """
    if declared is not None and declared > limit:
        raise too_large
    spool = tempfile.SpooledTemporaryFile(max_size=limits.spool_bytes)  # noqa: SIM115
    try:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + limits.body_timeout
        size = 0
        pending: list[bytes] = []
        pending_size = 0
        while True:
            wait = min(limits.header_timeout, deadline - loop.time())
            try:
                chunk = await asyncio.wait_for(stream.read(1 << 16), max(wait, 0.001))
            except asyncio.TimeoutError:
                raise Refusal(40000004, "The request body was not received in time!") from None
            if not chunk:
                break
            size += len(chunk)
            if size > limit:
                raise too_large
            pending.append(chunk)
            pending_size += len(chunk)
            if pending_size >= 1 << 20:
                # Disk writes off the loop, a megabyte at a time.
                await in_thread(None, spool.write, b"".join(pending))
                pending, pending_size = [], 0
        if pending:
            data = b"".join(pending)
            if size + 0 > limits.spool_bytes:
                await in_thread(None, spool.write, data)
            else:
                spool.write(data)
        spool.seek(0)
        return spool, size
    except BaseException:
        spool.close()
        raise
