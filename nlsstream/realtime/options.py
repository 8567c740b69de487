"""A session's arguments, checked once: :class:`SessionConfig`.

Everything a :class:`~nlsstream.Transcriber` or :class:`~nlsstream.Recognizer` is given,
apart from its callbacks, is validated here when the session is created, so that a
mistake is a ValueError/TypeError at the line that made it rather than a failure later
on the connection.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .. import audio
from ..config import start_parameters
from .connection import ProxySetting
from .protocol import SAMPLE_RATES, Namespace
from .resume import Reconnect

__all__ = ["DEFAULT_EVENT_QUEUE_SIZE", "DEFAULT_KEEPALIVE_S", "SessionConfig"]

DEFAULT_EVENT_QUEUE_SIZE = 1024
#: Seconds a live source may be quiet before the session sends silence in its place.
DEFAULT_KEEPALIVE_S = 3.0


@dataclass(frozen=True)
class SessionConfig:
    """The checked arguments of one session (see :class:`~nlsstream.realtime.session.Session`
    for their meaning). ``params`` are the Start parameters, the standard ones included;
    ``reconnect`` is ``None`` when resuming is off, ``keepalive`` when keepalive is."""

    appkey: str
    url: str
    format: str = "pcm"
    sample_rate: int = 16000
    connect_timeout: float = 10.0
    start_timeout: float = 10.0
    stop_timeout: float = 10.0
    ping_interval: float | None = 8.0
    ping_timeout: float | None = 20.0
    event_queue_size: int = DEFAULT_EVENT_QUEUE_SIZE
    max_ahead_ms: int = 1000
    proxy: ProxySetting = True
    reconnect: Reconnect | None = field(default_factory=Reconnect)
    keepalive: float | None = DEFAULT_KEEPALIVE_S
    params: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.appkey, str) or not self.appkey:
            raise ValueError("appkey must be a non-empty string")
        if self.sample_rate not in SAMPLE_RATES:
            raise ValueError(f"sample_rate must be 8000 or 16000 Hz, got {self.sample_rate!r}")
        for name in ("connect_timeout", "start_timeout", "stop_timeout"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"{name} must be positive, got {value!r}")
        if self.event_queue_size < 1:
            raise ValueError(f"event_queue_size must be at least 1, got {self.event_queue_size}")

    @classmethod
    def create(
        cls,
        namespace: Namespace,
        owner: str,
        *,
        reconnect: Reconnect | bool,
        keepalive: float | bool,
        standard: Mapping[str, Any],
        extra: Mapping[str, Any],
        params: Mapping[str, Any] | None,
        **fields: Any,
    ) -> SessionConfig:
        """The config of a session of class ``owner``: ``reconnect`` and ``keepalive`` as
        the session takes them (``True``/``False``/a value), the Start parameters from the
        ``standard`` ones, the keyword arguments ``extra`` and the explicit ``params``."""
        return cls(
            reconnect=_reconnect(reconnect),
            keepalive=_keepalive(keepalive),
            params={
                "format": fields.get("format", "pcm"),
                "sample_rate": fields.get("sample_rate", 16000),
                **standard,
                **start_parameters(namespace, owner, extra, params),
            },
            **fields,
        )

    @property
    def max_ahead_bytes(self) -> int:
        """How much PCM :meth:`stream` buffers ahead of the pacer."""
        return max(audio.FRAME_BYTES, 2 * self.sample_rate * self.max_ahead_ms // 1000)


def _reconnect(value: Reconnect | bool) -> Reconnect | None:
    if value is True:
        return Reconnect()
    if value is False:
        return None
    if not isinstance(value, Reconnect):
        raise TypeError(f"reconnect must be a Reconnect, True or False, got {value!r}")
    return value


def _keepalive(value: float | bool) -> float | None:
    if value is True:
        return DEFAULT_KEEPALIVE_S
    if value is False:
        return None
    if not (isinstance(value, (int, float)) and value > 0):
        raise ValueError(f"keepalive must be True, False or seconds > 0, got {value!r}")
    return float(value)
