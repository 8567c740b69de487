"""The light load-gateway: protocol flow, lateness accounting, robustness against bad input."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import os
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import (
    FRAME,
    client_frame,
    close_code_after,
    directive,
    events_until,
    http_request,
    raw_upgrade,
    read_server_frame,
    recv_json,
    start,
    upgrade_request,
    wait_until,
)
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from nlsstream.gateway.light import LightGateway, SessionStats
from nlsstream.realtime.protocol import RECOGNIZER, TRANSCRIBER, new_id


@pytest.fixture
async def gateway() -> AsyncIterator[LightGateway]:
    async with LightGateway(sentence_ms=200, idle_timeout=5.0, close_timeout=1.0) as gw:
        yield gw


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
    await wait_until(lambda: gateway.stats()["connections_open"] == 0)  # the server side closed
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
    # The official SDK sends Sec-WebSocket-Key/Version twice (§1.3). It is in the main
    # venv (scripts/test.sh fails if not), not in the one with the lowest picows.
    pytest.importorskip("nls")
    results = await asyncio.gather(
        asyncio.to_thread(_official_session, gateway.url, 30),
        asyncio.to_thread(_official_session, gateway.url, 30),
    )
    for got in results:
        assert got["errors"] == []
        assert got["names"] == ["TranscriptionStarted", "TranscriptionCompleted"]
        assert got["indices"] == [1, 2, 3]  # 600 ms: three whole 200 ms sentences, no tail
    await wait_until(lambda: gateway.stats()["connections_open"] == 0)  # the server side closed
    stats = gateway.stats()
    assert stats["overall"]["sessions"] == 2
    assert stats["overall"]["frames"] == 60
    assert stats["overall"]["completed"] == 2
    assert stats["handshake_errors"] == 0


# --------------------------------------------------------------------------- raw-socket checks


async def test_duplicate_handshake_headers_first_key_wins(gateway: LightGateway) -> None:
    # The exact duplicate the official SDK appends after its own key and version
    # (§1.3): picows answers for the first key, the one the SDK checks.
    await raw_upgrade(
        gateway.host,
        gateway.port,
        "Sec-WebSocket-Key: x3JJHMbDL1EzLkh9GBhXDw==\r\nSec-WebSocket-Version: 13\r\n",
    )


async def test_frames_split_across_reads_and_fragmented(gateway: LightGateway) -> None:
    reader, writer = await raw_upgrade(gateway.host, gateway.port)
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
    # A directive in two fragments.
    stop = directive(TRANSCRIBER.name, TRANSCRIBER.stop, task).encode()
    writer.write(client_frame(0x1, stop[:10], fin=False))
    writer.write(client_frame(0x0, stop[10:]))
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
        (directive(TRANSCRIBER.name, "Bogus", new_id()).encode(), 40010002),
        (start(new_id(), sample_rate=44100).encode(), 41010101),
        (start(new_id(), format="mp3").encode(), 40010003),
    ],
)
async def test_bad_directive_gets_task_failed_then_close_1000(
    gateway: LightGateway, payload: bytes, status: int
) -> None:
    reader, writer = await raw_upgrade(gateway.host, gateway.port)
    writer.write(client_frame(0x1, payload))
    _, body = await read_server_frame(reader)
    event = json.loads(body)
    assert event["header"]["name"] == "TaskFailed"
    assert event["header"]["namespace"] == "Default"
    assert event["header"]["status"] == status
    assert await close_code_after(reader) == 1000
    writer.close()
    assert gateway.stats()["task_failures"] == 1


async def test_audio_before_start_is_a_task_state_error(gateway: LightGateway) -> None:
    reader, writer = await raw_upgrade(gateway.host, gateway.port)
    writer.write(client_frame(0x2, FRAME))
    _, body = await read_server_frame(reader)
    assert json.loads(body)["header"]["status"] == 40010005
    assert await close_code_after(reader) == 1000
    writer.close()


async def test_appkey_checked_when_configured() -> None:
    async with LightGateway(appkeys=["good"]) as gw:
        async with connect(gw.url) as ws:
            await ws.send(start(new_id(), appkey="good"))
            assert (await recv_json(ws))["header"]["name"] == "TranscriptionStarted"
        async with connect(gw.url) as ws:
            await ws.send(start(new_id(), appkey="bad"))
            failed = await recv_json(ws)
            assert failed["header"]["status"] == 40020105


# --------------------------------------------------------------------------- RFC 6455 probes
# Each probe names who enforces it: picows itself, or this gateway's listener / factory.


async def _probe_close_code(gw: LightGateway, *frames: bytes) -> int:
    reader, writer = await raw_upgrade(gw.host, gw.port)
    for frame in frames:
        writer.write(frame)
    try:
        return await close_code_after(reader)
    finally:
        writer.close()


@pytest.mark.parametrize(
    ("frames", "code"),
    [
        # picows: control frames carry at most 125 bytes (RFC 6455 §5.5).
        ([client_frame(0x9, b"x" * 126)], 1002),
        # picows: control frames must not be fragmented (RFC 6455 §5.5).
        ([client_frame(0x9, b"ping", fin=False)], 1002),
        # picows: a close payload is empty or at least a 2-byte code (RFC 6455 §5.5.1).
        ([client_frame(0x8, b"\x03")], 1002),
        # picows: client frames must be masked (RFC 6455 §5.1).
        ([client_frame(0x2, FRAME, masked=False)], 1002),
        # this gateway: text messages must be UTF-8 (§8.1).
        ([client_frame(0x1, b'{"header": "\xff\xfe"}')], 1007),
        # this gateway: a UTF-8 sequence split over fragments is fine, a broken one is not.
        ([client_frame(0x1, b"\xc3", fin=False), client_frame(0x0, b"(")], 1007),
        # this gateway: a continuation needs a message to continue (RFC 6455 §5.4).
        ([client_frame(0x0, FRAME)], 1002),
        # this gateway: no new message inside a fragmented one (RFC 6455 §5.4).
        ([client_frame(0x2, FRAME, fin=False), client_frame(0x2, FRAME)], 1002),
        ([client_frame(0x1, b"{", fin=False), client_frame(0x1, b"{}")], 1002),
    ],
    ids=[
        "ping-126-bytes",
        "fragmented-ping",
        "close-1-byte",
        "unmasked",
        "invalid-utf8",
        "invalid-utf8-fragmented",
        "lone-continuation",
        "binary-inside-fragmented",
        "text-inside-fragmented",
    ],
)
async def test_protocol_violations_fail_the_connection(
    gateway: LightGateway, frames: list[bytes], code: int
) -> None:
    assert await _probe_close_code(gateway, *frames) == code
    async with connect(gateway.url) as ws:  # still serving
        await ws.send(start(new_id()))
        assert (await recv_json(ws))["header"]["name"] == "TranscriptionStarted"


async def test_protocol_errors_are_counted(gateway: LightGateway) -> None:
    assert await _probe_close_code(gateway, client_frame(0x9, b"x" * 126)) == 1002
    assert await _probe_close_code(gateway, client_frame(0x1, b"\xff")) == 1007
    # on_ws_disconnected runs when the server side has closed
    await wait_until(lambda: gateway.stats()["protocol_errors"] >= 2)
    assert gateway.stats()["protocol_errors"] == 2


async def test_valid_utf8_split_across_fragments_is_accepted(gateway: LightGateway) -> None:
    reader, writer = await raw_upgrade(gateway.host, gateway.port)
    text = start(new_id(), extra="é").replace("\\u00e9", "é").encode()  # raw UTF-8
    cut = text.index("é".encode()) + 1  # inside the 2-byte sequence
    writer.write(client_frame(0x1, text[:cut], fin=False))
    writer.write(client_frame(0x0, text[cut:]))
    _, body = await read_server_frame(reader)
    assert json.loads(body)["header"]["name"] == "TranscriptionStarted"
    writer.close()


def _key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


@pytest.mark.parametrize(
    ("request_text", "status"),
    [
        # this gateway: only /ws/v1 (picows answers 404 when the factory returns None).
        (upgrade_request(_key(), path="/other"), 404),
        (upgrade_request(_key(), path="/ws/v1/x"), 404),
        # picows: HTTP/1.1 only.
        (upgrade_request(_key(), version="HTTP/1.0"), 400),
        # picows: Upgrade: websocket and Connection: Upgrade required.
        (upgrade_request(_key()).replace("Upgrade: websocket\r\n", ""), 400),
        (upgrade_request(_key()).replace("Connection: Upgrade\r\n", ""), 400),
        (upgrade_request(_key()).replace("Connection: Upgrade", "Connection: keep-alive"), 400),
        (upgrade_request("short"), 400),
        (upgrade_request(_key()).replace("GET", "POST"), 400),
        (b"BLAH\r\n\r\n".decode(), 400),
    ],
    ids=[
        "path",
        "subpath",
        "http-1.0",
        "no-upgrade",
        "no-connection",
        "connection-keep-alive",
        "bad-key",
        "post",
        "garbage",
    ],
)
async def test_upgrade_refused(gateway: LightGateway, request_text: str, status: int) -> None:
    _, writer, head = await http_request(gateway.host, gateway.port, request_text)
    assert head.startswith(f"HTTP/1.1 {status}".encode()), head
    writer.close()


async def test_handshake_errors_are_counted(gateway: LightGateway) -> None:
    for request_text in (upgrade_request(_key(), path="/x"), upgrade_request("short")):
        _, writer, _ = await http_request(gateway.host, gateway.port, request_text)
        writer.close()
    async with connect(gateway.url) as ws:  # still serving
        await ws.send(start(new_id()))
        await recv_json(ws)
    assert gateway.stats()["handshake_errors"] == 2


async def test_token_required_when_configured() -> None:
    async with LightGateway(token="sekrit") as gw:
        for headers, url in [
            ({"X-NLS-Token": "wrong"}, gw.url),
            ({}, gw.url),
            ({}, gw.url + "?token=wrong"),
        ]:
            with pytest.raises(InvalidStatus) as info:
                async with connect(url, additional_headers=headers):
                    pass
            assert info.value.response.status_code == 403
            body = info.value.response.body or b""
            assert b"ACCESS_DENIED" in body
            assert b"sekrit" not in body and b"wrong" not in body
        for headers, url in [({"X-NLS-Token": "sekrit"}, gw.url), ({}, gw.url + "?token=sekrit")]:
            async with connect(url, additional_headers=headers) as ws:
                await ws.send(start(new_id()))
                assert (await recv_json(ws))["header"]["name"] == "TranscriptionStarted"


# --------------------------------------------------------------------------- stats and control


def _get(gw: LightGateway, path: str, token: str | None) -> tuple[int, bytes]:
    request = urllib.request.Request(f"http://{gw.host}:{gw.port}{path}")
    if token is not None:
        request.add_header("X-NLS-Token", token)
    try:
        with urllib.request.urlopen(request, timeout=5) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


async def _one_session(gw: LightGateway, token: str | None = None) -> None:
    headers = {"X-NLS-Token": token} if token else {}
    async with connect(gw.url, additional_headers=headers) as ws:
        task = new_id()
        await ws.send(start(task))
        await recv_json(ws)
        await ws.send(FRAME)
        await ws.send(directive(TRANSCRIBER.name, TRANSCRIBER.stop, task))
        await events_until(ws, "TranscriptionCompleted")


async def test_no_control_endpoints_unless_asked(gateway: LightGateway) -> None:
    for path in ("/stats", "/reset", "/health"):
        status, _ = await asyncio.to_thread(_get, gateway, path, "t")
        assert status == 404


def test_control_requires_a_token() -> None:
    with pytest.raises(ValueError, match="token"):
        LightGateway(control=True)


async def test_stats_and_reset_with_control_and_token() -> None:
    async with LightGateway(token="sekrit", control=True) as gw:
        await _one_session(gw, "sekrit")
        for token in (None, "wrong"):
            status, body = await asyncio.to_thread(_get, gw, "/stats", token)
            assert status == 403 and b"sekrit" not in body
        status, body = await asyncio.to_thread(_get, gw, "/stats?token=sekrit", None)
        assert status == 403  # the header only: URLs end up in logs
        status, body = await asyncio.to_thread(_get, gw, "/stats?reset=1", "sekrit")
        assert status == 200
        stats = json.loads(body)
        assert stats["overall"]["sessions"] == 1
        assert {"cpu_s", "cpu_share", "wall_s", "loop_lag", "overall", "sessions"} <= set(stats)
        status, body = await asyncio.to_thread(_get, gw, "/stats", "sekrit")
        assert json.loads(body)["overall"]["sessions"] == 0
        status, body = await asyncio.to_thread(_get, gw, "/reset", "sekrit")
        assert (status, json.loads(body)) == (200, {"reset": True})


async def test_idle_connection_gets_idle_timeout() -> None:
    async with (
        LightGateway(idle_timeout=0.3, close_timeout=0.5) as gw,
        connect(gw.url) as ws,
    ):
        t0 = time.monotonic()
        event = await recv_json(ws)
        assert event["header"]["status"] == 40000004
        assert "the last directive is 'None'" in event["header"]["status_text"]
        assert time.monotonic() - t0 < 4
