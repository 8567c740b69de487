"""The nlsstream exception tree and the gateway's documented status codes.

Every error the SDK raises derives from :class:`NlsError`. Errors that come from the
gateway carry the server's ``status``, ``status_text`` and ``task_id`` and say whether a
retry can help (:attr:`NlsError.retryable`). No error message ever contains a token or an
AccessKey secret (see :mod:`nlsstream.redaction`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypeVar

from .redaction import redact, redact_known

__all__ = [
    "FILE_TRANS_DONE",
    "FILE_TRANS_PENDING",
    "STATUS_CODES",
    "SUCCESS",
    "AudioFormatError",
    "AuthenticationError",
    "CallbackError",
    "ConfigurationError",
    "DirectiveError",
    "EventOverflowError",
    "GatewayConnectionError",
    "InvalidStateError",
    "MicrophoneError",
    "NlsError",
    "PopError",
    "ProtocolError",
    "StartTimeoutError",
    "StatusCode",
    "StopTimeoutError",
    "TaskFailedError",
    "TokenError",
    "is_retryable",
    "is_server_side",
    "redact",
    "status_hint",
    "status_text",
    "task_error",
    "with_note",
]

SUCCESS = 20000000


@dataclass(frozen=True)
class StatusCode:
    """One documented gateway status code (docs/protocol.md §6)."""

    code: int
    name: str
    meaning: str
    retryable: bool


def _table(*rows: tuple[int, str, str, bool]) -> dict[int, StatusCode]:
    return {code: StatusCode(code, name, meaning, retry) for code, name, meaning, retry in rows}


#: The status codes the gateway documents for the ASR protocols, with what they mean and
#: whether the same request can succeed if tried again (after a token refresh for 40000001).
STATUS_CODES: dict[int, StatusCode] = _table(
    (20000000, "SUCCESS", "Success.", False),
    (40000000, "CLIENT_ERROR", "Generic client error.", False),
    (40000001, "ACCESS_DENIED", "Token invalid or expired: refresh the token and reconnect.", True),
    (40000002, "MESSAGE_INVALID", "Malformed message, or a bad message/task id.", False),
    (40000003, "PARAMETER_INVALID", "A parameter is invalid: the text says which.", False),
    (40000004, "IDLE_TIMEOUT", "Nothing was sent for 10 s.", True),
    (40000005, "TOO_MANY_REQUESTS", "Concurrency or QPS limit reached: retry with backoff.", True),
    (40000009, "INVALID_AUDIO_HEADER", "Bad audio container (WAV header, Ogg/Opus).", False),
    (40000010, "FREE_TRIAL_EXPIRED", "The account's free trial has expired.", False),
    (40010001, "NAMESPACE_NOT_FOUND", "Unknown namespace or URL.", False),
    (40010002, "DIRECTIVE_NOT_SUPPORTED", "Unknown directive name.", False),
    (40010003, "DIRECTIVE_INVALID", "Bad directive (e.g. unsupported format).", False),
    (40010004, "CLIENT_DISCONNECT", "Client disconnected before the task finished.", False),
    (40010005, "TASK_STATE_ERROR", "Directive in the wrong task state (e.g. Stop twice).", False),
    (40020105, "APPKEY_NOT_EXIST", "The appkey does not exist.", False),
    (40020106, "APPKEY_UID_MISMATCH", "Appkey and token belong to different accounts.", False),
    (40270002, "NO_VALID_AUDIO_ERROR", "No valid speech was recognised.", False),
    (40270003, "DECODE_ERROR", "Audio could not be decoded (format mismatch).", False),
    (41000002, "APPKEY_KEY_IS_NULL", "The appkey is empty.", False),
    (41000003, "NO_END_POINT", "MetaInfo has no end point info.", False),
    (41010100, "UNSUPPORTED_FORMAT", "Unsupported audio format.", False),
    (41010101, "UNSUPPORTED_SAMPLE_RATE", "Only 8000 and 16000 Hz are supported.", False),
    (41010104, "TOO_LONG_SPEECH", "Sentence recognition audio is longer than 60 s.", False),
    (41010105, "SILENT_SPEECH", "No speech for too long.", False),
    (41010120, "CLIENT_DATA_TIMEOUT", "No audio for 10 s (sentence recognition).", True),
    (41040201, "GET_CLIENT_DATA_TIMEOUT", "Real-time audio did not arrive continuously.", True),
    (43040001, "CONCURRENCY_EXCEEDED", "Too many concurrent requests.", True),
    (50000000, "SERVER_ERROR", "Transient server error.", True),
    (50000001, "GRPC_ERROR", "Transient internal server error.", True),
    (52010001, "INSTANCE_POOL_EXHAUSTED", "Server capacity exhausted.", True),
    (50020003, "ROUTE_GROUP_NOT_FOUND", "Routing error on the server.", True),
    # FlashRecognizer (docs/protocol.md §11.2); names not documented, meanings are.
    (40270001, "UNSUPPORTED_FORMAT", "Unsupported audio format (FlashRecognizer).", False),
    (40270004, "NO_VALID_AUDIO_STREAM", "No valid audio stream in multi-channel audio.", False),
    (40270006, "FILE_DOWNLOAD_FAILED", "The audio_address could not be downloaded.", False),
    # FileTrans (docs/protocol.md §11.3): 2105xxxx progress, 4105xxxx the caller's to fix,
    # 5105xxxx transient.
    (21050000, "SUCCESS", "The recording was recognised.", False),
    (21050001, "RUNNING", "The task is being recognised.", False),
    (21050002, "QUEUEING", "The task waits in the queue.", False),
    (21050003, "SUCCESS_WITH_NO_VALID_FRAGMENT", "Recognised, but there was no speech.", False),
    (41050001, "USER_BIZDURATION_QUOTA_EXCEED", "The daily audio quota is used up.", False),
    (41050002, "FILE_DOWNLOAD_FAILED", "The file_link could not be downloaded.", False),
    (41050003, "FILE_CHECK_FAILED", "The file is not audio in a supported format.", False),
    (41050004, "FILE_TOO_LARGE", "The file is larger than 512 MB.", False),
    (41050005, "FILE_NORMALIZE_FAILED", "The audio could not be normalised.", False),
    (41050006, "FILE_PARSE_FAILED", "The file could not be parsed.", False),
    (41050007, "MKV_PARSE_FAILED", "The MKV file could not be parsed.", False),
    (41050008, "UNSUPPORTED_SAMPLE_RATE", "Sample rate does not fit the appkey's model.", False),
    (41050009, "UNSUPPORTED_ASR_GROUP", "Appkey and AccessKey of different accounts.", False),
    (41050010, "FILE_TRANS_TASK_EXPIRED", "Unknown or expired TaskId (kept 72 h).", False),
    (41050011, "REQUEST_INVALID_FILE_URL_VALUE", "The file_link is not a valid URL.", False),
    (41050012, "REQUEST_INVALID_CALLBACK_VALUE", "The callback_url is not valid.", False),
    (41050013, "REQUEST_PARAMETER_INVALID", "The Task is not valid JSON.", False),
    (41050014, "REQUEST_EMPTY_APPKEY_VALUE", "The Task has no appkey.", False),
    (41050015, "REQUEST_APPKEY_UNREGISTERED", "The appkey is not registered.", False),
    (41050021, "RAM_CHECK_FAILED", "The RAM user may not use this appkey.", False),
    (41050023, "CONTENT_LENGTH_CHECK_FAILED", "The file server's Content-Length is wrong.", False),
    (41050024, "FILE_404_NOT_FOUND", "The file server answered 404.", False),
    (41050025, "FILE_403_FORBIDDEN", "The file server answered 403.", False),
    (41050026, "FILE_SERVER_ERROR", "The file server answered with an error.", False),
    (41050103, "AUDIO_DURATION_TOO_LONG", "The audio is longer than 12 h.", False),
    (51050000, "INTERNAL_ERROR", "Transient server error: submit again.", True),
    (51050001, "VAD_FAILED", "Transient voice-detection failure: submit again.", True),
    (51050002, "RECOGNIZE_FAILED", "Transient recognition failure: submit again.", True),
    (51050003, "RECOGNIZE_INTERRUPT", "Recognition was interrupted: submit again.", True),
    (51050004, "OFFER_INTERRUPT", "The task was interrupted: submit again.", True),
    (51050005, "FILE_TRANS_TIMEOUT", "The task took too long: submit again.", True),
    (51050006, "FRAGMENT_FAILED", "Transient segmentation failure: submit again.", True),
)

#: The FileTrans codes a task reports while it is not finished yet.
FILE_TRANS_PENDING = frozenset({21050001, 21050002})
#: The FileTrans codes of a finished task that has a result (possibly without sentences).
FILE_TRANS_DONE = frozenset({21050000, 21050003})


#: Codes the cloud reports from its metadata service rather than the gateway proper: their
#: texts start with ``Meta:`` (``Meta:APPKEY_NOT_EXIST:Appkey not exist!``).
_META_CODES = frozenset({40020105, 40020106})


def status_text(status: int, detail: str, *, source: str | None = None) -> str:
    """A ``status_text`` as the gateway writes it: ``Gateway:<NAME>:<detail>``.

    The one place a status code becomes its text, for every gateway of the project:
    ``status_text(40010005, "Got stop directive while task is stopping!")``.
    ``source`` overrides the prefix where the cloud uses both for one code (the
    handshake's ``Meta:ACCESS_DENIED:The token '...' is invalid!``).
    """
    known = STATUS_CODES.get(status)
    name = known.name if known is not None else "INJECTED_FAULT"
    source = source or ("Meta" if status in _META_CODES else "Gateway")
    return f"{source}:{name}:{detail}"


#: Advice that fits only when the server's text is about the same thing: code ->
#: (a word the text must contain, the advice). Elsewhere the table's meaning is the hint.
_TEXT_HINTS: dict[int, tuple[str, str]] = {
    40000003: ("appkey", "The appkey is not set or invalid: use the project's appkey."),
}


def status_hint(status: int, text: str) -> str | None:
    """What a failed task's ``status`` means, worded so that it never contradicts the
    server's own ``text`` (``None`` for an undocumented code)."""
    special = _TEXT_HINTS.get(status)
    if special is not None and special[0] in text.lower():
        return special[1]
    known = STATUS_CODES.get(status)
    return known.meaning if known is not None else None


def is_retryable(status: int) -> bool:
    """Whether a task that failed with ``status`` may succeed if tried again.

    Documented codes use the table; otherwise 5xxxxxxx codes are transient and
    4xxxxxxx codes need the request fixed.
    """
    known = STATUS_CODES.get(status)
    if known is not None:
        return known.retryable
    return 50000000 <= status < 60000000


class NlsError(Exception):
    """Base class of every nlsstream error.

    ``retryable`` says whether repeating the same request (possibly after a token
    refresh or a backoff) can succeed. The message never shows a token or a secret that
    nlsstream was given (see :mod:`nlsstream.redaction`), whoever built it.
    """

    retryable: bool = False

    def __str__(self) -> str:
        return redact_known(super().__str__())


class InvalidStateError(NlsError, RuntimeError):
    """The call is not allowed in the session's current state.

    Raised *instead of* sending something the gateway would reject: audio before
    Started or after Stop, Stop twice, anything after the task ended.
    """


class ProtocolError(NlsError):
    """The gateway sent something the protocol does not allow (bad JSON, unknown shape)."""


class AudioFormatError(NlsError, ValueError):
    """Audio input that cannot be converted to PCM16 mono at the session's rate.

    Raised before anything is sent.
    """


class ConfigurationError(NlsError, ValueError):
    """The environment is incomplete or contradictory (e.g. an AccessKey id without secret)."""


class MicrophoneError(NlsError):
    """The microphone cannot be used: sounddevice/PortAudio missing, no input device,
    the device cannot record at the requested rate, or it stopped delivering audio."""


class DirectiveError(Exception):
    """A client directive the gateway must refuse, with the status to answer it with
    (the gateway's side: never raised to a client)."""

    def __init__(self, status: int, status_text: str, task_id: str | None = None):
        super().__init__(f"{status} {status_text}")
        self.status = status
        self.status_text = status_text
        self.task_id = task_id


class CallbackError(NlsError):
    """A user callback raised; the original exception is the ``__cause__``.

    Delivered to ``on_error``; the session keeps running.
    """


class EventOverflowError(NlsError):
    """An event iterator fell more than its queue size behind the session.

    The session never blocks on a slow consumer and never drops events silently: the
    lagging iterator yields what it had buffered, then raises this error.
    """

    def __init__(self, maxsize: int) -> None:
        super().__init__(
            f"event iterator fell behind: more than {maxsize} events were waiting "
            "(consume faster, or create the session with a larger event_queue_size)"
        )
        self.maxsize = maxsize


class GatewayConnectionError(NlsError, ConnectionError):
    """The connection could not be made (refused, DNS, TLS) or was lost mid-task."""

    retryable = True


class AuthenticationError(NlsError):
    """The gateway rejected the token (HTTP 403 at the handshake, or status 40000001).

    ``status_text`` is the server's explanation with any token redacted. Retryable
    after fetching a fresh token.
    """

    retryable = True

    def __init__(
        self,
        message: str,
        *,
        status_text: str = "",
        http_status: int | None = None,
        status: int | None = None,
        task_id: str | None = None,
    ):
        super().__init__(message)
        self.status_text = status_text
        self.http_status = http_status
        self.status = status
        self.task_id = task_id


class PopError(NlsError):
    """A POP RPC call signed with an AccessKey (CreateToken, FileTrans' SubmitTask and
    GetTaskResult) was refused by the service itself: bad AccessKey or signature,
    throttling, an internal error.

    ``code``, ``server_message`` and ``request_id`` are the server's ``Code``, ``Message``
    and ``RequestId`` (``None`` for network failures), ``http_status`` the HTTP status.
    Network failures, timeouts, throttling and 5xx answers are ``retryable``; a bad
    AccessKey or signature is not. Never contains the AccessKey secret.
    """

    def __init__(
        self,
        message: str,
        *,
        code: str | None = None,
        server_message: str | None = None,
        http_status: int | None = None,
        request_id: str | None = None,
        retryable: bool = False,
    ):
        super().__init__(message)
        self.code = code
        self.server_message = server_message
        self.http_status = http_status
        self.request_id = request_id
        self.retryable = retryable


class TokenError(PopError):
    """Fetching a token (CreateToken) failed; the attributes are :class:`PopError`'s."""


class TaskFailedError(NlsError):
    """The gateway ended the task with ``TaskFailed``, or a recording service reported a
    failed task (a FlashRecognizer/REST ``status``, a FileTrans ``StatusCode``).

    Attributes: ``status`` (e.g. 40000004), ``status_text`` (server text), ``task_id``
    and ``retryable`` (from :data:`STATUS_CODES`).
    """

    def __init__(self, status: int, status_text: str, task_id: str | None = None):
        self.status = status
        self.status_text = status_text
        self.task_id = task_id
        self.retryable = is_retryable(status)
        meaning = status_hint(status, status_text)
        hint = f" ({meaning})" if meaning else ""
        super().__init__(f"task {task_id or '?'} failed with status {status}: {status_text}{hint}")


class StartTimeoutError(NlsError, TimeoutError):
    """The gateway did not confirm the task start within ``start_timeout``."""

    retryable = True


class StopTimeoutError(NlsError, TimeoutError):
    """The gateway did not send Completed within the stop timeout after Stop."""

    retryable = True


#: 4xxxxxxx codes that are the service's load, not the client's doing: a new task may pass.
_THROTTLING = frozenset({40000005, 43040001})


def is_server_side(status: int) -> bool:
    """Whether a task that failed mid-stream with ``status`` failed for the service's own
    reasons (5xxxxxxx, throttling), so that a new task can take up where it stopped;
    not for what the client sent or failed to send (a time-out for missing audio, a bad
    parameter), which a new task would meet again."""
    return 50000000 <= status < 60000000 or status in _THROTTLING


NlsErrorT = TypeVar("NlsErrorT", bound="NlsError")


def with_note(error: NlsErrorT, note: str) -> NlsErrorT:
    """A copy of ``error`` (same type and attributes) whose message ends with ``note``."""
    # Not copy.copy(): it re-calls __init__ with args, which classes with several
    # required arguments (TaskFailedError) do not take.
    copy = type(error).__new__(type(error))
    copy.__dict__.update(error.__dict__)
    copy.args = (f"{error}; {note}",)
    copy.__cause__, copy.__context__ = error.__cause__, error.__context__
    copy.__traceback__ = error.__traceback__
    return copy


def task_error(status: int, status_text: str, task_id: str | None = None) -> NlsError:
    """The exception for a ``TaskFailed`` event: :class:`AuthenticationError` for a token
    problem (40000001), :class:`TaskFailedError` otherwise."""
    text = redact(status_text)
    if status == 40000001:
        return AuthenticationError(
            f"token rejected by the gateway: {text}",
            status_text=text,
            status=status,
            task_id=task_id,
        )
    return TaskFailedError(status, text, task_id)
