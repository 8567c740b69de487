"""OpenTelemetry for real-time sessions: optional (``pip install 'nlsstream[otel]'``,
which needs only ``opentelemetry-api``); without it nothing here runs.

Each session is one span (``nls.transcribe`` / ``nls.recognize``, kind CLIENT) from
``start()`` to the end of its task, with the task id, namespace, gateway address, final
status, resumes and seconds of audio as attributes, and an event per resume. Instruments
(meter ``nlsstream``), named in OpenTelemetry's semantic-convention style:

=============================================  =========  ===============================
``nls.client.sentence.final_latency``          histogram  ms, audio at a sentence's end
                                                          written -> its SentenceEnd
``nls.client.sentence.first_partial_latency``  histogram  ms, audio at a sentence's start
                                                          written -> its first partial
``nls.client.frame.lateness``                  histogram  ms, each session's p99 paced-frame
                                                          lateness, at its end
``nls.client.audio.sent``                      counter    bytes of audio sent
``nls.client.reconnects``                      counter    resumes on a new connection
=============================================  =========  ===============================

The SDK (providers, exporters) is the application's to configure, as OpenTelemetry
intends; with none configured, the API's no-op providers cost next to nothing.
"""

from __future__ import annotations

import urllib.parse
from typing import TYPE_CHECKING, Any

from .protocol import Event, ResultChanged, Resumed, SentenceEnd

if TYPE_CHECKING:
    from ..errors import NlsError
    from .pacing import Metrics

try:
    from opentelemetry import metrics as otel_metrics
    from opentelemetry import trace as otel_trace
except ImportError:  # the [otel] extra is not installed
    otel_metrics = None  # type: ignore[assignment]
    otel_trace = None  # type: ignore[assignment]

__all__ = ["SessionTelemetry", "available"]


def available() -> bool:
    """Whether ``opentelemetry-api`` is installed (sessions then report to it)."""
    return otel_trace is not None


class _Instruments:
    """The process's instruments, made once, on the first session that needs them."""

    def __init__(self) -> None:
        meter = otel_metrics.get_meter("nlsstream")
        self.final_latency = meter.create_histogram(
            "nls.client.sentence.final_latency",
            unit="ms",
            description="From writing the audio at a sentence's end to its SentenceEnd",
        )
        self.first_partial_latency = meter.create_histogram(
            "nls.client.sentence.first_partial_latency",
            unit="ms",
            description="From writing the audio at a sentence's start to its first partial",
        )
        self.lateness = meter.create_histogram(
            "nls.client.frame.lateness",
            unit="ms",
            description="A session's 99th-percentile paced-frame lateness, at its end",
        )
        self.audio_sent = meter.create_counter(
            "nls.client.audio.sent", unit="By", description="Audio bytes sent"
        )
        self.reconnects = meter.create_counter(
            "nls.client.reconnects",
            unit="{reconnect}",
            description="Sessions resumed on a new connection",
        )


_instruments: _Instruments | None = None


class SessionTelemetry:
    """One session's span and measurements. Create it with :meth:`begin`, which
    returns ``None`` when OpenTelemetry is not installed."""

    def __init__(self, namespace: str, url: str) -> None:
        global _instruments
        if _instruments is None:
            _instruments = _Instruments()
        self._instruments = _instruments
        parts = urllib.parse.urlsplit(url)
        self._attributes: dict[str, Any] = {"nls.namespace": namespace}
        if parts.hostname:
            self._attributes["server.address"] = parts.hostname
        if parts.port:
            self._attributes["server.port"] = parts.port
        name = "nls.transcribe" if namespace == "SpeechTranscriber" else "nls.recognize"
        tracer = otel_trace.get_tracer("nlsstream")
        self._span = tracer.start_span(
            name, kind=otel_trace.SpanKind.CLIENT, attributes=self._attributes
        )
        self._resumes = 0

    @classmethod
    def begin(cls, namespace: str, url: str) -> SessionTelemetry | None:
        return cls(namespace, url) if available() else None

    def event(self, event: Event) -> None:
        """An event as it arrived (with its latency measured)."""
        latency = getattr(event, "latency_ms", None)
        if latency is None:
            if isinstance(event, Resumed):
                self._resumes += 1
                self._instruments.reconnects.add(1, self._attributes)
                self._span.add_event(
                    "nls.resumed",
                    {
                        "nls.task.previous_id": event.previous_task_id,
                        "nls.task.id": event.task_id,
                        "nls.resume.gap_ms": event.gap_ms,
                        "nls.resume.replayed_ms": event.replayed_ms,
                    },
                )
            return
        if isinstance(event, SentenceEnd):
            self._instruments.final_latency.record(latency, self._attributes)
        elif isinstance(event, ResultChanged):
            self._instruments.first_partial_latency.record(latency, self._attributes)

    def end(self, task_id: str, error: NlsError | None, metrics: Metrics) -> None:
        """The task ended (``error``: why it failed, ``None`` if it completed)."""
        span = self._span
        span.set_attribute("nls.task.id", task_id)
        span.set_attribute("nls.resumes", self._resumes)
        span.set_attribute("nls.audio.seconds", round(metrics.audio_ms_sent / 1000, 3))
        if error is not None:
            span.set_attribute("error.type", type(error).__name__)
            status = getattr(error, "status", None)
            if isinstance(status, int):
                span.set_attribute("nls.status", status)
            span.set_status(otel_trace.Status(otel_trace.StatusCode.ERROR, str(error)))
        else:
            span.set_attribute("nls.status", 20000000)
        self._instruments.audio_sent.add(metrics.bytes_sent, self._attributes)
        if metrics.paced_frames:
            self._instruments.lateness.record(metrics.p99_lateness_ms, self._attributes)
        span.end()
