"""The official SDK's exception classes (``nls.exception``), under the same names."""

from __future__ import annotations

__all__ = [
    "CompleteTimeoutException",
    "ConnectionTimeout",
    "ConnectionUnavailable",
    "GetTokenFailed",
    "InvalidParameter",
    "NotStartException",
    "StartTimeoutException",
    "StopTimeoutException",
]


class InvalidParameter(Exception):
    """A missing token or appkey, a bad argument, or empty audio for the recognizer."""


class GetTokenFailed(Exception):
    """CreateToken failed (:func:`nlsstream.compat.nls.token.getToken`)."""


class ConnectionTimeout(Exception):
    """Audio could not be handed to the connection in time (it stopped taking data)."""


class ConnectionUnavailable(Exception):
    """Kept for code that catches it; nlsstream reports connection failures to
    ``on_error`` instead."""


class StartTimeoutException(Exception):
    """``start()``: no Started within ``timeout``."""


class StopTimeoutException(Exception):
    """``stop()``: no Completed within ``timeout``."""


class NotStartException(Exception):
    """``NlsSpeechRecognizer.send_audio()`` before ``start()`` or after the task ended."""


class CompleteTimeoutException(Exception):
    """Kept for code that catches it (the official SDK never raises it either)."""
