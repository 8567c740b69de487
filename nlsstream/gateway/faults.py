"""Fault injection for tests: make the local gateway misbehave on purpose.

A :class:`Faults` value is applied to one connection. Set it gateway-wide
(``gateway.faults = Faults(...)``, for connections opened afterwards) or queue it for
the next connection only (``gateway.queue_faults(Faults(...))``, FIFO).

Points (``*_at``):

* ``"start"``: when the Start directive arrives, instead of ``*Started``;
* ``"audio"``: once the task has received ``*_after_bytes`` bytes of audio;
* ``"stop"``: when the Stop directive arrives, instead of the final events.

When several faults hit the same point, the order is: drop, fail, stall, malformed.

The recording endpoints (FlashRecognizer, REST, POP RPC; see :mod:`.files`) take one
``Faults`` per HTTP request: ``start_delay`` delays the answer, ``drop_at`` (any point)
drops the connection, ``http_status`` answers that HTTP status with no JSON,
``fail_status`` is the status answered (a FileTrans task submitted with it ends with
it), ``complete_delay`` keeps a FileTrans task RUNNING that much longer.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["MALFORMED_TEXT", "FaultPoint", "Faults"]

FaultPoint = Literal["start", "audio", "stop"]

#: What ``malformed_at`` sends instead of an event: truncated JSON.
MALFORMED_TEXT = '{"header": {"namespace": "SpeechTranscriber", "name": "Sentence'


@dataclass
class Faults:
    """What to break in one connection. The default breaks nothing.

    Attributes:
        start_delay: seconds to wait before sending ``*Started``.
        complete_delay: seconds to wait before sending ``*Completed``.
        event_delay: seconds to wait before sending each ``SentenceEnd`` (a gateway
            slow to recognise: results keep coming, slowly).
        fail_status: send ``TaskFailed`` with this status at ``fail_at`` (status_text
            ``Gateway:<NAME>:Injected fault at <point>!``), then close.
        fail_at: where ``fail_status`` strikes.
        fail_after_bytes: for ``fail_at="audio"``: after this many audio bytes.
        drop_at: abort the TCP connection here (no close frame: the client sees 1006).
        drop_after_bytes: for ``drop_at="audio"``.
        malformed_at: send invalid JSON text instead of the event due here (for
            ``"audio"``: instead of the first event after ``malformed_after_bytes``).
        malformed_after_bytes: for ``malformed_at="audio"``.
        stall_at: from here on send nothing and ignore everything, but keep the socket
            open (and answer pings) until the client gives up.
        stall_after_bytes: for ``stall_at="audio"``.
        http_status: answer an HTTP request of the recording endpoints with this HTTP
            status (e.g. 500) and a plain-text body.
    """

    start_delay: float = 0.0
    complete_delay: float = 0.0
    event_delay: float = 0.0
    fail_status: int | None = None
    fail_at: FaultPoint = "start"
    fail_after_bytes: int = 0
    drop_at: FaultPoint | None = None
    drop_after_bytes: int = 0
    malformed_at: FaultPoint | None = None
    malformed_after_bytes: int = 0
    stall_at: FaultPoint | None = None
    stall_after_bytes: int = 0
    http_status: int | None = None

    def __post_init__(self) -> None:
        points = ("start", "audio", "stop")
        for name in ("fail_at", "drop_at", "malformed_at", "stall_at"):
            value = getattr(self, name)
            if value is not None and value not in points:
                raise ValueError(f"Faults.{name} must be one of {points} or None, got {value!r}")
        if min(self.start_delay, self.complete_delay, self.event_delay) < 0:
            raise ValueError("Faults delays must be >= 0")

    @property
    def active(self) -> bool:
        """Whether anything at all is injected."""
        return self != Faults()

    def fails(self, point: FaultPoint, audio_bytes: int = 0) -> bool:
        return (
            self.fail_status is not None
            and self.fail_at == point
            and (point != "audio" or audio_bytes >= max(self.fail_after_bytes, 1))
        )

    def drops(self, point: FaultPoint, audio_bytes: int = 0) -> bool:
        return self.drop_at == point and (
            point != "audio" or audio_bytes >= max(self.drop_after_bytes, 1)
        )

    def stalls(self, point: FaultPoint, audio_bytes: int = 0) -> bool:
        return self.stall_at == point and (
            point != "audio" or audio_bytes >= max(self.stall_after_bytes, 1)
        )

    def malforms(self, point: FaultPoint, audio_bytes: int = 0) -> bool:
        return self.malformed_at == point and (
            point != "audio" or audio_bytes >= max(self.malformed_after_bytes, 1)
        )
