"""One rule book, two gateways: the same directive sequences get identical replies from
the full gateway (``Gateway``) and the light one (``LightGateway``), with the cloud's
documented status codes (§6). Both take their rules from
``protocol.ServerTask``; this table keeps them from drifting apart."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from helpers import APPKEY, FRAME, directive, recv_json, start
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from nlsstream.gateway import Gateway
from nlsstream.gateway.light import LightGateway
from nlsstream.realtime.protocol import RECOGNIZER, TRANSCRIBER

TOKEN = "rules-token"
T1 = "0123456789abcdef0123456789abcdef"
T2 = "fedcba9876543210fedcba9876543210"
NS = TRANSCRIBER.name

#: A step sends text or audio, or waits for an event (so that both gateways see the
#: next step in the same task state, whatever their internal timing).
Step = tuple[str, Any]


def send(message: str | bytes) -> Step:
    return ("send", message)


def wait(name: str) -> Step:
    return ("wait", name)


def stop(task_id: str = T1) -> str:
    return directive(NS, TRANSCRIBER.stop, task_id)


def bad_message_id() -> str:
    message = json.loads(start(T1))
    message["header"]["message_id"] = "not-an-id"
    return json.dumps(message)


# (id, steps, expected replies: (event name, status), marks)
ROWS: list[tuple[str, list[Step], list[tuple[str, int]], Any]] = [
    (
        "start-twice",
        [send(start(T1)), wait("TranscriptionStarted"), send(start(T2))],
        [("TranscriptionStarted", 20000000), ("TaskFailed", 40010005)],
        (),
    ),
    (
        "stop-twice",
        [send(start(T1)), send(stop()), wait("TranscriptionCompleted"), send(stop())],
        [
            ("TranscriptionStarted", 20000000),
            ("TranscriptionCompleted", 20000000),
            ("TaskFailed", 40010005),
        ],
        (),
    ),
    ("audio-before-start", [send(FRAME)], [("TaskFailed", 40010005)], ()),
    ("stop-before-start", [send(stop())], [("TaskFailed", 40010005)], ()),
    (
        "control-before-start",
        [send(directive(NS, "ControlTranscriber", T1, {"max_sentence_silence": 500}))],
        [("TaskFailed", 40010005)],
        (),
    ),
    ("unknown-directive", [send(directive(NS, "Bogus", T1))], [("TaskFailed", 40010002)], ()),
    (
        "recognizer-directive-in-transcriber",
        [send(directive(NS, RECOGNIZER.start, T1))],
        [("TaskFailed", 40010002)],
        (),
    ),
    ("unknown-appkey", [send(start(T1, appkey="nope"))], [("TaskFailed", 40020105)], ()),
    ("bad-format", [send(start(T1, format="mp3"))], [("TaskFailed", 40010003)], ()),
    ("bad-sample-rate", [send(start(T1, sample_rate=44100))], [("TaskFailed", 41010101)], ()),
    ("bad-message-id", [send(bad_message_id())], [("TaskFailed", 40000002)], ()),
    ("invalid-json", [send("{not json")], [("TaskFailed", 40000002)], ()),
]


@pytest.fixture
async def gateways() -> AsyncIterator[dict[str, str]]:
    async with (
        Gateway(tokens=[TOKEN], appkeys=[APPKEY], recognizer="span") as full,
        LightGateway(token=TOKEN, appkeys=[APPKEY]) as light,
    ):
        yield {"full": full.url, "light": light.url}


async def replies(url: str, steps: list[Step]) -> list[dict[str, Any]]:
    """Run ``steps``, then read until TaskFailed; the gateway must then close (1000)."""
    got: list[dict[str, Any]] = []
    async with connect(url, additional_headers={"X-NLS-Token": TOKEN}) as ws:
        for kind, value in steps:
            if kind == "send":
                await ws.send(value)
                continue
            while not got or got[-1]["name"] != value:
                got.append(_reply(await recv_json(ws)))
                assert got[-1]["name"] != "TaskFailed", got
        while not got or got[-1]["name"] != "TaskFailed":
            got.append(_reply(await recv_json(ws)))
        with pytest.raises(ConnectionClosed) as closed:
            await recv_json(ws)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
    return got


def _reply(event: dict[str, Any]) -> dict[str, Any]:
    header = event["header"]
    return {
        "name": header["name"],
        "namespace": header["namespace"],
        "status": header["status"],
        "status_text": header["status_text"],
        "task_id": header["task_id"],
    }


@pytest.mark.parametrize(
    ("steps", "expected"),
    [pytest.param(steps, expected, id=id_, marks=marks) for id_, steps, expected, marks in ROWS],
)
async def test_both_gateways_answer_alike(
    gateways: dict[str, str], steps: list[Step], expected: list[tuple[str, int]]
) -> None:
    full = await replies(gateways["full"], steps)
    light = await replies(gateways["light"], steps)
    assert [(r["name"], r["status"]) for r in light] == expected
    assert [(r["name"], r["status"]) for r in full] == expected
    assert light == full
