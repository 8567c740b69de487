"""Byte compatibility with the official Python SDK (docs/protocol.md §3.2, §3.4, §4.1).

The real official SDK (``import nls``, blocking, run in a thread) and our sessions talk to
the same tiny recording server; for the same parameters, the directives must have the
same keys in the same order, the same value types and the same serialisation, differing
only in ids and in the ``context.sdk`` values.
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import pytest
from websockets.asyncio.server import ServerConnection, serve
from websockets.http11 import Request, Response

from nlsstream import Recognizer, Transcriber
from nlsstream.realtime.protocol import RECOGNIZER, TRANSCRIBER, build_event, encode

nls = pytest.importorskip("nls")

TOKEN = "compat-token"
APPKEY = "compat-app"
ID = re.compile(r'"[0-9a-f]{32}"')


@dataclass
class Recorder:
    """A minimal NLS server that answers Start/Stop and records every text frame."""

    url: str = ""
    messages: list[str] = field(default_factory=list)
    headers: list[dict[str, str]] = field(default_factory=list)

    async def handle(self, ws: ServerConnection) -> None:
        assert ws.request is not None
        self.headers.append({k.lower(): v for k, v in ws.request.headers.raw_items()})
        async for message in ws:
            if not isinstance(message, str):
                continue
            self.messages.append(message)
            header = json.loads(message)["header"]
            ns = RECOGNIZER if header["namespace"] == RECOGNIZER.name else TRANSCRIBER
            if header["name"] == ns.start:
                reply = build_event(ns.name, ns.started, header["task_id"])
            elif header["name"] == ns.stop:
                payload = {"result": "", "duration": 0} if ns is RECOGNIZER else None
                reply = build_event(ns.name, ns.completed, header["task_id"], payload)
            else:
                continue
            await ws.send(encode(reply))

    @staticmethod
    def first_key(connection: ServerConnection, request: Request) -> Response | None:
        # The official SDK sends two Sec-WebSocket-Key/Version headers and validates
        # the answer against the first (docs/protocol.md §1.3): keep only the first.
        for name in ("Sec-WebSocket-Key", "Sec-WebSocket-Version"):
            values = request.headers.get_all(name)
            if len(values) > 1:
                del request.headers[name]
                request.headers[name] = values[0]
        return None

    def raw(self) -> list[str]:
        out, self.messages = self.messages, []
        return out


@pytest.fixture
async def recorder() -> AsyncIterator[Recorder]:
    rec = Recorder()
    async with serve(
        rec.handle, "127.0.0.1", 0, process_request=rec.first_key, compression=None
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        rec.url = f"ws://127.0.0.1:{port}/ws/v1"
        yield rec


def normalise(text: str) -> str:
    """The raw directive with ids and the (SDK-specific) context block blanked out."""
    message = json.loads(text)
    text = text.replace(json.dumps(message["context"]), '"<context>"')
    return ID.sub('"<id>"', text)


def shape(value: Any) -> Any:
    """Keys (in order) and value types, recursively."""
    if isinstance(value, dict):
        return [(k, shape(v)) for k, v in value.items()]
    return type(value).__name__


def check_same(official: str, ours: str) -> None:
    a, b = json.loads(official), json.loads(ours)
    assert list(a) == list(b)
    assert shape(a["header"]) == shape(b["header"])
    assert shape(a.get("payload")) == shape(b.get("payload"))
    assert a.get("payload") == b.get("payload")
    # The context names the SDK: same keys and types, different values.
    assert shape(a["context"]) == shape(b["context"])
    assert b["context"]["sdk"]["name"] == "nlsstream"
    # Same serialisation (json.dumps defaults: ", " and ": " separators, ASCII only).
    assert normalise(official) == normalise(ours)


def run_official_transcriber(url: str) -> None:
    t = nls.NlsSpeechTranscriber(url=url, token=TOKEN, appkey=APPKEY)
    t.start(
        aformat="pcm",
        sample_rate=16000,
        enable_intermediate_result=True,
        enable_punctuation_prediction=True,
        enable_inverse_text_normalization=False,
        timeout=5,
        ping_interval=None,
        ex={"max_sentence_silence": 800, "enable_words": True, "vocabulary_id": "v1"},
    )
    t.send_audio(b"\x00\x00" * 320)
    t.ctrl(max_sentence_silence=2000)
    t.stop(timeout=5)


def run_official_recognizer(url: str) -> None:
    r = nls.NlsSpeechRecognizer(url=url, token=TOKEN, appkey=APPKEY)
    r.start(aformat="pcm", sample_rate=8000, timeout=5, ping_interval=None, ex={"a": "é"})
    r.send_audio(b"\x00\x00" * 160)
    r.stop(timeout=5)


async def test_transcriber_directives_match_the_official_sdk(recorder: Recorder) -> None:
    await asyncio.wait_for(asyncio.to_thread(run_official_transcriber, recorder.url), 20)
    official = recorder.raw()
    assert [json.loads(m)["header"]["name"] for m in official] == [
        "StartTranscription",
        "ControlTranscriber",
        "StopTranscription",
    ]
    async with Transcriber(
        APPKEY,
        TOKEN,
        url=recorder.url,
        enable_intermediate_result=True,
        enable_punctuation_prediction=True,
        max_sentence_silence=800,
        enable_words=True,
        vocabulary_id="v1",
    ) as t:
        await t.send_audio(b"\x00\x00" * 320)
        await t.ctrl(max_sentence_silence=2000)
        await t.stop()
    ours = recorder.raw()
    assert len(ours) == len(official) == 3
    for a, b in zip(official, ours, strict=True):
        check_same(a, b)
    # One task id per task, repeated in every directive; a new message id each time.
    headers = [json.loads(m)["header"] for m in ours]
    assert {h["task_id"] for h in headers} == {t.task_id}
    assert len({h["message_id"] for h in headers}) == 3


async def test_recognizer_directives_match_the_official_sdk(recorder: Recorder) -> None:
    await asyncio.wait_for(asyncio.to_thread(run_official_recognizer, recorder.url), 20)
    official = recorder.raw()
    async with Recognizer(
        APPKEY, TOKEN, url=recorder.url, sample_rate=8000, params={"a": "é"}
    ) as r:
        await r.send_audio(b"\x00\x00" * 160)
        await r.stop()
    ours = recorder.raw()
    assert [json.loads(m)["header"]["name"] for m in ours] == [
        "StartRecognition",
        "StopRecognition",
    ]
    assert len(official) == len(ours)
    for a, b in zip(official, ours, strict=True):
        check_same(a, b)
    assert "\\u00e9" in ours[0]  # ensure_ascii, like json.dumps defaults


async def test_handshake_headers(recorder: Recorder) -> None:
    async with Recognizer(APPKEY, TOKEN, url=recorder.url) as r:
        await r.stop()
    ours = recorder.headers[-1]
    assert ours["x-nls-token"] == TOKEN
    assert "origin" not in ours
    assert "sec-websocket-extensions" not in ours  # compression off
    assert ours["sec-websocket-version"] == "13"
