"""nlsstream: asyncio SDK for Alibaba Cloud NLS real-time speech recognition."""

from ._version import __version__
from .errors import (
    STATUS_CODES,
    AudioFormatError,
    AuthenticationError,
    CallbackError,
    EventOverflowError,
    GatewayConnectionError,
    InvalidStateError,
    NlsError,
    ProtocolError,
    StartTimeoutError,
    StatusCode,
    StopTimeoutError,
    TaskFailedError,
)
from .events import EventStream
from .pacing import Metrics, Pacer
from .protocol import (
    Completed,
    Event,
    ResultChanged,
    SentenceBegin,
    SentenceEnd,
    Started,
    TaskFailed,
    UnknownEvent,
    Word,
)
from .session import Recognizer, Result, Transcriber

__all__ = [
    "STATUS_CODES",
    "AudioFormatError",
    "AuthenticationError",
    "CallbackError",
    "Completed",
    "Event",
    "EventOverflowError",
    "EventStream",
    "GatewayConnectionError",
    "InvalidStateError",
    "Metrics",
    "NlsError",
    "Pacer",
    "ProtocolError",
    "Recognizer",
    "Result",
    "ResultChanged",
    "SentenceBegin",
    "SentenceEnd",
    "StartTimeoutError",
    "Started",
    "StatusCode",
    "StopTimeoutError",
    "TaskFailed",
    "TaskFailedError",
    "Transcriber",
    "UnknownEvent",
    "Word",
    "__version__",
]
