"""Sessions that survive the network: after a dropped connection or a retryable failure
mid-task, a session resumes on a new connection, replays the audio since the last final
sentence and goes on as one stream, with real speech against the local gateway."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nlsstream import (
    Event,
    GatewayConnectionError,
    Recognizer,
    Reconnect,
    Resumed,
    SentenceBegin,
    SentenceEnd,
    TaskFailedError,
    Transcriber,
)
from nlsstream.gateway import Faults, Gateway
from nlsstream.realtime.resume import ReplayBuffer, Timeline

pytest.importorskip("pocketsphinx")

FIXTURES = Path(__file__).parents[1] / "fixtures"
TRANSCRIPTS: dict[str, list[str]] = json.loads((FIXTURES / "transcripts.json").read_text())
THREE = str(FIXTURES / "three_sentences.wav")
HELLO = str(FIXTURES / "hello.wav")
TOKEN, APPKEY = "tok-resume", "app"
# 4 s into three_sentences.wav: in the middle of its second sentence.
MID_SECOND = 2 * 16000 * 4
FAST = Reconnect(backoff=0.01, max_backoff=0.05)


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    async with Gateway(tokens=[TOKEN], appkeys=[APPKEY], recognizer="sphinx") as g:
        yield g


@dataclass
class Run:
    sentences: list[SentenceEnd] = field(default_factory=list)
    begins: list[SentenceBegin] = field(default_factory=list)
    resumed: list[Resumed] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    text: str = ""
    reconnects: int = 0
    replayed_bytes: int = 0


async def transcribe(gw: Gateway, pace: float | None, **kw: Any) -> Run:
    run = Run()
    async with Transcriber(
        APPKEY,
        TOKEN,
        url=gw.url,
        on_sentence_begin=run.begins.append,
        on_sentence_end=run.sentences.append,
        on_resume=run.resumed.append,
        stop_timeout=10,
        **kw,
    ) as t:
        events = t.events()

        async def collect() -> None:
            async for event in events:
                run.events.append(event)

        collector = asyncio.create_task(collect())
        try:
            await t.stream(THREE, pace=pace)
            result = await t.stop()
        finally:
            # The iterator ends at Completed, or raises the task's error (which the
            # session raises too): either way, it is done within a bound.
            await asyncio.wait([collector], timeout=10)
            if not collector.done():
                collector.cancel()
            elif not collector.cancelled():
                collector.exception()
        await collector
    run.text = result.text
    run.reconnects = t.metrics.reconnects
    run.replayed_bytes = t.metrics.replayed_bytes
    return run


_BASELINE: list[Run] = []


async def baseline(gw: Gateway) -> Run:
    """The run without a fault, with word timings: PocketSphinx decodes the same audio
    the same way every time, so the module makes it once (each costs seconds)."""
    if not _BASELINE:
        run = await transcribe(gw, pace=None, enable_words=True)
        assert run.text == " ".join(TRANSCRIPTS["three_sentences.wav"])
        _BASELINE.append(run)
    return _BASELINE[0]


def assert_same_stream(run: Run, baseline: Run) -> None:
    assert run.text == baseline.text
    assert [s.index for s in run.sentences] == list(range(1, len(baseline.sentences) + 1))
    assert [b.index for b in run.begins] == [s.index for s in run.sentences]
    for got, want in zip(run.sentences, baseline.sentences, strict=True):
        assert got.text == want.text
        # On the whole stream's timeline, within one 20 ms frame of the run without a fault.
        assert abs(got.begin_time - want.begin_time) <= 20
        assert abs(got.time - want.time) <= 20
        for w_got, w_want in zip(got.words, want.words, strict=True):
            assert abs(w_got.start_time - w_want.start_time) <= 20


@pytest.mark.parametrize(
    "fault",
    [
        Faults(drop_at="audio", drop_after_bytes=MID_SECOND),
        Faults(fail_status=52010001, fail_at="audio", fail_after_bytes=MID_SECOND),
    ],
    ids=["dropped", "52010001"],
)
# Paced at 4x real time: the pacer's path, in a quarter of the time a real-time run takes.
@pytest.mark.parametrize("pace", [None, 4.0], ids=["fast", "paced"])
async def test_a_resumed_stream_is_the_stream_without_the_fault(
    gw: Gateway, fault: Faults, pace: float | None
) -> None:
    expected = await baseline(gw)
    gw.queue_faults(fault)  # the first connection only: the resumed one is sound
    run = await transcribe(gw, pace=pace, enable_words=True, reconnect=FAST)
    assert_same_stream(run, expected)
    assert run.reconnects == 1 and len(run.resumed) == 1
    resumed = run.resumed[0]
    assert resumed.previous_task_id != resumed.task_id
    assert resumed.attempts == 1 and resumed.gap_ms >= 0
    # The replay starts at the end of the first sentence, and holds what followed.
    assert 0 < run.replayed_bytes <= MID_SECOND * 2
    assert resumed.replayed_ms == run.replayed_bytes // 32
    if fault.fail_status:
        assert "52010001" in resumed.cause
    # events() saw the Resumed too, and no TaskFailed.
    assert resumed in run.events
    assert not [e for e in run.events if e.name == "TaskFailed"]


async def test_a_recognizer_resumes_by_replaying_its_utterance(gw: Gateway) -> None:
    async with Recognizer(APPKEY, TOKEN, url=gw.url) as r:
        await r.stream(HELLO, pace=None)
        baseline = await r.stop()
    gw.queue_faults(Faults(drop_at="audio", drop_after_bytes=16000))
    async with Recognizer(APPKEY, TOKEN, url=gw.url, reconnect=FAST) as r:
        await r.stream(HELLO, pace=None)
        result = await r.stop()
    assert result.text == baseline.text == TRANSCRIPTS["hello.wav"][0]
    assert r.metrics.reconnects == 1


async def test_a_drop_during_stop_resumes_and_stops_again(gw: Gateway) -> None:
    expected = await baseline(gw)
    gw.queue_faults(Faults(drop_at="stop"))
    run = await transcribe(gw, pace=None, enable_words=True, reconnect=FAST)
    assert_same_stream(run, expected)
    assert run.reconnects == 1


@pytest.mark.parametrize(
    ("fault", "error"),
    [
        (Faults(drop_at="audio", drop_after_bytes=MID_SECOND), GatewayConnectionError),
        (
            Faults(fail_status=52010001, fail_at="audio", fail_after_bytes=MID_SECOND),
            TaskFailedError,
        ),
    ],
    ids=["dropped", "52010001"],
)
async def test_without_reconnect_the_first_failure_is_raised(
    gw: Gateway, fault: Faults, error: type[Exception]
) -> None:
    gw.queue_faults(fault)
    with pytest.raises(error):
        await transcribe(gw, pace=None, reconnect=False)


async def test_when_every_attempt_fails_the_original_error_is_raised_in_bounded_time(
    gw: Gateway,
) -> None:
    gw.queue_faults(Faults(drop_at="audio", drop_after_bytes=MID_SECOND))
    gw.faults = Faults(fail_status=50000000, fail_at="start")  # every later connection
    began = time.monotonic()
    with pytest.raises(GatewayConnectionError, match=r"lost during task") as info:
        await transcribe(gw, pace=None, reconnect=Reconnect(attempts=3, backoff=0.01))
    assert "gave up resuming after 3 connection attempt(s)" in str(info.value)
    assert "50000000" in str(info.value)
    assert time.monotonic() - began < 30  # 3 attempts, each bounded by its timeouts


async def test_a_non_transient_failure_is_not_resumed(gw: Gateway) -> None:
    """A failure caused by what the client sent (here: audio that stopped arriving) would
    meet a new task too: it ends the session as before."""
    gw.queue_faults(Faults(fail_status=41040201, fail_at="audio", fail_after_bytes=MID_SECOND))
    with pytest.raises(TaskFailedError) as info:
        await transcribe(gw, pace=None)
    assert info.value.status == 41040201


async def test_past_the_replay_bound_resume_is_impossible_and_the_error_says_so(
    gw: Gateway,
) -> None:
    gw.queue_faults(Faults(drop_at="audio", drop_after_bytes=MID_SECOND))
    tiny = Reconnect(backoff=0.01, replay_seconds=0.1)
    with pytest.raises(
        GatewayConnectionError,
        match=r"cannot resume: the gateway had not finished the .* s of audio",
    ):
        await transcribe(gw, pace=4.0, reconnect=tiny)


# --------------------------------------------------------------------------- the parts


def test_replay_buffer_keeps_from_the_last_sentence_end_within_its_bound() -> None:
    buf = ReplayBuffer(limit=100)
    for _ in range(5):
        buf.add(b"a" * 30)  # 150 bytes: whole old chunks go while 100 bytes stay kept
    assert buf.replay_start() == 30
    assert buf.replay(150, open_since=None) == b"a" * 120
    # A sentence open since before what is kept: its start is gone.
    assert buf.replay(150, open_since=20) is None
    buf.trim(120)
    assert buf.replay_start() == 120 and buf.replay(140, open_since=130) == b"a" * 20


def test_timeline_rebases_and_drops_repeats() -> None:
    line = Timeline(16000)

    def end(index: int, begin: int, end: int) -> SentenceEnd:
        return SentenceEnd(
            name="SentenceEnd", namespace="SpeechTranscriber", task_id="t", index=index,
            time=end, begin_time=begin, text="x",
        )  # fmt: skip

    assert line.rebase(end(1, 100, 900)) == end(1, 100, 900)
    line.resume_at(900 * 32)  # the new task starts at 900 ms of the stream
    begin = SentenceBegin(name="SentenceBegin", namespace="SpeechTranscriber", task_id="u",
                          index=1, time=50)  # fmt: skip
    rebased = line.rebase(begin)
    assert isinstance(rebased, SentenceBegin) and (rebased.index, rebased.time) == (2, 950)
    assert line.rebase(begin) is None  # a repeat
    second = line.rebase(end(1, 50, 700))
    assert isinstance(second, SentenceEnd)
    assert (second.index, second.begin_time, second.time) == (2, 950, 1600)


def test_reconnect_policy_is_validated() -> None:
    with pytest.raises(ValueError, match="attempts"):
        Reconnect(attempts=0)
    with pytest.raises(ValueError, match="replay_seconds"):
        Reconnect(replay_seconds=0)
    with pytest.raises(TypeError, match="reconnect must be"):
        Transcriber(APPKEY, TOKEN, reconnect="yes")  # type: ignore[arg-type]
    delays = [Reconnect(backoff=1, max_backoff=4).delay(n) for n in (1, 2, 3, 9)]
    assert 0.5 <= delays[0] <= 1 and 1 <= delays[1] <= 2 and 2 <= delays[2] <= 4
    assert 2 <= delays[3] <= 4


async def test_a_task_failing_every_time_raises_its_own_error_not_a_stop_timeout(
    gw: Gateway,
) -> None:
    # Every task fails with the retryable 52010001 1.5 s into its audio, before a sentence
    # can finish: resuming never gets anywhere. stop()'s own deadline comes first; what
    # the user learns is the service's failure, with the timeout as its context.
    gw.faults = Faults(fail_status=52010001, fail_at="audio", fail_after_bytes=2 * 16000 * 3 // 2)
    t = Transcriber(APPKEY, TOKEN, url=gw.url, reconnect=FAST, stop_timeout=10)
    with pytest.raises(TaskFailedError) as caught:
        async with t:
            await t.stream(THREE, pace=None)
            await t.stop(timeout=5)
    error = caught.value
    assert error.status == 52010001 and error.retryable
    assert "without a new final sentence" in str(error)
    assert isinstance(error.__context__, TimeoutError) or "gave up resuming" in str(error)


async def test_resumes_without_progress_are_counted_across_resumes(gw: Gateway) -> None:
    # Each resumed task starts, then fails again: a successful Start is no progress, so
    # the session gives up after Reconnect.attempts resumes in a row, well before any
    # deadline, and says how many it made.
    gw.faults = Faults(fail_status=52010001, fail_at="audio", fail_after_bytes=16000)
    resumed: list[Resumed] = []
    policy = Reconnect(attempts=3, backoff=0.01, max_backoff=0.02)
    t = Transcriber(APPKEY, TOKEN, url=gw.url, reconnect=policy, on_resume=resumed.append)
    with pytest.raises(TaskFailedError) as caught:
        async with t:
            await t.stream(THREE, pace=None)
            await t.stop(timeout=60)
    assert caught.value.status == 52010001
    assert "gave up resuming after 3 connection attempt(s)" in str(caught.value)
    assert len(resumed) <= 3
