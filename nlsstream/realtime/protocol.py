"""Sans-I/O core of the NLS real-time protocols (SpeechTranscriber, SpeechRecognizer).

No sockets and no asyncio here: this module turns directives into JSON text, JSON text
into typed events, and keeps the client's task state. The client session and the local
gateway both build on it, so the two sides cannot drift apart.

Wire format: ``docs/protocol.md`` §2 (envelope and ids), §3
(SpeechTranscriber), §4 (SpeechRecognizer). Directives are serialised with
``json.dumps`` defaults, byte-for-byte the way the official Python SDK does (§2.1).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import re
import uuid
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from .._version import __version__
from ..errors import SUCCESS, DirectiveError, InvalidStateError, ProtocolError, status_text

__all__ = [
    "MAX_SPEECH_MS",
    "RECOGNIZER",
    "SUCCESS",
    "SUCCESS_TEXT",
    "TRANSCRIBER",
    "Accepted",
    "ClientTask",
    "Completed",
    "Directive",
    "DirectiveError",
    "Event",
    "Namespace",
    "ResultChanged",
    "Resumed",
    "SentenceBegin",
    "SentenceEnd",
    "ServerState",
    "ServerTask",
    "StartParams",
    "Started",
    "State",
    "TaskFailed",
    "UnknownEvent",
    "Word",
    "build_directive",
    "build_event",
    "build_task_failed",
    "encode",
    "is_valid_id",
    "new_id",
    "parse_directive",
    "parse_event",
    "parse_start_params",
    "sdk_context",
    "start_payload",
]

SUCCESS_TEXT = "Gateway:SUCCESS:Success."
TASK_FAILED = "TaskFailed"
#: TaskFailed travels in this namespace, not the request's (§2.2).
DEFAULT_NAMESPACE = "Default"
SAMPLE_RATES = (8000, 16000)

_ID = re.compile(r"[0-9a-f]{32}")


def new_id() -> str:
    """A fresh message or task id: 32 lowercase hex characters (a dashless UUID4)."""
    return uuid.uuid4().hex


def is_valid_id(value: object) -> bool:
    """Whether ``value`` is a 32-character lowercase hex id, as the gateway requires."""
    return isinstance(value, str) and _ID.fullmatch(value) is not None


def sdk_context() -> dict[str, Any]:
    """The ``context`` block sent with every directive: telemetry naming this SDK."""
    return {"sdk": {"name": "nlsstream", "version": __version__, "language": "python"}}


def encode(message: Mapping[str, Any]) -> str:
    """Serialise a message exactly as the official Python SDK does (``json.dumps`` defaults)."""
    return json.dumps(message)


@dataclass(frozen=True)
class Namespace:
    """The directive and event names of one real-time protocol."""

    name: str
    start: str
    stop: str
    control: str | None
    started: str
    result_changed: str
    completed: str
    #: The Start parameters docs/protocol.md documents for this namespace (§3.2, §4.1).
    parameters: frozenset[str] = frozenset()

    @property
    def directives(self) -> tuple[str, ...]:
        return tuple(n for n in (self.start, self.stop, self.control) if n is not None)


#: The five keys every Start payload has (§3.2).
BASE_PARAMETERS = (
    "format",
    "sample_rate",
    "enable_intermediate_result",
    "enable_punctuation_prediction",
    "enable_inverse_text_normalization",
)
TRANSCRIBER = Namespace(
    name="SpeechTranscriber",
    start="StartTranscription",
    stop="StopTranscription",
    control="ControlTranscriber",
    started="TranscriptionStarted",
    result_changed="TranscriptionResultChanged",
    completed="TranscriptionCompleted",
    parameters=frozenset(
        (
            *BASE_PARAMETERS,
            "customization_id",
            "vocabulary_id",
            "max_sentence_silence",
            "enable_words",
            "disfluency",
            "speech_noise_threshold",
            "enable_semantic_sentence_detection",
            "special_word_filter",
            "enable_multi_thresh_mod",
            "enable_ignore_sentence_timeout",
            "enable_nlp",
            "nlp_model",
            "session_id",
            "vad_silence_duration",
            "class_vocabulary_id",
            "enable_gender_detect",
        )
    ),
)
RECOGNIZER = Namespace(
    name="SpeechRecognizer",
    start="StartRecognition",
    stop="StopRecognition",
    control=None,
    started="RecognitionStarted",
    result_changed="RecognitionResultChanged",
    completed="RecognitionCompleted",
    parameters=frozenset(
        (
            *BASE_PARAMETERS,
            "customization_id",
            "vocabulary_id",
            "enable_voice_detection",
            "max_start_silence",
            "max_end_silence",
            "audio_address",
        )
    ),
)
NAMESPACES: dict[str, Namespace] = {ns.name: ns for ns in (TRANSCRIBER, RECOGNIZER)}


# --------------------------------------------------------------------------- directives


def start_payload(
    *,
    format: str = "pcm",
    sample_rate: int = 16000,
    enable_intermediate_result: bool = False,
    enable_punctuation_prediction: bool = False,
    enable_inverse_text_normalization: bool = False,
    **extra: Any,
) -> dict[str, Any]:
    """The payload of a Start directive: the five base keys, then any extra parameters
    (``max_sentence_silence``, ``enable_words``, ``vocabulary_id``, ...) in the order given.

    ``None`` values are left out, so optional parameters can be passed through unset.
    """
    payload: dict[str, Any] = {
        "format": format,
        "sample_rate": sample_rate,
        "enable_intermediate_result": enable_intermediate_result,
        "enable_punctuation_prediction": enable_punctuation_prediction,
        "enable_inverse_text_normalization": enable_inverse_text_normalization,
    }
    payload.update((k, v) for k, v in extra.items() if v is not None)
    return payload


def build_directive(
    namespace: str,
    name: str,
    *,
    task_id: str,
    appkey: str,
    payload: Mapping[str, Any] | None = None,
    message_id: str | None = None,
) -> dict[str, Any]:
    """A client directive: header (five keys, in the official SDK's order), payload when
    given, and the SDK context."""
    message: dict[str, Any] = {
        "header": {
            "message_id": message_id or new_id(),
            "task_id": task_id,
            "namespace": namespace,
            "name": name,
            "appkey": appkey,
        }
    }
    if payload is not None:
        message["payload"] = dict(payload)
    message["context"] = sdk_context()
    return message


@dataclass(frozen=True)
class Directive:
    """A parsed client directive (the gateway's view)."""

    namespace: str
    name: str
    message_id: str
    task_id: str
    appkey: str
    payload: Mapping[str, Any]
    context: Mapping[str, Any]
    raw: Mapping[str, Any] = field(repr=False)


def _reject(status: int, detail: str, task_id: str | None = None) -> DirectiveError:
    return DirectiveError(status, status_text(status, detail), task_id)


def parse_directive(text: str | bytes) -> Directive:
    """Parse a client directive, raising :class:`DirectiveError` with the gateway's
    documented status (40000002 for a malformed message or bad ids) when it is invalid.

    The directive *name* is not checked here; that depends on the task's state
    (:class:`ServerTask`).
    """
    try:
        message = json.loads(text)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise _reject(40000002, f"Invalid json ({type(exc).__name__})!") from None
    if not isinstance(message, dict) or not isinstance(message.get("header"), dict):
        raise _reject(40000002, "Missing message header!")
    header = message["header"]
    task_id = header.get("task_id")
    tid = task_id if is_valid_id(task_id) else None
    message_id = header.get("message_id")
    if not is_valid_id(message_id):
        raise _reject(40000002, f"Invalid message id {_short(message_id)}!", tid)
    if not is_valid_id(task_id):
        raise _reject(40000002, f"Invalid task id {_short(task_id)}!", tid)
    namespace, name = header.get("namespace"), header.get("name")
    if not isinstance(name, str) or not name:
        raise _reject(40000002, "Missing directive name!", tid)
    if not isinstance(namespace, str) or namespace not in NAMESPACES:
        raise _reject(40010001, f"Namespace {_short(namespace)} not found!", tid)
    appkey = header.get("appkey")
    if not isinstance(appkey, str) or not appkey:
        raise _reject(40000003, "appkey not set!", tid)
    payload = message.get("payload") or {}
    context = message.get("context") or {}
    if not isinstance(payload, dict) or not isinstance(context, dict):
        raise _reject(40000002, "payload and context must be objects!", tid)
    return Directive(namespace, name, message_id, task_id, appkey, payload, context, message)


def _short(value: object, limit: int = 64) -> str:
    """``value`` quoted for an error text, cut short: a client may send anything."""
    text = repr(value)
    return text if len(text) <= limit else text[:limit] + "..."


# --------------------------------------------------------------------------- events


@dataclass(frozen=True, slots=True)
class Word:
    """One recognised word with its times in ms from the start of the audio."""

    text: str
    start_time: int
    end_time: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Event:
    """A server event. ``raw_text`` is the message as received, :attr:`raw` its decoding.

    Events keep the message's text rather than its decoded dicts: a session keeps every
    final sentence, and at thousands of sessions the dicts would add up to enough
    objects to make the garbage collector's full passes pause the event loop for tens of
    milliseconds.
    """

    name: str
    namespace: str
    task_id: str
    message_id: str = ""
    status: int = SUCCESS
    status_text: str = SUCCESS_TEXT
    raw_text: str = field(default="", repr=False, compare=False)

    @property
    def raw(self) -> dict[str, Any]:
        """The whole message, unknown keys included, decoded afresh on each access
        (``{}`` for an event not made from a message)."""
        return json.loads(self.raw_text) if self.raw_text else {}


@dataclass(frozen=True, kw_only=True, slots=True)
class Started(Event):
    """``TranscriptionStarted`` / ``RecognitionStarted``: audio may be sent from now on."""


@dataclass(frozen=True, kw_only=True, slots=True)
class SentenceBegin(Event):
    """A new sentence was detected (transcriber). ``time`` is where it starts, in ms."""

    index: int
    time: int


@dataclass(frozen=True, kw_only=True, slots=True)
class ResultChanged(Event):
    """An intermediate result: the full current hypothesis, not a delta.

    Transcriber: ``index`` and ``time`` (ms) of the open sentence. Recognizer: ``duration``
    (ms of audio so far); ``index`` and ``time`` are ``None``.
    """

    text: str
    index: int | None = None
    time: int | None = None
    confidence: float | None = None
    words: tuple[Word, ...] = ()
    duration: int | None = None
    #: On a transcriber sentence's first intermediate result: ms from writing the audio
    #: at the sentence's beginning to this event's arrival (the session's measure).
    latency_ms: int | None = field(default=None, compare=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class SentenceEnd(Event):
    """A final sentence (transcriber): ``begin_time`` to ``time`` in ms, its text and words."""

    index: int
    time: int
    begin_time: int
    text: str
    confidence: float | None = None
    words: tuple[Word, ...] = ()
    #: ms from writing the audio at ``time`` to this event's arrival (the session's
    #: measure, not the gateway's; ``None`` if that audio went out too long ago to be
    #: remembered). Not part of the event's equality.
    latency_ms: int | None = field(default=None, compare=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class Completed(Event):
    """``TranscriptionCompleted`` / ``RecognitionCompleted``: the task ended normally.

    For the recognizer, ``text`` is the result and ``duration`` the audio length in ms;
    the transcriber sends neither (``""`` and ``None``).
    """

    text: str = ""
    duration: int | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class TaskFailed(Event):
    """The task failed; ``status`` and ``status_text`` say why."""


@dataclass(frozen=True, kw_only=True, slots=True)
class UnknownEvent(Event):
    """An event this version does not know (e.g. ``SentenceSemantics``); kept, not dropped."""

    payload: Mapping[str, Any] = field(default_factory=dict, compare=False)


@dataclass(frozen=True, kw_only=True, slots=True)
class Resumed(Event):
    """Not a gateway message: the session's own news that it survived a failure (see
    :class:`~nlsstream.realtime.resume.Reconnect`). ``task_id`` is the new task's id,
    ``previous_task_id`` the one that was lost; ``cause`` says why (the error's text);
    ``attempts`` counts the connections it took, ``gap_ms`` the time from the failure to
    the new task's start, ``replayed_ms`` the audio sent again."""

    previous_task_id: str
    cause: str
    attempts: int
    gap_ms: int
    replayed_ms: int


def _number(payload: Mapping[str, Any], key: str) -> float | int | None:
    """``payload[key]`` if it is a finite number, ``None`` if absent or null."""
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ProtocolError(f"payload.{key} must be a finite number, got {_short(value)}")
    return value


def _int(payload: Mapping[str, Any], key: str) -> int | None:
    value = _number(payload, key)
    return None if value is None else int(value)


def _req_int(payload: Mapping[str, Any], key: str) -> int:
    """A number the event must carry (a missing one reads as 0, as the cloud omits zeros)."""
    if key in payload and payload[key] is None:
        raise ProtocolError(f"payload.{key} must be a number, got null")
    return _int(payload, key) or 0


def _float(payload: Mapping[str, Any], key: str) -> float | None:
    value = _number(payload, key)
    return None if value is None else float(value)


def _text(payload: Mapping[str, Any], key: str = "result") -> str:
    value = payload.get(key, "")
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProtocolError(f"payload.{key} must be a string, got {_short(value)}")
    return value


def _words(payload: Mapping[str, Any]) -> tuple[Word, ...]:
    words = payload.get("words") or []
    if not isinstance(words, list):
        raise ProtocolError(f"payload.words must be a list, got {_short(words)}")
    out = []
    for w in words:
        if not isinstance(w, dict):
            raise ProtocolError(f"a word must be an object, got {_short(w)}")
        out.append(Word(_text(w, "text"), _req_int(w, "startTime"), _req_int(w, "endTime")))
    return tuple(out)


def parse_event(text: str | bytes) -> Event:
    """Parse one server event into its typed class.

    Lenient where the gateway varies (unknown keys, missing or empty payload,
    ``namespace: "Default"`` on TaskFailed, ``status_message`` instead of
    ``status_text``); raises :class:`ProtocolError` for what cannot be an event.
    """
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        message = json.loads(text)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        detail = "nested too deeply" if isinstance(exc, RecursionError) else str(exc)
        raise ProtocolError(f"gateway sent invalid JSON: {detail}: {_preview(text)}") from None
    if not isinstance(message, dict) or not isinstance(message.get("header"), dict):
        raise ProtocolError(f"gateway message has no header: {_preview(text)}")
    header = message["header"]
    name = header.get("name")
    if not isinstance(name, str) or not name:
        raise ProtocolError(f"gateway message has no header.name: {_preview(text)}")
    payload = message.get("payload") or {}
    if not isinstance(payload, dict):
        raise ProtocolError(f"gateway payload is not an object: {_preview(text)}")
    status = header.get("status", SUCCESS)
    if isinstance(status, bool) or not isinstance(status, int):
        raise ProtocolError(f"header.status must be an integer, got {_short(status)}")
    base: dict[str, Any] = {
        "name": name,
        "namespace": _header_str(header, "namespace"),
        "task_id": _header_str(header, "task_id"),
        "message_id": _header_str(header, "message_id"),
        "status": status,
        "status_text": _header_str(header, "status_text") or _header_str(header, "status_message"),
        "raw_text": text,
    }
    if name == TASK_FAILED:
        return TaskFailed(**base)
    kind = _EVENT_KINDS.get(name)
    if kind is Started:
        return Started(**base)
    if kind is SentenceBegin:
        return SentenceBegin(
            **base, index=_req_int(payload, "index"), time=_req_int(payload, "time")
        )
    if kind is ResultChanged:
        return ResultChanged(
            **base,
            text=_text(payload),
            index=_int(payload, "index"),
            time=_int(payload, "time"),
            confidence=_float(payload, "confidence"),
            words=_words(payload),
            duration=_int(payload, "duration"),
        )
    if kind is SentenceEnd:
        return SentenceEnd(
            **base,
            index=_req_int(payload, "index"),
            time=_req_int(payload, "time"),
            begin_time=_req_int(payload, "begin_time"),
            text=_text(payload),
            confidence=_float(payload, "confidence"),
            words=_words(payload),
        )
    if kind is Completed:
        return Completed(**base, text=_text(payload), duration=_int(payload, "duration"))
    return UnknownEvent(**base, payload=payload)


def _header_str(header: Mapping[str, Any], key: str) -> str:
    value = header.get(key)
    if value is None:
        return ""
    if not isinstance(value, str):
        raise ProtocolError(f"header.{key} must be a string, got {_short(value)}")
    return value


def _preview(text: str | bytes, limit: int = 200) -> str:
    shown = text if isinstance(text, str) else text.decode("utf-8", "replace")
    return repr(shown[:limit]) + ("..." if len(shown) > limit else "")


_EVENT_KINDS: dict[str, type[Event]] = {}
for _ns in (TRANSCRIBER, RECOGNIZER):
    _EVENT_KINDS[_ns.started] = Started
    _EVENT_KINDS[_ns.result_changed] = ResultChanged
    _EVENT_KINDS[_ns.completed] = Completed
_EVENT_KINDS["SentenceBegin"] = SentenceBegin
_EVENT_KINDS["SentenceEnd"] = SentenceEnd


def build_event(
    namespace: str,
    name: str,
    task_id: str,
    payload: Mapping[str, Any] | None = None,
    *,
    status: int = SUCCESS,
    status_text: str = SUCCESS_TEXT,
) -> dict[str, Any]:
    """A server event as the cloud gateway sends it (§2.2): header keys in its order,
    a fresh ``message_id``, and the payload only when there is one."""
    message: dict[str, Any] = {
        "header": {
            "namespace": namespace,
            "name": name,
            "status": status,
            "message_id": new_id(),
            "task_id": task_id,
            "status_text": status_text,
        }
    }
    if payload is not None:
        message["payload"] = dict(payload)
    return message


def build_task_failed(task_id: str, status: int, status_text: str) -> dict[str, Any]:
    """A ``TaskFailed`` event, which the gateway sends in namespace ``Default``."""
    return build_event(
        DEFAULT_NAMESPACE, TASK_FAILED, task_id, status=status, status_text=status_text
    )


# --------------------------------------------------------------------------- client state


class State(enum.Enum):
    """The client's view of one task (docs/protocol.md §10)."""

    IDLE = "idle"  # nothing sent yet
    STARTING = "starting"  # Start sent, waiting for Started
    STARTED = "started"  # audio and Control allowed
    STOPPING = "stopping"  # Stop sent, draining until Completed
    COMPLETED = "completed"  # Completed received
    FAILED = "failed"  # TaskFailed received, or the connection was lost

    @property
    def ended(self) -> bool:
        return self in (State.COMPLETED, State.FAILED)


class ClientTask:
    """The client side of one task, without I/O.

    Methods named after client actions return the text to send, or raise
    :class:`~nlsstream.errors.InvalidStateError` when the action is illegal in the
    current state, so nothing the gateway would reject is ever sent.
    :meth:`receive` parses a server event and advances the state.

    Transitions (client actions on the left of ``->``, server events on the right)::

        IDLE     --start()-->        STARTING
        STARTING --Started-->        STARTED
        STARTED  --audio()/control() STARTED
        STARTED  --stop()-->         STOPPING
        STARTED  --Completed-->      COMPLETED   (server VAD ended the task early)
        STOPPING --Completed-->      COMPLETED
        any live --TaskFailed-->     FAILED
        any live --fail()-->         FAILED      (connection lost)
    """

    # The actions each state allows; one table, read top to bottom.
    _ALLOWED: ClassVar[dict[State, frozenset[str]]] = {
        State.IDLE: frozenset({"start"}),
        State.STARTING: frozenset(),
        State.STARTED: frozenset({"audio", "control", "stop"}),
        State.STOPPING: frozenset(),
        State.COMPLETED: frozenset(),
        State.FAILED: frozenset(),
    }

    def __init__(
        self,
        namespace: Namespace,
        appkey: str,
        params: Mapping[str, Any] | None = None,
        *,
        task_id: str | None = None,
    ) -> None:
        if task_id is not None and not is_valid_id(task_id):
            raise ValueError(f"task_id must be 32 lowercase hex characters, got {task_id!r}")
        self.namespace = namespace
        self.appkey = appkey
        self.params = start_payload(**(params or {}))
        self.task_id = task_id or new_id()
        self.state = State.IDLE

    def _check(self, action: str, what: str) -> None:
        if action not in self._ALLOWED[self.state]:
            raise InvalidStateError(f"cannot {what} while the task is {self.state.value}")

    def _directive(self, name: str, payload: Mapping[str, Any] | None = None) -> str:
        return encode(
            build_directive(
                self.namespace.name, name, task_id=self.task_id, appkey=self.appkey, payload=payload
            )
        )

    def start(self) -> str:
        """The Start directive; the task is then STARTING."""
        self._check("start", "start")
        self.state = State.STARTING
        return self._directive(self.namespace.start, self.params)

    def audio(self) -> None:
        """Check that audio may be sent now (only while STARTED)."""
        if self.state is not State.STARTED:
            self._check("audio", "send audio")

    def control(self, **params: Any) -> str:
        """A Control directive changing ``params`` mid-task (transcriber only)."""
        if self.namespace.control is None:
            raise InvalidStateError(f"{self.namespace.name} has no control directive")
        self._check("control", "send a control directive")
        return self._directive(self.namespace.control, params)

    def stop(self) -> str:
        """The Stop directive; the task is then STOPPING."""
        self._check("stop", "stop")
        self.state = State.STOPPING
        return self._directive(self.namespace.stop)

    def fail(self) -> None:
        """Mark the task dead without a server event (connection lost, aborted)."""
        if not self.state.ended:
            self.state = State.FAILED

    def receive(self, text: str | bytes) -> Event:
        """Parse a server event and advance the state.

        Raises :class:`~nlsstream.errors.ProtocolError` for a malformed event or one that
        cannot happen in the current state (e.g. a result before Started).
        """
        event = parse_event(text)
        if self.state.ended:
            raise ProtocolError(f"gateway sent {event.name} after the task was {self.state.value}")
        if event.task_id and event.task_id != self.task_id:
            raise ProtocolError(
                f"gateway sent {event.name} for task {event.task_id}, expected {self.task_id}"
            )
        if isinstance(event, TaskFailed):
            self.state = State.FAILED
        elif self.state is State.IDLE:
            raise ProtocolError(f"gateway sent {event.name} before Start")
        elif self.state is State.STARTING:
            if not isinstance(event, Started):
                raise ProtocolError(f"gateway sent {event.name} before the task started")
            self.state = State.STARTED
        elif isinstance(event, Started):
            raise ProtocolError(f"gateway sent {event.name} twice")
        elif isinstance(event, Completed):
            self.state = State.COMPLETED
        return event


# --------------------------------------------------------------------------- server side

#: A recognizer task holds at most this much audio (§4, §5.4), a transcriber sentence too.
MAX_SPEECH_MS = 60_000
#: Audio formats the local gateways decode: 16-bit mono PCM, raw or in a WAV container.
GATEWAY_FORMATS = ("pcm", "wav")


@dataclass(frozen=True)
class StartParams:
    """The payload of a Start directive, validated (what a gateway needs of it)."""

    namespace: str
    format: str = "pcm"
    sample_rate: int = 16000
    enable_intermediate_result: bool = False
    enable_words: bool = False
    max_sentence_silence: int = 800
    enable_voice_detection: bool = False
    max_start_silence: int | None = None
    max_end_silence: int | None = None
    raw: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)


def _ms_param(payload: Mapping[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = payload.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise _reject(
            40000003, f"{key} must be an integer from {lo} to {hi} (ms), got {_short(value)}!"
        )
    return value


def _flag_param(payload: Mapping[str, Any], key: str) -> bool:
    value = payload.get(key, False)
    if not isinstance(value, bool):
        raise _reject(40000003, f"{key} must be a boolean, got {_short(value)}!")
    return value


def parse_start_params(namespace: str, payload: Mapping[str, Any]) -> StartParams:
    """Validate a Start payload, raising :class:`DirectiveError` with the documented status:
    40010003 for an unsupported ``format``, 41010101 for a sample rate other than 8000 or
    16000 (§6), 40000003 for other bad parameters."""
    fmt = payload.get("format", "pcm")
    if fmt not in GATEWAY_FORMATS:
        raise _reject(
            40010003,
            f"Invalid format {_short(fmt)}: this gateway accepts only 'pcm' and 'wav' "
            "(16-bit mono PCM)!",
        )
    rate = payload.get("sample_rate", 16000)
    if isinstance(rate, bool) or rate not in SAMPLE_RATES:
        raise _reject(
            41010101,
            f"Unsupported sample rate {_short(rate)}: only 8000 and 16000 are supported!",
        )
    return StartParams(
        namespace=namespace,
        format=fmt,
        sample_rate=int(rate),
        enable_intermediate_result=_flag_param(payload, "enable_intermediate_result"),
        enable_words=_flag_param(payload, "enable_words"),
        max_sentence_silence=_ms_param(payload, "max_sentence_silence", 200, 6000) or 800,
        enable_voice_detection=_flag_param(payload, "enable_voice_detection"),
        max_start_silence=_ms_param(payload, "max_start_silence", 0, MAX_SPEECH_MS),
        max_end_silence=_ms_param(payload, "max_end_silence", 0, MAX_SPEECH_MS),
        raw=dict(payload),
    )


class ServerState(enum.Enum):
    """A gateway connection's view of its task (§3.1, §4.1)."""

    IDLE = "idle"  # no task yet, or the last one completed (another may start)
    STARTED = "started"  # Start accepted: audio and Control allowed
    STOPPING = "stopping"  # Stop accepted: the final events are being produced
    FAILED = "failed"  # TaskFailed sent: the connection is finished


@dataclass(frozen=True)
class Accepted:
    """A directive the task accepted; what the gateway must do is in ``kind``."""

    kind: str  # "start", "stop" or "control"
    directive: Directive
    #: For a Start or a Control: the task's parameters from now on, validated.
    params: StartParams | None = None


class ServerTask:
    """The gateway's side of one connection's tasks, without I/O: one rule book for
    every gateway of the project (the full one and the light one), so they answer the
    same input with the same events and status codes.

    Feed it what the client sent; it either accepts (:meth:`receive` returns
    :class:`Accepted`, :meth:`receive_audio` returns whether to process the audio) or
    raises :class:`DirectiveError` with the status to answer with. Then build the reply
    with :meth:`started`, :meth:`event`, :meth:`completed` or :meth:`failed` (all return
    the message text). After a failure the connection is done (§3.5).

    Transitions (what the client sends on the left, the gateway's reply on the right)::

        IDLE      --Start-->           STARTED   (Started)   ... or TaskFailed:
                                                 bad appkey 40020105, format 40010003,
                                                 rate 41010101, parameter 40000003
        STARTED   --audio, Control-->  STARTED
        STARTED   --Stop-->            STOPPING  (final events, Completed)
        STOPPING  --completed()-->     IDLE      (another task may start)
        STARTED   --completed(early)-> IDLE      (voice detection ended it; a late Stop
                                                  and late audio are ignored)
        STARTED/STOPPING --Start-->    40010005
        IDLE      --Stop, Control, audio--> 40010005   (Stop after Completed too)
        STOPPING  --Stop, Control, audio--> 40010005
        any       --unknown directive-->    40010002   (e.g. a recognizer directive in
                                                        the transcriber namespace)
        any       --malformed, bad ids-->   40000002
    """

    def __init__(self, appkeys: Collection[str] | None = None) -> None:
        self.appkeys = appkeys
        self.state = ServerState.IDLE
        self.namespace: Namespace | None = None
        self.task_id = ""
        self.params: StartParams | None = None
        #: The name of the last directive received ("None" before any), for IDLE_TIMEOUT.
        self.last_directive = "None"
        self._done_task_id: str | None = None  # the last task completed here
        self._done_early = False  # ... by voice detection rather than by Stop

    # ---------------------------------------------------------------- input

    def receive(self, text: str | bytes) -> Accepted | None:
        """Check one directive against the task's state.

        Returns what to do, ``None`` for a directive to ignore (a late Stop after voice
        detection completed the task); raises :class:`DirectiveError` (and the task is
        FAILED) for anything the gateway must refuse.
        """
        try:
            return self._receive(text)
        except DirectiveError as exc:
            self._refused(exc)
            raise

    def _receive(self, text: str | bytes) -> Accepted | None:
        if self.state is ServerState.FAILED:
            raise _reject(40010005, "The task has failed!", self.task_id)
        d = parse_directive(text)
        self.last_directive = d.name
        ns = NAMESPACES[d.namespace]
        if d.name not in ns.directives:
            raise _reject(
                40010002,
                f"Directive {_short(d.name)} is not supported in namespace '{ns.name}'!",
                d.task_id,
            )
        if d.name == ns.start:
            return self._start(ns, d)
        if self.state is ServerState.IDLE and d.task_id == self._done_task_id:
            if d.name == ns.stop and self._done_early:
                return None  # voice detection already completed it: a late Stop is a no-op
            raise _reject(40010005, f"Got {d.name} after the task completed!", d.task_id)
        what = "stop" if d.name == ns.stop else "control"
        if self.state is ServerState.IDLE:
            raise _reject(40010005, f"Got {what} directive before the task started!", d.task_id)
        if d.task_id != self.task_id or ns is not self.namespace:
            raise _reject(
                40000002,
                f"Task id '{d.task_id}' ({ns.name}) does not match the running task!",
            )
        if self.state is ServerState.STOPPING:
            raise _reject(40010005, f"Got {what} directive while task is stopping!")
        if what == "stop":
            self.state = ServerState.STOPPING
            return Accepted(what, d)
        assert self.params is not None
        silence = _ms_param(d.payload, "max_sentence_silence", 200, 6000)
        if silence is not None:  # the one parameter a Control may change (§3.3)
            self.params = dataclasses.replace(self.params, max_sentence_silence=silence)
        return Accepted(what, d, self.params)

    def _start(self, ns: Namespace, d: Directive) -> Accepted:
        if self.state is not ServerState.IDLE:
            raise _reject(40010005, "Got start directive while task is running!")
        self.namespace, self.task_id = ns, d.task_id
        self._done_task_id = None
        if self.appkeys is not None and d.appkey not in self.appkeys:
            raise _reject(40020105, "Appkey not exist!", d.task_id)
        self.params = parse_start_params(ns.name, d.payload)
        self.state = ServerState.STARTED
        return Accepted("start", d, self.params)

    def receive_audio(self) -> bool:
        """Check that audio may arrive now: True to process it, False to ignore it (the
        task was already completed by voice detection); raises :class:`DirectiveError`."""
        if self.state is ServerState.STARTED:
            return True
        try:
            if self.state is ServerState.IDLE and self._done_task_id is not None:
                if self._done_early:
                    return False  # the cloud ignores audio after an early Completed
                raise _reject(40010005, "Got audio data after the stop directive!")
            if self.state is ServerState.STOPPING:
                raise _reject(40010005, "Got audio data after the stop directive!")
            if self.state is ServerState.FAILED:
                raise _reject(40010005, "The task has failed!")
            raise _reject(40010005, "Got audio data before the task started!")
        except DirectiveError as exc:
            self._refused(exc)
            raise

    def _refused(self, exc: DirectiveError) -> None:
        """Whose task a refusal names: the directive's own id before any task (when it
        had a valid one), else the running task's."""
        if not exc.task_id or self.state is not ServerState.IDLE:
            exc.task_id = self.task_id or exc.task_id
        self.state = ServerState.FAILED

    # ---------------------------------------------------------------- output

    def event(self, name: str, payload: Mapping[str, Any] | None = None) -> str:
        """An event of the current task (e.g. ``SentenceEnd``), as text."""
        assert self.namespace is not None, "no task has started"
        return encode(build_event(self.namespace.name, name, self.task_id, payload))

    def started(self) -> str:
        """The ``*Started`` event for the task just accepted."""
        assert self.namespace is not None, "no task has started"
        return self.event(self.namespace.started)

    def completed(self, payload: Mapping[str, Any] | None = None, *, early: bool = False) -> str:
        """The ``*Completed`` event; the task is over and another may start.

        ``early``: voice detection ended the task before any Stop; a late Stop and
        late audio are then ignored, as the cloud does.
        """
        assert self.namespace is not None, "no task has started"
        text = self.event(self.namespace.completed, payload)
        self.state = ServerState.IDLE
        self._done_task_id, self._done_early = self.task_id, early
        return text

    def failed(self, status: int, detail: str, task_id: str | None = None) -> str:
        """A ``TaskFailed`` with ``status`` and its text; the task is over for good.

        ``detail`` is the text after ``Gateway:<NAME>:`` (see
        :func:`~nlsstream.errors.status_text`); use :meth:`refusal` for a
        :class:`DirectiveError`.
        """
        return self.refusal(DirectiveError(status, status_text(status, detail), task_id))

    def refusal(self, exc: DirectiveError) -> str:
        """The ``TaskFailed`` answering a refused directive or audio."""
        self.state = ServerState.FAILED
        return encode(build_task_failed(exc.task_id or self.task_id, exc.status, exc.status_text))
