"""The light load-gateway: protocol flow, lateness accounting, robustness against bad input."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import logging
import os
import time
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from nlsstream.gateway.light import LightGateway, SessionStats
from nlsstream.protocol import RECOGNIZER, TRANSCRIBER, build_directive, encode, new_id

FRAME = b"\x01\x00" * 320  # 640 bytes = 20 ms at 16 kHz


@pytest.fixture
async def gateway() -> AsyncIterator[LightGateway]:
    async with LightGateway(sentence_ms=200, idle_timeout=5.0, close_timeout=1.0) as gw:
        yield gw


def directive(ns: str, name: str, task_id: str, payload: dict[str, Any] | None = None) -> str:
    return encode(build_directive(ns, name, task_id=task_id, appkey="app", payload=payload))


def start(task_id: str, ns: str = TRANSCRIBER.name, **payload: Any) -> str:
    name = TRANSCRIBER.start if ns == TRANSCRIBER.name else RECOGNIZER.start
    return directive(ns, name, task_id, {"format": "pcm", "sample_rate": 16000, **payload})


async def recv_json(ws: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 5))
    return data


async def events_until(ws: Any, last: str) -> list[dict[str, Any]]:
    out = []
    while True:
        event = await recv_json(ws)
        out.append(event)
        if event["header"]["name"] in (last, "TaskFailed"):
            return out


# --------------------------------------------------------------------------- lateness maths


def test_lateness_against_ideal_schedule_from_first_frame() -> None:
    s = SessionStats(TRANSCRIBER, new_id(), 16000, 1000)
    t0 = 1000.0
    # Frames 0-4 on time, frame 5 arrives 100 ms late, 6-9 early or on time again.
    arrivals = [t0 + k * 0.02 for k in range(10)]
    arrivals[5] += 0.1
    arrivals[7] -= 0.005  # early frames count as 0, not negative
    for t in arrivals:
        s.record(640, t)
    late = list(s.lateness)
    assert late[5] == pytest.approx(0.1)
    assert all(x == pytest.approx(0.0, abs=1e-9) for i, x in enumerate(late) if i != 5)
    summary = s.summary()
    assert summary["frames"] == 10 and summary["bytes"] == 6400
    assert summary["audio_s"] == pytest.approx(0.2)
    assert summary["max_ms"] == pytest.approx(100.0)
    assert summary["p50_ms"] == pytest.approx(0.0)


def test_lateness_uses_bytes_not_message_count() -> None:
    # 100 ms chunks (3200 B) at 8 kHz: chunk k is due at k * 200 ms.
    s = SessionStats(TRANSCRIBER, new_id(), 8000, 1000)
    for t in [0.0, 0.2, 0.45, 0.6]:
        s.record(3200, 10.0 + t)
    assert list(s.lateness) == pytest.approx([0.0, 0.0, 0.05, 0.0])


# --------------------------------------------------------------------------- protocol flow


async def test_transcriber_flow_with_websockets_client(gateway: LightGateway) -> None:
    task = new_id()
    async with connect(gateway.url, additional_headers={"X-NLS-Token": "t"}) as ws:
        await ws.send(start(task))
        started = await recv_json(ws)
        assert started["header"]["name"] == "TranscriptionStarted"
        assert started["header"]["task_id"] == task
        assert started["header"]["status"] == 20000000
        for _ in range(25):  # 500 ms of audio: two whole 200 ms sentences, then a tail
            await ws.send(FRAME)
        await ws.send(directive(TRANSCRIBER.name, TRANSCRIBER.stop, task))
        events = await events_until(ws, "TranscriptionCompleted")
    names = [e["header"]["name"] for e in events]
    assert names == ["SentenceBegin", "SentenceEnd"] * 3 + ["TranscriptionCompleted"]
    ends = [e["payload"] for e in events if e["header"]["name"] == "SentenceEnd"]
    assert [e["index"] for e in ends] == [1, 2, 3]
    assert [(e["begin_time"], e["time"]) for e in ends] == [(0, 200), (200, 400), (400, 500)]
    await asyncio.sleep(0.05)
    stats = gateway.stats()
    (session,) = stats["sessions"]
    assert session["task_id"] == task
    assert session["frames"] == 25 and session["bytes"] == 25 * 640
    assert session["sentence_end_sent"] == 3
    assert session["completed"] and not session["closed_early"]
    assert stats["overall"]["sentence_end_sent"] == 3
    assert stats["connections_open"] == 0


async def test_lateness_measured_at_server_for_delayed_frames(gateway: LightGateway) -> None:
    task = new_id()
    async with connect(gateway.url) as ws:
        await ws.send(start(task))
        await recv_json(ws)
        await ws.send(FRAME)
        await asyncio.sleep(0.2)
        for _ in range(4):  # due at 20..80 ms, sent after >= 200 ms: 180, 160, 140, 120 late
            await ws.send(FRAME)
        await ws.send(directive(TRANSCRIBER.name, TRANSCRIBER.stop, task))
        await events_until(ws, "TranscriptionCompleted")
    (session,) = gateway.stats()["sessions"]
    assert session["frames"] == 5
    assert 175.0 <= session["max_ms"] < 400.0
    assert 135.0 <= session["p50_ms"] < 360.0


async def test_recognizer_flow(gateway: LightGateway) -> None:
    task = new_id()
    async with connect(gateway.url) as ws:
        await ws.send(start(task, RECOGNIZER.name))
        assert (await recv_json(ws))["header"]["name"] == "RecognitionStarted"
        for _ in range(50):
            await ws.send(FRAME)
        await ws.send(directive(RECOGNIZER.name, RECOGNIZER.stop, task))
        (done,) = await events_until(ws, "RecognitionCompleted")
    assert done["header"]["name"] == "RecognitionCompleted"
    assert done["payload"]["duration"] == 1000


async def test_ping_is_answered(gateway: LightGateway) -> None:
    async with connect(gateway.url) as ws:
        pong = await ws.ping(b"hi")
        latency = await asyncio.wait_for(pong, 5)
        assert latency >= 0


def _official_session(url: str, frames: int) -> dict[str, Any]:
    import nls

    logging.getLogger("nls").setLevel(logging.CRITICAL)
    got: dict[str, Any] = {"names": [], "indices": [], "errors": []}

    def name_of(message: str) -> str:
        return str(json.loads(message)["header"]["name"])

    tr = nls.NlsSpeechTranscriber(
        url=url,
        token="token",
        appkey="app",
        on_start=lambda m, *a: got["names"].append(name_of(m)),
        on_sentence_end=lambda m, *a: got["indices"].append(json.loads(m)["payload"]["index"]),
        on_completed=lambda m, *a: got["names"].append(name_of(m)),
        on_error=lambda m, *a: got["errors"].append(m),
    )
    tr.start(timeout=5)
    for _ in range(frames):
        tr.send_audio(FRAME)
    tr.stop(timeout=5)
    tr.shutdown()
    return got


async def test_official_sdk_works(gateway: LightGateway) -> None:
    # The official SDK sends Sec-WebSocket-Key/Version twice (reference §1.3).
    results = await asyncio.gather(
        asyncio.to_thread(_official_session, gateway.url, 30),
        asyncio.to_thread(_official_session, gateway.url, 30),
    )
    for got in results:
        assert got["errors"] == []
        assert got["names"] == ["TranscriptionStarted", "TranscriptionCompleted"]
        assert got["indices"] == [1, 2, 3]  # 600 ms: three whole 200 ms sentences, no tail
    await asyncio.sleep(0.1)
    stats = gateway.stats()
    assert stats["overall"]["sessions"] == 2
    assert stats["overall"]["frames"] == 60
    assert stats["overall"]["completed"] == 2
    assert stats["handshake_errors"] == 0


# --------------------------------------------------------------------------- raw-socket checks


def client_frame(opcode: int, payload: bytes, *, fin: bool = True, masked: bool = True) -> bytes:
    mask = os.urandom(4)
    n = len(payload)
    b0 = (0x80 if fin else 0) | opcode
    mbit = 0x80 if masked else 0
    if n < 126:
        head = bytes((b0, mbit | n))
    elif n < 65536:
        head = bytes((b0, mbit | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((b0, mbit | 127)) + n.to_bytes(8, "big")
    if not masked:
        return head + payload
    body = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return head + mask + body


async def raw_upgrade(
    gw: LightGateway, extra: str = ""
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    reader, writer = await asyncio.open_connection(gw.host, gw.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write(
        (
            f"GET /ws/v1 HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n{extra}\r\n"
        ).encode()
    )
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    expected = base64.b64encode(
        hashlib.sha1(key.encode() + b"258EAFA5-E914-47DA-95CA-C5AB0DC85B11").digest()
    )
    assert head.startswith(b"HTTP/1.1 101"), head
    assert b"Sec-WebSocket-Accept: " + expected in head
    return reader, writer, head


async def read_server_frame(reader: asyncio.StreamReader) -> tuple[int, bytes]:
    b0, b1 = await asyncio.wait_for(reader.readexactly(2), 5)
    n = b1 & 0x7F
    if n == 126:
        n = int.from_bytes(await reader.readexactly(2), "big")
    elif n == 127:
        n = int.from_bytes(await reader.readexactly(8), "big")
    return b0 & 0x0F, await reader.readexactly(n)


async def test_duplicate_handshake_headers_first_key_wins(gateway: LightGateway) -> None:
    # The exact duplicate the official SDK appends after the real key and version.
    _, writer, _ = await raw_upgrade(
        gateway, "Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\nSec-WebSocket-Version: 13\r\n"
    )
    writer.close()


async def test_frames_split_across_reads_and_fragmented(gateway: LightGateway) -> None:
    reader, writer, _ = await raw_upgrade(gateway)
    task = new_id()
    writer.write(client_frame(0x1, start(task).encode()))
    opcode, body = await read_server_frame(reader)
    assert opcode == 0x1 and json.loads(body)["header"]["name"] == "TranscriptionStarted"
    # 64-bit length, in pieces; the last piece ends exactly where the payload ends.
    big = client_frame(0x2, b"\x00" * 70000)
    assert len(big) == 7 * 9000 + 7014
    for i in range(0, len(big), 9000):
        writer.write(big[i : i + 9000])
        await writer.drain()
        await asyncio.sleep(0.005)
    # One 1280-byte message in two fragments, with a ping in between.
    writer.write(client_frame(0x2, b"\x00" * 640, fin=False))
    writer.write(client_frame(0x9, b"p"))
    writer.write(client_frame(0x0, b"\x00" * 640))
    writer.write(client_frame(0x1, directive(TRANSCRIBER.name, TRANSCRIBER.stop, task).encode()))
    await writer.drain()
    seen = []
    while not seen or seen[-1] != "TranscriptionCompleted":
        opcode, body = await read_server_frame(reader)
        seen.append("pong" if opcode == 0xA else json.loads(body)["header"]["name"])
    assert "pong" in seen
    writer.write(client_frame(0x8, (1000).to_bytes(2, "big")))
    opcode, body = await read_server_frame(reader)
    assert opcode == 0x8 and body == (1000).to_bytes(2, "big")
    writer.close()
    (session,) = gateway.stats()["sessions"]
    assert session["frames"] == 2 and session["bytes"] == 70000 + 1280


@pytest.mark.parametrize(
    ("payload", "status"),
    [
        (b"not json", 40000002),
        (json.dumps({"header": {"name": "StartTranscription"}}).encode(), 40000002),
        (directive(TRANSCRIBER.name, "Bogus", new_id()).encode(), 40000002),
        (start(new_id(), sample_rate=44100).encode(), 41010101),
    ],
)
async def test_bad_directive_gets_task_failed(
    gateway: LightGateway, payload: bytes, status: int
) -> None:
    reader, writer, _ = await raw_upgrade(gateway)
    writer.write(client_frame(0x1, payload))
    opcode, body = await read_server_frame(reader)
    event = json.loads(body)
    assert event["header"]["name"] == "TaskFailed"
    assert event["header"]["namespace"] == "Default"
    assert event["header"]["status"] == status
    opcode, _ = await read_server_frame(reader)
    assert opcode == 0x8  # then the gateway closes
    writer.close()


async def test_audio_before_start_and_protocol_errors_do_not_crash(
    gateway: LightGateway,
) -> None:
    reader, writer, _ = await raw_upgrade(gateway)
    writer.write(client_frame(0x2, FRAME))
    _, body = await read_server_frame(reader)
    assert json.loads(body)["header"]["status"] == 40000002
    writer.close()

    reader, writer, _ = await raw_upgrade(gateway)
    writer.write(client_frame(0x2, FRAME, masked=False))  # clients must mask
    opcode, body = await read_server_frame(reader)
    assert opcode == 0x8 and int.from_bytes(body[:2], "big") == 1002
    writer.close()

    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    writer.write(b"BLAH\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 400")
    writer.close()

    reader, writer = await asyncio.open_connection(gateway.host, gateway.port)
    writer.write(b"GET /ws/v1 HTTP/1.1\r\nUpgrade: websocket\r\nSec-WebSocket-Key: short\r\n\r\n")
    assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 400")
    writer.close()

    # Still serving.
    async with connect(gateway.url) as ws:
        await ws.send(start(new_id()))
        assert (await recv_json(ws))["header"]["name"] == "TranscriptionStarted"
    assert gateway.stats()["handshake_errors"] == 2


async def test_token_required_when_configured() -> None:
    async with LightGateway(token="sekrit") as gw:
        with pytest.raises(InvalidStatus) as info:
            async with connect(gw.url, additional_headers={"X-NLS-Token": "wrong"}):
                pass
        assert info.value.response.status_code == 403
        assert b"sekrit" not in (info.value.response.body or b"")
        async with connect(gw.url, additional_headers={"X-NLS-Token": "sekrit"}) as ws:
            await ws.send(start(new_id()))
            assert (await recv_json(ws))["header"]["name"] == "TranscriptionStarted"


async def test_stats_and_reset_over_http(gateway: LightGateway) -> None:
    async with connect(gateway.url) as ws:
        task = new_id()
        await ws.send(start(task))
        await recv_json(ws)
        await ws.send(FRAME)
        await ws.send(directive(TRANSCRIBER.name, TRANSCRIBER.stop, task))
        await events_until(ws, "TranscriptionCompleted")

    def get(path: str) -> dict[str, Any]:
        url = f"http://{gateway.host}:{gateway.port}{path}"
        with urllib.request.urlopen(url, timeout=5) as resp:
            data: dict[str, Any] = json.loads(resp.read())
            return data

    stats = await asyncio.to_thread(get, "/stats?reset=1")
    assert stats["overall"]["sessions"] == 1
    assert {"cpu_s", "cpu_share", "wall_s", "loop_lag", "overall", "sessions"} <= set(stats)
    again = await asyncio.to_thread(get, "/stats")
    assert again["overall"]["sessions"] == 0
    assert (await asyncio.to_thread(get, "/reset")) == {"reset": True}


async def test_idle_connection_gets_idle_timeout() -> None:
    async with (
        LightGateway(idle_timeout=0.3, close_timeout=0.5) as gw,
        connect(gw.url) as ws,
    ):
        t0 = time.monotonic()
        event = await recv_json(ws)
        assert event["header"]["status"] == 40000004
        assert time.monotonic() - t0 < 4
