"""The local NLS gateway: offline, byte-compatible with the cloud's real-time protocols.

Start it from Python (``async with Gateway() as gw``), from a thread
(``with Gateway().run_in_thread() as gw``), from pytest (the ``nls_gateway`` fixture
of :mod:`nlsstream.testing`) or from the shell (``nlsstream serve``), then point any
NLS client, ours or the official SDK, at :attr:`Gateway.url`.
"""

from .engine import (
    CallableRecognizer,
    SegmentDecoder,
    SpanRecognizer,
    SpeechEngine,
    SphinxRecognizer,
    Transcript,
)
from .faults import Faults
from .http import HttpLimits
from .server import Gateway, GatewayThread, SessionRecord

__all__ = [
    "CallableRecognizer",
    "Faults",
    "Gateway",
    "GatewayThread",
    "HttpLimits",
    "SegmentDecoder",
    "SessionRecord",
    "SpanRecognizer",
    "SpeechEngine",
    "SphinxRecognizer",
    "Transcript",
]
