"""Renderers: subtitles, JSON Lines, live and plain text, progress bar."""

from __future__ import annotations

import io
import json

import pytest
from helpers import parse_subtitles

from nlsstream.cli.output import (
    CLEAR_LINE,
    Cue,
    JsonlRenderer,
    LiveRenderer,
    ProgressBar,
    SubtitleRenderer,
    TextRenderer,
    cue_from_event,
    event_to_json,
    format_srt,
    format_timestamp,
    format_vtt,
    renderer_for,
)
from nlsstream.realtime.protocol import (
    RECOGNIZER,
    TRANSCRIBER,
    Event,
    SentenceEnd,
    build_event,
    build_task_failed,
    encode,
    parse_event,
)

TASK = "0123456789abcdef0123456789abcdef"


def event(namespace: str, name: str, payload: dict[str, object] | None = None) -> Event:
    """A typed event exactly as the client parses it off the wire."""
    return parse_event(encode(build_event(namespace, name, TASK, payload)))


def sentence_end(index: int, begin: int, end: int, text: str, **extra: object) -> SentenceEnd:
    payload = {"index": index, "time": end, "begin_time": begin, "result": text, **extra}
    ev = event("SpeechTranscriber", "SentenceEnd", payload)
    assert isinstance(ev, SentenceEnd)
    return ev


def partial(index: int, text: str) -> Event:
    return event(
        "SpeechTranscriber", TRANSCRIBER.result_changed, {"index": index, "time": 1, "result": text}
    )


SENTENCES = [
    sentence_end(1, 880, 2520, "hello world"),
    sentence_end(2, 3700, 61_234, "what is the weather"),
    sentence_end(3, 3_600_000 + 62_000, 3_600_000 + 65_001, "set an alarm"),
]


@pytest.mark.parametrize(
    ("ms", "sep", "expected"),
    [
        (0, ",", "00:00:00,000"),
        (1234, ",", "00:00:01,234"),
        (1234, ".", "00:00:01.234"),
        (61_005, ".", "00:01:01.005"),
        (3_600_000 + 59 * 60_000 + 59_999, ",", "01:59:59,999"),
        (100 * 3_600_000, ",", "100:00:00,000"),
        (-5, ",", "00:00:00,000"),
    ],
)
def test_format_timestamp(ms: int, sep: str, expected: str) -> None:
    assert format_timestamp(ms, sep) == expected


def test_srt_is_numbered_with_comma_times() -> None:
    srt = format_srt(SENTENCES)
    assert srt.startswith("1\n00:00:00,880 --> 00:00:02,520\nhello world\n\n2\n")
    assert parse_subtitles(srt, "srt") == [
        (880, 2520, "hello world"),
        (3700, 61_234, "what is the weather"),
        (3_662_000, 3_665_001, "set an alarm"),
    ]


def test_vtt_has_header_and_dot_times() -> None:
    vtt = format_vtt(SENTENCES)
    assert vtt.startswith("WEBVTT\n\n00:00:00.880 --> 00:00:02.520\nhello world\n\n")
    assert [c[:2] for c in parse_subtitles(vtt, "vtt")] == [
        (880, 2520),
        (3700, 61_234),
        (3_662_000, 3_665_001),
    ]


def test_subtitles_skip_empty_text_and_keep_numbering_contiguous() -> None:
    cues = [Cue(0, 500, "a"), Cue(600, 900, "   "), Cue(1000, 1500, "b")]
    assert [c[2] for c in parse_subtitles(format_srt(cues), "srt")] == ["a", "b"]
    assert format_srt([]) == ""
    assert format_vtt([]) == "WEBVTT\n"


def test_subtitle_text_cannot_break_a_cue() -> None:
    # A blank line would end the cue early; "<" and "&" are markup in WebVTT.
    cues = [Cue(0, 1000, "one\n\ntwo"), Cue(1000, 900, "a < b & c --> d")]
    srt = parse_subtitles(format_srt(cues), "srt")
    assert srt == [(0, 1000, "one two"), (1000, 1000, "a < b & c --> d")]
    vtt = parse_subtitles(format_vtt(cues), "vtt")
    assert vtt[1][2] == "a &lt; b &amp; c --&gt; d"


def test_cue_from_event() -> None:
    assert cue_from_event(SENTENCES[0]) == Cue(880, 2520, "hello world")
    done = event(RECOGNIZER.name, RECOGNIZER.completed, {"result": "hello world", "duration": 1500})
    assert cue_from_event(done) == Cue(0, 1500, "hello world")
    assert cue_from_event(event(TRANSCRIBER.name, TRANSCRIBER.completed)) is None
    assert cue_from_event(partial(1, "hel")) is None


def test_event_to_json_sentence_end_with_words() -> None:
    words = [{"text": "hello", "startTime": 880, "endTime": 1200}]
    ev = sentence_end(1, 880, 2520, "hello world", confidence=0.9, words=words)
    data = event_to_json(ev)
    assert data == {
        "type": "SentenceEnd",
        "name": "SentenceEnd",
        "task_id": TASK,
        "index": 1,
        "time": 2520,
        "begin_time": 880,
        "text": "hello world",
        "confidence": 0.9,
        "words": [{"text": "hello", "start_time": 880, "end_time": 1200}],
    }
    assert json.loads(json.dumps(data)) == data


def test_event_to_json_failure_and_unknown_events() -> None:
    failed = parse_event(encode(build_task_failed(TASK, 40000004, "Gateway:IDLE_TIMEOUT:idle")))
    data = event_to_json(failed)
    assert data["type"] == "TaskFailed"
    assert (data["status"], data["status_text"]) == (40000004, "Gateway:IDLE_TIMEOUT:idle")
    unknown = event("SpeechTranscriber", "SentenceSemantics", {"x": [1, 2]})
    assert event_to_json(unknown)["payload"] == {"x": [1, 2]}
    started = event_to_json(event(TRANSCRIBER.name, TRANSCRIBER.started))
    assert started == {"type": "Started", "name": "TranscriptionStarted", "task_id": TASK}


def test_jsonl_renderer_writes_one_object_per_event() -> None:
    out = io.StringIO()
    r = JsonlRenderer(out)
    for ev in [partial(1, "hel"), SENTENCES[0]]:
        r.handle(ev)
    r.close()
    lines = out.getvalue().splitlines()
    assert [json.loads(line)["type"] for line in lines] == ["ResultChanged", "SentenceEnd"]


def test_text_renderer_prints_only_finals() -> None:
    out = io.StringIO()
    r = TextRenderer(out)
    for ev in [partial(1, "hel"), SENTENCES[0], partial(2, "wha"), SENTENCES[1]]:
        r.handle(ev)
    r.handle(event(RECOGNIZER.name, RECOGNIZER.completed, {"result": "whole", "duration": 5}))
    r.close()
    assert out.getvalue() == "hello world\nwhat is the weather\nwhole\n"


def test_live_renderer_rewrites_partials_in_place() -> None:
    out = io.StringIO()
    r = LiveRenderer(out, width=80)
    for ev in [partial(1, "hel"), partial(1, "hello"), SENTENCES[0], partial(2, "wh")]:
        r.handle(ev)
    r.close()
    assert out.getvalue() == (
        f"{CLEAR_LINE}hel{CLEAR_LINE}hello{CLEAR_LINE}hello world\n{CLEAR_LINE}wh{CLEAR_LINE}"
    )


def test_live_renderer_keeps_partials_within_the_terminal_width() -> None:
    out = io.StringIO()
    r = LiveRenderer(out, width=10)
    r.handle(partial(1, "abcdefghijklmnopqrstuvwxyz"))
    shown = out.getvalue()[len(CLEAR_LINE) :]
    assert shown == "…stuvwxyz"  # 9 columns: one less than the width, so no wrap


def test_subtitle_renderer_writes_on_close() -> None:
    out = io.StringIO()
    r = SubtitleRenderer(out, "vtt")
    for ev in SENTENCES:
        r.handle(ev)
    assert out.getvalue() == ""
    r.close()
    assert len(parse_subtitles(out.getvalue(), "vtt")) == 3


def test_renderer_for() -> None:
    out = io.StringIO()  # not a terminal
    assert isinstance(renderer_for("text", out), TextRenderer)
    assert isinstance(renderer_for("text", out, live=True), LiveRenderer)
    assert isinstance(renderer_for("jsonl", out), JsonlRenderer)
    assert isinstance(renderer_for("srt", out), SubtitleRenderer)
    with pytest.raises(ValueError, match="unknown output format 'xml'"):
        renderer_for("xml", out)
    with pytest.raises(ValueError, match="'srt' or 'vtt'"):
        SubtitleRenderer(out, "ass")


def test_progress_bar_redraws_on_change_and_clears() -> None:
    out = io.StringIO()
    now = [100.0]
    bar = ProgressBar(1000, out, width=10, clock=lambda: now[0])
    bar.update(0)
    bar.update(1)  # still 0 % and 0 s: no redraw
    now[0] += 5.5
    bar.update(500)
    now[0] += 0.2
    bar.update(500)  # the same percentage and second: no redraw
    now[0] += 4.5
    bar.update(5000)  # clamped
    assert out.getvalue().split(CLEAR_LINE)[1:] == [
        "[----------]   0% sent  0:00 elapsed",
        "[#####-----]  50% sent  0:05 elapsed, ETA 0:05",
        "[##########] 100% sent  0:10 elapsed",
    ]
    bar.close()
    assert out.getvalue().endswith(CLEAR_LINE)
    assert bar.render(250, 3600.0) == "[##--------]  25% sent  1:00:00 elapsed, ETA 3:00:00"
