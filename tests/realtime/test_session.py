"""Client sessions against the local gateway over loopback: full flows, callbacks,
iterators, state rules and pacing modes."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from helpers import wait_until

import nlsstream
from nlsstream import (
    AudioFormatError,
    CallbackError,
    Completed,
    EventOverflowError,
    InvalidStateError,
    NlsError,
    Recognizer,
    ResultChanged,
    SentenceBegin,
    SentenceEnd,
    Started,
    Transcriber,
)
from nlsstream.gateway import Gateway
from nlsstream.realtime.protocol import State, new_id

FIXTURES = Path(__file__).parents[1] / "fixtures"
TRANSCRIPTS: dict[str, list[str]] = json.loads((FIXTURES / "transcripts.json").read_text())
THREE = str(FIXTURES / "three_sentences.wav")
HELLO = str(FIXTURES / "hello.wav")


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    async with Gateway(tokens=["tok"], appkeys=["app"], recognizer="span") as g:
        yield g


@pytest.fixture(scope="module")
def sphinx_available() -> None:
    pytest.importorskip("pocketsphinx")


async def settle(gw: Gateway, before: set[asyncio.Task[Any]]) -> None:
    """Wait until no task started since ``before`` is left and the gateway holds no
    connection; fail if that does not happen within 3 s."""
    current = asyncio.current_task()
    for _ in range(300):
        left = {t for t in asyncio.all_tasks() - before if t is not current and not t.done()}
        if not left and not gw._connections:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"left behind: tasks {left}, connections {len(gw._connections)}")


def session_kwargs(gw: Gateway, **kw: Any) -> dict[str, Any]:
    return {"url": gw.url, "stop_timeout": 5.0, **kw}


# --------------------------------------------------------------------------- full flows


async def test_transcriber_recognises_three_sentences_with_pocketsphinx(
    sphinx_available: None,
) -> None:
    ended: list[SentenceEnd] = []
    async with (
        Gateway(tokens=["tok"], appkeys=["app"], recognizer="sphinx") as gw,
        Transcriber(
            "app",
            "tok",
            url=gw.url,
            enable_intermediate_result=True,
            on_sentence_end=ended.append,
        ) as t,
    ):
        sentences = t.sentences()

        async def feed() -> nlsstream.Result:
            await t.stream(THREE, pace=None)
            return await t.stop()

        feeder = asyncio.create_task(feed())
        got = [s async for s in sentences]
        result = await feeder
    expected = TRANSCRIPTS["three_sentences.wav"]
    assert [s.text for s in got] == expected
    assert [s.index for s in got] == [1, 2, 3]
    assert all(s.begin_time < s.time for s in got)
    assert got[0].time <= got[1].begin_time and got[1].time <= got[2].begin_time
    assert ended == got
    assert result.sentences == tuple(got)
    assert result.text == " ".join(expected)
    assert result.task_id == t.task_id
    info = soundfile.info(THREE)
    assert result.duration == pytest.approx(info.frames / info.samplerate * 1000, abs=1)
    assert t.state is State.COMPLETED
    record = gw.sessions[-1]
    assert record.outcome == "completed" and record.task_id == t.task_id
    assert record.audio_bytes == t.metrics.bytes_sent


async def test_recognizer_recognises_numpy_audio_with_pocketsphinx(sphinx_available: None) -> None:
    samples, rate = soundfile.read(HELLO, dtype="int16")
    assert rate == 16000
    async with (
        Gateway(tokens=["tok"], appkeys=["app"], recognizer="sphinx") as gw,
        Recognizer("app", "tok", url=gw.url) as r,
    ):
        await r.stream(samples, pace=None)
        result = await r.stop()
    assert result.text == TRANSCRIPTS["hello.wav"][0]
    assert result.sentences == ()
    assert result.duration == pytest.approx(len(samples) / 16, abs=2)
    assert r.metrics.bytes_sent == 2 * len(samples)


async def test_recognizer_at_8khz(sphinx_available: None) -> None:
    async with (
        Gateway(recognizer="sphinx") as gw,
        Recognizer(gw.appkey, gw.token, url=gw.url, sample_rate=8000) as r,
    ):
        await r.stream(str(FIXTURES / "alarm_8k.wav"), pace=None)
        result = await r.stop()
    # 8 kHz audio goes out unresampled: 640-byte frames of 40 ms each.
    info = soundfile.info(str(FIXTURES / "alarm_8k.wav"))
    assert info.samplerate == 8000
    assert r.metrics.bytes_sent == 2 * info.frames == gw.sessions[-1].audio_bytes
    assert r.metrics.audio_ms_sent == pytest.approx(info.duration * 1000)
    assert gw.sessions[-1].params["sample_rate"] == 8000
    assert result.duration == pytest.approx(info.duration * 1000, abs=2)
    assert result.text  # the words themselves depend on the gateway's 8 kHz path


async def test_span_flow_with_send_audio_and_extra_params(gw: Gateway) -> None:
    pcm, _ = soundfile.read(THREE, dtype="int16")
    data = pcm.tobytes()
    task_id = new_id()
    async with Transcriber(
        "app",
        "tok",
        task_id=task_id,
        max_sentence_silence=600,
        enable_words=True,
        vocabulary_id=None,
        **session_kwargs(gw),
    ) as t:
        assert t.task_id == task_id and t.state is State.STARTED
        for i in range(0, len(data), 3200):
            await t.send_audio(data[i : i + 3200])
        await t.ctrl(max_sentence_silence=800)
        result = await t.stop()
    assert len(result.sentences) == 3
    assert all(s.text.startswith("speech ") for s in result.sentences)
    record = gw.sessions[-1]
    assert record.task_id == task_id
    assert record.params["max_sentence_silence"] == 600
    assert record.params["enable_words"] is True
    assert "vocabulary_id" not in record.params
    assert record.audio_bytes == len(data) == t.metrics.bytes_sent
    assert t.metrics.audio_ms_sent == pytest.approx(len(data) / 32)
    assert t.metrics.stop_to_completed_ms is not None
    assert t.metrics.time_to_first_partial_ms is not None


# ----------------------------------------------------------------- callbacks and iterators


async def test_every_callback_sync_and_async_in_order(gw: Gateway) -> None:
    calls: list[tuple[str, object]] = []

    async def on_sentence_end(s: SentenceEnd) -> None:
        await asyncio.sleep(0.01)  # a slow coroutine callback is awaited, in order
        calls.append(("sentence_end", s.index))

    async def on_close() -> None:
        calls.append(("close", None))

    t = Transcriber(
        "app",
        "tok",
        enable_intermediate_result=True,
        on_start=lambda e: calls.append(("start", type(e))),
        on_sentence_begin=lambda e: calls.append(("sentence_begin", e.index)),
        on_result_changed=lambda e: calls.append(("result_changed", e.index)),
        on_sentence_end=on_sentence_end,
        on_completed=lambda e: calls.append(("completed", type(e))),
        on_error=lambda e: calls.append(("error", e)),
        on_close=on_close,
        **session_kwargs(gw),
    )
    async with t:
        await t.stream(THREE, pace=None)
        await t.stop()
    names = [c[0] for c in calls]
    assert calls[0] == ("start", Started)
    assert calls[-2:] == [("completed", Completed), ("close", None)]
    assert "error" not in names
    assert [c[1] for c in calls if c[0] == "sentence_end"] == [1, 2, 3]
    assert [c[1] for c in calls if c[0] == "sentence_begin"] == [1, 2, 3]
    assert "result_changed" in names
    # Sentence n's partials come after its begin and before its end.
    for n in (1, 2, 3):
        i_begin = calls.index(("sentence_begin", n))
        i_end = calls.index(("sentence_end", n))
        partials = [i for i, c in enumerate(calls) if c == ("result_changed", n)]
        assert partials and all(i_begin < i < i_end for i in partials)


async def test_iterators_and_callbacks_together(gw: Gateway) -> None:
    from_callback: list[SentenceEnd] = []
    async with Transcriber(
        "app",
        "tok",
        enable_intermediate_result=True,
        on_sentence_end=from_callback.append,
        **session_kwargs(gw),
    ) as t:
        # Created before any audio, consumed concurrently afterwards: none may miss
        # an event, whatever the scheduling.
        every1, every2 = t.events(), t.events()
        sentences1, sentences2 = t.sentences(), t.sentences()
        partials = t.results()

        async def drain(it: AsyncIterator[Any]) -> list[Any]:
            return [e async for e in it]

        consumers = [
            asyncio.create_task(drain(it)) for it in (every1, every2, sentences1, sentences2)
        ]
        await t.stream(THREE, pace=None)
        result = await t.stop()
        all1, all2, s1, s2 = await asyncio.gather(*consumers)
        got_partials = await drain(partials)
    assert all1 == all2
    assert s1 == s2 == from_callback == list(result.sentences)
    assert len(s1) == 3
    assert isinstance(all1[-1], Completed)
    assert [e for e in all1 if isinstance(e, SentenceEnd)] == s1
    assert got_partials == [e for e in all1 if isinstance(e, ResultChanged)]
    assert got_partials and all(isinstance(e, ResultChanged) for e in got_partials)
    kinds = {type(e) for e in all1}
    assert {SentenceBegin, SentenceEnd, ResultChanged, Completed} <= kinds
    assert Started not in kinds  # it came before events() was called


async def test_iterator_created_after_the_end_ends_at_once(gw: Gateway) -> None:
    async with Recognizer("app", "tok", **session_kwargs(gw)) as r:
        await r.stream(HELLO, pace=None)
        await r.stop()
        assert [e async for e in r.events()] == []
    assert [e async for e in r.results()] == []


async def test_lagging_iterator_raises_overflow_not_silent_loss(gw: Gateway) -> None:
    async with Transcriber(
        "app", "tok", enable_intermediate_result=True, event_queue_size=3, **session_kwargs(gw)
    ) as t:
        lagging = t.events()
        keeping_up = t.sentences()
        reader = asyncio.create_task(_collect(keeping_up))
        await t.stream(THREE, pace=None)
        result = await t.stop()
    got: list[Any] = []
    with pytest.raises(EventOverflowError, match="more than 3 events") as info:
        async for e in lagging:
            got.append(e)
    assert len(got) == 3 and info.value.maxsize == 3
    assert isinstance(info.value, NlsError)
    # The session and the other iterator were not affected.
    assert await reader == list(result.sentences)
    assert len(result.sentences) == 3


async def _collect(it: AsyncIterator[Any]) -> list[Any]:
    return [e async for e in it]


async def test_iterator_aclose_unsubscribes(gw: Gateway) -> None:
    async with Transcriber("app", "tok", **session_kwargs(gw)) as t:
        it = t.events()
        await it.aclose()
        await t.stream(THREE, pace=None)
        await t.stop()
        assert [e async for e in it] == []


async def test_callback_exception_goes_to_on_error_and_session_survives(gw: Gateway) -> None:
    errors: list[NlsError] = []

    def broken(s: SentenceEnd) -> None:
        raise KeyError(f"bug in sentence {s.index}")

    async with Transcriber(
        "app", "tok", on_sentence_end=broken, on_error=errors.append, **session_kwargs(gw)
    ) as t:
        await t.stream(THREE, pace=None)
        result = await t.stop()
    assert len(result.sentences) == 3
    assert len(errors) == 3
    assert all(isinstance(e, CallbackError) for e in errors)
    assert isinstance(errors[0].__cause__, KeyError)
    assert "broken" in str(errors[0]) and "bug in sentence 1" in str(errors[0])


async def test_exception_in_on_error_is_logged(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    def bad_on_error(e: NlsError) -> None:
        raise RuntimeError("on_error is broken too")

    def broken(e: Completed) -> None:
        raise ValueError("x")

    with caplog.at_level(logging.ERROR, logger="nlsstream"):
        async with Recognizer(
            "app", "tok", on_completed=broken, on_error=bad_on_error, **session_kwargs(gw)
        ) as r:
            await r.stream(HELLO, pace=None)
            result = await r.stop()
    assert result.text
    assert any("on_error callback raised" in rec.message for rec in caplog.records)


async def test_callback_exception_without_on_error_is_logged(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(e: Started) -> None:
        raise ValueError("bad start handler")

    with caplog.at_level(logging.ERROR, logger="nlsstream"):
        async with Recognizer("app", "tok", on_start=broken, **session_kwargs(gw)) as r:
            await r.stream(HELLO, pace=None)
            await r.stop()
    assert any("bad start handler" in rec.getMessage() for rec in caplog.records)


# --------------------------------------------------------------------------- state rules


async def test_stop_twice_returns_the_same_result(gw: Gateway) -> None:
    async with Recognizer("app", "tok", **session_kwargs(gw)) as r:
        await r.stream(HELLO, pace=None)
        first = await r.stop()
        assert await r.stop() is first
    assert len([e for e in gw.sessions[-1].events if e == "RecognitionCompleted"]) == 1


async def test_concurrent_stops_send_stop_once(gw: Gateway) -> None:
    async with Recognizer("app", "tok", **session_kwargs(gw)) as r:
        await r.stream(HELLO, pace=None)
        a, b = await asyncio.gather(r.stop(), r.stop())
    assert a is b
    assert gw.sessions[-1].status == 20000000


async def test_audio_and_stop_outside_the_task_raise_invalid_state(gw: Gateway) -> None:
    r = Recognizer("app", "tok", **session_kwargs(gw))
    with pytest.raises(InvalidStateError, match="idle"):
        await r.send_audio(b"\x00\x00")
    with pytest.raises(InvalidStateError):
        await r.stream(b"\x00\x00")
    with pytest.raises(InvalidStateError, match="before the session was started"):
        await r.stop()
    async with r:
        await r.send_audio(b"\x00\x00" * 160)
        await r.stop()
        with pytest.raises(InvalidStateError, match="completed"):
            await r.send_audio(b"\x00\x00")
        with pytest.raises(InvalidStateError, match="completed"):
            await r.stream(HELLO)
    with pytest.raises(InvalidStateError, match="only once"):
        await r.start()


async def test_bad_audio_is_refused_before_sending(gw: Gateway) -> None:
    async with Transcriber("app", "tok", **session_kwargs(gw)) as t:
        with pytest.raises(AudioFormatError, match="even number of bytes"):
            await t.send_audio(b"\x00\x01\x02")
        with pytest.raises(AudioFormatError):
            await t.stream(str(FIXTURES / "transcripts.json"))
        with pytest.raises(ValueError, match="pace"):
            await t.stream(HELLO, pace=-1)
        assert t.metrics.bytes_sent == 0
        await t.stop()
    assert gw.sessions[-1].audio_bytes == 0


async def test_stream_concurrently_on_one_session_is_refused(gw: Gateway) -> None:
    more = asyncio.Event()

    async def live() -> AsyncIterator[bytes]:
        yield b"\x01\x00" * 1600
        await more.wait()  # the first stream is running until the test says so
        yield b"\x01\x00" * 1600

    async with Transcriber("app", "tok", **session_kwargs(gw)) as t:
        first = asyncio.create_task(t.stream(live(), pace=None))
        await wait_until(lambda: t.metrics.bytes_sent > 0)
        with pytest.raises(InvalidStateError, match="already running"):
            await t.stream(HELLO)
        more.set()
        await first
        await t.stop()
    assert t.metrics.bytes_sent == 2 * 3200  # the refused stream sent nothing


async def test_stop_during_stream_interrupts_it_loudly(gw: Gateway) -> None:
    async with Transcriber("app", "tok", **session_kwargs(gw)) as t:
        streaming = asyncio.create_task(t.stream(THREE, pace=5))
        await wait_until(lambda: t.metrics.bytes_sent > 0)  # under way (it lasts ~2 s)
        result = await t.stop()
        with pytest.raises(InvalidStateError, match="stop\\(\\) was called while stream"):
            await streaming
    assert result.duration == round(t.metrics.audio_ms_sent)
    assert 0 < t.metrics.bytes_sent < soundfile.info(THREE).frames * 2


async def test_constructor_validation_happens_before_connecting() -> None:
    url = "ws://127.0.0.1:9/ws/v1"  # nothing listens: any connect attempt would fail
    with pytest.raises(ValueError, match="8000 or 16000"):
        Transcriber("app", "tok", url=url, sample_rate=44100)
    with pytest.raises(ValueError, match="appkey"):
        Recognizer("", "tok", url=url)
    with pytest.raises(ValueError, match="task_id"):
        Recognizer("app", "tok", url=url, task_id="not-hex")
    with pytest.raises(ValueError, match="start_timeout"):
        Recognizer("app", "tok", url=url, start_timeout=0)
    assert not hasattr(Recognizer("app", "tok", url=url), "ctrl")


async def test_default_url_and_repr_hide_the_token() -> None:
    t = Transcriber("app", "s3cret-token")
    assert t.url == nlsstream.config.DEFAULT_URL
    assert "s3cret" not in repr(t)
    assert t.state is State.IDLE and t.result is None


async def test_token_provider_is_asked_before_connecting(gw: Gateway) -> None:
    class Provider:
        calls = 0

        async def get_token(self) -> str:
            self.calls += 1
            return "tok"

    provider = Provider()
    async with Recognizer("app", provider, **session_kwargs(gw)) as r:
        await r.stream(HELLO, pace=None)
        await r.stop()
    assert provider.calls == 1


async def test_recognizer_server_vad_ends_the_task_and_stop_returns_result(
    gw: Gateway,
) -> None:
    pcm, _ = soundfile.read(HELLO, dtype="int16")
    silence = np.zeros(16000 * 2, dtype=np.int16)
    async with Recognizer(
        "app",
        "tok",
        enable_voice_detection=True,
        max_end_silence=400,
        **session_kwargs(gw),
    ) as r:
        it = r.events()
        waiter = asyncio.create_task(_collect(it))
        with pytest.raises(InvalidStateError, match="ended"):
            # The gateway's VAD completes the task in the trailing silence; the rest of
            # the audio cannot be sent, and stream() says so.
            await r.stream(np.concatenate([pcm, silence, silence]), pace=4)
        events = await waiter
        assert r.state is State.COMPLETED
        result = await r.stop()
    assert isinstance(events[-1], Completed)
    assert result.text == events[-1].text
    assert "StopRecognition" not in str(gw.sessions[-1].events)


# --------------------------------------------------------------------------- pacing modes


async def test_paced_stream_follows_the_schedule_and_unpaced_does_not(gw: Gateway) -> None:
    seconds = soundfile.info(HELLO).duration
    async with Recognizer("app", "tok", **session_kwargs(gw)) as r:
        start = time.monotonic()
        await r.stream(HELLO, pace=4.0)
        elapsed = time.monotonic() - start
        await r.stop()
    frames = r.metrics.frames_sent
    # Frame n is not due before t0 + n * 20 ms / pace, so the stream cannot end earlier.
    assert elapsed >= (frames - 1) * 0.02 / 4.0
    assert r.metrics._paced_frames == frames
    assert r.metrics.audio_ms_sent == pytest.approx(seconds * 1000, abs=1)

    async with Recognizer("app", "tok", **session_kwargs(gw)) as r2:
        await r2.stream(HELLO, pace=None)
        await r2.stop()
    assert r2.metrics._paced_frames == 0  # not scheduled: written as the socket takes it
    assert r2.metrics.bytes_sent == r.metrics.bytes_sent
    assert gw.sessions[-1].audio_bytes == gw.sessions[-2].audio_bytes


async def test_frames_are_640_bytes_and_last_one_kept(gw: Gateway) -> None:
    data = b"\x01\x00" * (320 * 10 + 17)  # 10 full frames and a 34-byte tail
    async with Recognizer("app", "tok", **session_kwargs(gw)) as r:
        await r.stream(data, pace=50)
        await r.stop()
    assert r.metrics.frames_sent == 11
    assert r.metrics.bytes_sent == len(data) == gw.sessions[-1].audio_bytes


async def test_async_iterable_source(gw: Gateway) -> None:
    pcm, _ = soundfile.read(HELLO, dtype="int16")

    async def mic() -> AsyncIterator[bytes]:
        for i in range(0, len(pcm), 1000):
            yield pcm[i : i + 1000].tobytes()
            await asyncio.sleep(0)

    async with Recognizer("app", "tok", **session_kwargs(gw)) as r:
        await r.stream(mic(), pace=20)
        await r.stop()
    assert r.metrics.bytes_sent == 2 * len(pcm)


async def test_clean_exit_leaves_no_task_or_socket(gw: Gateway) -> None:
    before = asyncio.all_tasks()
    async with Transcriber("app", "tok", **session_kwargs(gw)) as t:
        await t.stream(HELLO, pace=None)
    assert t.state is State.COMPLETED  # leaving the block stopped gracefully
    assert t.result is not None
    await settle(gw, before)
    assert gw.sessions[-1].outcome == "completed"


async def test_iterator_sees_events_in_gateway_order_while_a_coroutine_callback_waits(
    gw: Gateway,
) -> None:
    # Events are delivered from the connection's data path when the reader is idle and
    # queued behind it when a coroutine callback is still running; either way every
    # consumer must see the gateway's order.
    seen_by_callbacks: list[tuple[str, int | None]] = []

    async def slow_begin(e: SentenceBegin) -> None:
        await asyncio.sleep(0.02)
        seen_by_callbacks.append(("SentenceBegin", e.index))

    t = Transcriber(
        "app",
        "tok",
        enable_intermediate_result=True,
        on_sentence_begin=slow_begin,
        on_result_changed=lambda e: seen_by_callbacks.append(("ResultChanged", e.index)),
        on_sentence_end=lambda e: seen_by_callbacks.append(("SentenceEnd", e.index)),
        **session_kwargs(gw),
    )
    async with t:
        stream = t.events()
        await t.stream(THREE, pace=None)
        await t.stop()
        seen_by_iterator = [
            (type(e).__name__, getattr(e, "index", None))
            async for e in stream
            if isinstance(e, (SentenceBegin, ResultChanged, SentenceEnd))
        ]
    wanted = {
        "SentenceBegin": "SentenceBegin",
        "TranscriptionResultChanged": "ResultChanged",
        "SentenceEnd": "SentenceEnd",
    }
    sent = [wanted[name] for name in gw.sessions[-1].events if name in wanted]
    assert seen_by_iterator == seen_by_callbacks
    assert [name for name, _ in seen_by_iterator] == sent
    assert [i for name, i in seen_by_iterator if name == "SentenceEnd"] == [1, 2, 3]


@pytest.mark.parametrize(
    ("keep", "expected"), [(True, list(range(1, 51))), (10, list(range(41, 51))), (False, [])]
)
async def test_keep_sentences_bounds_what_the_result_keeps(
    keep: int | bool, expected: list[int]
) -> None:
    """50 sentences (one per 100 ms of audio): the result keeps all, the last 10, or none;
    the iterator still sees every one."""
    pytest.importorskip("picows")  # the light gateway numbers one sentence per 100 ms
    from nlsstream.gateway.light import LightGateway

    async with LightGateway(sentence_ms=100) as gw:
        t = Transcriber("app", "tok", url=gw.url, proxy=None, keep_sentences=keep)
        seen = t.sentences()
        async with t:
            await t.stream(b"\x00\x00" * 16000 * 5, pace=None)
            result = await t.stop()
        assert [s.index async for s in seen] == list(range(1, 51))
    assert [s.index for s in result.sentences] == expected
    assert result.text == " ".join(f"sentence {i}" for i in expected)


@pytest.mark.parametrize("bad", [-1, 1.5, "all"])
def test_keep_sentences_rejects_nonsense(bad: object) -> None:
    with pytest.raises(ValueError, match="keep_sentences"):
        Transcriber("app", "tok", keep_sentences=bad)  # type: ignore[arg-type]
