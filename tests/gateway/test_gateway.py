"""The local gateway over real loopback WebSockets: both protocols, events as the cloud
sends them, VAD segmentation, recognisers (span, PocketSphinx, user callables)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
from collections.abc import AsyncIterator
from typing import Any

import numpy as np
import pytest
from helpers import (
    APPKEY,
    FIXTURES,
    TOKEN,
    TRANSCRIPTS,
    RawTask,
    client_frame,
    names,
    open_ws,
    payloads,
    raw_upgrade,
    read_pcm,
    read_server_frame,
    silence,
    start,
    wait_until,
    word_errors,
)
from websockets.exceptions import ConnectionClosed

from nlsstream.gateway import Faults, Gateway, SpanRecognizer, Transcript
from nlsstream.gateway.engine import sphinx_available
from nlsstream.realtime import protocol as p

HEX32 = re.compile(r"[0-9a-f]{32}")


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    async with Gateway(tokens=[TOKEN], appkeys=[APPKEY], recognizer="span", idle_timeout=3) as g:
        yield g


def test_word_errors_helper() -> None:
    assert word_errors("a b c", "a b c") == 0
    assert word_errors("a b c", "a x c") == 1
    assert word_errors("a b c", "a c") == 1
    assert word_errors("a b", "a b c d") == 2


# --------------------------------------------------------------------------- transcriber


async def test_transcriber_events_match_the_cloud(gw: Gateway) -> None:
    pcm, rate = read_pcm("three_sentences.wav")
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        started = await task.start(enable_intermediate_result=True, enable_words=True)
        assert started == {
            "header": {
                "namespace": "SpeechTranscriber",
                "name": "TranscriptionStarted",
                "status": 20000000,
                "message_id": started["header"]["message_id"],
                "task_id": task.task_id,
                "status_text": "Gateway:SUCCESS:Success.",
            }
        }
        await task.audio(pcm)
        await task.stop()
        events = await task.until_end()
    for event in [started, *events]:
        header = event["header"]
        assert HEX32.fullmatch(header["message_id"])
        assert header["task_id"] == task.task_id
        assert header["status"] == 20000000
        assert header["status_text"] == "Gateway:SUCCESS:Success."
        assert header["namespace"] == "SpeechTranscriber"
    assert len({e["header"]["message_id"] for e in events}) == len(events)
    assert names(events)[-1] == "TranscriptionCompleted" and "payload" not in events[-1]
    begins = payloads(events, "SentenceBegin")
    ends = payloads(events, "SentenceEnd")
    assert [b["index"] for b in begins] == [1, 2, 3]
    assert [e["index"] for e in ends] == [1, 2, 3]
    # Every sentence is Begin, then partials of that index, then End.
    order = [(e["header"]["name"], e["payload"]["index"]) for e in events if "payload" in e]
    for i in (1, 2, 3):
        mine = [n for n, idx in order if idx == i]
        assert mine[0] == "SentenceBegin" and mine[-1] == "SentenceEnd"
        assert set(mine[1:-1]) == {"TranscriptionResultChanged"}
    # Sentences sit where the fixture has speech: 0.3 s lead-in, 1.2 s pauses.
    for b, e in zip(begins, ends, strict=True):
        assert e["begin_time"] == b["time"] < e["time"]
        assert e["result"] == f"speech {e['begin_time'] / 1000:.2f}-{e['time'] / 1000:.2f}"
        assert 0 <= e["confidence"] <= 1
        assert e["words"] == [
            {"text": "speech", "startTime": e["begin_time"], "endTime": e["time"]}
        ]
    assert 300 <= begins[0]["time"] < 700
    assert all(ends[i]["time"] + 1000 < begins[i + 1]["time"] for i in range(2))
    assert ends[2]["time"] <= len(pcm) * 1000 // (2 * rate)
    for partial in payloads(events, "TranscriptionResultChanged"):
        assert set(partial) >= {"index", "time", "result", "confidence", "words", "status"}
    record = gw.sessions[-1]
    assert record.task_id == task.task_id and record.namespace == "SpeechTranscriber"
    assert record.status == 20000000 and record.outcome == "completed"
    assert record.audio_bytes == len(pcm)
    assert record.sentences == [e["result"] for e in ends]
    assert record.params["enable_words"] is True


async def test_no_intermediate_results_unless_asked(gw: Gateway) -> None:
    pcm, _ = read_pcm("weather.wav")
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start()
        await task.audio(pcm)
        await task.stop()
        events = await task.until_end()
    assert names(events) == ["SentenceBegin", "SentenceEnd", "TranscriptionCompleted"]
    assert payloads(events, "SentenceEnd")[0]["words"] == []  # enable_words not set


async def test_stop_flushes_the_open_sentence(gw: Gateway) -> None:
    pcm, _ = read_pcm("three_sentences.wav")
    head = pcm[: 32000 * 15 // 10]  # cut in the middle of the first sentence
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start()
        await task.audio(head)
        await task.stop()
        events = await task.until_end()
    assert names(events) == ["SentenceBegin", "SentenceEnd", "TranscriptionCompleted"]


async def test_silence_only_gives_no_sentence(gw: Gateway) -> None:
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start()
        await task.audio(silence(2000))
        await task.stop()
        assert names(await task.until_end()) == ["TranscriptionCompleted"]


async def test_max_sentence_silence_and_control_transcriber(gw: Gateway) -> None:
    pcm, _ = read_pcm("three_sentences.wav")
    # 2000 ms silence bridges the 1.2 s pauses: one sentence.
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start(max_sentence_silence=2000)
        await task.audio(pcm)
        await task.stop()
        assert len(payloads(await task.until_end(), "SentenceEnd")) == 1
    # Changed mid-stream, after the first sentence ended: the last two merge.
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start()
        cut = 32000 * 32 // 10  # 3.2 s: inside the first pause, after 800 ms of it
        await task.audio(pcm[:cut])
        await task.directive("ControlTranscriber", {"max_sentence_silence": 2000})
        await task.audio(pcm[cut:])
        await task.stop()
        ends = payloads(await task.until_end(), "SentenceEnd")
    assert [e["index"] for e in ends] == [1, 2]
    assert ends[1]["time"] - ends[1]["begin_time"] > 3000


async def test_transcriber_at_8000_hz(gw: Gateway) -> None:
    pcm, rate = read_pcm("alarm_8k.wav")
    assert rate == 8000
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start(sample_rate=8000)
        await task.audio(pcm + silence(1000, 8000), chunk=1600)
        await task.stop()
        ends = payloads(await task.until_end(), "SentenceEnd")
    assert len(ends) == 1
    # The speech spans most of the 2.45 s file, in 8 kHz time.
    assert 1500 < ends[0]["time"] - ends[0]["begin_time"] < 2450


async def test_wav_format_header_is_parsed_and_skipped(gw: Gateway) -> None:
    data = (FIXTURES / "weather.wav").read_bytes()
    pcm, _ = read_pcm("weather.wav")
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start(format="wav")
        await task.audio(data[:10])  # a header split over frames is fine
        await task.audio(data[10:])
        await task.stop()
        events = await task.until_end()
    assert names(events)[-1] == "TranscriptionCompleted"
    assert len(payloads(events, "SentenceEnd")) == 1
    assert gw.sessions[-1].audio_bytes == len(data) > len(pcm)


async def test_several_tasks_one_after_another_on_one_connection(gw: Gateway) -> None:
    pcm, _ = read_pcm("hello.wav")
    async with open_ws(gw) as ws:
        for _ in range(2):
            task = RawTask(ws)
            await task.start()
            await task.audio(pcm)
            await task.stop()
            assert names(await task.until_end())[-1] == "TranscriptionCompleted"
    assert [r.outcome for r in gw.sessions[-2:]] == ["completed", "completed"]
    assert gw.sessions[-1].task_id != gw.sessions[-2].task_id


async def test_client_leaving_early_is_recorded_as_disconnect(gw: Gateway) -> None:
    pcm, _ = read_pcm("hello.wav")
    async with open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start()
        await task.audio(pcm)
    await wait_until(lambda: gw.sessions[-1].outcome != "open")
    assert gw.sessions[-1].status == 40010004
    assert gw.sessions[-1].outcome == "disconnected"


# --------------------------------------------------------------------------- recognizer


async def test_recognizer_events(gw: Gateway) -> None:
    pcm, rate = read_pcm("weather.wav")
    async with open_ws(gw) as ws:
        task = RawTask(ws, "SpeechRecognizer")
        started = await task.start(enable_intermediate_result=True)
        assert started["header"]["name"] == "RecognitionStarted"
        assert started["header"]["namespace"] == "SpeechRecognizer"
        assert "payload" not in started
        await task.audio(pcm)
        await task.stop()
        events = await task.until_end()
    partials = payloads(events, "RecognitionResultChanged")
    assert partials and all(set(x) == {"result", "duration"} for x in partials)
    durations = [x["duration"] for x in partials]
    assert durations == sorted(durations) and durations[0] > 0
    assert names(events)[-1] == "RecognitionCompleted"
    final = events[-1]["payload"]
    assert final["duration"] == len(pcm) * 1000 // (2 * rate)
    assert final["result"].startswith("speech ")
    assert gw.sessions[-1].sentences == [final["result"]]


async def test_recognizer_without_intermediate_results(gw: Gateway) -> None:
    pcm, _ = read_pcm("hello.wav")
    async with open_ws(gw) as ws:
        task = RawTask(ws, "SpeechRecognizer")
        await task.start()
        await task.audio(pcm)
        await task.stop()
        assert names(await task.until_end()) == ["RecognitionCompleted"]


async def test_recognizer_max_end_silence_completes_on_its_own(gw: Gateway) -> None:
    pcm, _ = read_pcm("weather.wav")
    async with open_ws(gw) as ws:
        task = RawTask(ws, "SpeechRecognizer")
        await task.start(enable_voice_detection=True, max_end_silence=400)
        await task.audio(pcm + silence(1000))
        events = await task.until_end()  # no Stop sent
        assert names(events) == ["RecognitionCompleted"]
        assert events[0]["payload"]["result"].startswith("speech ")
        # Later audio and a late Stop are ignored, as by the cloud.
        await task.audio(silence(200))
        await task.stop()
        with pytest.raises(asyncio.TimeoutError):
            await task.recv(timeout=0.3)
    assert gw.sessions[-1].status == 20000000


async def test_recognizer_max_start_silence_fails(gw: Gateway) -> None:
    async with open_ws(gw) as ws:
        task = RawTask(ws, "SpeechRecognizer")
        await task.start(enable_voice_detection=True, max_start_silence=500)
        await task.audio(silence(1000))
        events = await task.until_end()
    header = events[-1]["header"]
    assert header["name"] == "TaskFailed" and header["namespace"] == "Default"
    assert header["status"] == 41010105
    assert "SILENT_SPEECH" in header["status_text"] and "500 ms" in header["status_text"]


async def test_recognizer_over_60_seconds_fails(gw: Gateway) -> None:
    async with open_ws(gw) as ws:
        task = RawTask(ws, "SpeechRecognizer")
        await task.start(sample_rate=8000)
        # The gateway closes after TaskFailed, possibly while audio is still being sent.
        with contextlib.suppress(ConnectionClosed):
            await task.audio(silence(61_000, 8000), chunk=16000)
        events = await task.until_end()
    assert events[-1]["header"]["status"] == 41010104
    assert "TOO_LONG_SPEECH" in events[-1]["header"]["status_text"]


# --------------------------------------------------------------------------- recognisers


async def test_user_callable_recognizer() -> None:
    seen: list[tuple[int, int]] = []

    def recognise(pcm: bytes, rate: int) -> str:
        seen.append((len(pcm), rate))
        return f"{len(pcm)} bytes"

    pcm, _ = read_pcm("three_sentences.wav")
    async with Gateway(recognizer=recognise) as gw, open_ws(gw, token="anything") as ws:
        task = RawTask(ws, appkey="any-appkey")
        await task.start()
        await task.audio(pcm)
        await task.stop()
        ends = payloads(await task.until_end(), "SentenceEnd")
    assert [e["result"] for e in ends] == [f"{n} bytes" for n, _ in seen]
    assert len(seen) == 3 and all(rate == 16000 and n > 16000 for n, rate in seen)


async def test_recognizer_object_with_words() -> None:
    class Fixed:
        name = "fixed"

        def open(self, sample_rate: int, offset_ms: int) -> Any:
            return _FixedSegment()

    class _FixedSegment:
        def feed(self, pcm: bytes) -> str:
            return "partial"

        def finish(self) -> Transcript:
            return Transcript("hi there", (p.Word("hi", 10, 50), p.Word("there", 60, 90)), 0.5)

        def close(self) -> None:
            pass

    pcm, _ = read_pcm("hello.wav")
    async with Gateway(recognizer=Fixed()) as gw, open_ws(gw) as ws:
        task = RawTask(ws)
        await task.start(enable_words=True, enable_intermediate_result=True)
        await task.audio(pcm)
        await task.stop()
        events = await task.until_end()
    end = payloads(events, "SentenceEnd")[0]
    assert end["result"] == "hi there" and end["confidence"] == 0.5
    # Word times are shifted from segment time to task time (the segment starts a
    # little before SentenceBegin: the recogniser also gets some lead-in audio).
    start = end["words"][0]["startTime"] - 10
    assert 0 <= start <= end["begin_time"]
    assert end["words"] == [
        {"text": "hi", "startTime": start + 10, "endTime": start + 50},
        {"text": "there", "startTime": start + 60, "endTime": start + 90},
    ]
    assert {x["result"] for x in payloads(events, "TranscriptionResultChanged")} == {"partial"}


def test_recognizer_choice() -> None:
    assert isinstance(Gateway(recognizer="span").recognizer, SpanRecognizer)
    with pytest.raises(ValueError, match="unknown recognizer"):
        Gateway(recognizer="whisper")
    with pytest.raises(TypeError):
        Gateway(recognizer=42)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- PocketSphinx

sphinx = pytest.mark.skipif(not sphinx_available(), reason="pocketsphinx not installed")


@pytest.fixture
async def sphinx_gw() -> AsyncIterator[Gateway]:
    async with Gateway(recognizer="sphinx") as g:
        yield g


async def transcribe(
    gateway: Gateway, name: str, namespace: str = "SpeechTranscriber", **params: Any
) -> list[dict[str, Any]]:
    pcm, rate = read_pcm(name)
    async with open_ws(gateway) as ws:
        task = RawTask(ws, namespace)
        await task.start(sample_rate=rate, **params)
        await task.audio(pcm + silence(300, rate), chunk=rate // 5)
        await task.stop()
        return await task.until_end()


@sphinx
@pytest.mark.parametrize("name", ["hello.wav", "weather.wav", "three_sentences.wav"])
async def test_sphinx_transcribes_the_fixtures(sphinx_gw: Gateway, name: str) -> None:
    events = await transcribe(sphinx_gw, name, enable_words=True, enable_intermediate_result=True)
    ends = payloads(events, "SentenceEnd")
    expected = TRANSCRIPTS[name]
    assert len(ends) == len(expected)
    ref, hyp = " ".join(expected), " ".join(e["result"] for e in ends)
    assert word_errors(ref, hyp) / len(ref.split()) <= 0.10, hyp
    for end in ends:
        words = end["words"]
        assert [w["text"] for w in words] == end["result"].split()
        times = [t for w in words for t in (w["startTime"], w["endTime"])]
        assert times == sorted(times)
        assert end["begin_time"] - 300 <= times[0] and times[-1] <= end["time"] + 300
        assert 0 < end["confidence"] <= 1
    # Partials are real streaming hypotheses: they grow towards the final text.
    partials = [x["result"] for x in payloads(events, "TranscriptionResultChanged")]
    assert len(set(partials)) > 2


@sphinx
@pytest.mark.parametrize("name", ["hello.wav", "weather.wav"])
async def test_sphinx_recognizer(sphinx_gw: Gateway, name: str) -> None:
    events = await transcribe(sphinx_gw, name, "SpeechRecognizer")
    result = events[-1]["payload"]["result"]
    ref = TRANSCRIPTS[name][0]
    assert word_errors(ref, result) / len(ref.split()) <= 0.10, result


@sphinx
async def test_sphinx_at_8000_hz(sphinx_gw: Gateway) -> None:
    # 8 kHz audio is upsampled for the wide-band model; lacking the upper band it is
    # recognised poorly (see SphinxRecognizer): this checks that it is recognised at
    # all. (The bound used to be 0.4, met only when earlier tests had adapted the
    # pooled decoder to speech; alone, this test failed.)
    ref = TRANSCRIPTS["alarm_8k.wav"][0]
    events = await transcribe(sphinx_gw, "alarm_8k.wav", "SpeechRecognizer")
    result = events[-1]["payload"]["result"]
    assert "alarm" in result.split(), result
    assert word_errors(ref, result) / len(ref.split()) <= 0.8, result


# --------------------------------------------------------------------------- runners


async def test_pytest_plugin_fixture_from_an_async_test(nls_gateway: Gateway) -> None:
    from nlsstream.testing import TEST_APPKEY, TEST_TOKEN

    assert (nls_gateway.token, nls_gateway.appkey) == (TEST_TOKEN, TEST_APPKEY)
    assert nls_gateway.url.startswith("ws://127.0.0.1:") and nls_gateway.url.endswith("/ws/v1")
    nls_gateway.queue_faults(Faults(fail_status=40000005))
    async with open_ws(nls_gateway, token=nls_gateway.token) as ws:
        task = RawTask(ws, appkey=nls_gateway.appkey)
        assert (await task.start())["header"]["status"] == 40000005
    async with open_ws(nls_gateway, token=nls_gateway.token) as ws:
        task = RawTask(ws, appkey=nls_gateway.appkey)
        assert (await task.start())["header"]["status"] == 20000000
    assert [s.status for s in nls_gateway.sessions][:1] == [40000005]


@pytest.mark.nls_gateway(recognizer="span", tokens=None, appkeys=None)
def test_pytest_plugin_marker_options(nls_gateway: Gateway) -> None:
    assert nls_gateway.tokens is None and nls_gateway.appkeys is None
    assert isinstance(nls_gateway.recognizer, SpanRecognizer)


def test_run_in_thread_from_sync_code() -> None:
    gateway = Gateway(recognizer="span")
    with gateway.run_in_thread() as gw:
        assert gw is gateway and gw.running and gw.port != 0

        async def one() -> str:
            async with open_ws(gw) as ws:
                return str((await RawTask(ws).start())["header"]["name"])

        assert asyncio.run(one()) == "TranscriptionStarted"
    assert not gateway.running


async def test_session_records_are_bounded_and_refused_starts_keep_no_payload() -> None:
    """A long-running gateway keeps the newest ``max_records`` records; a Start refused
    for a wrong appkey keeps nothing of its (here 900 KB) payload."""
    big = "x" * 900_000
    gw = Gateway(appkeys=["right"], recognizer="span", max_records=5, max_size=2 << 20)
    async with gw:
        for _ in range(12):
            async with open_ws(gw, token=gw.token) as ws:
                task = RawTask(ws, appkey="wrong")
                event = await task.start(vocabulary=big)
                assert event["header"]["status"] == 40020105
        assert len(gw.sessions) == 5
        assert all(r.status == 40020105 and not r.params for r in gw.sessions)


class _CountingEngine:
    """A speech engine that counts the decoders it opened and holds none of its own."""

    name = "counting"

    def __init__(self) -> None:
        self.opened = 0

    def open(self, sample_rate: int, offset_ms: int) -> Any:
        self.opened += 1
        return self

    def feed(self, pcm: bytes) -> str:
        return "hi"

    def finish(self) -> Transcript:
        return Transcript("hi")

    def close(self) -> None:
        pass


async def test_the_decoder_pool_is_bounded_and_others_keep_being_served() -> None:
    """With one decoder slot, a second recognizer task that needs one waits
    ``decoder_wait`` and fails with the retryable 52010001; the first completes."""
    engine = _CountingEngine()
    loud = np.random.default_rng(2).integers(-20000, 20000, 16000, dtype=np.int16).tobytes()
    gw = Gateway(recognizer=engine, max_decoders=1, decoder_wait=0.3)
    async with gw, open_ws(gw) as ws_a, open_ws(gw) as ws_b:
        a = RawTask(ws_a, "SpeechRecognizer")
        b = RawTask(ws_b, "SpeechRecognizer")
        assert (await a.start(enable_intermediate_result=True))["header"]["status"] == 20000000
        await a.audio(loud)  # speech: A's sentence holds the only decoder
        await a.recv()  # a RecognitionResultChanged: A is decoding
        assert (await b.start())["header"]["status"] == 20000000
        await b.audio(loud)
        failed = await b.until_end()
        assert failed[-1]["header"]["name"] == "TaskFailed"
        assert failed[-1]["header"]["status"] == 52010001
        assert "at most 1 sentences" in failed[-1]["header"]["status_text"]
        await a.stop()
        done = await a.until_end()
        assert done[-1]["header"]["name"] == "RecognitionCompleted"
        assert done[-1]["payload"]["result"] == "hi"
    assert engine.opened == 1


async def test_a_client_gone_while_waiting_for_a_decoder_gets_none() -> None:
    """A task whose client leaves while it waits for a decoder slot never creates one."""
    engine = _CountingEngine()
    loud = np.random.default_rng(3).integers(-20000, 20000, 16000, dtype=np.int16).tobytes()
    gw = Gateway(recognizer=engine, max_decoders=1, decoder_wait=30)
    async with gw, open_ws(gw) as ws_a:
        a = RawTask(ws_a, "SpeechRecognizer")
        await a.start(enable_intermediate_result=True)
        await a.audio(loud)
        await a.recv()  # A holds the only decoder
        # C on a raw socket: a client library has no documented way to vanish abruptly.
        reader, writer = await raw_upgrade(gw.host, gw.port, f"X-NLS-Token: {TOKEN}\r\n")
        writer.write(client_frame(0x1, start(p.new_id(), ns="SpeechRecognizer").encode()))
        _, started = await read_server_frame(reader)
        assert json.loads(started)["header"]["name"] == "RecognitionStarted"
        for i in range(0, len(loud), 3200):
            writer.write(client_frame(0x2, loud[i : i + 3200]))
        await writer.drain()  # C's segment now waits for the slot ...
        writer.transport.abort()  # ... and C goes
        await a.stop()
        assert (await a.until_end())[-1]["header"]["name"] == "RecognitionCompleted"
        await wait_until(lambda: len(gw._connections) == 1, 30)
    assert engine.opened == 1
