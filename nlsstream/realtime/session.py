"""The asyncio client sessions: :class:`Transcriber` and :class:`Recognizer`.

One session is one stream of audio and events. Entering the ``async with`` block
connects (token in ``X-NLS-Token``), sends Start and waits for Started; leaving it stops
gracefully (Stop once, drain until Completed) or, if the block raised or was cancelled,
aborts: no task and no socket outlive the block.

The session is the facade users call: arguments (checked once, in
:class:`~nlsstream.realtime.options.SessionConfig`), ``async with``, :meth:`stream`,
:meth:`send_audio`, :meth:`stop`, iterators and callbacks. Beneath it:

* a :class:`~nlsstream.realtime.taskrun.TaskRun`: one connection and one task
  (:class:`~nlsstream.realtime.protocol.ClientTask`, the sans-I/O state machine);
* the :class:`~nlsstream.realtime.router.EventRouter`: the one path every event takes
  to iterators, callbacks, the result and the metrics;
* the :class:`~nlsstream.realtime.sending.AudioSender`: the one way out for audio,
  paced by the event loop's shared :class:`~nlsstream.realtime.pacing.Pacer`;
* a :class:`~nlsstream.realtime.resume.Resumer` (when resuming is on): the replay
  buffer, the timeline and the attempts; on a failure it cures, a new run takes over
  and the stream is handed to it.

Every wait is bounded (``connect_timeout``, ``start_timeout``, ``stop_timeout``, and the
WebSocket keepalive while streaming), and every failure ends as a typed
:class:`~nlsstream.errors.NlsError` that never contains the token.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any, ClassVar, TypeVar

from .. import audio
from ..auth import TokenSource, as_provider
from ..config import DEFAULT_URL, check_token
from ..errors import (
    AudioFormatError,
    InvalidStateError,
    NlsError,
)
from ..redaction import get_logger
from .connection import ProxySetting
from .events import EventHub, EventStream
from .lifecycle import Lifecycle
from .live import AudioQueue
from .options import DEFAULT_EVENT_QUEUE_SIZE, SessionConfig
from .pacing import Metrics, Pacer
from .protocol import (
    MAX_SPEECH_MS,
    RECOGNIZER,
    TRANSCRIBER,
    ClientTask,
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
from .resume import Reconnect
from .router import EventRouter
from .sending import AudioLimit

__all__ = ["Recognizer", "Result", "Session", "Transcriber"]

logger = get_logger("nlsstream.realtime.session")

E = TypeVar("E", bound=Event)
#: A callback: a plain function or a coroutine function (awaited before later events).
Handler = Callable[[E], object]
ErrorHandler = Callable[[NlsError], object]


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
        self.config = config = SessionConfig.create(
            self.namespace,
            type(self).__name__,
            reconnect=reconnect,
            keepalive=keepalive,
            standard={
                "enable_intermediate_result": enable_intermediate_result,
                "enable_punctuation_prediction": enable_punctuation_prediction,
                "enable_inverse_text_normalization": enable_inverse_text_normalization,
            },
            extra=extra,
            params=params,
            appkey=appkey,
            url=url,
            format=format,
            sample_rate=sample_rate,
            connect_timeout=connect_timeout,
            start_timeout=start_timeout,
            stop_timeout=stop_timeout,
            ping_interval=ping_interval,
            ping_timeout=ping_timeout,
            event_queue_size=event_queue_size,
            max_ahead_ms=max_ahead_ms,
            proxy=proxy,
        )
        token = check_token(token)
        self._callbacks: dict[type[Event], Callable[[Any], object] | None] = {
            Started: on_start,
            ResultChanged: on_result_changed,
            Completed: on_completed,
            Resumed: on_resume,
        }
        #: Counters of what was sent and how late (see :class:`~nlsstream.pacing.Metrics`).
        self.metrics = Metrics(sample_rate=sample_rate)
        self._hub = EventHub()  # iterators may subscribe before start()
        self._life = Lifecycle(
            config,
            self.namespace,
            ClientTask(self.namespace, appkey, config.params, task_id=task_id),
            as_provider(token),
            self.metrics,
            self._hub,
            callbacks=self._callbacks,
            on_error=on_error,
            on_close=on_close,
            pacer=pacer,
            keep_sentences=self._keep_sentences,
            max_audio_ms=self._max_audio_ms,
        )
        self._result: Result | None = None

    # ------------------------------------------------------------------ properties

    @property
    def url(self) -> str:
        """The gateway's URL."""
        return self.config.url

    @property
    def format(self) -> str:
        """The audio format declared to the gateway."""
        return self.config.format

    @property
    def sample_rate(self) -> int:
        """The session's sample rate (8000 or 16000)."""
        return self.config.sample_rate

    @property
    def connect_timeout(self) -> float:
        """Seconds to get a token and open the connection."""
        return self.config.connect_timeout

    @property
    def start_timeout(self) -> float:
        """Seconds to wait for Started."""
        return self.config.start_timeout

    @property
    def stop_timeout(self) -> float:
        """Seconds ``stop()`` waits while the gateway sends nothing."""
        return self.config.stop_timeout

    @property
    def task_id(self) -> str:
        """The task's 32-hex id (sent in every directive, echoed in every event)."""
        return self._life.task_id

    @property
    def state(self) -> State:
        """Where the task is: IDLE, STARTING, STARTED, STOPPING, COMPLETED or FAILED."""
        return self._life.state

    @property
    def result(self) -> Result | None:
        """The result once the task completed, else ``None``."""
        router = self._life.router
        if self._result is None and router is not None and router.ended and router.error is None:
            self._result = self._build_result(router)
        return self._result

    @property
    def error(self) -> NlsError | None:
        """Why the task failed, once it has."""
        router = self._life.router
        return router.error if router is not None else None

    def __repr__(self) -> str:
        run = self._life.run
        shown = run.shown_url if run is not None else self.url
        name, state = type(self).__name__, self.state.value
        return f"<{name} task_id={self.task_id} state={state} url={shown}>"

    @property
    def _ended(self) -> bool:
        return self._life.ended

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
                await self._life.close()
            else:
                await self.abort()
            return
        try:
            if not self._ended or (self.error is not None and not self._life.error_seen()):
                await self.stop()
        except BaseException:
            await self.abort()
            raise
        await self._life.close()

    async def start(self) -> None:
        """Connect, send Start and wait for Started (what entering ``async with`` does).

        Raises AuthenticationError, GatewayConnectionError, StartTimeoutError,
        TaskFailedError; the connection is closed again on any failure.
        """
        await self._life.start()

    async def stop(self, timeout: float | None = None) -> Result:
        """Send Stop (once), wait for Completed and return the :class:`Result`.

        The wait measures progress, not the length of the audio: the gateway may still be
        working through a backlog (audio sent faster than real time), and as long as
        events keep coming ``stop()`` keeps waiting. It raises
        :class:`~nlsstream.errors.StopTimeoutError` when nothing has arrived for
        ``stop_timeout`` s, or when ``timeout`` (an overall bound for this call, if
        given) has passed. If the session was resuming without getting anywhere, it
        raises the error that made it resume instead, with the timeout as its context.

        If the gateway already ended the task (server VAD), or ``stop()`` ran before,
        returns the same result. Raises the task's error if it failed, and
        InvalidStateError before the session started. A ``stream()`` still running is
        interrupted with InvalidStateError.
        """
        await self._life.stop(timeout)
        result = self.result
        assert result is not None
        return result

    async def abort(self) -> None:
        """Close the connection now, without Stop; pending iterators and ``stream()``
        calls raise InvalidStateError. Safe to call at any time, any number of times."""
        await self._life.abort()

    @abc.abstractmethod
    def _build_result(self, router: EventRouter) -> Result:
        """The protocol's Result from what the task delivered."""

    # ------------------------------------------------------------------ sending

    @property
    def _limit(self) -> AudioLimit | None:
        if self._max_audio_ms is None or self.format != "pcm":
            return None
        return AudioLimit(type(self).__name__, self._max_audio_ms, self.sample_rate, self.metrics)

    async def send_audio(self, data: bytes | bytearray | memoryview) -> None:
        """Send ``data`` now, unpaced, as one binary frame (PCM16LE mono at the session's
        rate when ``format="pcm"``).

        Raises InvalidStateError before Started or after Stop (audio is never dropped
        silently), AudioFormatError for an odd number of PCM bytes, and the task's error
        if it failed. While the session resumes after a failure, waits until it has.
        """
        await self._life.resume_done()
        self._life.check_audio()
        if self.format == "pcm" and len(data) % 2:
            raise AudioFormatError(f"PCM16 audio must be an even number of bytes, got {len(data)}")
        limit = self._limit
        if limit is not None:
            limit.check(len(data))
        if len(data):
            assert self._life.writer is not None
            await self._life.writer.send(bytes(data))

    async def stream(
        self,
        source: audio.AudioSource | AudioQueue,
        pace: float | None = 1.0,
        *,
        sample_rate: float | None = None,
    ) -> None:
        """Send ``source`` (anything :func:`nlsstream.audio.pcm_chunks` accepts, or an
        :class:`~nlsstream.AudioQueue` that other threads fill) as 640-byte PCM frames,
        paced at ``pace`` times real time; ``pace=None`` or ``0`` sends as fast as the
        socket takes it. Returns once the last frame is written (for a queue: once it is
        closed and sent); does not send Stop. The last frame may be shorter and is never
        dropped.

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
        await self._life.resume_done()
        self._life.check_audio()
        writer = self._life.writer
        assert writer is not None
        if writer.streaming:
            raise InvalidStateError("stream() is already running on this session")
        await writer.stream_source(
            source, pace, sample_rate, keepalive=self.config.keepalive, limit=self._limit
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
        return self._hub.subscribe(kinds, self.config.event_queue_size)


_S = TypeVar("_S", bound=Session)


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
        self._keep_sentences = limit
        super().__init__(appkey, token, **kwargs)
        self._callbacks[SentenceBegin] = on_sentence_begin
        self._callbacks[SentenceEnd] = on_sentence_end

    def sentences(self) -> EventStream[SentenceEnd]:
        """An async iterator over final sentences (SentenceEnd), until Completed."""
        return self._subscribe((SentenceEnd,))

    async def ctrl(self, **params: Any) -> None:
        """Change parameters mid-task (``ControlTranscriber``), e.g.
        ``max_sentence_silence`` or ``vocabulary_id``. Only while STARTED."""
        await self._life.resume_done()
        error = self.error
        if error is not None and not isinstance(error, InvalidStateError):
            raise InvalidStateError(f"cannot send a control directive: {error}")
        self._life.send_text(self._life.task.control(**params))

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
