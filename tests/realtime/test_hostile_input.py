"""Hostile input to both parsers: whatever the peer sends, the client raises
ProtocolError and the gateway answers a documented 4xxxxxxx status; nothing else
escapes (no OverflowError, ValueError, AssertionError, RecursionError, TypeError)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.server import ServerConnection, serve

from nlsstream import Transcriber
from nlsstream.errors import ProtocolError
from nlsstream.realtime import protocol as p

TASK = "0123456789abcdef0123456789abcdef"

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=20,
)
keys = st.sampled_from(
    ["index", "time", "begin_time", "result", "confidence", "words", "duration", "x"]
)
names = st.sampled_from(
    ["SentenceEnd", "SentenceBegin", "TranscriptionResultChanged", "TranscriptionStarted",
     "TranscriptionCompleted", "RecognitionCompleted", "TaskFailed", "Other"]
)  # fmt: skip


def event_text(name: Any, payload: Any, **header: Any) -> str:
    head = {"namespace": "SpeechTranscriber", "name": name, "task_id": TASK, **header}
    return json.dumps({"header": head, "payload": payload})


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(name=names, payload=st.dictionaries(keys, json_values, max_size=5))
def test_parse_event_raises_only_protocol_error(name: str, payload: dict[str, Any]) -> None:
    try:
        event = p.parse_event(event_text(name, payload))
    except ProtocolError:
        return
    assert isinstance(event, p.Event)


@settings(max_examples=200)
@given(message=json_values)
def test_parse_event_of_any_json_raises_only_protocol_error(message: Any) -> None:
    with contextlib.suppress(ProtocolError):
        p.parse_event(json.dumps(message))


@pytest.mark.parametrize(
    "text",
    [
        event_text("SentenceEnd", {"index": 1e400, "time": 1, "begin_time": 0}),
        event_text("SentenceEnd", {"index": 1, "time": float("nan"), "begin_time": 0}),
        event_text("SentenceBegin", {"index": 1, "time": None}),
        event_text("SentenceEnd", {"index": 1, "words": [{"text": "a", "startTime": None}]}),
        event_text("SentenceEnd", {}, task_id=["x"]),
        event_text("TaskFailed", {}, status_text={"a": 1}),
        '{"header": ' * 100_000 + "}" * 100_000,
        "[" * 100_000,
        b'{"header": {"name": "\xff"}}',
        '{"header": {"name": "SentenceEnd"}, "payload": {"index": ' + "9" * 5000 + "}}",
    ],
    ids=[
        "inf",
        "nan",
        "null-time",
        "null-word-time",
        "list-task-id",
        "dict-text",
        "deep",
        "deep-list",
        "bad-utf8",
        "huge-int",
    ],
)
def test_hostile_events_are_protocol_errors(text: str | bytes) -> None:
    with pytest.raises(ProtocolError):
        p.parse_event(text)


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(
    header=st.dictionaries(
        st.sampled_from(["message_id", "task_id", "namespace", "name", "appkey", "x"]),
        json_values,
        max_size=6,
    ),
    payload=json_values,
)
def test_gateway_refuses_any_bad_directive_with_a_4xx_status(header: Any, payload: Any) -> None:
    task = p.ServerTask()
    try:
        task.receive(json.dumps({"header": header, "payload": payload}))
    except p.DirectiveError as exc:
        assert 40000000 <= exc.status < 50000000, exc
        assert json.loads(task.refusal(exc))["header"]["status"] == exc.status


@pytest.mark.parametrize(
    "text",
    [
        json.dumps({"header": {"message_id": TASK, "task_id": TASK, "namespace": {},
                               "name": "StartTranscription", "appkey": "k"}}),
        '{"header": ' * 100_000 + "}" * 100_000,
        json.dumps({"header": {"message_id": TASK, "task_id": TASK, "namespace":
                               "SpeechTranscriber", "name": "StartTranscription",
                               "appkey": "k"}, "payload": {"sample_rate": 1e400}}),
    ],
    ids=["dict-namespace", "deep", "inf-rate"],
)  # fmt: skip
def test_hostile_directives_get_documented_statuses(text: str) -> None:
    with pytest.raises(p.DirectiveError) as info:
        p.ServerTask().receive(text)
    assert 40000000 <= info.value.status < 50000000


async def test_a_hostile_event_ends_the_session_with_a_protocol_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A live session that receives a malformed event raises ProtocolError (not a
    retryable GatewayConnectionError), and asyncio logs no fatal error."""

    async def handler(ws: ServerConnection) -> None:
        start = json.loads(await ws.recv())
        task_id = start["header"]["task_id"]
        started = p.build_event("SpeechTranscriber", "TranscriptionStarted", task_id)
        await ws.send(p.encode(started))
        await ws.send(event_text("SentenceEnd", {"index": 1e400}, task_id=task_id))
        await ws.wait_closed()

    caplog.set_level(logging.ERROR, logger="asyncio")
    async with serve(handler, "127.0.0.1", 0) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        t = Transcriber("app", "tok", url=f"ws://127.0.0.1:{port}/", proxy=None)
        with pytest.raises(ProtocolError, match="finite number"):
            async with t:
                await asyncio.wait_for(t.sentences().__anext__(), 10)
        assert isinstance(t.error, ProtocolError) and not t.error.retryable
    assert not [r for r in caplog.records if "Fatal error" in r.getMessage()]
