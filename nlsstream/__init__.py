"""nlsstream: asyncio SDK for Alibaba Cloud NLS real-time speech recognition."""

from ._version import __version__
from .errors import (
    STATUS_CODES,
    AudioFormatError,
    AuthenticationError,
    GatewayConnectionError,
    InvalidStateError,
    NlsError,
    ProtocolError,
    StartTimeoutError,
    StatusCode,
    StopTimeoutError,
    TaskFailedError,
)
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

__all__ = [
    "STATUS_CODES",
    "AudioFormatError",
    "AuthenticationError",
    "Completed",
    "Event",
    "GatewayConnectionError",
    "InvalidStateError",
    "NlsError",
    "ProtocolError",
    "ResultChanged",
    "SentenceBegin",
    "SentenceEnd",
    "StartTimeoutError",
    "Started",
    "StatusCode",
    "StopTimeoutError",
    "TaskFailed",
    "TaskFailedError",
    "UnknownEvent",
    "Word",
    "__version__",
]
