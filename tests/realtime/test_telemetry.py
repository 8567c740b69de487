"""OpenTelemetry (the [otel] extra): a span per session and the latency, lateness,
audio and reconnect instruments, seen through the SDK's in-memory exporters."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from nlsstream import Reconnect, Resumed, Transcriber
from nlsstream.gateway import Faults, Gateway

otel_trace = pytest.importorskip("opentelemetry.trace")
otel_metrics = pytest.importorskip("opentelemetry.metrics")
sdk_trace = pytest.importorskip("opentelemetry.sdk.trace")
sdk_metrics = pytest.importorskip("opentelemetry.sdk.metrics")
from opentelemetry.sdk.metrics.export import InMemoryMetricReader  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import (  # noqa: E402
    InMemorySpanExporter,
)

THREE = str(Path(__file__).parents[1] / "fixtures" / "three_sentences.wav")
# 4 s into three_sentences.wav: in the middle of its second sentence.
MID_SECOND = 2 * 16000 * 4

# OpenTelemetry's global providers can be set once per process: this module does it,
# when its test runs. Other tests' sessions may report to them too, so what is looked at
# is this test's gateway's (its port) and this session's span (its task id).
SPANS = InMemorySpanExporter()
READER = InMemoryMetricReader()


@pytest.fixture(scope="module", autouse=True)
def providers() -> None:
    provider = sdk_trace.TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(SPANS))
    otel_trace.set_tracer_provider(provider)
    otel_metrics.set_meter_provider(sdk_metrics.MeterProvider(metric_readers=[READER]))


def points(name: str, port: int) -> list[Any]:
    data = READER.get_metrics_data()
    assert data is not None
    return [
        point
        for resource in data.resource_metrics
        for scope in resource.scope_metrics
        for metric in scope.metrics
        if metric.name == name
        for point in metric.data.data_points
        if dict(point.attributes or {}).get("server.port") == port
    ]


async def test_a_session_that_resumed_once_is_one_span_with_its_instruments() -> None:
    resumed: list[Resumed] = []
    async with Gateway(recognizer="sphinx") as gw:
        gw.queue_faults(Faults(drop_at="audio", drop_after_bytes=MID_SECOND))
        async with Transcriber(
            "app",
            "tok",
            url=gw.url,
            enable_intermediate_result=True,
            reconnect=Reconnect(backoff=0.01, max_backoff=0.05),
            on_resume=resumed.append,
        ) as t:
            await t.stream(THREE, pace=None)
            await t.stop()
    assert len(resumed) == 1
    [span] = [
        s
        for s in SPANS.get_finished_spans()
        if s.name == "nls.transcribe" and dict(s.attributes or {}).get("nls.task.id") == t.task_id
    ]
    port = gw.port
    attrs = dict(span.attributes or {})
    assert attrs["nls.task.id"] == t.task_id
    assert attrs["nls.namespace"] == "SpeechTranscriber"
    assert attrs["server.address"] == "127.0.0.1"
    assert attrs["nls.status"] == 20000000 and attrs["nls.resumes"] == 1
    assert attrs["nls.audio.seconds"] == pytest.approx(t.metrics.audio_ms_sent / 1000, abs=0.01)
    [event] = [e for e in span.events if e.name == "nls.resumed"]
    assert dict(event.attributes or {})["nls.task.id"] == t.task_id
    assert sum(p.value for p in points("nls.client.reconnects", port)) == 1
    assert sum(p.value for p in points("nls.client.audio.sent", port)) == t.metrics.bytes_sent
    assert t.metrics.final_latency.count >= 2
    finals = points("nls.client.sentence.final_latency", port)
    assert sum(p.count for p in finals) == t.metrics.final_latency.count
