"""Unit tests for the sans-I/O protocol core (nlsstream.realtime.protocol)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from nlsstream.errors import STATUS_CODES, InvalidStateError, ProtocolError
from nlsstream.realtime import protocol as p

TID = "0123456789abcdef0123456789abcdef"


def event_text(name: str, payload: dict[str, Any] | None = None, **header: Any) -> str:
    ns = header.pop("namespace", "SpeechTranscriber")
    msg = p.build_event(ns, name, header.pop("task_id", TID), payload, **header)
    return json.dumps(msg)


# --------------------------------------------------------------------------- ids


def test_new_id_is_32_lowercase_hex_and_unique() -> None:
    ids = {p.new_id() for _ in range(100)}
    assert len(ids) == 100
    assert all(p.is_valid_id(i) and len(i) == 32 and i == i.lower() for i in ids)


@pytest.mark.parametrize(
    "bad", [None, "", "0123", TID.upper(), TID + "0", "g" * 32, 12, "0123-4567" * 4]
)
def test_is_valid_id_rejects(bad: object) -> None:
    assert not p.is_valid_id(bad)


# --------------------------------------------------------------------------- directives


def test_start_directive_shape_matches_official_sdk_order() -> None:
    proto = p.ClientTask(p.TRANSCRIBER, "app", {"max_sentence_silence": 800}, task_id=TID)
    msg = json.loads(proto.start())
    assert list(msg) == ["header", "payload", "context"]
    assert list(msg["header"]) == ["message_id", "task_id", "namespace", "name", "appkey"]
    assert msg["header"]["task_id"] == TID
    assert msg["header"]["name"] == "StartTranscription"
    assert msg["header"]["namespace"] == "SpeechTranscriber"
    assert p.is_valid_id(msg["header"]["message_id"])
    assert list(msg["payload"]) == [
        "format",
        "sample_rate",
        "enable_intermediate_result",
        "enable_punctuation_prediction",
        "enable_inverse_text_normalization",
        "max_sentence_silence",
    ]
    assert msg["payload"]["max_sentence_silence"] == 800
    assert msg["context"]["sdk"]["name"] == "nlsstream"


def test_directives_serialise_with_json_dumps_defaults() -> None:
    proto = p.ClientTask(p.RECOGNIZER, "app", task_id=TID)
    text = proto.start()
    assert text == json.dumps(json.loads(text))
    assert '"header": {"message_id": ' in text


def test_start_payload_drops_none_and_keeps_extra_order() -> None:
    payload = p.start_payload(sample_rate=8000, vocabulary_id=None, enable_words=True, b=1, a=2)
    assert payload["sample_rate"] == 8000
    assert "vocabulary_id" not in payload
    assert list(payload)[-3:] == ["enable_words", "b", "a"]


def test_stop_has_no_payload_and_reuses_task_id() -> None:
    proto = p.ClientTask(p.RECOGNIZER, "app")
    start = json.loads(proto.start())
    proto.receive(
        event_text("RecognitionStarted", namespace="SpeechRecognizer", task_id=proto.task_id)
    )
    stop = json.loads(proto.stop())
    assert list(stop) == ["header", "context"]
    assert stop["header"]["name"] == "StopRecognition"
    assert stop["header"]["task_id"] == start["header"]["task_id"] == proto.task_id
    assert stop["header"]["message_id"] != start["header"]["message_id"]


def test_control_directive_and_recognizer_has_none() -> None:
    proto = p.ClientTask(p.TRANSCRIBER, "app", task_id=TID)
    proto.start()
    proto.receive(event_text("TranscriptionStarted"))
    ctrl = json.loads(proto.control(max_sentence_silence=2000))
    assert ctrl["header"]["name"] == "ControlTranscriber"
    assert ctrl["payload"] == {"max_sentence_silence": 2000}
    rec = p.ClientTask(p.RECOGNIZER, "app")
    with pytest.raises(InvalidStateError, match="no control"):
        rec.control(x=1)


def test_client_protocol_rejects_bad_task_id() -> None:
    with pytest.raises(ValueError, match="32 lowercase hex"):
        p.ClientTask(p.TRANSCRIBER, "app", task_id="abc")


def test_parse_directive_round_trip_and_errors() -> None:
    proto = p.ClientTask(p.TRANSCRIBER, "app", task_id=TID)
    d = p.parse_directive(proto.start())
    assert (d.namespace, d.name, d.task_id, d.appkey) == (
        "SpeechTranscriber",
        "StartTranscription",
        TID,
        "app",
    )
    with pytest.raises(p.DirectiveError) as info:
        p.parse_directive("{nope")
    assert info.value.status == 40000002
    bad = json.loads(proto._directive("StopTranscription"))
    bad["header"]["message_id"] = "xyz"
    with pytest.raises(p.DirectiveError, match="Invalid message id"):
        p.parse_directive(json.dumps(bad))
    bad["header"]["message_id"] = p.new_id()
    bad["header"]["namespace"] = "Nope"
    with pytest.raises(p.DirectiveError) as info:
        p.parse_directive(json.dumps(bad))
    assert info.value.status == 40010001


# --------------------------------------------------------------------------- parse_event


def test_parse_sentence_end_ignores_unknown_keys() -> None:
    payload = {
        "index": 1,
        "time": 2520,
        "result": "北京的天气。",
        "confidence": 0.872,
        "words": [{"text": "北京", "startTime": 630, "endTime": 930}],
        "status": 0,
        "gender": "",
        "begin_time": 880,
        "stash_result": {"sentenceId": 2, "beginTime": 2520, "text": ""},
        "sentence_id": "5495a7dd10e0405fbd3424e4d0249b55",
        "gender_score": 0.0,
    }
    ev = p.parse_event(event_text("SentenceEnd", payload))
    assert isinstance(ev, p.SentenceEnd)
    assert (ev.index, ev.begin_time, ev.time, ev.text) == (1, 880, 2520, "北京的天气。")
    assert ev.words == (p.Word("北京", 630, 930),)
    assert ev.confidence == pytest.approx(0.872)
    assert ev.raw["payload"]["gender_score"] == 0.0
    # The event keeps the text, not dicts; each access decodes a fresh copy.
    assert json.loads(ev.raw_text)["payload"] == payload
    assert ev.raw is not ev.raw and ev.raw == json.loads(ev.raw_text)
    assert not hasattr(ev, "__dict__")  # slotted: a retained sentence is one small object


@pytest.mark.parametrize("payload", [None, {}])
def test_parse_started_and_completed_without_payload(payload: dict[str, Any] | None) -> None:
    started = p.parse_event(event_text("TranscriptionStarted", payload))
    assert isinstance(started, p.Started)
    done = p.parse_event(event_text("TranscriptionCompleted", payload))
    assert isinstance(done, p.Completed)
    assert (done.text, done.duration) == ("", None)


def test_parse_recognizer_events() -> None:
    rc = p.parse_event(
        event_text(
            "RecognitionResultChanged",
            {"result": "hello", "duration": 900},
            namespace="SpeechRecognizer",
        )
    )
    assert isinstance(rc, p.ResultChanged)
    assert (rc.text, rc.duration, rc.index) == ("hello", 900, None)
    done = p.parse_event(
        event_text(
            "RecognitionCompleted",
            {"result": "hello world", "duration": 1500},
            namespace="SpeechRecognizer",
        )
    )
    assert isinstance(done, p.Completed)
    assert (done.text, done.duration) == ("hello world", 1500)


def test_parse_task_failed_in_default_namespace_and_status_message_fallback() -> None:
    msg = p.build_task_failed(TID, 40000004, "Gateway:IDLE_TIMEOUT:idle!")
    ev = p.parse_event(json.dumps(msg))
    assert isinstance(ev, p.TaskFailed)
    assert (ev.namespace, ev.status, ev.status_text) == (
        "Default",
        40000004,
        "Gateway:IDLE_TIMEOUT:idle!",
    )
    del msg["header"]["status_text"]
    msg["header"]["status_message"] = "from a fake"
    assert p.parse_event(json.dumps(msg)).status_text == "from a fake"


def test_parse_unknown_event_is_kept() -> None:
    ev = p.parse_event(event_text("SentenceSemantics", {"x": 1}))
    assert isinstance(ev, p.UnknownEvent)
    assert ev.payload == {"x": 1}


@pytest.mark.parametrize(
    "text",
    [
        "not json",
        b"\xff\xfe",
        "[]",
        '{"payload": {}}',
        '{"header": {"name": ""}}',
        '{"header": {"name": "SentenceEnd"}, "payload": [1]}',
        '{"header": {"name": "SentenceEnd", "status": "ok"}}',
        '{"header": {"name": "SentenceEnd"}, "payload": {"index": "one"}}',
        '{"header": {"name": "SentenceEnd"}, "payload": {"result": 5}}',
        '{"header": {"name": "SentenceEnd"}, "payload": {"words": {"a": 1}}}',
        '{"header": {"name": "SentenceEnd"}, "payload": {"words": [1]}}',
    ],
)
def test_parse_event_malformed_raises_protocol_error(text: str | bytes) -> None:
    with pytest.raises(ProtocolError):
        p.parse_event(text)


def test_protocol_error_message_previews_bad_text() -> None:
    with pytest.raises(ProtocolError, match=r"invalid JSON.*not json"):
        p.parse_event("not json at all")


# --------------------------------------------------------------------------- state machine


def started(ns: p.Namespace = p.TRANSCRIBER) -> p.ClientTask:
    proto = p.ClientTask(ns, "app", task_id=TID)
    proto.start()
    proto.receive(event_text(ns.started, namespace=ns.name))
    return proto


def test_full_transcriber_sequence() -> None:
    proto = p.ClientTask(p.TRANSCRIBER, "app", task_id=TID)
    assert proto.state is p.State.IDLE
    proto.start()
    assert proto.state is p.State.STARTING
    proto.receive(event_text("TranscriptionStarted"))
    assert proto.state is p.State.STARTED
    proto.audio()
    proto.receive(event_text("SentenceBegin", {"index": 1, "time": 0}))
    proto.receive(event_text("SentenceEnd", {"index": 1, "time": 900, "begin_time": 0}))
    proto.stop()
    assert proto.state is p.State.STOPPING
    proto.receive(event_text("SentenceEnd", {"index": 2, "time": 1900, "begin_time": 1000}))
    proto.receive(event_text("TranscriptionCompleted"))
    assert proto.state is p.State.COMPLETED
    assert proto.state.ended


@pytest.mark.parametrize(
    ("action", "state_setup"),
    [
        ("audio", "idle"),
        ("stop", "idle"),
        ("audio", "starting"),
        ("stop", "starting"),
        ("control", "starting"),
        ("start", "started"),
        ("audio", "stopping"),
        ("stop", "stopping"),
        ("control", "stopping"),
        ("audio", "completed"),
        ("stop", "completed"),
        ("start", "failed"),
        ("audio", "failed"),
    ],
)
def test_illegal_client_actions_raise_invalid_state(action: str, state_setup: str) -> None:
    proto = p.ClientTask(p.TRANSCRIBER, "app", task_id=TID)
    if state_setup != "idle":
        proto.start()
    if state_setup in ("started", "stopping", "completed"):
        proto.receive(event_text("TranscriptionStarted"))
    if state_setup == "stopping":
        proto.stop()
    if state_setup == "completed":
        proto.receive(event_text("TranscriptionCompleted"))
    if state_setup == "failed":
        proto.fail()
    before = proto.state
    with pytest.raises(InvalidStateError, match=before.value):
        getattr(proto, action)()
    assert proto.state is before


def test_stop_twice_is_refused() -> None:
    proto = started()
    proto.stop()
    with pytest.raises(InvalidStateError, match="stopping"):
        proto.stop()


def test_server_vad_completion_while_started() -> None:
    proto = started(p.RECOGNIZER)
    proto.receive(
        event_text(
            "RecognitionCompleted", {"result": "hi", "duration": 5}, namespace="SpeechRecognizer"
        )
    )
    assert proto.state is p.State.COMPLETED
    with pytest.raises(InvalidStateError):
        proto.stop()


@pytest.mark.parametrize("when", ["starting", "started", "stopping"])
def test_task_failed_from_any_live_state(when: str) -> None:
    proto = p.ClientTask(p.TRANSCRIBER, "app", task_id=TID)
    proto.start()
    if when != "starting":
        proto.receive(event_text("TranscriptionStarted"))
    if when == "stopping":
        proto.stop()
    ev = proto.receive(json.dumps(p.build_task_failed(TID, 41040201, "Realtime:TIMEOUT")))
    assert isinstance(ev, p.TaskFailed)
    assert proto.state is p.State.FAILED


@pytest.mark.parametrize(
    ("setup", "name", "match"),
    [
        ("idle", "TranscriptionStarted", "before Start"),
        ("starting", "SentenceEnd", "before the task started"),
        ("started", "TranscriptionStarted", "twice"),
        ("completed", "SentenceEnd", "after the task was completed"),
    ],
)
def test_impossible_server_sequences_raise_protocol_error(
    setup: str, name: str, match: str
) -> None:
    proto = p.ClientTask(p.TRANSCRIBER, "app", task_id=TID)
    if setup != "idle":
        proto.start()
    if setup in ("started", "completed"):
        proto.receive(event_text("TranscriptionStarted"))
    if setup == "completed":
        proto.receive(event_text("TranscriptionCompleted"))
    payload = {"index": 1, "time": 1, "begin_time": 0} if name == "SentenceEnd" else None
    with pytest.raises(ProtocolError, match=match):
        proto.receive(event_text(name, payload))


def test_event_for_another_task_is_a_protocol_error() -> None:
    proto = started()
    with pytest.raises(ProtocolError, match="for task"):
        proto.receive(event_text("SentenceBegin", {"index": 1, "time": 0}, task_id=p.new_id()))


def test_fail_is_idempotent_and_keeps_completed() -> None:
    proto = started()
    proto.receive(event_text("TranscriptionCompleted"))
    proto.fail()
    assert proto.state is p.State.COMPLETED
    other = started()
    other.fail()
    other.fail()
    assert other.state is p.State.FAILED


# --------------------------------------------------------------------------- server side


def directive(name: str, task_id: str, ns: p.Namespace = p.TRANSCRIBER, **payload: Any) -> str:
    return p.encode(
        p.build_directive(ns.name, name, task_id=task_id, appkey="key", payload=payload or None)
    )


def test_server_task_runs_tasks_one_after_another() -> None:
    task = p.ServerTask(appkeys=["key"])
    first, second = p.new_id(), p.new_id()
    accepted = task.receive(directive("StartTranscription", first, sample_rate=8000))
    assert accepted is not None and accepted.kind == "start"
    assert accepted.params is not None and accepted.params.sample_rate == 8000
    assert json.loads(task.started())["header"]["name"] == "TranscriptionStarted"
    assert task.receive_audio() is True
    control = task.receive(directive("ControlTranscriber", first, max_sentence_silence=300))
    assert control is not None and control.params is not None
    assert control.params.max_sentence_silence == 300 == task.params.max_sentence_silence  # type: ignore[union-attr]
    stop = task.receive(directive("StopTranscription", first))
    assert stop is not None and stop.kind == "stop" and task.state is p.ServerState.STOPPING
    completed = json.loads(task.completed())
    assert completed["header"]["task_id"] == first and task.state is p.ServerState.IDLE
    assert task.receive(directive("StartTranscription", second)) is not None


def test_server_task_ignores_late_stop_and_audio_after_voice_detection() -> None:
    task = p.ServerTask()
    tid = p.new_id()
    task.receive(directive("StartRecognition", tid, p.RECOGNIZER))
    task.completed({"result": "hi"}, early=True)
    assert task.receive_audio() is False
    assert task.receive(directive("StopRecognition", tid, p.RECOGNIZER)) is None


@pytest.mark.parametrize(
    ("steps", "status"),
    [
        (["start", "start"], 40010005),
        (["start", "stop", "stop"], 40010005),
        (["start", "stop", "completed", "stop"], 40010005),
        (["start", "stop", "audio"], 40010005),
        (["audio"], 40010005),
        (["stop"], 40010005),
        (["control"], 40010005),
        (["unknown"], 40010002),
        (["recognizer-in-transcriber"], 40010002),
        (["bad-appkey"], 40020105),
        (["bad-format"], 40010003),
        (["bad-rate"], 41010101),
        (["bad-silence"], 40000003),
        (["bad-message-id"], 40000002),
        (["not-json"], 40000002),
        (["deep"], 40000002),
    ],
)
def test_server_task_refuses_with_the_documented_status(steps: list[str], status: int) -> None:
    task = p.ServerTask(appkeys=["key"])
    tid = p.new_id()
    texts = {
        "start": directive("StartTranscription", tid),
        "stop": directive("StopTranscription", tid),
        "control": directive("ControlTranscriber", tid),
        "unknown": directive("Dance", tid),
        "recognizer-in-transcriber": directive("StartRecognition", tid),
        "bad-format": directive("StartTranscription", tid, format="mp3"),
        "bad-rate": directive("StartTranscription", tid, sample_rate=44100),
        "bad-silence": directive("StartTranscription", tid, max_sentence_silence=True),
        "bad-appkey": directive("StartTranscription", tid).replace('"key"', '"other"'),
        "bad-message-id": directive("StartTranscription", tid).replace(
            '"message_id": "', '"message_id": "X'
        ),
        "not-json": "{not json",
        "deep": "[" * 100_000 + "]" * 100_000,
    }
    with pytest.raises(p.DirectiveError) as info:
        for step in steps:
            if step == "audio":
                task.receive_audio()
            elif step == "completed":
                task.completed()
            else:
                task.receive(texts[step])
    assert info.value.status == status
    assert task.state is p.ServerState.FAILED
    failed = json.loads(task.refusal(info.value))
    assert failed["header"]["name"] == "TaskFailed"
    assert failed["header"]["status"] == status
    assert failed["header"]["status_text"].split(":")[1] == STATUS_CODES[status].name
    if steps[0] not in ("not-json", "deep", "audio"):  # these name no task
        assert failed["header"]["task_id"] == tid
