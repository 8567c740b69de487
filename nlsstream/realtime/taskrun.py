"""One connection and the one task on it: :class:`TaskRun`.

A session runs one task at a time; when it resumes after a failure, a new run (a new
connection, a new task with the same parameters) takes over from the old one, which is
retired: what its connection still delivers is stale and ignored. Reconnection is the
session's business (:mod:`nlsstream.realtime.resume`), not the run's, as websockets keeps
reconnecting in ``connect()`` and out of its connection.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from ..auth import RefreshableTokenProvider, TokenProvider
from ..errors import (
    AuthenticationError,
    GatewayConnectionError,
    NlsError,
    ProtocolError,
    StartTimeoutError,
    redact,
)
from ..redaction import get_logger, register
from .connection import Connection, connect
from .options import SessionConfig
from .protocol import ClientTask
from .router import EventRouter

__all__ = ["TaskRun", "Tokens"]

logger = get_logger("nlsstream.realtime.session")


class Tokens:
    """A session's token: asked of the provider before each connection, and dropped
    when the gateway rejects it (so that the next connection gets a fresh one)."""

    def __init__(self, provider: TokenProvider) -> None:
        self.provider = provider
        self.current: str | None = None

    @property
    def refreshable(self) -> bool:
        """Whether a rejected token can be replaced (a fixed one cannot)."""
        return isinstance(self.provider, RefreshableTokenProvider)

    async def get(self, timeout: float) -> str:
        try:
            token = await asyncio.wait_for(self.provider.get_token(), timeout)
        except asyncio.TimeoutError:
            raise GatewayConnectionError(
                f"timed out after {timeout:g} s waiting for the token provider"
            ) from None
        self.current = token
        register(token)
        return token

    def invalidate(self) -> None:
        """Drop the current token, so that the next connection asks for a new one."""
        provider = self.provider
        if isinstance(provider, RefreshableTokenProvider):  # what `refreshable` says
            try:
                provider.invalidate(self.current)
            except Exception:
                logger.exception("token provider's invalidate() failed")


class TaskRun:
    """One connection and one task, from Start to the end of the task.

    ``on_lost(run)`` is called when the connection goes away while the run is live.
    """

    def __init__(
        self,
        task: ClientTask,
        router: EventRouter,
        config: SessionConfig,
        *,
        on_lost: Callable[[TaskRun], None],
    ) -> None:
        self.task = task
        self.conn: Connection | None = None
        #: False once retired: what the connection still delivers is ignored.
        self.live = True
        self._router = router
        self._config = config
        self._on_lost = on_lost
        self._token: str | None = None
        #: Resolved by the task's Started (or by a failure that ends the wait for it).
        self.started = router.attach(task)

    @property
    def shown_url(self) -> str:
        """The gateway's URL as it may be shown (without the token)."""
        return redact(self._config.url, self._token)

    async def connect(self, tokens: Tokens) -> Connection:
        """Get a token and open the WebSocket connection, both within ``connect_timeout``;
        a token the gateway rejects is dropped from ``tokens``."""
        config = self._config
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.connect_timeout
        token = self._token = await tokens.get(config.connect_timeout)
        self._router.secrets = (token,)
        try:
            return await self._open(token, deadline - loop.time())
        except AuthenticationError:
            tokens.invalidate()
            raise

    async def _open(self, token: str, timeout: float) -> Connection:
        config = self._config
        debug = logger.isEnabledFor(logging.DEBUG)  # shown_url costs regexes: only if logged
        if debug:
            logger.debug("connecting to %s for task %s", self.shown_url, self.task.task_id)
        self.conn = await connect(
            config.url,
            token,
            on_message=self._message,
            on_lost=self._lost,
            proxy=config.proxy,
            open_timeout=max(0.001, timeout),
            ping_interval=config.ping_interval,
            ping_timeout=config.ping_timeout,
            close_timeout=config.stop_timeout,
        )
        if debug:
            logger.debug("connected to %s", self.shown_url)
        return self.conn

    def _message(self, text: str) -> None:
        if self.live:
            self._router.message(text)

    def _lost(self) -> None:
        if self.live:
            self._on_lost(self)

    async def wait_started(self) -> StartTimeoutError | None:
        """Wait up to ``start_timeout`` for Started (or the failure that ends the wait),
        once Start was sent; the error to end with if it timed out."""
        timeout = self._config.start_timeout
        try:
            await asyncio.wait_for(asyncio.shield(self.started), timeout)
        except asyncio.TimeoutError:
            return StartTimeoutError(
                f"gateway at {self.shown_url} did not confirm the start of task "
                f"{self.task.task_id} within {timeout:g} s"
            )
        return None

    def send_text(self, text: str) -> None:
        """Send one directive; raises ConnectionError if the connection is gone."""
        assert self.conn is not None
        self.conn.send_text(text)

    async def close(self) -> None:
        """The closing handshake (code 1000), bounded by ``stop_timeout``."""
        if self.conn is not None:
            await self.conn.close()

    def retire(self) -> None:
        """Nothing more is heard from this run; its connection is cut."""
        self.live = False
        if self.conn is not None:
            self.conn.abort()

    def lost_error(self) -> GatewayConnectionError:
        """The error for a connection that went away under the task."""
        how = self.conn.describe_close() if self.conn is not None else "not connected"
        return GatewayConnectionError(
            f"connection to {self.shown_url} lost during task {self.task.task_id} "
            f"({self.task.state.value}; {how})"
        )

    def loss(self) -> NlsError:
        """Why the connection went away: its own failure if it had one, else the loss."""
        conn = self.conn
        failure = conn.failure if conn is not None else None
        if failure is None:
            return self.lost_error()
        if isinstance(failure, ProtocolError):
            return ProtocolError(f"task {self.task.task_id}: {failure}; connection aborted")
        return GatewayConnectionError(
            f"connection to {self.shown_url} failed during task {self.task.task_id} "
            f"({self.task.state.value}): {failure}"
        )
