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

__all__ = ["FAULT_SYNTAX", "MALFORMED_TEXT", "FaultPoint", "Faults", "parse_faults"]

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


#: The ``SPEC`` syntax of :func:`parse_faults` (``nlsstream serve --fault``).
FAULT_SYNTAX = """\
fault SPEC: [once:]WHAT[@WHEN]  (every connection / HTTP request, or with once: the next only)
  WHAT  drop             abort the TCP connection (the client sees 1006)
        stall            send nothing more, keep the socket open
        malformed        send invalid JSON instead of the event due
        fail=STATUS      TaskFailed with STATUS (e.g. 40000005, 52010001), then close
        delay=SECONDS    wait before Started (@start), Completed (@stop) or each
                         SentenceEnd (@event)
        http=STATUS      answer recording requests with this HTTP status
  WHEN  start (default) | stop | audio+N  where N is bytes of audio (64000b) or
        milliseconds / seconds of 16 kHz PCM16 (2000ms, 2s; 32 bytes per ms)
  e.g.  --fault drop@audio+2s                  every connection drops after 2 s of audio
        --fault once:fail=52010001@start       the next task fails at start (retryable)
"""

_SPEC_POINTS = ("start", "audio", "stop")
_DELAYS = {"start": "start_delay", "stop": "complete_delay", "event": "event_delay"}


def _audio_bytes(amount: str, spec: str) -> int:
    units = (("ms", 32), ("s", 32000), ("b", 1))
    for unit, factor in units:
        number = amount[: -len(unit)]
        if amount.endswith(unit) and number.replace(".", "", 1).isdigit():
            return int(float(number) * factor)
    raise ValueError(f"fault {spec!r}: audio+N needs N with a unit: 64000b, 2000ms or 2s")


def _parse_one(spec: str) -> tuple[dict[str, object], bool]:
    """One ``SPEC`` as :class:`Faults` fields, and whether it is for the next connection only."""
    body = spec.strip()
    once = body.startswith("once:")
    body = body.removeprefix("once:")
    what, _, when = body.partition("@")
    kind, _, value = what.partition("=")
    if kind == "http":
        if when or not value.isdigit() or not 100 <= int(value) <= 599:
            raise ValueError(f"fault {spec!r}: http takes an HTTP status and no @WHEN: http=500")
        return {"http_status": int(value)}, once
    if kind == "delay":
        point = when or "start"
        try:
            seconds = float(value)
        except ValueError:
            seconds = -1.0
        if point not in _DELAYS or not 0 <= seconds < 86400:
            raise ValueError(
                f"fault {spec!r}: delay takes seconds and @start, @stop or @event: delay=2@start"
            )
        return {_DELAYS[point]: seconds}, once
    if kind not in ("drop", "stall", "malformed", "fail"):
        raise ValueError(
            f"fault {spec!r}: WHAT is drop, stall, malformed, fail=STATUS, delay=SECONDS "
            "or http=STATUS"
        )
    if (kind == "fail") != bool(value) or (value and not value.isdigit()):
        raise ValueError(
            f"fault {spec!r}: "
            + ("fail takes a status: fail=40000005" if kind == "fail" else f"{kind} takes no =")
        )
    point, _, amount = (when or "start").partition("+")
    if point not in _SPEC_POINTS or bool(amount) != (point == "audio"):
        raise ValueError(f"fault {spec!r}: WHEN is start, stop or audio+N (e.g. audio+2000ms)")
    fields: dict[str, object] = {f"{kind}_at": point}
    if kind == "fail":
        fields["fail_status"] = int(value)
    if point == "audio":
        fields[f"{kind}_after_bytes"] = _audio_bytes(amount, spec)
    return fields, once


def parse_faults(specs: list[str]) -> tuple[Faults, Faults | None]:
    """Faults from ``SPEC`` strings (:data:`FAULT_SYNTAX`, ``nlsstream serve --fault``):
    those for every connection (``Gateway(faults=...)``) and, if any spec says ``once:``,
    those for the next connection only (``Gateway.queue_faults``; it has the every-time
    faults too). Raises :class:`ValueError` naming the bad spec."""
    every: dict[str, object] = {}
    once: dict[str, object] = {}
    for spec in specs:
        fields, is_once = _parse_one(spec)
        target = once if is_once else every
        for name, value in fields.items():
            if name in target and target[name] != value:
                raise ValueError(f"fault {spec!r}: conflicts with an earlier --fault ({name})")
            target[name] = value
    base = Faults(**every)  # type: ignore[arg-type]
    if not once:
        return base, None
    return base, Faults(**{**every, **once})  # type: ignore[arg-type]
