"""Fault injection: every fault at every point, per gateway and per connection."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator

import pytest
from helpers import RawTask, names, read_pcm
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, ConnectionClosedError

from nlsstream.gateway import Faults, Gateway
from nlsstream.gateway.faults import MALFORMED_TEXT

PCM, _ = read_pcm("hello.wav")  # 1.2 s, one sentence


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    async with Gateway(recognizer="span", idle_timeout=5) as g:
        yield g


async def run_task(gw: Gateway, faults: Faults | None = None) -> tuple[RawTask, list[str]]:
    """Start, send PCM, stop; the names of the events received before the end."""
    if faults is not None:
        gw.queue_faults(faults)
    async with connect(gw.url) as ws:
        task = RawTask(ws)
        await task.start()
        await task.audio(PCM)
        await task.stop()
        return task, names(await task.until_end())


def test_faults_validation() -> None:
    with pytest.raises(ValueError, match="fail_at"):
        Faults(fail_at="later")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="delays"):
        Faults(start_delay=-1)
    assert not Faults().active and Faults(drop_at="stop").active


@pytest.mark.parametrize("point", ["start", "audio", "stop"])
async def test_fail_status(gw: Gateway, point: str) -> None:
    gw.queue_faults(Faults(fail_status=50000000, fail_at=point, fail_after_bytes=6400))  # type: ignore[arg-type]
    async with connect(gw.url) as ws:
        task = RawTask(ws)
        first = await task.start()
        events = [first]
        if first["header"]["name"] != "TaskFailed":
            try:
                await task.audio(PCM)
                await task.stop()
            except ConnectionClosed:
                pass
            events = await task.until_end()
    header = events[-1]["header"]
    assert header["name"] == "TaskFailed" and header["namespace"] == "Default"
    assert header["status"] == 50000000
    assert header["status_text"] == f"Gateway:SERVER_ERROR:Injected fault at {point}!"
    record = gw.sessions[-1]
    assert record.status == 50000000 and record.outcome == "failed"
    if point == "audio":
        assert 6400 <= record.audio_bytes < len(PCM)
        assert names(task.events)[0] == "TranscriptionStarted"
    if point == "stop":
        assert record.audio_bytes == len(PCM)


@pytest.mark.parametrize("point", ["start", "audio", "stop"])
async def test_drop(gw: Gateway, point: str) -> None:
    gw.queue_faults(Faults(drop_at=point, drop_after_bytes=3200))  # type: ignore[arg-type]
    async with connect(gw.url) as ws:
        task = RawTask(ws)
        with pytest.raises(ConnectionClosedError) as info:
            await task.start()
            await task.audio(PCM)
            await task.stop()
            await task.until_end()
        assert info.value.rcvd is None  # no close frame: the TCP connection was aborted
    record = gw.sessions[-1]
    assert record.outcome == "dropped" and record.status is None
    expected = {
        "start": [],
        "audio": ["TranscriptionStarted"],
        "stop": ["TranscriptionStarted", "SentenceBegin"],
    }
    assert names(task.events) == expected[point]


@pytest.mark.parametrize(
    ("point", "replaced"),
    [
        ("start", "TranscriptionStarted"),
        ("audio", "SentenceBegin"),
        ("stop", "TranscriptionCompleted"),
    ],
)
async def test_malformed(gw: Gateway, point: str, replaced: str) -> None:
    gw.queue_faults(Faults(malformed_at=point, malformed_after_bytes=3200))  # type: ignore[arg-type]
    texts: list[str] = []
    async with connect(gw.url) as ws:
        task = RawTask(ws)
        await task.directive("StartTranscription", {"format": "pcm", "sample_rate": 16000})
        await task.audio(PCM)
        await task.stop()
        while True:
            text = await asyncio.wait_for(ws.recv(), 5)
            assert isinstance(text, str)
            texts.append(text)
            if "TranscriptionCompleted" in text or (text == MALFORMED_TEXT and point == "stop"):
                break
    assert texts.count(MALFORMED_TEXT) == 1
    with pytest.raises(json.JSONDecodeError):
        json.loads(MALFORMED_TEXT)
    good = [json.loads(t)["header"]["name"] for t in texts if t != MALFORMED_TEXT]
    full = ["TranscriptionStarted", "SentenceBegin", "SentenceEnd", "TranscriptionCompleted"]
    assert good == [n for n in full if n != replaced]
    assert "<malformed>" in gw.sessions[-1].events


@pytest.mark.parametrize("point", ["start", "audio", "stop"])
async def test_stall(gw: Gateway, point: str) -> None:
    gw.queue_faults(Faults(stall_at=point, stall_after_bytes=3200))  # type: ignore[arg-type]
    async with connect(gw.url) as ws:
        task = RawTask(ws)
        await task.directive("StartTranscription", {"format": "pcm", "sample_rate": 16000})
        await task.audio(PCM)
        await task.stop()
        received = []
        with pytest.raises(asyncio.TimeoutError):
            while True:
                received.append(
                    json.loads(await asyncio.wait_for(ws.recv(), 0.5))["header"]["name"]
                )
        # The socket is still open and answers pings.
        await asyncio.wait_for(await ws.ping(), 2)
    assert "TranscriptionCompleted" not in received
    if point == "start":
        assert received == []
    else:
        assert received[0] == "TranscriptionStarted"
    assert gw.sessions[-1].outcome == "stalled"


async def test_start_and_complete_delay(gw: Gateway) -> None:
    t0 = time.monotonic()
    _task, events = await run_task(gw, Faults(start_delay=0.3, complete_delay=0.3))
    assert events[-1] == "TranscriptionCompleted"
    assert time.monotonic() - t0 >= 0.6


async def test_queue_is_fifo_and_for_one_connection_each(gw: Gateway) -> None:
    gw.queue_faults(Faults(fail_status=40000005))
    gw.queue_faults(Faults(fail_status=50000001))
    statuses = []
    for _ in range(3):
        async with connect(gw.url) as ws:
            statuses.append((await RawTask(ws).start())["header"]["status"])
    assert statuses == [40000005, 50000001, 20000000]


async def test_gateway_wide_faults(gw: Gateway) -> None:
    gw.faults = Faults(fail_status=40000005)
    for _ in range(2):
        async with connect(gw.url) as ws:
            assert (await RawTask(ws).start())["header"]["status"] == 40000005
    gw.faults = Faults()
    _, events = await run_task(gw)
    assert events[-1] == "TranscriptionCompleted"


async def test_faults_at_construction() -> None:
    faults = Faults(fail_status=52010001)
    async with Gateway(recognizer="span", faults=faults) as g, connect(g.url) as ws:
        header = (await RawTask(ws).start())["header"]
    assert header["status"] == 52010001
    assert header["status_text"].startswith("Gateway:INSTANCE_POOL_EXHAUSTED:")
