"""The asyncio client sessions: :class:`Transcriber` and :class:`Recognizer`.

One session is one task on one WebSocket connection (§1.4). Entering the ``async with``
block connects (token in ``X-NLS-Token``), sends Start and waits for Started; leaving it
stops gracefully (Stop once, drain until Completed) or, if the block raised or was
cancelled, aborts: no task and no socket outlive the block.

The session is the lifecycle facade users call. Beneath it: the connection
(:mod:`nlsstream.realtime.connection`: handshake, keepalive, flow control, the audio gate), the
event router (:mod:`nlsstream.realtime.router`: the one path every event takes to iterators,
callbacks, the result and the metrics) and the sans-I/O task state machine
(:class:`~nlsstream.realtime.protocol.ClientProtocol`). Audio goes out through :meth:`send_audio`
(now, unpaced) or :meth:`stream` (any source, cut into 640-byte frames, paced by the
event loop's shared :class:`~nlsstream.realtime.pacing.Pacer`).

Every wait is bounded (``connect_timeout``, ``start_timeout``, ``stop_timeout``, and the
WebSocket keepalive while streaming), and every failure ends as a typed
:class:`~nlsstream.errors.NlsError` that never contains the token.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncGenerator, AsyncIterable, Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, TypeVar

from .. import audio
from ..auth import TokenProvider, TokenSource, as_provider
from ..config import DEFAULT_URL, check_token, start_parameters
from ..errors import (
    AudioFormatError,
    AuthenticationError,
    CallbackError,
    GatewayConnectionError,
    InvalidStateError,
    NlsError,
    ProtocolError,
    StartTimeoutError,
    StopTimeoutError,
    TaskFailedError,
    is_server_side,
    redact,
    with_note,
)
from .connection import Connection, ProxySetting, connect
from .events import EventHub, EventStream
from .pacing import Metrics, Pacer
from .protocol import (
    MAX_SPEECH_MS,
    RECOGNIZER,
    SAMPLE_RATES,
    TRANSCRIBER,
    ClientProtocol,
    Completed,
    Event,
    Namespace,
    ResultChanged,
    Resumed,
    SentenceBegin,
    SentenceEnd,
    Started,
    State,
)
from .resume import Reconnect, ReplayBuffer, Timeline
from .router import EventRouter
from .sending import AudioSender

__all__ = ["Recognizer", "Result", "Session", "Transcriber"]

logger = logging.getLogger("nlsstream.realtime.session")

E = TypeVar("E", bound=Event)
#: A callback: a plain function or a coroutine function (awaited before later events).
Handler = Callable[[E], object]
ErrorHandler = Callable[[NlsError], object]

DEFAULT_EVENT_QUEUE_SIZE = 1024
#: Seconds a live source may be quiet before the session sends silence in its place.
DEFAULT_KEEPALIVE_S = 3.0


@dataclass(frozen=True)
class Result:
    """The outcome of a completed task, returned by ``stop()``.

    ``text``: the sentences joined by a space (transcriber) or the recognition result
    (recognizer). ``duration``: ms of audio (the gateway's figure for the recognizer,
    the audio sent for the transcriber). ``sentences``: every ``SentenceEnd`` in order
    (transcriber; empty for the recognizer).
    """

    text: str
    duration: int
    task_id: str
    sentences: tuple[SentenceEnd, ...] = ()


class Session(abc.ABC):
    """What :class:`Transcriber` and :class:`Recognizer` share; use one of those.

    Args:
        appkey: the project's appkey (sent in every directive's header).
        token: a token string or a :class:`~nlsstream.auth.TokenProvider`; asked for a
            token once, before connecting. ``None`` raises
            :class:`~nlsstream.config.ConfigurationError` saying how to give one.
        url: the gateway (default: the cloud's Shanghai endpoint).
        format: audio format declared to the gateway; :meth:`stream` needs ``"pcm"``.
        sample_rate: 8000 or 16000.
        enable_intermediate_result, enable_punctuation_prediction,
        enable_inverse_text_normalization: the standard Start parameters.
        on_start, on_result_changed, on_completed: called with the matching event.
        on_error: called with every :class:`~nlsstream.errors.NlsError` the session hits,
            including :class:`~nlsstream.errors.CallbackError` for a failing callback.
        on_close: called with no arguments once the connection is closed.
        connect_timeout, start_timeout, stop_timeout: seconds (the connect timeout
            covers getting the token and the WebSocket handshake).
        ping_interval, ping_timeout: WebSocket keepalive (``None`` disables it): a
            gateway that answers no ping and sends nothing else for ``ping_timeout``
            ends the session with :class:`~nlsstream.errors.GatewayConnectionError`
            (which a resume may then cure).
        event_queue_size: how many events each iterator may fall behind before it fails
            with :class:`~nlsstream.errors.EventOverflowError`.
        task_id: a 32-hex task id (default: a fresh one).
        pacer: the :class:`~nlsstream.realtime.pacing.Pacer` for :meth:`stream` (default: the
            running loop's shared one).
        max_ahead_ms: how much audio :meth:`stream` buffers ahead of the pacer.
        proxy: ``True`` (default) uses the system's proxy settings for the gateway's
            address (``wss_proxy``/``https_proxy``/... environment variables, ``no_proxy``),
            read once per address per process; a proxy URL (``http://``, ``socks5://``)
            uses that proxy; ``None`` connects directly. Proxies need the ``[proxy]``
            extra (python-socks).
        reconnect: how the session survives a dropped connection or a retryable
            failure mid-task (a :class:`~nlsstream.Reconnect`; ``True``, the default,
            is ``Reconnect()``; ``False`` lets the first failure end the task). It
            connects again, starts a new task with the same parameters and replays the
            audio since the end of the last final sentence; events go on as one stream
            (indices and times continue), and ``on_resume`` / :meth:`events` get a
            :class:`~nlsstream.Resumed`. When every attempt fails, the original error
            is raised.
        on_resume: called with each :class:`~nlsstream.Resumed`.
        keepalive: when a live source (an async iterable, e.g. a microphone or a call)
            produces nothing for this many seconds, :meth:`stream` sends silence at real
            time until it does again, so that the gateway's 10 s idle timeout does not end
            the task (caller on hold, muted input). ``True`` (the default) is 3 s;
            ``False`` turns it off. Counted in ``metrics.keepalive_bytes``; the silence is
            on the stream's timeline. Whole sources (files, bytes, arrays) never pause.
        params: extra Start parameters, sent as given; ``None`` values are left out.
        **extra: Start parameters as keyword arguments (``max_sentence_silence``,
            ``enable_words``, ``vocabulary_id``, ...); one outside the documented set
            (:attr:`~nlsstream.realtime.protocol.Namespace.parameters`, most likely a typo) draws a
            warning, once per name; pass it in ``params`` instead to send it without.
            A value that cannot be sent as JSON (e.g. a callback the class does not
            have) raises TypeError here.

    Callbacks run on the event loop, in event order, as events arrive; a coroutine
    callback is awaited before later events are delivered, so a slow one delays only
    this session. A callback that raises is reported to ``on_error`` as
    :class:`~nlsstream.errors.CallbackError` and the session goes on.
    """

    namespace: ClassVar[Namespace]
    #: The most audio one task takes (``None``: no limit).
    _max_audio_ms: ClassVar[int | None] = None
    #: How many final sentences the result keeps (``None``: all).
    _keep_sentences: int | None = None

    def __init__(
        self,
        appkey: str,
        token: TokenSource,
        *,
        url: str = DEFAULT_URL,
        format: str = "pcm",
        sample_rate: int = 16000,
        enable_intermediate_result: bool = False,
        enable_punctuation_prediction: bool = False,
        enable_inverse_text_normalization: bool = False,
        on_start: Handler[Started] | None = None,
        on_result_changed: Handler[ResultChanged] | None = None,
        on_completed: Handler[Completed] | None = None,
        on_error: ErrorHandler | None = None,
        on_close: Callable[[], object] | None = None,
        connect_timeout: float = 10.0,
        start_timeout: float = 10.0,
        stop_timeout: float = 10.0,
        ping_interval: float | None = 8.0,
        ping_timeout: float | None = 20.0,
        event_queue_size: int = DEFAULT_EVENT_QUEUE_SIZE,
        task_id: str | None = None,
        pacer: Pacer | None = None,
        max_ahead_ms: int = 1000,
        proxy: ProxySetting = True,
        reconnect: Reconnect | bool = True,
        on_resume: Handler[Resumed] | None = None,
        keepalive: float | bool = True,
        params: Mapping[str, Any] | None = None,
        **extra: Any,
    ) -> None:
        if not isinstance(appkey, str) or not appkey:
            raise ValueError("appkey must be a non-empty string")
        if sample_rate not in SAMPLE_RATES:
            raise ValueError(f"sample_rate must be 8000 or 16000 Hz, got {sample_rate!r}")
        for name, value in (
            ("connect_timeout", connect_timeout),
            ("start_timeout", start_timeout),
            ("stop_timeout", stop_timeout),
        ):
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if event_queue_size < 1:
            raise ValueError(f"event_queue_size must be at least 1, got {event_queue_size}")
        token = check_token(token)
        extra = start_parameters(self.namespace, type(self).__name__, extra, params)
        self._provider: TokenProvider = as_provider(token)
        self._token: str | None = token if isinstance(token, str) else None
        self.url = url
        self.format = format
        self.sample_rate = sample_rate
        if reconnect is True:
            reconnect = Reconnect()
        elif reconnect is not False and not isinstance(reconnect, Reconnect):
            raise TypeError(f"reconnect must be a Reconnect, True or False, got {reconnect!r}")
        self._reconnect: Reconnect | None = reconnect or None
        if keepalive is True:
            keepalive = DEFAULT_KEEPALIVE_S
        elif keepalive is not False and not (isinstance(keepalive, (int, float)) and keepalive > 0):
            raise ValueError(f"keepalive must be True, False or seconds > 0, got {keepalive!r}")
        self._keepalive: float | None = float(keepalive) if keepalive is not False else None
        self._appkey = appkey
        self._proto = ClientProtocol(
            self.namespace,
            appkey,
            {
                "format": format,
                "sample_rate": sample_rate,
                "enable_intermediate_result": enable_intermediate_result,
                "enable_punctuation_prediction": enable_punctuation_prediction,
                "enable_inverse_text_normalization": enable_inverse_text_normalization,
                **extra,
            },
            task_id=task_id,
        )
        self._callbacks: dict[type[Event], Callable[[Any], object] | None] = {
            Started: on_start,
            ResultChanged: on_result_changed,
            Completed: on_completed,
            Resumed: on_resume,
        }
        self._on_error = on_error
        self._on_close = on_close
        self.connect_timeout = connect_timeout
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.ping_interval = ping_interval
        self.ping_timeout = ping_timeout
        self.event_queue_size = event_queue_size
        self._pacer = pacer
        self.proxy = proxy
        self._max_ahead_bytes = max(audio.FRAME_BYTES, 2 * sample_rate * max_ahead_ms // 1000)
        #: Counters of what was sent and how late (see :class:`~nlsstream.realtime.pacing.Metrics`).
        self.metrics = Metrics(sample_rate=sample_rate)

        self._hub = EventHub()  # iterators may subscribe before start()
        self._router: EventRouter | None = None  # from start() on
        self._conn: Connection | None = None
        self._audio: AudioSender | None = None  # once connected
        self._opened = False
        self._result: Result | None = None
        self._error_raised = False  # the task's error reached the user (raised or aborted)
        self._closed = False  # on_close was called
        self._closer: asyncio.Task[None] | None = None  # closes the connection at the end
        # Resuming (see nlsstream.realtime.resume): the audio to replay, the events' re-basing, the
        # task doing it, and the connection generation (callbacks of older ones are stale).
        self._replay: ReplayBuffer | None = None
        self._timeline: Timeline | None = None
        self._resumer: asyncio.Task[None] | None = None
        self._attempt_error: NlsError | None = None
        # Connections tried since the last final sentence: a gateway that fails every
        # resumed task before it gets anywhere must not keep the session resuming forever.
        self._attempts_used = 0
        self._generation = 0

    # ------------------------------------------------------------------ properties

    @property
    def task_id(self) -> str:
        """The task's 32-hex id (sent in every directive, echoed in every event)."""
        return self._proto.task_id

    @property
    def state(self) -> State:
        """Where the task is: IDLE, STARTING, STARTED, STOPPING, COMPLETED or FAILED."""
        return self._proto.state

    @property
    def result(self) -> Result | None:
        """The result once the task completed, else ``None``."""
        router = self._router
        if self._result is None and router is not None and router.ended and router.error is None:
            self._result = self._build_result(router)
        return self._result

    @property
    def error(self) -> NlsError | None:
        """Why the task failed, once it has."""
        return self._router.error if self._router is not None else None

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} task_id={self.task_id} state={self.state.value} "
            f"url={self._display_url()}>"
        )

    def _display_url(self) -> str:
        return redact(self.url, self._token)

    @property
    def _ended(self) -> bool:
        return self._router is not None and self._router.ended

    # ------------------------------------------------------------------ lifecycle

    async def __aenter__(self: _S) -> _S:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            if self._ended and not issubclass(exc_type, asyncio.CancelledError):
                # The task is over anyway (e.g. the block re-raised its error): close
                # politely instead of cutting the connection.
                await self._close()
            else:
                await self.abort()
            return
        try:
            if not self._ended or (self.error is not None and not self._error_seen()):
                await self.stop()
        except BaseException:
            await self.abort()
            raise
        await self._close()

    async def start(self) -> None:
        """Connect, send Start and wait for Started (what entering ``async with`` does).

        Raises AuthenticationError, GatewayConnectionError, StartTimeoutError,
        TaskFailedError; the connection is closed again on any failure.
        """
        if self._opened:
            raise InvalidStateError("a session can be started only once; create a new one")
        self._opened = True
        if self._pacer is None:
            self._pacer = Pacer.for_loop()
        router = self._router = EventRouter(
            self._proto,
            self.metrics,
            callbacks=self._callbacks,
            on_error=self._on_error,
            on_end=self._on_task_end,
            hub=self._hub,
            keep_sentences=self._keep_sentences,
        )
        if self._reconnect is not None:
            seconds = max(self._reconnect.replay_seconds, (self._max_audio_ms or 0) / 1000)
            self._replay = ReplayBuffer(int(seconds * 2 * self.sample_rate))
            self._timeline = Timeline(self.sample_rate)
            router.rebase = self._rebase
            router.recover = self._recover
        try:
            conn = await self._connect()
            self._audio = AudioSender(
                conn,
                router,
                self.metrics,
                pacer=self._pacer,
                sample_rate=self.sample_rate,
                max_ahead_bytes=self._max_ahead_bytes,
                check=self._check_audio,
                lost=self._lost_error,
                raise_error=self._raise_error,
                keep=self._replay.add if self._replay is not None else None,
                resumed=self._resumed if self._reconnect is not None else None,
            )
            timed_out = await self._start_task()
            if timed_out is not None:
                router.fail(timed_out)
            await self._raise_error()
        except BaseException:
            await self.abort()
            raise

    async def _start_task(self) -> StartTimeoutError | None:
        """Send Start for the current task and wait up to ``start_timeout`` for Started
        (or the failure that ends the wait); the error to end with if it timed out."""
        assert self._router is not None
        self._send_text(self._proto.start())
        try:
            await asyncio.wait_for(asyncio.shield(self._router.started_future), self.start_timeout)
        except asyncio.TimeoutError:
            return StartTimeoutError(
                f"gateway at {self._display_url()} did not confirm the start of task "
                f"{self.task_id} within {self.start_timeout:g} s"
            )
        return None

    async def _connect(self) -> Connection:
        assert self._router is not None
        timeout = self.connect_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        try:
            token = await asyncio.wait_for(self._provider.get_token(), timeout)
        except asyncio.TimeoutError:
            raise GatewayConnectionError(
                f"timed out after {timeout:g} s waiting for the token provider"
            ) from None
        self._token = token
        self._router.secrets = (token,)
        logger.debug("connecting to %s for task %s", self._display_url(), self.task_id)
        self._generation += 1
        generation, router = self._generation, self._router

        def on_message(text: str) -> None:
            if generation == self._generation:
                router.message(text)

        def on_lost() -> None:
            if generation == self._generation:
                self._on_connection_lost()

        try:
            self._conn = await connect(
                self.url,
                token,
                on_message=on_message,
                on_lost=on_lost,
                proxy=self.proxy,
                open_timeout=max(0.001, deadline - loop.time()),
                ping_interval=self.ping_interval,
                ping_timeout=self.ping_timeout,
                close_timeout=self.stop_timeout,
            )
        except AuthenticationError:
            self._invalidate_token()
            raise
        logger.debug("connected to %s", self._display_url())
        return self._conn

    def _invalidate_token(self) -> None:
        invalidate = getattr(self._provider, "invalidate", None)
        if callable(invalidate):
            try:
                invalidate(self._token)
            except Exception:
                logger.exception("token provider's invalidate() failed")

    async def stop(self, timeout: float | None = None) -> Result:
        """Send Stop (once), wait for Completed and return the :class:`Result`.

        The wait measures progress, not the length of the audio: the gateway may still be
        working through a backlog (audio sent faster than real time), and as long as
        events keep coming ``stop()`` keeps waiting. It raises
        :class:`~nlsstream.errors.StopTimeoutError` when nothing has arrived for
        ``stop_timeout`` s, or when ``timeout`` (an overall bound for this call, if
        given) has passed.

        If the gateway already ended the task (server VAD), or ``stop()`` ran before,
        returns the same result. Raises the task's error if it failed, and
        InvalidStateError before the session started. A ``stream()`` still running is
        interrupted with InvalidStateError.
        """
        router = self._router
        if router is None:
            raise InvalidStateError("stop() called before the session was started")
        await self._resume_done()
        if not router.ended and self.state is State.STARTED:
            if self._audio is not None:
                self._audio.interrupt("stop() was called while stream() was still sending")
            text = self._proto.stop()
            router.stop_sent_at = asyncio.get_running_loop().time()
            with contextlib.suppress(GatewayConnectionError):
                self._send_text(text)  # on failure the task's error is raised below
        if not router.ended and router.failing is None:
            await self._wait_completed(router, timeout)
        await self._raise_error()
        result = self.result
        assert result is not None
        return result

    async def _wait_completed(self, router: EventRouter, timeout: float | None) -> None:
        """Wait for the end of the task while the gateway makes progress (see stop())."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        overall = began + timeout if timeout is not None else float("inf")
        while not router.ended:
            if await self._resume_done():
                began = loop.time()  # the new task's own progress counts from here
            now = loop.time()
            heard = max(began, router.stop_sent_at or began, router.last_message_at or began)
            left = min(heard + self.stop_timeout, overall) - now
            if left <= 0:
                if now >= overall:
                    why = f"within {timeout:g} s (the timeout given to stop())"
                else:
                    why = f"after Stop: it sent nothing for {self.stop_timeout:g} s"
                router.fail(StopTimeoutError(f"gateway did not complete task {self.task_id} {why}"))
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(router.ended_future), left)

    async def _raise_error(self) -> None:
        """Raise the task's error, if it failed, once ``on_error`` has heard of it."""
        router = self._router
        assert router is not None
        if router.error is not None or router.failing is not None:
            await router.settle()
            error = router.error or router.failing
            assert error is not None
            self._error_raised = True
            raise error

    def _error_seen(self) -> bool:
        """Whether the task's error reached user code (raised by a call or an iterator)."""
        return self._error_raised or self._hub.error_delivered

    async def abort(self) -> None:
        """Close the connection now, without Stop; pending iterators and ``stream()``
        calls raise InvalidStateError. Safe to call at any time, any number of times."""
        router, conn = self._router, self._conn
        self._cancel_resume()
        if router is not None:
            if not router.ended:
                # The caller chose to abort: nothing to report or to re-raise.
                error = InvalidStateError(f"session for task {self.task_id} was aborted")
                router.fail(error, report=False)
                self._error_raised = True
            router.close()  # callbacks still waiting to run are dropped
        if conn is not None:
            conn.abort()
        await self._close()

    async def _close(self) -> None:
        """After the task ended: wait (bounded) for the closing of the connection that
        the end of the task began, and for ``on_close``."""
        closer = self._closer
        if closer is not None:
            await asyncio.wait([closer])
        else:
            await self._call_on_close()

    async def _close_connection(self, conn: Connection) -> None:
        """The task is over: the closing handshake (code 1000, §1.4), bounded by
        ``stop_timeout``, then ``on_close`` once what is left to report has been."""
        await conn.close()
        if self._router is not None:
            await self._router.settle()
        await self._call_on_close()

    async def _call_on_close(self) -> None:
        if self._closed or not self._opened or self._conn is None:
            return
        self._closed = True
        if self._on_close is not None:
            try:
                result = self._on_close()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                error = CallbackError(f"on_close callback raised {exc!r}")
                error.__cause__ = exc
                if self._on_error is not None:
                    with contextlib.suppress(Exception):
                        outcome = self._on_error(error)
                        if inspect.isawaitable(outcome):
                            await outcome
                else:
                    logger.error("task %s: %s", self.task_id, error, exc_info=exc)

    # ------------------------------------------------------------------ the task's end

    def _on_task_end(self, error: NlsError | None) -> None:
        """Called once by the router when the task ends, however it ended."""
        if isinstance(error, AuthenticationError):
            self._invalidate_token()
        self._cancel_resume()
        if self._audio is not None:
            self._audio.interrupt(
                f"task {self.task_id} ended ({self.state.value}) before all audio was sent",
                error,
            )
        conn = self._conn
        if conn is not None:
            if isinstance(error, (StartTimeoutError, StopTimeoutError, ProtocolError)):
                conn.abort()  # the gateway is unresponsive or broken: no closing handshake
            self._closer = asyncio.get_running_loop().create_task(
                self._close_connection(conn), name=f"nlsstream-close-{self.task_id}"
            )

    def _on_connection_lost(self) -> None:
        router, conn = self._router, self._conn
        if router is None or router.ended:
            return
        assert conn is not None
        if conn.failure is not None:
            error: NlsError = conn.failure
            if isinstance(error, ProtocolError):
                error = ProtocolError(f"task {self.task_id}: {error}; connection aborted")
            else:
                error = GatewayConnectionError(
                    f"connection to {self._display_url()} failed during task {self.task_id} "
                    f"({self.state.value}): {error}"
                )
        else:
            error = self._lost_error()
        if not self._recover(error):
            router.fail(error)

    @abc.abstractmethod
    def _build_result(self, router: EventRouter) -> Result:
        """The protocol's Result from what the task delivered."""

    # ------------------------------------------------------------------ resuming

    @property
    def _resuming(self) -> bool:
        return self._resumer is not None and not self._resumer.done()

    async def _resume_done(self) -> bool:
        """Wait for a resume in progress, if any (bounded by its attempts and their
        timeouts); True if there was one."""
        resumer = self._resumer
        if resumer is None or resumer.done() or resumer is asyncio.current_task():
            return False
        await asyncio.wait([resumer])
        return True

    def _cancel_resume(self) -> None:
        resumer = self._resumer
        if resumer is not None and resumer is not asyncio.current_task():
            resumer.cancel()

    def _rebase(self, event: Event) -> Event | None:
        """The router's ``rebase``: ``event`` on the whole stream's timeline."""
        if isinstance(event, Started) and self._resuming:
            # A resumed task's start is the session's news, not the user's.
            started = self._router.started_future if self._router is not None else None
            if started is not None and not started.done():
                started.set_result(None)
            return None
        assert self._timeline is not None and self._replay is not None
        rebased = self._timeline.rebase(event)
        if isinstance(rebased, SentenceEnd):
            self._replay.trim(self._timeline.sentence_end_bytes(rebased))
            self._attempts_used = 0  # progress: the attempts are the next failure's
        return rebased

    def _recover(self, error: NlsError) -> bool:
        """The router's ``recover``: take over ``error`` by resuming, if it is one a new
        connection can cure and the task is under way."""
        router = self._router
        if self._reconnect is None or router is None or router.ended:
            return False
        if self._resuming:
            # The attempt under way failed: its wait for Started learns of it now.
            self._attempt_error = error
            if not router.started_future.done():
                router.started_future.set_result(None)
            return True
        if not self._resumable(error):
            return False
        if not router.started_future.done() or self._audio is None:
            return False  # still starting: start() reports the failure itself
        self._resumer = asyncio.get_running_loop().create_task(
            self._resume(error), name=f"nlsstream-resume-{self.task_id}"
        )
        return True

    def _resumable(self, error: NlsError) -> bool:
        """Whether a new task can take up where ``error`` stopped this one: a lost
        connection, a failure of the service's own (see :func:`errors.is_server_side`),
        or a token that expired mid-task when the provider can fetch a fresh one."""
        if isinstance(error, GatewayConnectionError):
            return True
        if isinstance(error, AuthenticationError):
            return callable(getattr(self._provider, "invalidate", None))
        return isinstance(error, TaskFailedError) and is_server_side(error.status)

    async def _resumed(self, conn: Connection) -> bool:
        """The sender's ``resumed``: after a send on ``conn`` failed, whether a new
        connection took over (waiting for the resume that the loss of ``conn`` starts)."""
        if conn is self._conn and not self._resuming:
            # The transport failed under the write; its connection_lost() (which starts
            # the resume) runs on a later loop iteration.
            await conn.wait_closed(self.stop_timeout)
        await self._resume_done()
        router = self._router
        return router is not None and not router.ended and self._conn is not conn

    async def _resume(self, cause: NlsError) -> None:
        """Connect again, start a new task, replay, go on (see :class:`Reconnect`)."""
        router, sender, policy = self._router, self._audio, self._reconnect
        assert router is not None and sender is not None and policy is not None
        assert self._replay is not None and self._timeline is not None
        loop = asyncio.get_running_loop()
        lost_at = loop.time()
        previous = self.task_id
        stopping = router.stop_sent_at is not None
        if isinstance(cause, AuthenticationError):
            self._invalidate_token()  # the new connection asks the provider for a fresh one
        old = self._conn
        sender.hold()
        self._generation += 1  # nothing more is heard from the old connection
        if old is not None:
            old.abort()
        replay = self._replay.replay(self.metrics.bytes_sent, self._timeline.open_since)
        if replay is None:
            behind = (self.metrics.bytes_sent - self._replay.mark) / (2 * self.sample_rate)
            note = (
                f"cannot resume: the gateway had not finished the {behind:.1f} s of audio "
                "since its last final sentence, more than the replay buffer keeps "
                f"({policy.replay_seconds:g} s, Reconnect.replay_seconds)"
            )
            router.fail(with_note(cause, note))
            return
        logger.info("task %s: %s; resuming", previous, cause)
        conn: Connection | None = None
        attempt = 0
        while conn is None and self._attempts_used < policy.attempts:
            attempt += 1
            self._attempts_used += 1
            await asyncio.sleep(policy.delay(attempt))
            conn = await self._start_again()
            failure = self._attempt_error
            if failure is not None and not failure.retryable:
                break
        if conn is None:
            last = f", the last: {self._attempt_error}" if self._attempt_error else ""
            note = (
                f"gave up resuming after {self._attempts_used} connection attempt(s) since "
                f"the last final sentence{last}"
            )
            router.fail(with_note(cause, note))
            return
        # The new task recognises the stream from the replay's start on.
        self._timeline.resume_at(self._replay.replay_start())
        if replay:
            conn.write_frames(b"".join(conn.encode_frames(replay, audio.FRAME_BYTES)))
            self.metrics.replayed_bytes += len(replay)
        self.metrics.reconnects += 1
        sender.retarget(conn)
        if stopping:
            self._send_text(self._proto.stop())
        router.deliver(
            Resumed(
                name="Resumed",
                namespace=self.namespace.name,
                task_id=self.task_id,
                previous_task_id=previous,
                cause=str(cause),
                attempts=attempt,
                gap_ms=round((loop.time() - lost_at) * 1000),
                replayed_ms=len(replay) * 1000 // (2 * self.sample_rate),
            )
        )

    async def _start_again(self) -> Connection | None:
        """One attempt: a new connection and a new task with the same parameters, up to
        Started. Returns the connection, or None (the reason in ``_attempt_error``)."""
        router = self._router
        assert router is not None
        self._attempt_error = None
        proto = ClientProtocol(self.namespace, self._appkey, self._proto.params)
        self._proto = router.proto = proto
        router.started_future = asyncio.get_running_loop().create_future()
        conn = None
        try:
            conn = await self._connect()
            timed_out = await self._start_task()
            if timed_out is not None:
                self._attempt_error = timed_out
        except NlsError as exc:
            self._attempt_error = exc
        if self._attempt_error is None and proto.state is State.STARTED:
            return conn
        if conn is not None:
            self._generation += 1
            conn.abort()
        return None

    # ------------------------------------------------------------------ sending

    def _check_audio(self) -> None:
        error = self.error
        if error is None and self._router is not None:
            error = self._router.failing  # its delivery waits behind a callback
        if error is not None and not isinstance(error, InvalidStateError):
            self._error_raised = True
            raise error
        if not self._resuming:  # audio sent meanwhile waits for the new task
            self._proto.audio()

    def _send_text(self, text: str) -> None:
        assert self._conn is not None and self._router is not None
        try:
            self._conn.send_text(text)
        except ConnectionError:
            error = self._lost_error()
            if not self._recover(error):
                self._router.fail(error)
            raise error from None

    def _lost_error(self) -> GatewayConnectionError:
        conn = self._conn
        how = conn.describe_close() if conn is not None else "not connected"
        return GatewayConnectionError(
            f"connection to {self._display_url()} lost during task {self.task_id} "
            f"({self.state.value}; {how})"
        )

    async def send_audio(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` now, unpaced, as one binary frame (PCM16LE mono at the session's
        rate when ``format="pcm"``).

        Raises InvalidStateError before Started or after Stop (audio is never dropped
        silently), AudioFormatError for an odd number of PCM bytes, and the task's error
        if it failed. While the session resumes after a failure, waits until it has.
        """
        await self._resume_done()
        self._check_audio()
        if self.format == "pcm" and len(data) % 2:
            raise AudioFormatError(f"PCM16 audio must be an even number of bytes, got {len(data)}")
        limit = self._audio_limit()
        if limit is not None:
            self._check_length(len(data), limit)
        if len(data):
            assert self._audio is not None
            await self._audio.send(bytes(data))

    async def stream(
        self,
        source: audio.AudioSource,
        pace: float | None = 1.0,
        *,
        sample_rate: float | None = None,
    ) -> None:
        """Send ``source`` (anything :func:`nlsstream.audio.pcm_chunks` accepts) as
        640-byte PCM frames, paced at ``pace`` times real time; ``pace=None`` or ``0``
        sends as fast as the socket takes it. Returns once the last frame is written;
        does not send Stop. The last frame may be shorter and is never dropped.

        ``sample_rate``: the rate of a numpy array or PCM bytes when it is not the
        session's (they are resampled); without it they are taken to be at the
        session's rate. Files carry their own rate.

        Raises AudioFormatError for audio that cannot be converted (before anything is
        sent), InvalidStateError if the task is not accepting audio or ends first (e.g.
        the gateway's VAD completed it, or ``stop()`` was called meanwhile), and the
        task's error if it fails meanwhile.
        """
        if pace is not None and not pace >= 0:
            raise ValueError(f"pace must be positive, or 0/None for as fast as possible: {pace!r}")
        if self.format != "pcm":
            raise AudioFormatError(
                f"stream() sends PCM but the session format is {self.format!r}; "
                "use send_audio() for encoded audio"
            )
        await self._resume_done()
        self._check_audio()
        assert self._audio is not None
        if self._audio.streaming:
            raise InvalidStateError("stream() is already running on this session")
        limit = self._audio_limit()
        cut: list[bool] = []
        if limit is None:
            chunks = audio.pcm_chunks(source, self.sample_rate, sample_rate)
        elif audio.is_whole(source):
            # Known length: refuse before sending anything rather than fail at the limit.
            pcm = await audio.whole_pcm(source, self.sample_rate, sample_rate)
            self._check_length(len(pcm), limit)
            chunks = audio.pcm_chunks(pcm, self.sample_rate)
        else:
            chunks = _up_to(audio.pcm_chunks(source, self.sample_rate, sample_rate), limit, cut)
        live = isinstance(source, AsyncIterable) and not audio.is_whole(source)
        async with contextlib.aclosing(chunks) as limited:
            await self._audio.stream(limited, pace, self._keepalive if live else None)
        if cut:
            raise AudioFormatError(
                f"stream() stopped sending at {self._limit_text()}: the rest of the live "
                "source was not sent; stop() returns what was recognised up to there"
            )

    def _audio_limit(self) -> int | None:
        """PCM bytes the task may still take (``None``: no limit)."""
        if self._max_audio_ms is None or self.format != "pcm":
            return None
        return max(0, self._max_audio_ms * 2 * self.sample_rate // 1000 - self.metrics.bytes_sent)

    def _limit_text(self) -> str:
        seconds = (self._max_audio_ms or 0) // 1000
        return f"{type(self).__name__}'s limit of {seconds} s of audio per task"

    def _check_length(self, size: int, limit: int) -> None:
        if size > limit:
            ms = size * 1000 // (2 * self.sample_rate)
            raise AudioFormatError(
                f"{ms / 1000:.1f} s of audio is more than {self._limit_text()} "
                f"({limit * 1000 // (2 * self.sample_rate) / 1000:.1f} s left); nothing was "
                "sent: use a Transcriber for longer audio"
            )

    # ------------------------------------------------------------------ events

    def events(self) -> EventStream[Event]:
        """An async iterator over every event (including TaskFailed and unknown ones).

        Registered now, so it sees every event from this call on; ends after Completed,
        raises the task's error if the task fails. Any number may run at once.
        """
        return self._subscribe((Event,))

    def results(self) -> EventStream[ResultChanged]:
        """An async iterator over intermediate results (ResultChanged events only;
        needs ``enable_intermediate_result=True``). Ends at Completed."""
        return self._subscribe((ResultChanged,))

    def _subscribe(self, kinds: tuple[type[E], ...]) -> EventStream[E]:
        return self._hub.subscribe(kinds, self.event_queue_size)


_S = TypeVar("_S", bound=Session)


async def _up_to(
    chunks: AsyncGenerator[bytes, None], limit: int, cut: list[bool]
) -> AsyncGenerator[bytes, None]:
    """``chunks`` until ``limit`` bytes have come (the last one cut to fit); then ends,
    appending to ``cut`` if there was more."""
    async with contextlib.aclosing(chunks) as source:
        async for chunk in source:
            if len(chunk) > limit:
                if limit:
                    yield chunk[:limit]
                cut.append(True)
                return
            limit -= len(chunk)
            yield chunk


class Transcriber(Session):
    """Real-time transcription (``SpeechTranscriber``): continuous audio, many sentences.

    Adds ``on_sentence_begin`` / ``on_sentence_end`` callbacks, :meth:`sentences` and
    :meth:`ctrl`. ``stop()`` returns a :class:`Result` whose ``sentences`` are every
    final sentence, ``text`` their texts joined by spaces, and ``duration`` the ms of
    audio sent. See :class:`Session` for the other arguments.

    ``keep_sentences``: the session keeps every final sentence for the result (``True``,
    the default; about 1 KB each), only the last *N* (a count), or none (``False``). For
    streams of hours, bound it and take sentences as they come from
    :meth:`sentences` or ``on_sentence_end``; the result's ``text`` and ``sentences``
    then cover only the kept ones.
    """

    namespace = TRANSCRIBER

    def __init__(
        self,
        appkey: str,
        token: TokenSource,
        *,
        on_sentence_begin: Handler[SentenceBegin] | None = None,
        on_sentence_end: Handler[SentenceEnd] | None = None,
        keep_sentences: int | bool = True,
        **kwargs: Any,
    ) -> None:
        if keep_sentences is True:
            limit: int | None = None
        elif keep_sentences is False:
            limit = 0
        elif isinstance(keep_sentences, int) and keep_sentences >= 0:
            limit = keep_sentences
        else:
            raise ValueError(
                f"keep_sentences must be True, False or a count >= 0, got {keep_sentences!r}"
            )
        super().__init__(appkey, token, **kwargs)
        self._keep_sentences = limit
        self._callbacks[SentenceBegin] = on_sentence_begin
        self._callbacks[SentenceEnd] = on_sentence_end

    def sentences(self) -> EventStream[SentenceEnd]:
        """An async iterator over final sentences (SentenceEnd), until Completed."""
        return self._subscribe((SentenceEnd,))

    async def ctrl(self, **params: Any) -> None:
        """Change parameters mid-task (``ControlTranscriber``), e.g.
        ``max_sentence_silence`` or ``vocabulary_id``. Only while STARTED."""
        await self._resume_done()
        error = self.error
        if error is not None and not isinstance(error, InvalidStateError):
            raise InvalidStateError(f"cannot send a control directive: {error}")
        self._send_text(self._proto.control(**params))

    def _build_result(self, router: EventRouter) -> Result:
        sentences = tuple(router.sentences)
        return Result(
            text=" ".join(s.text for s in sentences if s.text),
            duration=round(self.metrics.audio_ms_sent),
            task_id=self.task_id,
            sentences=sentences,
        )


class Recognizer(Session):
    """Sentence recognition (``SpeechRecognizer``): one utterance of at most 60 s.

    ``stop()`` returns a :class:`Result` with the recognised ``text`` and the gateway's
    ``duration``. A task takes at most 60 s of audio: a longer recording (bytes, a path,
    an array) or ``send_audio()`` chunk is refused with AudioFormatError before anything of
    it is sent; a live source is sent up to 60 s, then ``stream()`` raises
    AudioFormatError and ``stop()`` returns what those 60 s held. With
    ``enable_voice_detection=True`` the gateway may end the task by itself; ``stop()``
    then returns that result. See :class:`Session` for arguments.
    """

    namespace = RECOGNIZER
    _max_audio_ms = MAX_SPEECH_MS

    def _build_result(self, router: EventRouter) -> Result:
        done = router.completed
        assert done is not None
        duration = done.duration if done.duration is not None else self.metrics.audio_ms_sent
        return Result(text=done.text, duration=round(duration), task_id=self.task_id)
