"""The official Python SDK's ``nls`` module for the real-time recognisers, on nlsstream.

Put ``import nlsstream.compat.nls as nls`` in front of code written for ``import nls``
(alibabacloud-nls-python-sdk 1.0.2): :class:`NlsSpeechTranscriber` and
:class:`NlsSpeechRecognizer` take the same arguments, call the same callbacks with the
server's JSON text plus ``*callback_args`` in the same order (``on_completed`` /
``on_error`` before ``on_close``), and raise the same exception classes
(:mod:`~nlsstream.compat.nls.exception`); :func:`enableTrace` and
:func:`nls.token.getToken <nlsstream.compat.nls.token.getToken>` are there too.

Underneath, each object is a thin adapter over one blocking
:class:`nlsstream.sync.Transcriber` / :class:`~nlsstream.sync.Recognizer` per task (names,
arguments, JSON strings and return values), on the process's one event-loop thread: no
SDK thread per session (the official SDK runs two or three). As there, **each session's
callbacks run on a thread of their own** (a worker of a shared, bounded pool, while they
run), in order: a callback may block and delays only its own session's later callbacks;
``start()``, ``stop()``, ``send_audio()``, ``ctrl()`` and ``shutdown()`` may be called
from a callback.

Deliberate differences (README, "The drop-in `nls` module"): failures the official SDK
swallows (HTTP 403, a refused or lost connection, a gateway that stops answering pings)
reach ``on_error`` as a TaskFailed-shaped JSON message; ``start()``, ``stop()``,
``send_audio()`` and ``ctrl()`` return ``True`` on success and ``False`` where the
official SDK silently returns ``None``; ``send_audio()`` queues the audio and returns
(the loop streams it at real time, 60-80 ms behind the caller, in order, before a
later ``ctrl()`` or ``stop()``); sample rates other than 8000/16000 and odd-length PCM
are refused at once.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

from ... import sync
from ..._version import __version__ as _nlsstream_version
from ...auth import AccessKeyTokenProvider, TokenSource
from ...config import DEFAULT_URL
from ...errors import (
    AudioFormatError,
    AuthenticationError,
    CallbackError,
    NlsError,
    StartTimeoutError,
    StopTimeoutError,
    TaskFailedError,
)
from ...realtime.protocol import Event, State, build_task_failed, encode
from ...realtime.session import Session, Transcriber
from ...redaction import get_logger
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


class _NlsSession:
    """What :class:`NlsSpeechTranscriber` and :class:`NlsSpeechRecognizer` share: the
    official names, arguments, JSON strings and return values over one blocking
    :class:`nlsstream.sync.Transcriber` / :class:`~nlsstream.sync.Recognizer` per task."""

    _session_class: ClassVar[type[sync.BlockingSession[Any]]]
    #: The official callbacks that receive an event, by nlsstream's keyword.
    _events: ClassVar[tuple[str, ...]] = ("on_start", "on_result_changed", "on_completed")

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
        self._session: sync.BlockingSession[Any] | None = None
        self._reported: NlsError | None = None  # the last error given to on_error
        self._closed = False  # on_close was called for the current task

    # ------------------------------------------------------------ the user's callbacks
    # They run on the session's callback worker (nlsstream.sync), in order.

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

    def _on_error(self, error: NlsError) -> None:
        if isinstance(error, (StartTimeoutError, StopTimeoutError, CallbackError)):
            return  # raised by start() / stop(), as the official SDK does; _call logs
        self._report(error)

    def _report(self, error: NlsError) -> None:
        if self._reported is error:
            return
        self._reported = error
        task_id = self._session.task_id if self._session is not None else ""
        self._call("on_error", _error_message(error, task_id))

    def _on_close(self) -> None:
        if not self._closed:
            self._closed = True
            self._call("on_close")

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
        """Connect, send Start and wait for Started (and ``on_start``); True once started.

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
        current = self._session
        if current is not None and current.state is State.STARTED:
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
        handlers: dict[str, Any] = {name: self._forward(name) for name in self._events}
        self._reported, self._closed = None, False
        session = self._session = self._session_class(
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
            # Nor does it send silence for a quiet sender: the gateway's idle timeout holds.
            keepalive=False,
            on_error=self._on_error,
            on_close=self._on_close,
            **handlers,
            **payload,
        )
        try:
            session.start()
        except StartTimeoutError:
            raise StartTimeoutException(f"Waiting Start over {timeout}s") from None
        except NlsError as exc:
            # start() has waited for the callbacks: on_error (TaskFailed) has run, if
            # it was going to. The official SDK's on_close follows even a refused handshake.
            self._report(exc)
            self._on_close()
            return False
        return True

    def send_audio(self, pcm_data: bytes | bytearray | memoryview) -> bool:
        """Queue audio for the task and return (:meth:`nlsstream.sync.Transcriber.send_audio`:
        no lock, no wake-up of the loop per call); False if the task is not started or
        has ended (the official SDK drops it silently)."""
        session = self._session
        if session is None:
            self._not_started()
            return False
        try:
            session.send_audio(pcm_data)
        except AudioFormatError as exc:
            raise InvalidParameter(str(exc)) from None
        except NlsError:
            self._not_started()
            return False
        except TimeoutError as exc:
            raise ConnectionTimeout(str(exc)) from None
        return True

    def stop(self, timeout: float = 10) -> bool:
        """Send the queued audio, then Stop, and wait for Completed and the callbacks up
        to ``on_close``; True if the task completed. Raises
        :class:`StopTimeoutException` after ``timeout`` s without Completed; False if
        the task was not started or failed (``on_error`` has been told)."""
        session = self._session
        if session is None or session.state is not State.STARTED:
            logger.debug("not started")
            return session is not None and session.result is not None
        try:
            session.stop(timeout)
            ok = True
        except (StopTimeoutError, TimeoutError):
            raise StopTimeoutException(f"Waiting stop over {timeout}s") from None
        except NlsError:
            ok = False  # on_error has had it
        with contextlib.suppress(NlsError, TimeoutError):
            session.close()  # the closing handshake, then on_close
        return ok

    def shutdown(self) -> None:
        """Close the connection now (no Stop); ``on_close`` follows. Repeated calls, or
        a call before ``start()``, do nothing."""
        if self._session is not None:
            self._session.abort()

    def _bad_parameter(self, message: str) -> None:
        raise ValueError(message)

    def _not_started(self) -> None:
        logger.debug("send_audio before start or after the end: nothing sent")


class NlsSpeechTranscriber(_NlsSession):
    """Real-time transcription, as the official ``nls.NlsSpeechTranscriber``.

    ``NlsSpeechTranscriber(url, token, appkey, on_start, on_sentence_begin,
    on_sentence_end, on_result_changed, on_completed, on_error, on_close,
    callback_args)``; each ``on_x(message, *callback_args)`` receives the server's JSON
    text, ``on_close(*callback_args)`` nothing else. Callbacks run on nlsstream's shared
    event-loop thread and must not block.
    """

    _session_class = sync.Transcriber
    _events = (*_NlsSession._events, "on_sentence_begin", "on_sentence_end")

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
        session = self._session
        if session is None or session.state is not State.STARTED:
            logger.debug("not started")
            return False
        assert isinstance(session, sync.Transcriber)
        try:
            session.ctrl(**kwargs)  # after the audio queued so far
        except NlsError:
            return False
        return True


class NlsSpeechRecognizer(_NlsSession):
    """Sentence recognition, as the official ``nls.NlsSpeechRecognizer``.

    ``NlsSpeechRecognizer(url, token, appkey, on_start, on_result_changed,
    on_completed, on_error, on_close, callback_args)``; see
    :class:`NlsSpeechTranscriber` for the callbacks. ``send_audio`` raises
    :class:`NotStartException` outside a started task and :class:`InvalidParameter` for
    empty data, as the official SDK does.
    """

    _session_class = sync.Recognizer

    def send_audio(self, pcm_data: bytes | bytearray | memoryview) -> bool:
        if not pcm_data:
            raise InvalidParameter("data empty!")
        return super().send_audio(pcm_data)

    def _bad_parameter(self, message: str) -> None:
        raise InvalidParameter(message)

    def _not_started(self) -> None:
        raise NotStartException("Need start before send!")
