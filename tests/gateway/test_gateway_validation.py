"""Bad input to the local gateway gets the documented status and a clear text, and
never hurts another session."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from helpers import APPKEY, TOKEN, RawTask, names, open_ws, payloads, read_pcm, silence
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from nlsstream.gateway import Gateway
from nlsstream.realtime import protocol as p


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    async with Gateway(
        tokens=[TOKEN], appkeys=[APPKEY], recognizer="span", idle_timeout=0.5, max_size=64_000
    ) as g:
        yield g


async def failure(task: RawTask) -> dict[str, Any]:
    """The TaskFailed header the gateway answers with; the connection then closes."""
    last = task.events[-1] if task.events else None
    if last is None or last["header"]["name"] != "TaskFailed":  # not yet received
        last = (await task.until_end())[-1]
    header: dict[str, Any] = last["header"]
    assert header["name"] == "TaskFailed" and header["namespace"] == "Default"
    assert "payload" not in last
    with pytest.raises(ConnectionClosed):
        await task.recv(timeout=3)
    return header


# --------------------------------------------------------------------------- handshake


async def test_wrong_token_gets_403_and_is_not_logged(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="nlsstream")
    with pytest.raises(InvalidStatus) as info:
        async with open_ws(gw, token="wrong-secret-token"):
            pass
    response = info.value.response
    assert response.status_code == 403
    assert response.body == b"Meta:ACCESS_DENIED:The token 'wrong-secret-token' is invalid!"
    ours = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith("nlsstream"))
    assert "wrong-secret-token" not in ours and TOKEN not in ours
    assert "invalid token" in ours


async def test_query_token_is_in_no_log_line(gw: Gateway, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with pytest.raises(InvalidStatus) as info:
        async with connect(f"{gw.url}?token=query-secret-token"):
            pass
    assert info.value.response.status_code == 403
    async with connect(f"{gw.url}?token={TOKEN}") as ws:
        assert (await RawTask(ws).start())["header"]["status"] == 20000000
    # Every server-side logger (ours, aiohttp's access and server logs); the test's own
    # websockets client logs its request lines at DEBUG, and those are the client's.
    server = [r.getMessage() for r in caplog.records if not r.name.startswith("websockets")]
    assert server and not any("query-secret-token" in m or TOKEN in m for m in server)


async def test_missing_token_gets_403(gw: Gateway) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with connect(gw.url):
            pass
    assert info.value.response.status_code == 403
    assert b"Missing authorization header" in info.value.response.body


async def test_token_in_query_is_accepted(gw: Gateway) -> None:
    async with connect(f"{gw.url}?token={TOKEN}") as ws:
        started = await RawTask(ws).start()
    assert started["header"]["status"] == 20000000


async def test_wrong_path_is_404(gw: Gateway) -> None:
    with pytest.raises(InvalidStatus) as info:
        async with connect(gw.url.replace("/ws/v1", "/ws/v2"), additional_headers={}):
            pass
    assert info.value.response.status_code == 404


async def test_plain_http_on_the_same_port(gw: Gateway) -> None:
    base = gw.url.replace("ws://", "http://").removesuffix("/ws/v1")
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{base}/nowhere") as response:
            assert response.status == 404
        async with http.get(f"{base}/ws/v1", params={"token": "bad"}) as response:
            assert response.status == 403
            assert await response.text() == "Meta:ACCESS_DENIED:The token 'bad' is invalid!"
        async with http.get(f"{base}/ws/v1", headers={"X-NLS-Token": TOKEN}) as response:
            assert response.status == 400  # not a WebSocket upgrade
    assert gw.sessions == []


async def test_closing_the_gateway_closes_connections_with_1001() -> None:
    gateway = Gateway(recognizer="span")
    await gateway.start()
    try:
        async with connect(gateway.url) as ws:
            await RawTask(ws).start()
            await ws.send(silence(100))
            await gateway.close()
            with pytest.raises(ConnectionClosed) as info:
                await asyncio.wait_for(ws.recv(), 5)
    finally:
        await gateway.close()
    assert info.value.rcvd is not None and info.value.rcvd.code == 1001
    assert gateway.sessions[-1].outcome == "disconnected"
    assert not gateway.running


async def test_no_tokens_configured_accepts_any_or_none() -> None:
    async with Gateway(recognizer="span") as g, connect(g.url) as ws:
        started = await RawTask(ws, appkey="whatever").start()
    assert started["header"]["name"] == "TranscriptionStarted"
    assert g.token and g.appkey  # usable defaults


# --------------------------------------------------------------------------- directives


async def test_unknown_appkey(gw: Gateway) -> None:
    async with open_ws(gw) as ws:
        task = RawTask(ws, appkey="nope")
        await task.start()
        header = await failure(task)
    assert header["status"] == 40020105
    assert header["status_text"] == "Meta:APPKEY_NOT_EXIST:Appkey not exist!"
    assert header["task_id"] == task.task_id
    assert gw.sessions[-1].status == 40020105 and gw.sessions[-1].outcome == "failed"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("{not json", "Invalid json"),
        ("[1, 2]", "Missing message header!"),
        (json.dumps({"header": {"task_id": "0" * 32, "message_id": "x"}}), "Invalid message id"),
        (
            json.dumps(
                p.build_directive(
                    "SpeechTranscriber", "StartTranscription", task_id="ABC", appkey=APPKEY
                )
            ),
            "Invalid task id 'ABC'",
        ),
    ],
)
async def test_malformed_messages_give_40000002(gw: Gateway, text: str, expected: str) -> None:
    async with open_ws(gw) as ws:
        await ws.send(text)
        header = await failure(RawTask(ws))
    assert header["status"] == 40000002
    assert header["status_text"].startswith("Gateway:MESSAGE_INVALID:")
    assert expected in header["status_text"]


async def test_stop_for_another_task_id(gw: Gateway) -> None:
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start()
        await task.directive("StopTranscription", task_id=p.new_id())
        header = await failure(task)
    assert header["status"] == 40000002 and "does not match" in header["status_text"]


@pytest.mark.parametrize("fmt", ["opus", "PCM", "mp3"])
async def test_unsupported_format(gw: Gateway, fmt: str) -> None:
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.directive("StartTranscription", p.start_payload(format=fmt))
        header = await failure(task)
    assert header["status"] == 40010003
    assert f"Invalid format '{fmt}'" in header["status_text"]
    assert "'pcm' and 'wav'" in header["status_text"]


@pytest.mark.parametrize("rate", [44100, 22050, "16000"])
async def test_unsupported_sample_rate(gw: Gateway, rate: Any) -> None:
    async with open_ws(gw) as ws:
        task = RawTask(ws, "SpeechRecognizer")
        await task.directive("StartRecognition", p.start_payload(sample_rate=rate))
        header = await failure(task)
    assert header["status"] == 41010101
    assert "UNSUPPORTED_SAMPLE_RATE" in header["status_text"]
    assert "8000 and 16000" in header["status_text"]


@pytest.mark.parametrize(
    "params",
    [{"max_sentence_silence": 50}, {"max_sentence_silence": "800"}, {"enable_words": "yes"}],
)
async def test_bad_parameters(gw: Gateway, params: dict[str, Any]) -> None:
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start(**params)
        header = await failure(task)
    assert header["status"] == 40000003
    assert next(iter(params)) in header["status_text"]


async def test_bad_control_parameter(gw: Gateway) -> None:
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start()
        await task.directive("ControlTranscriber", {"max_sentence_silence": 10})
        header = await failure(task)
    assert header["status"] == 40000003


async def test_unknown_directive(gw: Gateway) -> None:
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start()
        await task.directive("PauseTranscription")
        header = await failure(task)
    assert header["status"] == 40010002
    assert "'PauseTranscription' is not supported" in header["status_text"]


async def test_control_is_not_a_recognizer_directive(gw: Gateway) -> None:
    async with open_ws(gw) as ws:
        task = RawTask(ws, "SpeechRecognizer")
        await task.start()
        await task.directive("ControlTranscriber", {"max_sentence_silence": 1000})
        assert (await failure(task))["status"] == 40010002


async def test_unknown_namespace(gw: Gateway) -> None:
    message = p.build_directive(
        "SpeechSynthesizer", "StartSynthesis", task_id=p.new_id(), appkey=APPKEY
    )
    async with open_ws(gw) as ws:
        await ws.send(p.encode(message))
        header = await failure(RawTask(ws))
    assert header["status"] == 40010001


# --------------------------------------------------------------------------- task state


async def test_audio_before_start(gw: Gateway) -> None:
    async with open_ws(gw) as ws:
        await ws.send(silence(20))
        header = await failure(RawTask(ws))
    assert header["status"] == 40010005
    assert header["status_text"] == (
        "Gateway:TASK_STATE_ERROR:Got audio data before the task started!"
    )


async def test_audio_after_stop(gw: Gateway) -> None:
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start()
        await task.stop()
        assert names(await task.until_end()) == ["TranscriptionCompleted"]
        await ws.send(silence(20))
        header = await failure(task)
    assert header["status"] == 40010005
    assert "audio data after the stop directive" in header["status_text"]


async def test_stop_before_start(gw: Gateway) -> None:
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.stop()
        header = await failure(task)
    assert header["status"] == 40010005 and "before the task started" in header["status_text"]


async def test_stop_twice(gw: Gateway) -> None:
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start()
        await task.stop()
        await task.stop()
        events = await task.until_end()
        assert names(events) == ["TranscriptionCompleted"]
        header = await failure(task)
    assert header["status"] == 40010005
    # The first Stop completed the task; ServerTask names the second one's directive.
    assert header["status_text"] == (
        "Gateway:TASK_STATE_ERROR:Got StopTranscription after the task completed!"
    )


async def test_start_twice(gw: Gateway) -> None:
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start()
        await task.start()  # returns the TaskFailed
        assert task.events[-1]["header"]["status"] == 40010005
        assert "while task is running" in task.events[-1]["header"]["status_text"]


async def test_idle_timeout(gw: Gateway) -> None:
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start()
        header = await failure(task)
    assert header["status"] == 40000004
    assert header["status_text"] == (
        "Gateway:IDLE_TIMEOUT:Websocket session is idle for too long time, "
        "the last directive is 'StartTranscription'!"
    )
    assert gw.sessions[-1].status == 40000004


async def test_idle_timeout_is_reset_by_audio(gw: Gateway) -> None:
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start()
        for _ in range(8):  # 0.8 s in all, more than the 0.5 s idle timeout
            await ws.send(silence(100))
            await asyncio.sleep(0.1)
        await task.stop()
        assert names(await task.until_end()) == ["TranscriptionCompleted"]


# --------------------------------------------------------------------------- wav


def wav_header(rate: int = 16000, channels: int = 1, bits: int = 16, tag: int = 1) -> bytes:
    fmt = (
        tag.to_bytes(2, "little")
        + channels.to_bytes(2, "little")
        + rate.to_bytes(4, "little")
        + (rate * channels * bits // 8).to_bytes(4, "little")
        + (channels * bits // 8).to_bytes(2, "little")
        + bits.to_bytes(2, "little")
    )
    return b"RIFF\xff\xff\xff\xffWAVEfmt " + len(fmt).to_bytes(4, "little") + fmt + b"data\0\0\0\0"


@pytest.mark.parametrize(
    ("header", "refused"),
    [
        (wav_header(channels=2), "2 channels (only mono)"),
        (wav_header(rate=8000), "8000 Hz (the task declared sample_rate 16000)"),
        (wav_header(bits=8), "8-bit samples (only 16-bit)"),
        (wav_header(tag=3, bits=32), "encoding tag 3 (only 1 = PCM)"),
    ],
)
async def test_wav_with_unsupported_audio(gw: Gateway, header: bytes, refused: str) -> None:
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start(format="wav")
        await ws.send(header + silence(100))
        result = await failure(task)
    assert result["status"] == 40010003
    assert "Unsupported wav audio" in result["status_text"] and refused in result["status_text"]


@pytest.mark.parametrize(
    ("data", "text"),
    [
        (b"OggS" + bytes(100), "does not start with RIFF"),
        (b"RIFF\0\0\0\0AVI " + bytes(100), "RIFF....WAVE"),
        (b"RIFF\0\0\0\0WAVEjunk" + (9000).to_bytes(4, "little") + bytes(5000), "Too large"),
    ],
)
async def test_invalid_wav_header(gw: Gateway, data: bytes, text: str) -> None:
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start(format="wav")
        await ws.send(data)
        header = await failure(task)
    assert header["status"] == 40000009 and text in header["status_text"]


async def test_pcm_wav_header_passes(gw: Gateway) -> None:
    pcm, _ = read_pcm("hello.wav")
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start(format="wav")
        await task.audio(wav_header() + pcm)
        await task.stop()
        assert len(payloads(await task.until_end(), "SentenceEnd")) == 1


# --------------------------------------------------------------------------- isolation


async def test_bad_sessions_do_not_hurt_a_concurrent_one(gw: Gateway) -> None:
    pcm, _ = read_pcm("three_sentences.wav")

    async def good() -> list[str]:
        async with open_ws(gw) as ws:
            task = RawTask(ws)
            await task.start()
            for i in range(0, len(pcm), 6400):
                await ws.send(pcm[i : i + 6400])
                await asyncio.sleep(0)
            await task.stop()
            return names(await task.until_end())

    async def huge() -> int | None:
        async with open_ws(gw, max_size=None) as ws:
            await RawTask(ws).start()
            with contextlib.suppress(ConnectionClosed):
                await ws.send(bytes(200_000))  # over the gateway's max_size
                await ws.recv()
            return ws.protocol.close_rcvd.code if ws.protocol.close_rcvd else None

    async def garbage() -> int:
        async with open_ws(gw) as ws:
            await ws.send(b"\xff\xfe not json".decode("latin-1"))
            return int((await failure(RawTask(ws)))["status"])

    good_names, huge_code, garbage_status = await asyncio.gather(good(), huge(), garbage())
    assert good_names.count("SentenceEnd") == 3 and good_names[-1] == "TranscriptionCompleted"
    assert huge_code == 1009  # message too big: only that connection is closed
    assert garbage_status == 40000002
    async with open_ws(gw) as ws:  # and the server still serves
        assert (await RawTask(ws).start())["header"]["status"] == 20000000
