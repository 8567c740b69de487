"""nlsstream: asyncio SDK for Alibaba Cloud NLS speech recognition.

What a user needs is here: the sessions (:class:`Transcriber`, :class:`Recognizer`), the
recording clients (:class:`FlashRecognizer`, :class:`FileTranscriber`,
:class:`RestRecognizer`; they need the ``files`` extra) and their results, the sessions'
events, :class:`State` (what ``session.state`` returns), :class:`Result` and
:class:`Metrics` (``session.metrics``), token providers, settings, the error tree, and
:class:`Pacer` for sharing or driving the real-time clock. The local gateway lives in
:mod:`nlsstream.gateway`, the pytest fixture in :mod:`nlsstream.testing`, the blocking
face of the sessions in :mod:`nlsstream.sync`, and a drop-in for the official SDK's
``nls`` module in :mod:`nlsstream.compat.nls`.
"""

from ._version import __version__
from .auth import AccessKeyTokenProvider, StaticTokenProvider, TokenProvider
from .config import DEFAULT_URL, ConfigurationError, Settings
from .errors import (
    STATUS_CODES,
    AudioFormatError,
    AuthenticationError,
    CallbackError,
    EventOverflowError,
    GatewayConnectionError,
    InvalidStateError,
    NlsError,
    PopError,
    ProtocolError,
    StartTimeoutError,
    StatusCode,
    StopTimeoutError,
    TaskFailedError,
    TokenError,
)
from .mic import Microphone, MicrophoneError
from .realtime.events import EventStream
from .realtime.live import AudioQueue
from .realtime.pacing import Metrics, Pacer
from .realtime.protocol import (
    Completed,
    Event,
    ResultChanged,
    Resumed,
    SentenceBegin,
    SentenceEnd,
    Started,
    State,
    TaskFailed,
    UnknownEvent,
    Word,
)
from .realtime.resume import Reconnect
from .realtime.session import Recognizer, Result, Transcriber
from .recordings.services import (
    FileResult,
    FileSentence,
    FileTranscriber,
    FileTransTask,
    FlashRecognizer,
    RestRecognizer,
)

__all__ = [
    "DEFAULT_URL",
    "STATUS_CODES",
    "AccessKeyTokenProvider",
    "AudioFormatError",
    "AudioQueue",
    "AuthenticationError",
    "CallbackError",
    "Completed",
    "ConfigurationError",
    "Event",
    "EventOverflowError",
    "EventStream",
    "FileResult",
    "FileSentence",
    "FileTransTask",
    "FileTranscriber",
    "FlashRecognizer",
    "GatewayConnectionError",
    "InvalidStateError",
    "Metrics",
    "Microphone",
    "MicrophoneError",
    "NlsError",
    "Pacer",
    "PopError",
    "ProtocolError",
    "Recognizer",
    "Reconnect",
    "RestRecognizer",
    "Result",
    "ResultChanged",
    "Resumed",
    "SentenceBegin",
    "SentenceEnd",
    "Settings",
    "StartTimeoutError",
    "Started",
    "State",
    "StaticTokenProvider",
    "StatusCode",
    "StopTimeoutError",
    "TaskFailed",
    "TaskFailedError",
    "TokenError",
    "TokenProvider",
    "Transcriber",
    "UnknownEvent",
    "Word",
    "__version__",
]
