"""The official Python SDK's ``nls`` module for the real-time recognisers, on nlsstream.

Put ``import nlsstream.compat.nls as nls`` in front of code written for ``import nls``
(alibabacloud-nls-python-sdk 1.0.2): :class:`NlsSpeechTranscriber` and
:class:`NlsSpeechRecognizer` take the same arguments, call the same callbacks with the
server's JSON text plus ``*callback_args`` in the same order (``on_completed`` /
``on_error`` before ``on_close``), and raise the same exception classes
(:mod:`~nlsstream.compat.nls.exception`); :func:`enableTrace` and
:func:`nls.token.getToken <nlsstream.compat.nls.token.getToken>` are there too.

Underneath, every session is an nlsstream session on the process's one event-loop
thread (:func:`nlsstream.sync.loop_thread`): no thread per session (the official SDK
runs two or three). So **callbacks run on that shared thread** and must return
quickly; a callback that blocks delays every session of the process. From a callback,
``ctrl()`` and ``shutdown()`` may be called (they are queued); ``start()``, ``stop()``
and ``send_audio()`` raise ``RuntimeError`` there.

Deliberate differences (README, "The drop-in `nls` module"): failures the official SDK
swallows (HTTP 403, a refused or lost connection, a gateway that stops answering pings)
reach ``on_error`` as a TaskFailed-shaped JSON message; ``start()``, ``stop()``,
``send_audio()`` and ``ctrl()`` return ``True`` on success and ``False`` where the
official SDK silently returns ``None``; ``send_audio()`` queues the audio and returns
(it is written on the loop thread, in order, before a later ``ctrl()`` or ``stop()``,
within about :data:`nlsstream.sync.POST_WINDOW`);
sample rates other than 8000/16000 and odd-length PCM are refused at once.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, ClassVar

from ..._version import __version__ as _nlsstream_version
from ...auth import AccessKeyTokenProvider, TokenSource
from ...config import DEFAULT_URL
from ...errors import (
    AuthenticationError,
    CallbackError,
    InvalidStateError,
    NlsError,
    StartTimeoutError,
    StopTimeoutError,
    TaskFailedError,
)
from ...realtime.protocol import (
    Completed,
    Event,
    ResultChanged,
    SentenceBegin,
    SentenceEnd,
    Started,
    State,
    build_task_failed,
    encode,
)
from ...realtime.session import Recognizer, Session, Transcriber
from ...redaction import get_logger
from ...sync import CALL_MARGIN, LoopThread, loop_thread
from . import exception, token
from .exception import (
    CompleteTimeoutException,
    ConnectionTimeout,
    ConnectionUnavailable,
    GetTokenFailed,
    InvalidParameter,
    NotStartException,
    StartTimeoutException,
    StopTimeoutException,
)

__all__ = [  # the official top level, plus its exception classes (nls.exception.*)
    "CompleteTimeoutException",
    "ConnectionTimeout",
    "ConnectionUnavailable",
    "GetTokenFailed",
    "InvalidParameter",
    "NlsSpeechRecognizer",
    "NlsSpeechTranscriber",
    "NotStartException",
    "StartTimeoutException",
    "StopTimeoutException",
    "__version__",
    "enableTrace",
    "exception",
    "token",
]

#: The official SDK version whose surface this module reproduces, and ours.
__version__ = f"1.0.2+nlsstream.{_nlsstream_version}"

logger = get_logger("nlsstream.compat.nls")

#: Formats the official SDK accepts in ``start(aformat=...)``.
FORMATS = ("pcm", "opus", "opu", "wav", "amr", "speex", "mp3", "aac")
#: Audio queued by ``send_audio()`` beyond which it waits for the connection.
MAX_QUEUED_BYTES = 1 << 20
#: How long ``send_audio()`` waits for room in the queue before giving up.
QUEUE_TIMEOUT = 60.0
#: The official SDK waits for the WebSocket pong without limit (``ping_timeout=None``);
#: a gateway that stops answering is given this long instead.
DEFAULT_PING_TIMEOUT = 20.0
#: Session keyword arguments that ``ex`` must not reach (they are not Start parameters).
_SESSION_OPTIONS = frozenset(inspect.signature(Transcriber.__init__).parameters) | frozenset(
    inspect.signature(Session.__init__).parameters
)
_START_PARAMS = (
    "format",
    "sample_rate",
    "enable_intermediate_result",
    "enable_punctuation_prediction",
    "enable_inverse_text_normalization",
)

_NLS_FORMAT = "%(asctime)s - %(levelname)s - %(message)s"


def enableTrace(traceable: bool, handler: logging.Handler | None = None) -> None:
    """Log what nlsstream does at DEBUG level to ``handler`` (default: stderr), as
    ``nls.enableTrace(True)`` does. Tokens never appear in these logs."""
    if not traceable:
        return
    handler = handler if handler is not None else logging.StreamHandler()
    handler.setFormatter(logging.Formatter(_NLS_FORMAT))
    root = logging.getLogger("nlsstream")
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)


def _error_message(error: NlsError, task_id: str) -> str:
    """The JSON text ``on_error`` receives: the gateway's TaskFailed (status and text,
    token redacted), or a TaskFailed-shaped message for a failure that is not one."""
    status: int | None = getattr(error, "status", None)
    if status is not None and isinstance(error, (TaskFailedError, AuthenticationError)):
        return encode(build_task_failed(task_id, status, error.status_text))
    if isinstance(error, AuthenticationError):
        status = 40000001  # HTTP 403 at the handshake: what the cloud calls ACCESS_DENIED
    else:
        status = 50000000 if error.retryable else 40000000
    text = f"nlsstream:{type(error).__name__}:{error}"
    return encode(build_task_failed(task_id, status, text))


class _Task:
    """One start()..stop() of a compat object: the nlsstream session, its audio queue,
    and what has been reported to the user's callbacks."""

    def __init__(self, owner: _NlsSession, session: Session, runner: LoopThread) -> None:
        self.owner = owner
        self.session = session
        self.runner = runner
        self.closed = False  # on_close was called
        self.reported: NlsError | None = None  # the last error given to on_error
        # The audio queue: filled by send_audio() on any thread, sent by one sender
        # task on the loop, woken (through LoopThread.post) when audio arrives.
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._chunks: deque[bytes] = deque()
        self._queued = 0
        self._busy = False  # the sender has audio to send or a wake-up is on its way
        self._wakeup: asyncio.Future[None] | None = None
        self._flushed: asyncio.Future[None] | None = None
        self._sender: asyncio.Task[None] | None = None
        self.failed: NlsError | None = None  # audio can no longer be sent

    # ------------------------------------------------------------ callbacks (loop)

    def on_error(self, error: NlsError) -> None:
        if isinstance(error, CallbackError):
            # The official SDK logs and swallows a failing callback; so do we.
            logger.error("task %s: %s", self.session.task_id, error, exc_info=error.__cause__)
            return
        if isinstance(error, (StartTimeoutError, StopTimeoutError)):
            return  # raised by start() / stop(), as the official SDK does
        self.report(error)

    def report(self, error: NlsError) -> None:
        if self.reported is error:
            return
        self.reported = error
        self.owner._call("on_error", _error_message(error, self.session.task_id))

    def on_close(self) -> None:
        """The session is over (called once the connection closed)."""
        self.refuse_audio(InvalidStateError(f"task {self.session.task_id} is over"))
        if self._sender is not None:
            self._sender.cancel()
        if not self.closed:
            self.closed = True
            self.owner._call("on_close")

    # ------------------------------------------------------------ audio queue

    def put(self, data: bytes) -> bool:
        """Queue ``data`` for the session (from any thread but the loop's); False if the
        task can no longer take audio. Waits (bounded) while too much is queued."""
        with self._lock:
            if self._queued >= MAX_QUEUED_BYTES and not self._room.wait_for(
                lambda: self.failed is not None or self._queued < MAX_QUEUED_BYTES,
                QUEUE_TIMEOUT,
            ):
                raise ConnectionTimeout(
                    f"the connection took no audio for {QUEUE_TIMEOUT:g} s "
                    f"({self._queued} bytes queued)"
                )
            if self.failed is not None:
                return False
            self._chunks.append(data)
            self._queued += len(data)
            if self._busy:
                return True
            self._busy = True
        self.runner.post(self._wake)
        return True

    def _wake(self) -> None:
        wakeup = self._wakeup
        if wakeup is not None and not wakeup.done():
            wakeup.set_result(None)

    async def _send(self) -> None:
        """The sender: writes the queued audio in order, sleeps while there is none."""
        session = self.session
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                chunk = self._chunks.popleft() if self._chunks else None
                if chunk is None:
                    self._busy = False
                else:
                    self._queued -= len(chunk)
                    if self._queued < MAX_QUEUED_BYTES <= self._queued + len(chunk):
                        self._room.notify_all()
            if chunk is None:
                self._flush_done()
                self._wakeup = loop.create_future()
                await self._wakeup
                continue
            try:
                await session.send_audio(chunk)
            except NlsError as exc:  # the task ended: on_error has heard why, if it failed
                self.refuse_audio(exc)
                return

    def _flush_done(self) -> None:
        flushed, self._flushed = self._flushed, None
        if flushed is not None and not flushed.done():
            flushed.set_result(None)

    def refuse_audio(self, error: NlsError) -> None:
        """No more audio: drop what is queued (saying so) and wake whoever waits."""
        with self._lock:
            if self.failed is None:
                self.failed = error
                if self._queued:
                    logger.warning(
                        "task %s: audio is no longer accepted (%s); %d queued bytes dropped",
                        self.session.task_id,
                        error,
                        self._queued,
                    )
            self._chunks.clear()
            self._queued = 0
            self._busy = False
            self._room.notify_all()
        self._flush_done()

    async def flush(self) -> None:
        """Wait until the audio queued so far is written (or refused)."""
        with self._lock:
            if not self._busy:
                return
        if self._flushed is None:
            self._flushed = asyncio.get_running_loop().create_future()
        await self._flushed

    # ------------------------------------------------------------ lifecycle (loop)

    async def start(self) -> bool:
        session = self.session
        try:
            await session.start()
        except StartTimeoutError:
            await session.abort()
            raise
        except NlsError as exc:
            self.report(exc)  # unless the router already did (TaskFailed)
            await session.abort()
            self.on_close()  # the official SDK's on_close follows even a refused handshake
            return False
        self._sender = asyncio.get_running_loop().create_task(self._send())
        return True

    async def stop(self, timeout: float) -> bool:
        session = self.session
        await self.flush()
        try:
            await session.stop(timeout)
        except StopTimeoutError:
            await session.abort()
            raise
        except NlsError:
            ok = False  # on_error has had it
        else:
            ok = True
        await session.__aexit__(None, None, None)  # the closing handshake, then on_close
        return ok

    async def ctrl(self, params: dict[str, Any]) -> None:
        await self.flush()
        session = self.session
        assert isinstance(session, Transcriber)
        await session.ctrl(**params)


class _NlsSession:
    """What :class:`NlsSpeechTranscriber` and :class:`NlsSpeechRecognizer` share."""

    _session_class: ClassVar[type[Session]]
    #: The nlsstream event each of the official SDK's callbacks receives.
    _events: ClassVar[dict[str, type[Event]]] = {
        "on_start": Started,
        "on_result_changed": ResultChanged,
        "on_completed": Completed,
    }

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        appkey: str | None = None,
        on_start: Callable[..., object] | None = None,
        on_result_changed: Callable[..., object] | None = None,
        on_completed: Callable[..., object] | None = None,
        on_error: Callable[..., object] | None = None,
        on_close: Callable[..., object] | None = None,
        callback_args: Sequence[Any] = (),
        *,
        akid: str | None = None,
        aksecret: str | None = None,
    ) -> None:
        source: TokenSource | None = token
        if not token and akid and aksecret:  # the SDK's older in-repo API
            source = AccessKeyTokenProvider(akid, aksecret)
        if not source or not appkey:
            raise InvalidParameter("Must provide token and appkey")
        self._url = url
        self._token: TokenSource = source
        self._appkey = appkey
        self._callbacks: dict[str, Callable[..., object] | None] = {
            "on_start": on_start,
            "on_result_changed": on_result_changed,
            "on_completed": on_completed,
            "on_error": on_error,
            "on_close": on_close,
        }
        self._callback_args = tuple(callback_args)
        self._task: _Task | None = None

    # ------------------------------------------------------------ the user's callbacks

    def _call(self, name: str, *message: str) -> None:
        """Call the user's ``name`` callback with ``message`` (none for ``on_close``)
        and ``*callback_args``; an exception is logged and swallowed, as the official
        SDK does."""
        callback = self._callbacks.get(name)
        if callback is None:
            return
        try:
            callback(*message, *self._callback_args)
        except Exception:
            logger.exception("%s callback raised", name)

    def _forward(self, name: str) -> Callable[[Event], None] | None:
        if self._callbacks.get(name) is None:
            return None

        def forward(event: Event) -> None:
            self._call(name, event.raw_text)

        return forward

    # ------------------------------------------------------------ the official API

    def start(
        self,
        aformat: str = "pcm",
        sample_rate: int = 16000,
        ch: int = 1,
        enable_intermediate_result: bool = False,
        enable_punctuation_prediction: bool = False,
        enable_inverse_text_normalization: bool = False,
        timeout: float = 10,
        ping_interval: float | None = 8,
        ping_timeout: float | None = None,
        ex: dict[str, Any] | None = None,
        *,
        enable_punctutation_prediction: bool | None = None,
    ) -> bool:
        """Connect, send Start and wait for Started; True once started.

        A refused connection or a TaskFailed goes to ``on_error`` (then ``on_close``)
        and returns False; raises :class:`StartTimeoutException` after ``timeout`` s
        without Started, and for a bad ``ch`` or ``aformat`` what the official SDK
        raises. ``ex`` is merged into the Start payload;
        ``enable_punctutation_prediction`` is the SDK's older spelling.
        """
        if ch != 1:
            self._bad_parameter(f"not support channel: {ch}")
        if aformat not in FORMATS:
            self._bad_parameter(f"format {aformat} not support")
        if enable_punctutation_prediction is not None:
            enable_punctuation_prediction = enable_punctutation_prediction
        current = self._task
        if current is not None and current.session.state is State.STARTED:
            logger.debug("already started")
            return True
        payload: dict[str, Any] = {
            "format": aformat,
            "sample_rate": sample_rate,
            "enable_intermediate_result": enable_intermediate_result,
            "enable_punctuation_prediction": enable_punctuation_prediction,
            "enable_inverse_text_normalization": enable_inverse_text_normalization,
            **(ex or {}),
        }
        clash = sorted(set(payload) - set(_START_PARAMS) & _SESSION_OPTIONS)
        if clash:
            raise InvalidParameter(f"ex may hold Start parameters only, not {clash}")
        runner = loop_thread()
        handlers: dict[str, Any] = {name: self._forward(name) for name in self._events}
        task_holder: list[_Task] = []
        session = self._session_class(
            self._appkey,
            self._token,
            url=self._url,
            connect_timeout=timeout,
            start_timeout=timeout,
            ping_interval=ping_interval or None,
            ping_timeout=ping_timeout or DEFAULT_PING_TIMEOUT,
            # The official SDK never resumes a task, and the callbacks get the raw JSON
            # of the gateway, which a resumed task would number and time afresh.
            reconnect=False,
            on_error=lambda error: task_holder[0].on_error(error),
            on_close=lambda: task_holder[0].on_close(),
            **handlers,
            **payload,
        )
        task = _Task(self, session, runner)
        task_holder.append(task)
        self._task = task
        try:
            return runner.run(task.start, 2 * timeout + CALL_MARGIN)
        except StartTimeoutError:
            raise StartTimeoutException(f"Waiting Start over {timeout}s") from None

    def send_audio(self, pcm_data: bytes | bytearray | memoryview) -> bool:
        """Queue audio for the task (written on the loop thread, in order); False if
        the task is not started or has ended (the official SDK drops it silently)."""
        task = self._task
        if task is None or task.session.state is not State.STARTED:
            self._not_started()
            return False
        if not pcm_data:
            return True
        if task.session.format == "pcm" and len(pcm_data) % 2:
            raise InvalidParameter(f"PCM16 audio must be an even number of bytes: {len(pcm_data)}")
        if threading.current_thread() is task.runner.thread:
            task.runner.check_caller()  # raises: a full queue would deadlock the loop
        if task.put(bytes(pcm_data)):
            return True
        self._not_started()
        return False

    def stop(self, timeout: float = 10) -> bool:
        """Send the queued audio, then Stop, and wait for Completed (and the close);
        True if the task completed. Raises :class:`StopTimeoutException` after
        ``timeout`` s without Completed; False if the task was not started or failed
        (``on_error`` has been told)."""
        task = self._task
        if task is None or task.session.state is not State.STARTED:
            logger.debug("not started")
            return task is not None and task.session.result is not None
        bound = timeout + 2 * task.session.stop_timeout + CALL_MARGIN
        try:
            return task.runner.run(lambda: task.stop(timeout), bound)
        except StopTimeoutError:
            raise StopTimeoutException(f"Waiting stop over {timeout}s") from None

    def shutdown(self) -> None:
        """Close the connection now (no Stop); ``on_close`` follows. Repeated calls, or
        a call before ``start()``, do nothing."""
        task = self._task
        if task is not None:
            self._on_loop(task, task.session.abort)

    def _on_loop(self, task: _Task, make: Callable[[], Awaitable[None]]) -> None:
        """Run ``make()`` on the loop: waited for from another thread, queued (and its
        failure logged) when called from a callback, on the loop thread itself."""
        runner = task.runner
        if threading.current_thread() is runner.thread:
            future = asyncio.ensure_future(make())
            future.add_done_callback(_log_failure)
        else:
            runner.run(make, task.session.stop_timeout + CALL_MARGIN)

    def _bad_parameter(self, message: str) -> None:
        raise ValueError(message)

    def _not_started(self) -> None:
        logger.debug("send_audio before start or after the end: nothing sent")


def _log_failure(future: asyncio.Future[None]) -> None:
    if not future.cancelled() and future.exception() is not None:
        logger.error("queued call failed", exc_info=future.exception())


class NlsSpeechTranscriber(_NlsSession):
    """Real-time transcription, as the official ``nls.NlsSpeechTranscriber``.

    ``NlsSpeechTranscriber(url, token, appkey, on_start, on_sentence_begin,
    on_sentence_end, on_result_changed, on_completed, on_error, on_close,
    callback_args)``; each ``on_x(message, *callback_args)`` receives the server's JSON
    text, ``on_close(*callback_args)`` nothing else. Callbacks run on nlsstream's shared
    event-loop thread and must not block.
    """

    _session_class = Transcriber
    _events: ClassVar[dict[str, type[Event]]] = {
        **_NlsSession._events,
        "on_sentence_begin": SentenceBegin,
        "on_sentence_end": SentenceEnd,
    }

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        appkey: str | None = None,
        on_start: Callable[..., object] | None = None,
        on_sentence_begin: Callable[..., object] | None = None,
        on_sentence_end: Callable[..., object] | None = None,
        on_result_changed: Callable[..., object] | None = None,
        on_completed: Callable[..., object] | None = None,
        on_error: Callable[..., object] | None = None,
        on_close: Callable[..., object] | None = None,
        callback_args: Sequence[Any] = (),
        *,
        akid: str | None = None,
        aksecret: str | None = None,
    ) -> None:
        super().__init__(
            url,
            token,
            appkey,
            on_start,
            on_result_changed,
            on_completed,
            on_error,
            on_close,
            callback_args,
            akid=akid,
            aksecret=aksecret,
        )
        self._callbacks["on_sentence_begin"] = on_sentence_begin
        self._callbacks["on_sentence_end"] = on_sentence_end

    def ctrl(self, **kwargs: Any) -> bool:
        """Send ``ControlTranscriber`` with ``kwargs`` as the payload, after the audio
        queued so far; a sole ``ex={...}`` (the SDK's older API) is the payload itself.
        False if the task is not started."""
        if not kwargs:
            raise InvalidParameter("Empty kwargs not allowed!")
        if set(kwargs) == {"ex"} and isinstance(kwargs["ex"], dict):
            kwargs = dict(kwargs["ex"])
        task = self._task
        if task is None or task.session.state is not State.STARTED:
            logger.debug("not started")
            return False
        self._on_loop(task, lambda: task.ctrl(kwargs))
        return True


class NlsSpeechRecognizer(_NlsSession):
    """Sentence recognition, as the official ``nls.NlsSpeechRecognizer``.

    ``NlsSpeechRecognizer(url, token, appkey, on_start, on_result_changed,
    on_completed, on_error, on_close, callback_args)``; see
    :class:`NlsSpeechTranscriber` for the callbacks. ``send_audio`` raises
    :class:`NotStartException` outside a started task and :class:`InvalidParameter` for
    empty data, as the official SDK does.
    """

    _session_class = Recognizer

    def send_audio(self, pcm_data: bytes | bytearray | memoryview) -> bool:
        if not pcm_data:
            raise InvalidParameter("data empty!")
        return super().send_audio(pcm_data)

    def _bad_parameter(self, message: str) -> None:
        raise InvalidParameter(message)

    def _not_started(self) -> None:
        raise NotStartException("Need start before send!")
