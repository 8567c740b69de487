"""The asyncio client sessions: :class:`Transcriber` and :class:`Recognizer`.

One session is one task on one WebSocket connection (reference §1.4). Entering the
``async with`` block connects (token in ``X-NLS-Token``), sends Start and waits for
Started; leaving it stops gracefully (Stop once, drain until Completed) or, if the block
raised or was cancelled, aborts: no task and no socket outlive the block.

Inside, one reader task parses every server event with the sans-I/O
:class:`~nlsstream.protocol.ClientProtocol`, hands it to every iterator's bounded queue
(:mod:`nlsstream.events`) and then to the user's callback. Audio goes out through
:meth:`send_audio` (now, unpaced) or :meth:`stream` (any source, cut into 640-byte frames,
paced by the event loop's shared :class:`~nlsstream.pacing.Pacer`).

Every wait is bounded (``connect_timeout``, ``start_timeout``, ``stop_timeout``, and the
WebSocket keepalive while streaming), and every failure ends as a typed
:class:`~nlsstream.errors.NlsError` that never contains the token.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import functools
import inspect
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, Literal, TypeVar, cast

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI
from websockets.frames import Frame, Opcode
from websockets.proxy import get_proxy
from websockets.uri import parse_uri

from . import audio
from .auth import TokenProvider, TokenSource, as_provider
from .config import DEFAULT_URL
from .errors import (
    AudioFormatError,
    AuthenticationError,
    CallbackError,
    GatewayConnectionError,
    InvalidStateError,
    NlsError,
    ProtocolError,
    StartTimeoutError,
    StopTimeoutError,
    redact,
    task_error,
)
from .events import EventHub, EventStream
from .pacing import Metrics, PacedStream, Pacer, client_frames, ws_writable
from .protocol import (
    RECOGNIZER,
    SAMPLE_RATES,
    TRANSCRIBER,
    ClientProtocol,
    Completed,
    Event,
    Namespace,
    ResultChanged,
    SentenceBegin,
    SentenceEnd,
    Started,
    State,
    TaskFailed,
)

__all__ = ["Recognizer", "Result", "Session", "Transcriber"]

logger = logging.getLogger("nlsstream.session")

E = TypeVar("E", bound=Event)
#: A callback: a plain function or a coroutine function (awaited by the reader).
Handler = Callable[[E], object]
ErrorHandler = Callable[[NlsError], object]

DEFAULT_EVENT_QUEUE_SIZE = 1024


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
            token once, before connecting.
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
        ping_interval, ping_timeout: WebSocket keepalive (``None`` disables it).
        event_queue_size: how many events each iterator may fall behind before it fails
            with :class:`~nlsstream.errors.EventOverflowError`.
        task_id: a 32-hex task id (default: a fresh one).
        pacer: the :class:`~nlsstream.pacing.Pacer` for :meth:`stream` (default: the
            running loop's shared one).
        max_ahead_ms: how much audio :meth:`stream` buffers ahead of the pacer.
        proxy: ``True`` (default) uses the system's proxy settings for the gateway's
            address (``wss_proxy``/``https_proxy``/... environment variables, ``no_proxy``),
            read once per address per process; a proxy URL uses that proxy; ``None``
            connects directly.
        params: extra Start parameters (``max_sentence_silence``, ``enable_words``,
            ``vocabulary_id``, ...), sent as given; ``None`` values are left out.

    Callbacks run in the reader, in event order; a coroutine callback is awaited, so a
    slow one delays only this session. A callback that raises is reported to
    ``on_error`` as :class:`~nlsstream.errors.CallbackError` and the session goes on.
    """

    namespace: ClassVar[Namespace]

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
        proxy: str | Literal[True] | None = True,
        **params: Any,
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
        self._appkey = appkey
        self._provider: TokenProvider = as_provider(token)
        self._token: str | None = token if isinstance(token, str) else None
        self.url = url
        self.format = format
        self.sample_rate = sample_rate
        self._proto = ClientProtocol(
            self.namespace,
            appkey,
            {
                "format": format,
                "sample_rate": sample_rate,
                "enable_intermediate_result": enable_intermediate_result,
                "enable_punctuation_prediction": enable_punctuation_prediction,
                "enable_inverse_text_normalization": enable_inverse_text_normalization,
                **params,
            },
            task_id=task_id,
        )
        self._callbacks: dict[type[Event], Callable[[Any], object] | None] = {
            Started: on_start,
            ResultChanged: on_result_changed,
            Completed: on_completed,
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
        self.metrics = Metrics(sample_rate=sample_rate)

        self._hub = EventHub()
        self._conn: ClientConnection | None = None
        self._reader: asyncio.Task[None] | None = None
        self._started: asyncio.Future[None] | None = None
        self._ended: asyncio.Future[None] | None = None
        self._opened = False
        self._finished = False
        self._error: NlsError | None = None
        self._error_delivered = False
        self._result: Result | None = None
        self._sentences: list[SentenceEnd] = []
        self._completed: Completed | None = None
        self._paced: PacedStream | None = None
        self._streaming = False
        self._close_called = False
        self._first_audio_at: float | None = None
        self._transport_write: Callable[[bytes], object] = _not_connected
        self._stop_sent_at: float | None = None
        # Incoming messages (see _NlsConnection): each message websockets queues for the
        # reader has one entry here, in order, saying what the reader is to do with it.
        self._inbox: deque[_InboxEntry] = deque()
        self._reader_busy = False  # the reader is handling a message (maybe awaiting)
        self._fast_events = True  # off for good once a message needs the reader's parse

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
        return self._result

    @property
    def error(self) -> NlsError | None:
        """Why the task failed, once it has."""
        return self._error

    def __repr__(self) -> str:
        return (
            f"<{type(self).__name__} task_id={self.task_id} state={self.state.value} "
            f"url={self._display_url()}>"
        )

    def _display_url(self) -> str:
        return redact(self.url, self._token)

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
            if self._finished and not issubclass(exc_type, asyncio.CancelledError):
                # The task is over anyway (e.g. the block re-raised its error): let the
                # reader finish its polite close instead of cutting it.
                await self._close()
            else:
                await self.abort()
            return
        try:
            if not self._finished or (self._error is not None and not self._delivered()):
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
        loop = asyncio.get_running_loop()
        if self._pacer is None:
            self._pacer = Pacer.for_loop(loop)
        self._started = loop.create_future()
        self._ended = loop.create_future()
        try:
            await self._connect()
            assert self._conn is not None
            self._reader = loop.create_task(
                self._read_loop(self._conn), name=f"nlsstream-reader-{self.task_id}"
            )
            await self._send_text(self._proto.start())
            try:
                await asyncio.wait_for(asyncio.shield(self._started), self.start_timeout)
            except asyncio.TimeoutError:
                error = StartTimeoutError(
                    f"gateway at {self._display_url()} did not confirm the start of task "
                    f"{self.task_id} within {self.start_timeout:g} s"
                )
                await self._fail(error)
                raise error from None
            if self._error is not None:
                self._error_delivered = True
                raise self._error
        except BaseException:
            await self.abort()
            raise

    async def _connect(self) -> None:
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
        url = self._display_url()
        logger.debug("connecting to %s for task %s", url, self.task_id)
        try:
            proxy = self.proxy
            if proxy is True:
                uri = parse_uri(self.url)
                proxy = _system_proxy(uri.secure, uri.host, uri.port)
            self._conn = await connect(
                self.url,
                proxy=proxy,
                create_connection=cast(Any, functools.partial(_NlsConnection, session=self)),
                additional_headers={"X-NLS-Token": token},
                compression=None,
                origin=None,
                open_timeout=max(0.001, deadline - loop.time()),
                ping_interval=self.ping_interval,
                ping_timeout=self.ping_timeout,
                close_timeout=self.stop_timeout,
            )
        except InvalidStatus as exc:
            status = exc.response.status_code
            body = redact(exc.response.body.decode("utf-8", "replace").strip(), token)
            detail = f"HTTP {status}" + (f": {body}" if body else "")
            if status in (401, 403):
                self._invalidate_token()
                raise AuthenticationError(
                    f"gateway at {url} rejected the token ({detail})",
                    status_text=body,
                    http_status=status,
                ) from None
            raise GatewayConnectionError(
                f"gateway at {url} refused the WebSocket upgrade ({detail})"
            ) from None
        except InvalidURI as exc:
            raise ValueError(f"invalid gateway url {url!r}: {exc}") from None
        except (asyncio.TimeoutError, TimeoutError):
            raise GatewayConnectionError(
                f"timed out after {timeout:g} s connecting to {url}"
            ) from None
        except (OSError, InvalidHandshake) as exc:
            raise GatewayConnectionError(
                f"cannot connect to {url}: {redact(str(exc), token)}"
            ) from exc
        self._transport_write = self._conn.transport.write  # bound once, not per frame
        logger.debug("connected to %s", url)

    def _invalidate_token(self) -> None:
        invalidate = getattr(self._provider, "invalidate", None)
        if callable(invalidate):
            try:
                invalidate(self._token)
            except Exception:
                logger.exception("token provider's invalidate() failed")

    async def stop(self, timeout: float | None = None) -> Result:
        """Send Stop (once), wait for Completed and return the :class:`Result`.

        If the gateway already ended the task (server VAD), or ``stop()`` ran before,
        returns the same result. Raises the task's error if it failed,
        :class:`~nlsstream.errors.StopTimeoutError` if Completed does not arrive within
        ``timeout`` (default ``stop_timeout``), and InvalidStateError before the session
        started. A ``stream()`` still running is interrupted with InvalidStateError.
        """
        if not self._opened or self._ended is None:
            raise InvalidStateError("stop() called before the session was started")
        if not self._finished and self.state is State.STARTED:
            if self._paced is not None:
                self._paced.abort(
                    InvalidStateError(
                        "stop() was called while stream() was still sending: "
                        f"{self._paced.buffered_bytes} buffered bytes were not sent"
                    )
                )
            text = self._proto.stop()
            self._stop_sent_at = asyncio.get_running_loop().time()
            with contextlib.suppress(GatewayConnectionError):
                await self._send_text(text)  # on failure the task's error is raised below
        if not self._finished:
            wait = self.stop_timeout if timeout is None else timeout
            try:
                await asyncio.wait_for(asyncio.shield(self._ended), wait)
            except asyncio.TimeoutError:
                if not self._finished:
                    error = StopTimeoutError(
                        f"gateway did not complete task {self.task_id} within {wait:g} s after Stop"
                    )
                    await self._fail(error)
        return self._outcome()

    def _outcome(self) -> Result:
        if self._error is not None:
            self._error_delivered = True
            raise self._error
        assert self._result is not None
        return self._result

    def _delivered(self) -> bool:
        return self._error_delivered or self._hub.error_delivered

    async def abort(self) -> None:
        """Close the connection now, without Stop; pending iterators and ``stream()``
        calls raise InvalidStateError. Safe to call at any time, any number of times."""
        if not self._finished and self._opened:
            self._finish(InvalidStateError(f"session for task {self.task_id} was aborted"))
            self._error_delivered = True  # the caller chose to abort; nothing to re-raise
        conn, reader = self._conn, self._reader
        if conn is not None:
            conn.transport.abort()
        if reader is not None and not reader.done():
            reader.cancel()
        try:
            if reader is not None:
                await asyncio.wait([reader], timeout=self.stop_timeout)
                if reader.done():
                    self._drop_inbox()  # a cancelled reader did not get to do it
            if conn is not None:
                await asyncio.wait_for(asyncio.shield(conn.wait_closed()), self.stop_timeout)
        except asyncio.TimeoutError:  # pragma: no cover - abort() closes at once
            logger.warning("task %s: connection did not close after abort", self.task_id)
        finally:
            if conn is not None:
                await self._call_on_close()

    async def _close(self) -> None:
        """After the task ended: let the reader finish its closing handshake."""
        reader = self._reader
        if reader is not None and not reader.done():
            done, _ = await asyncio.wait([reader], timeout=self.stop_timeout)
            if not done:
                await self.abort()
                return
        await self._call_on_close()

    async def _call_on_close(self) -> None:
        if self._close_called or not self._opened:
            return
        self._close_called = True
        if self._on_close is not None:
            try:
                result = self._on_close()
                if inspect.isawaitable(result):
                    await result
            except Exception as exc:
                await self._report(CallbackError(f"on_close callback raised {exc!r}"), exc)

    # ------------------------------------------------------------------ sending

    def _check_audio(self) -> None:
        if self._error is not None and not isinstance(self._error, InvalidStateError):
            self._error_delivered = True
            raise self._error
        self._proto.audio()

    async def send_audio(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` now, unpaced, as one binary frame (PCM16LE mono at the session's
        rate when ``format="pcm"``).

        Raises InvalidStateError before Started or after Stop (audio is never dropped
        silently), AudioFormatError for an odd number of PCM bytes, and the task's error
        if it failed.
        """
        self._check_audio()
        if self.format == "pcm" and len(data) % 2:
            raise AudioFormatError(f"PCM16 audio must be an even number of bytes, got {len(data)}")
        if not len(data):
            return
        await self._send_audio_now(bytes(data))

    async def _send_audio_now(self, data: bytes) -> None:
        conn = self._conn
        assert conn is not None
        try:
            await conn.send(data)
        except ConnectionClosed as exc:
            raise self._lost_error(exc) from None
        self._count_audio(len(data))

    def _count_audio(self, nbytes: int) -> None:
        if self._first_audio_at is None:
            self._first_audio_at = asyncio.get_running_loop().time()
        self.metrics.record_audio(nbytes)

    async def stream(self, source: audio.AudioSource, pace: float | None = 1.0) -> None:
        """Send ``source`` (anything :func:`nlsstream.audio.pcm_chunks` accepts) as
        640-byte PCM frames, paced at ``pace`` times real time; ``pace=None`` sends as
        fast as the socket takes it. Returns once the last frame is written; does not
        send Stop. The last frame may be shorter and is never dropped.

        Raises AudioFormatError for audio that cannot be converted (before anything is
        sent), InvalidStateError if the task is not accepting audio or ends first (e.g.
        the gateway's VAD completed it, or ``stop()`` was called meanwhile), and the
        task's error if it fails meanwhile.
        """
        if pace is not None and not pace > 0:
            raise ValueError(f"pace must be positive or None, got {pace!r}")
        if self.format != "pcm":
            raise AudioFormatError(
                f"stream() sends PCM but the session format is {self.format!r}; "
                "use send_audio() for encoded audio"
            )
        self._check_audio()
        if self._streaming:
            raise InvalidStateError("stream() is already running on this session")
        self._streaming = True
        try:
            async with contextlib.aclosing(audio.pcm_chunks(source, self.sample_rate)) as chunks:
                if pace is None:
                    framer = audio.Framer(audio.FRAME_BYTES)
                    async for chunk in chunks:
                        for frame in framer.push(chunk):
                            await self._send_frame_unpaced(frame)
                        # send() only yields when the socket is backed up: let the
                        # reader (and everyone else) run between chunks.
                        await asyncio.sleep(0)
                    tail = framer.flush()
                    if tail:
                        await self._send_frame_unpaced(tail)
                else:
                    await self._stream_paced(chunks, pace)
        finally:
            self._streaming = False

    async def _send_frame_unpaced(self, frame: bytes) -> None:
        self._check_audio()
        await self._send_audio_now(frame)

    async def _stream_paced(self, chunks: Any, pace: float) -> None:
        assert self._pacer is not None
        paced = self._pacer.open(
            self,
            2 * self.sample_rate * pace,
            self.metrics,
            max_ahead_bytes=self._max_ahead_bytes,
            frame_bytes=audio.FRAME_BYTES,
        )
        self._paced = paced
        try:
            # The task may have ended while the source was being opened; from now on
            # _finish() aborts the stream.
            self._check_audio()
            self._sync_audio_gate()
            async for chunk in chunks:
                await paced.put(chunk)
                if self._first_audio_at is None:
                    self._first_audio_at = paced.start_time
            await paced.finish()
        except BaseException as exc:
            paced.abort(exc)
            raise
        finally:
            self._paced = None

    # FrameSink, for the pacer.

    def _sync_audio_gate(self) -> None:
        """Hold the paced stream while the connection cannot take a frame (see
        nlsstream.pacing.ws_writable); called whenever that may have changed:
        flow control, anything websockets writes (a close frame), the connection lost."""
        paced = self._paced
        if paced is not None:
            conn = self._conn
            paced.held = conn is None or not ws_writable(conn)

    def frame_writer(self) -> Callable[[bytes], object]:
        # compression=None: no extension can be negotiated (RFC 6455 §9.1), so frames
        # made by client_frames() go straight to the transport.
        return self._transport_write

    def encode_frames(self, pcm: bytes, frame_bytes: int) -> list[bytes]:
        return client_frames(pcm, frame_bytes)

    async def _send_text(self, text: str) -> None:
        conn = self._conn
        assert conn is not None
        try:
            await conn.send(text)
        except ConnectionClosed as exc:
            error = self._lost_error(exc)
            await self._fail(error)
            raise error from None

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
        stream = self._hub.subscribe(kinds, self.event_queue_size)
        return stream

    async def _read_loop(self, conn: ClientConnection) -> None:
        error: NlsError | None = None
        try:
            async for message in conn:
                self._reader_busy = True
                entry = self._inbox.popleft() if self._inbox else _UNPARSED
                if entry is _UNPARSED:
                    if isinstance(message, bytes):
                        raise ProtocolError(
                            f"gateway sent a binary frame ({len(message)} bytes) on an ASR task"
                        )
                    entry = self._proto.receive(message)
                if isinstance(entry, Event):
                    await self._dispatch(entry)
                elif isinstance(entry, BaseException):
                    raise entry
                elif isinstance(entry, list):  # callbacks of an event _on_frame() delivered
                    for awaitable in entry:
                        await awaitable
                if self._finished:
                    break
                self._reader_busy = False
            else:
                if not self._finished:
                    error = GatewayConnectionError(
                        f"gateway at {self._display_url()} closed the connection before task "
                        f"{self.task_id} ended (code {conn.close_code}, "
                        f"reason {conn.close_reason!r})"
                    )
        except ProtocolError as exc:
            error = ProtocolError(f"task {self.task_id}: {exc}; connection aborted")
            error.__cause__ = exc
            conn.transport.abort()
        except ConnectionClosed as exc:
            if not self._finished:
                error = self._lost_error(exc)
        except Exception as exc:  # a bug here must not leave the session hanging
            logger.exception("task %s: reader failed", self.task_id)
            error = NlsError(f"task {self.task_id}: internal error in the session reader: {exc!r}")
            conn.transport.abort()
        if error is not None:
            self._proto.fail()
            await self._fail(error)
        self._drop_inbox()
        # The task is over: close politely (code 1000, reference §3.1), bounded by
        # close_timeout, then tell the user.
        await conn.close()
        await self._call_on_close()

    def _drop_inbox(self) -> None:
        """The reader is done: messages that arrive from now on are left unread, and
        callbacks still waiting to be awaited are closed (never left to the GC)."""
        self._reader_busy = True
        for entry in self._inbox:
            if isinstance(entry, list):
                for awaitable in entry:
                    if inspect.iscoroutine(awaitable):
                        awaitable.close()
        self._inbox.clear()

    # Events on the connection's data path. At 1,000 sessions the gateway sends 2,000
    # events a second; taking each one through websockets' message queue and waking the
    # reader task for it cost more than parsing it. So every message is parsed the
    # moment it arrives (in arrival order, as the protocol state machine needs), and the
    # frequent results (SentenceBegin/End, ResultChanged) are delivered right there when
    # nothing is ahead of them: not while the reader is busy with an earlier message
    # (e.g. awaiting a coroutine callback) nor while messages wait for it. The reader
    # still handles everything else (Started, Completed, TaskFailed, protocol errors,
    # the close) and awaits whatever a callback returned before the next event.

    def _on_frame(self, frame: Frame) -> bool:
        """The first frame of an incoming message: True if it was handled here, False
        to let websockets queue the message for the reader (with its inbox entry)."""
        if not self._fast_events or self._finished:
            self._inbox.append(_UNPARSED)
            return False
        if frame.opcode is not Opcode.TEXT or not frame.fin:
            # Binary (a protocol error) or fragmented: the reader reads and parses it,
            # and every later message too, so that they stay in order.
            self._fast_events = False
            self._inbox.append(_UNPARSED)
            return False
        try:
            event = self._proto.receive(str(frame.data, "utf-8"))
        except UnicodeDecodeError:
            self._fast_events = False
            self._inbox.append(_UNPARSED)
            return False
        except ProtocolError as exc:
            self._inbox.append(exc)
            return False
        if self._inbox or self._reader_busy or type(event) not in _FAST_EVENTS:
            self._inbox.append(event)
            return False
        pending = self._deliver(event)
        if pending:
            self._inbox.append(pending)  # the reader awaits them before any later event
            return False
        return True

    def _deliver(self, event: Event) -> list[Awaitable[object]]:
        """What _dispatch() does with a result event, synchronously; returns what is
        left to await (a coroutine callback, or reporting a failed callback)."""
        if (
            self.metrics.time_to_first_partial_ms is None
            and self._first_audio_at
            and isinstance(event, (ResultChanged, SentenceEnd))
        ):
            now = asyncio.get_running_loop().time()
            self.metrics.time_to_first_partial_ms = (now - self._first_audio_at) * 1e3
        if isinstance(event, SentenceEnd):
            self._sentences.append(event)
        self._hub.publish(event)
        callback = self._callbacks.get(type(event))
        if callback is None:
            return []
        try:
            result = callback(event)
        except Exception as exc:
            return [self._report(_callback_error(callback, exc), exc)]
        if inspect.isawaitable(result):
            return [self._await_callback(callback, result)]
        return []

    async def _await_callback(
        self, callback: Callable[[Any], object], result: Awaitable[object]
    ) -> None:
        try:
            await result
        except Exception as exc:
            await self._report(_callback_error(callback, exc), exc)

    async def _dispatch(self, event: Event) -> None:
        loop = asyncio.get_running_loop()
        is_result = isinstance(event, (ResultChanged, SentenceEnd)) or (
            isinstance(event, Completed) and bool(event.text)
        )
        if is_result and self.metrics.time_to_first_partial_ms is None and self._first_audio_at:
            self.metrics.time_to_first_partial_ms = (loop.time() - self._first_audio_at) * 1e3
        if isinstance(event, SentenceEnd):
            self._sentences.append(event)
        elif isinstance(event, Completed):
            self._completed = event
            if self._stop_sent_at is not None:
                self.metrics.stop_to_completed_ms = (loop.time() - self._stop_sent_at) * 1e3
        self._hub.publish(event)
        if isinstance(event, TaskFailed):
            error = task_error(event.status, redact(event.status_text, self._token), self.task_id)
            if isinstance(error, AuthenticationError):
                self._invalidate_token()
            await self._fail(error)
            return
        callback = self._callbacks.get(type(event))
        if callback is not None:
            await self._run_callback(callback, event)
        if isinstance(event, Started):
            assert self._started is not None
            if not self._started.done():
                self._started.set_result(None)
        elif isinstance(event, Completed):
            self._finish(None)

    async def _run_callback(self, callback: Callable[[Any], object], arg: object) -> None:
        try:
            result = callback(arg)
            if inspect.isawaitable(result):
                await result
        except Exception as exc:
            await self._report(_callback_error(callback, exc), exc)

    async def _report(self, error: NlsError, cause: BaseException | None = None) -> None:
        if cause is not None:
            error.__cause__ = cause
        if self._on_error is None:
            if isinstance(error, CallbackError):
                logger.error("task %s: %s", self.task_id, error, exc_info=cause)
            return
        try:
            result = self._on_error(error)
            if inspect.isawaitable(result):
                await result
        except Exception:
            logger.exception("task %s: on_error callback raised", self.task_id)

    async def _fail(self, error: NlsError) -> None:
        """End the task with ``error``: wake every waiter, then tell ``on_error``."""
        if self._finished:
            return
        self._finish(error)
        if isinstance(error, (StartTimeoutError, StopTimeoutError)) and self._conn is not None:
            # The gateway is unresponsive: don't wait for a closing handshake either.
            self._conn.transport.abort()
        await self._report(error)

    def _finish(self, error: NlsError | None) -> None:
        """The one place the task ends: state, result, iterators, stream, waiters."""
        if self._finished:
            return
        self._finished = True
        self._error = error
        if error is not None:
            self._proto.fail()
        else:
            self._result = self._build_result()
        self._hub.close(error)
        if self._paced is not None:
            self._paced.abort(
                error
                if error is not None and not isinstance(error, InvalidStateError)
                else InvalidStateError(
                    f"task {self.task_id} ended ({self.state.value}) before all audio was sent: "
                    f"{self._paced.buffered_bytes} buffered bytes were not sent"
                )
            )
        for fut in (self._started, self._ended):
            if fut is not None and not fut.done():
                fut.set_result(None)

    @abc.abstractmethod
    def _build_result(self) -> Result:
        """The protocol's Result from what the task delivered."""

    def _lost_error(self, exc: ConnectionClosed) -> GatewayConnectionError:
        code = exc.rcvd.code if exc.rcvd is not None else None
        what = f"close code {code}" if code is not None else "no close frame"
        return GatewayConnectionError(
            f"connection to {self._display_url()} lost during task {self.task_id} "
            f"({self.state.value}; {what})"
        )


def _not_connected(data: bytes) -> None:
    raise InvalidStateError("the session is not connected")


def _callback_error(callback: Callable[[Any], object], exc: Exception) -> CallbackError:
    name = getattr(callback, "__name__", repr(callback))
    return CallbackError(f"callback {name} raised {type(exc).__name__}: {exc}")


class _Unparsed:
    """Inbox entry: the reader reads and parses this message itself."""


_UNPARSED = _Unparsed()
#: An inbox entry: the parsed event, the error parsing it raised, what is left to await
#: of an event _on_frame() delivered, or _UNPARSED.
_InboxEntry = Event | ProtocolError | list[Awaitable[object]] | _Unparsed
#: The events _on_frame() may deliver itself: results, which never end the task.
_FAST_EVENTS = frozenset({SentenceBegin, SentenceEnd, ResultChanged})


@functools.lru_cache(maxsize=64)
def _system_proxy(secure: bool, host: str, port: int) -> str | None:
    """websockets' own proxy lookup, once per gateway address: it scans the whole
    environment (and OS settings) on every call, which thousands of connects need not
    repeat."""
    return get_proxy(parse_uri(f"{'wss' if secure else 'ws'}://{host}:{port}/"))


class _NlsConnection(ClientConnection):
    """A client connection that offers each incoming message to its session first, and
    tells it when the connection stops or starts taking audio."""

    def __init__(self, *args: Any, session: Session, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._session = session

    def process_event(self, event: Any) -> None:
        if (
            isinstance(event, Frame)
            and (event.opcode is Opcode.TEXT or event.opcode is Opcode.BINARY)
            and self._session._on_frame(event)
        ):
            return
        super().process_event(event)

    # Every change of what ws_writable() checks passes through one of these: websockets
    # writes every frame it makes (a close frame included) with send_data().

    def send_data(self) -> None:
        super().send_data()
        self._session._sync_audio_gate()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._session._sync_audio_gate()

    def resume_writing(self) -> None:
        super().resume_writing()
        self._session._sync_audio_gate()

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self._session._sync_audio_gate()


_S = TypeVar("_S", bound=Session)


class Transcriber(Session):
    """Real-time transcription (``SpeechTranscriber``): continuous audio, many sentences.

    Adds ``on_sentence_begin`` / ``on_sentence_end`` callbacks, :meth:`sentences` and
    :meth:`ctrl`. ``stop()`` returns a :class:`Result` whose ``sentences`` are every
    final sentence, ``text`` their texts joined by spaces, and ``duration`` the ms of
    audio sent. See :class:`Session` for the other arguments.
    """

    namespace = TRANSCRIBER

    def __init__(
        self,
        appkey: str,
        token: TokenSource,
        *,
        on_sentence_begin: Handler[SentenceBegin] | None = None,
        on_sentence_end: Handler[SentenceEnd] | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(appkey, token, **kwargs)
        self._callbacks[SentenceBegin] = on_sentence_begin
        self._callbacks[SentenceEnd] = on_sentence_end

    def sentences(self) -> EventStream[SentenceEnd]:
        """An async iterator over final sentences (SentenceEnd), until Completed."""
        return self._subscribe((SentenceEnd,))

    async def ctrl(self, **params: Any) -> None:
        """Change parameters mid-task (``ControlTranscriber``), e.g.
        ``max_sentence_silence`` or ``vocabulary_id``. Only while STARTED."""
        if self._error is not None and not isinstance(self._error, InvalidStateError):
            raise InvalidStateError(f"cannot send a control directive: {self._error}")
        await self._send_text(self._proto.control(**params))

    def _build_result(self) -> Result:
        sentences = tuple(self._sentences)
        return Result(
            text=" ".join(s.text for s in sentences if s.text),
            duration=round(self.metrics.audio_ms_sent),
            task_id=self.task_id,
            sentences=sentences,
        )


class Recognizer(Session):
    """Sentence recognition (``SpeechRecognizer``): one utterance of at most 60 s.

    ``stop()`` returns a :class:`Result` with the recognised ``text`` and the gateway's
    ``duration``. With ``enable_voice_detection=True`` the gateway may end the task by
    itself; ``stop()`` then returns that result. See :class:`Session` for arguments.
    """

    namespace = RECOGNIZER

    def _build_result(self) -> Result:
        done = self._completed
        assert done is not None
        duration = done.duration if done.duration is not None else self.metrics.audio_ms_sent
        return Result(text=done.text, duration=round(duration), task_id=self.task_id)
