"""The recording clients (FlashRecognizer, FileTranscriber, RestRecognizer) against the
local gateway's recording services, over loopback, with real speech (PocketSphinx).

Downloads and callbacks go to a small aiohttp server of the test's own (:class:`Files`).
Waits are bounded by :data:`TIMEOUT`; nothing sleeps to synchronise.
"""

from __future__ import annotations

import asyncio
import io
import itertools
import json
import logging
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile as sf
from aiohttp import ClientSession, web
from helpers import AK_ID, AK_SECRET, APPKEY, FIXTURES, TOKEN, TRANSCRIPTS, read_pcm, word_errors

import nlsstream
from nlsstream import (
    AccessKeyTokenProvider,
    AudioFormatError,
    AuthenticationError,
    FileTranscriber,
    FlashRecognizer,
    GatewayConnectionError,
    PopError,
    RestRecognizer,
    TaskFailedError,
    Transcriber,
)
from nlsstream.errors import STATUS_CODES
from nlsstream.gateway import Faults, Gateway
from nlsstream.gateway.engine import sphinx_available

pytestmark = pytest.mark.skipif(not sphinx_available(), reason="needs pocketsphinx")

#: Bound of every wait for recognition (a loaded 2-CPU machine, several seconds of audio).
TIMEOUT = 60.0
TWO = "two_channel.flac"


class Files:
    """A loopback HTTP server: the fixtures under ``/f/``, 404 elsewhere, and a callback
    receiver at ``/callback`` whose bodies land in :attr:`callbacks`."""

    def __init__(self) -> None:
        self.callbacks: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.url = ""
        self.extra: dict[str, bytes] = {}

    async def _file(self, request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        if name in self.extra:
            return web.Response(body=self.extra[name])
        path = FIXTURES / name
        if not path.is_file():
            raise web.HTTPNotFound()
        return web.Response(body=path.read_bytes())

    async def _callback(self, request: web.Request) -> web.Response:
        await self.callbacks.put(await request.json())
        return web.Response(text="ok")

    def app(self) -> web.Application:
        app = web.Application()
        app.add_routes([web.get("/f/{name}", self._file), web.post("/callback", self._callback)])
        return app


@pytest.fixture
async def files() -> AsyncIterator[Files]:
    f = Files()
    runner = web.AppRunner(f.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    f.url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        yield f
    finally:
        await runner.cleanup()


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    async with Gateway(
        tokens=[TOKEN],
        appkeys=[APPKEY],
        access_keys={AK_ID: AK_SECRET},
        max_decoders=4,
        decoder_wait=60.0,
    ) as g:
        yield g


def ft_client(gw: Gateway, secret: str = AK_SECRET, **kwargs: Any) -> FileTranscriber:
    return FileTranscriber(AK_ID, secret, appkey=APPKEY, endpoint=gw.http_url, **kwargs)


def closed_port_url() -> str:
    """A loopback URL nobody listens on: a client that tried to upload would fail there
    with GatewayConnectionError, so AudioFormatError proves nothing was sent."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return f"http://127.0.0.1:{s.getsockname()[1]}"


def assert_says(text: str, expected: str, max_errors: int = 1) -> None:
    assert word_errors(expected, text) <= max_errors, (expected, text)


# --------------------------------------------------------------------------- FlashRecognizer


async def test_flash_two_channels_each_with_its_phrase(gw: Gateway) -> None:
    async with FlashRecognizer(APPKEY, TOKEN, url=gw.http_url) as flash:
        result = await asyncio.wait_for(
            flash.recognize(FIXTURES / TWO, enable_word_level_result=True), TIMEOUT
        )
    assert {s.channel_id for s in result.sentences} == {0, 1}
    for channel, expected in enumerate(TRANSCRIPTS[TWO]):
        (sentence,) = result.channel(channel)
        assert_says(sentence.text, expected)
        assert sentence.words and [w.text for w in sentence.words] == sentence.text.split()
        assert sentence.begin_time <= sentence.words[0].start_time
        assert sentence.words[-1].end_time <= sentence.end_time + 100
    left, right = result.channel(0)[0], result.channel(1)[0]
    assert left.begin_time < right.begin_time  # the right channel's phrase starts later
    assert result.duration == pytest.approx(sf.info(FIXTURES / TWO).duration * 1000, abs=20)
    assert len(result.task_id) == 32 and result.raw["status"] == 20000000


async def test_flash_sources_bytes_array_pcm_and_audio_address(gw: Gateway, files: Files) -> None:
    wav = (FIXTURES / "weather.wav").read_bytes()
    pcm, rate = read_pcm("weather.wav")
    expected = TRANSCRIPTS["weather.wav"][0]
    async with FlashRecognizer(APPKEY, TOKEN, url=gw.http_url) as flash:
        texts = [
            (await flash.recognize(wav)).text,
            (await flash.recognize(np.frombuffer(pcm, "<i2"), sample_rate=rate)).text,
            (await flash.recognize(pcm, sample_rate=rate)).text,  # raw PCM16 mono
            (await flash.recognize(audio_address=f"{files.url}/f/weather.wav")).text,
        ]
    for text in texts:
        assert_says(text, expected)


async def test_flash_audio_address_by_get_as_the_docs_helper_sends_it(
    gw: Gateway, files: Files
) -> None:
    params = {
        "appkey": APPKEY,
        "token": TOKEN,
        "format": "wav",
        "sample_rate": "16000",
        "audio_address": f"{files.url}/f/hello.wav",
    }
    url = gw.http_url + "/stream/v1/FlashRecognizer"
    async with ClientSession() as http, http.get(url, params=params) as r:
        body = await r.json()
    assert body["status"] == 20000000 and body["message"] == "SUCCESS"
    (sentence,) = body["flash_result"]["sentences"]
    assert_says(sentence["text"], TRANSCRIPTS["hello.wav"][0])


async def test_flash_undownloadable_address(gw: Gateway, files: Files) -> None:
    async with FlashRecognizer(APPKEY, TOKEN, url=gw.http_url) as flash:
        with pytest.raises(TaskFailedError) as info:
            await flash.recognize(audio_address=f"{files.url}/f/missing.wav")
    assert info.value.status == 40270006 and not info.value.retryable


async def test_flash_bad_token_and_appkey(gw: Gateway) -> None:
    wav = (FIXTURES / "hello.wav").read_bytes()
    async with FlashRecognizer(APPKEY, "wrong-token-123", url=gw.http_url) as flash:
        with pytest.raises(AuthenticationError) as auth_info:
            await flash.recognize(wav)
    assert auth_info.value.status == 40000001
    assert "wrong-token-123" not in str(auth_info.value)
    async with FlashRecognizer("no-such-appkey", TOKEN, url=gw.http_url) as flash:
        with pytest.raises(TaskFailedError) as info:
            await flash.recognize(wav)
    assert info.value.status == 40020105


async def test_no_speech_gives_no_sentences(gw: Gateway) -> None:
    silent = np.zeros(16000 * 2, dtype=np.int16)
    async with FlashRecognizer(APPKEY, TOKEN, url=gw.http_url) as flash:
        result = await flash.recognize(silent, sample_rate=16000)
    assert result.sentences == () and result.text == "" and result.duration == 2000


async def test_audio_that_cannot_be_sent_fails_before_upload(tmp_path: Path) -> None:
    nowhere = closed_port_url()
    big = tmp_path / "big.wav"
    with big.open("wb") as f:
        f.truncate(101 * 1024 * 1024)  # sparse: > 100 MB without writing it
    notes = tmp_path / "notes.wav"
    notes.write_text("not audio at all\n" * 10)
    long_array = np.zeros(16000 * 61, dtype=np.int16)
    async with FlashRecognizer(APPKEY, TOKEN, url=nowhere) as flash:
        with pytest.raises(AudioFormatError, match="100 MB"):
            await flash.recognize(big)
        with pytest.raises(AudioFormatError, match="could not be decoded"):
            await flash.recognize(notes)
        with pytest.raises(AudioFormatError, match="sample_rate"):
            await flash.recognize(long_array)
    async with RestRecognizer(APPKEY, TOKEN, url=nowhere) as rest:
        with pytest.raises(AudioFormatError, match="at most 60 s"):
            await rest.recognize(long_array, sample_rate=16000)
        with pytest.raises(GatewayConnectionError):  # what a sendable one meets
            await rest.recognize(long_array[:16000], sample_rate=16000)


# --------------------------------------------------------------------------- REST


async def test_rest_recognises_one_sentence(gw: Gateway) -> None:
    async with RestRecognizer(APPKEY, TOKEN, url=gw.http_url) as rest:
        result = await asyncio.wait_for(rest.recognize(FIXTURES / "weather.wav"), TIMEOUT)
        stereo = await rest.recognize(FIXTURES / TWO)  # channels are mixed
        pcm, rate = read_pcm("weather.wav")
        both = np.frombuffer(pcm, "<i2").repeat(2).reshape(-1, 2)  # int16 (samples, 2)
        array = await rest.recognize(both, sample_rate=rate)
    assert_says(result.text, TRANSCRIPTS["weather.wav"][0])
    assert result.duration == pytest.approx(sf.info(FIXTURES / "weather.wav").duration * 1000, 2)
    assert stereo.text
    assert_says(array.text, TRANSCRIPTS["weather.wav"][0])


async def test_rest_token_goes_in_the_header_and_a_bad_one_is_rejected(gw: Gateway) -> None:
    async with RestRecognizer(APPKEY, "bad-token-456", url=gw.http_url) as rest:
        with pytest.raises(AuthenticationError) as info:
            await rest.recognize(FIXTURES / "hello.wav")
    assert "bad-token-456" not in str(info.value)


async def test_rest_too_long_is_also_refused_by_the_gateway(gw: Gateway) -> None:
    pcm = bytes(2 * 16000 * 61)
    async with (
        ClientSession() as http,
        http.post(
            gw.http_url + "/stream/v1/asr",
            params={"appkey": APPKEY, "format": "pcm", "sample_rate": "16000"},
            headers={"X-NLS-Token": TOKEN},
            data=io.BytesIO(pcm),
        ) as r,
    ):
        body = await r.json()
    assert body["status"] == 41010104 and body["result"] == ""


# --------------------------------------------------------------------------- FileTrans


async def test_filetrans_two_channels_with_words(gw: Gateway, files: Files) -> None:
    async with ft_client(gw) as ft:
        task = await ft.submit(f"{files.url}/f/{TWO}", enable_words=True)
        assert len(task.task_id) == 32
        result = await task.wait(TIMEOUT)
    assert result.status == 21050000 and result.task_id == task.task_id
    assert result.duration == pytest.approx(sf.info(FIXTURES / TWO).duration * 1000, abs=20)
    for channel, expected in enumerate(TRANSCRIPTS[TWO]):
        (s,) = result.channel(channel)
        assert_says(s.text, expected)
        assert [w.text for w in s.words] == s.text.split()
        assert all(s.begin_time <= w.start_time < s.end_time for w in s.words)
        assert s.speech_rate and s.speech_rate > 0
        assert s.emotion_value is not None and s.silence_duration is not None
    raw = result.raw["Result"]
    assert {"Sentences", "Words"} <= raw.keys()
    assert set(raw["Sentences"][0]) == {
        "ChannelId",
        "BeginTime",
        "EndTime",
        "Text",
        "SilenceDuration",
        "SpeechRate",
        "EmotionValue",
    }


async def test_filetrans_file_url_transcribe_and_result(gw: Gateway, tmp_path: Path) -> None:
    link = (FIXTURES / "weather.wav").as_uri()
    async with ft_client(gw) as ft:
        result = await ft.transcribe(link, timeout=TIMEOUT)
        again = await ft.result(result.task_id, timeout=TIMEOUT)  # "submitted elsewhere"
    assert_says(result.text, TRANSCRIPTS["weather.wav"][0])
    assert again.text == result.text and "Words" not in result.raw["Result"]


async def test_filetrans_states_queueing_running_success(files: Files) -> None:
    async with Gateway(appkeys=[APPKEY], file_workers=1) as gw:  # the second task waits
        gw.queue_faults(Faults(complete_delay=2.0))  # the first one stays RUNNING a while
        results = await _two_tasks(gw, files)
    assert [r.status for r in results] == [21050000, 21050000]
    assert_says(results[1].text, TRANSCRIPTS["weather.wav"][0])


async def _two_tasks(gw: Gateway, files: Files) -> list[nlsstream.FileResult]:
    async with ft_client(gw) as ft:
        first = await ft.submit(f"{files.url}/f/hello.wav")
        second = await ft.submit(f"{files.url}/f/weather.wav")
        assert await first.poll() is None and first.status == 21050001
        assert await second.poll() is None and second.status == 21050002
        return list(await asyncio.gather(first.wait(TIMEOUT), second.wait(TIMEOUT)))


async def test_filetrans_keeps_the_newest_tasks(files: Files) -> None:
    async with Gateway(recognizer="span", max_file_tasks=2) as gw, ft_client(gw) as ft:
        done = [await ft.transcribe(f"{files.url}/f/hello.wav", timeout=TIMEOUT) for _ in "abc"]
        with pytest.raises(TaskFailedError) as info:
            await ft.result(done[0].task_id)
        assert info.value.status == 41050010  # forgotten, as the cloud does after 72 h
        assert (await ft.result(done[2].task_id)).text == done[2].text


@pytest.mark.parametrize("fmt", ["MP3", "OGG"])
async def test_compressed_recordings(gw: Gateway, tmp_path: Path, fmt: str) -> None:
    data, rate = sf.read(FIXTURES / "weather.wav", dtype="float32")
    path = tmp_path / f"weather.{fmt.lower()}"
    sf.write(path, data, rate, format=fmt)
    expected = TRANSCRIPTS["weather.wav"][0]
    async with FlashRecognizer(APPKEY, TOKEN, url=gw.http_url) as flash:
        assert_says((await flash.recognize(path)).text, expected, max_errors=2)
    async with ft_client(gw) as ft:
        result = await ft.transcribe(path.as_uri(), timeout=TIMEOUT)
    assert_says(result.text, expected, max_errors=2)


async def test_filetrans_polls_back_off_never_above_one_per_second_and_time_out(
    gw: Gateway, files: Files
) -> None:
    gw.queue_faults(Faults(complete_delay=4.0))
    async with ft_client(gw) as ft:
        task = await ft.submit(f"{files.url}/f/hello.wav")
        gw.queue_faults(Faults(http_status=500))  # the first poll fails: wait() goes on
        with pytest.raises(TimeoutError, match=task.task_id):
            await task.wait(timeout=2.0)
        # Concurrent pollers of one task share its one-per-second budget.
        await asyncio.gather(task.poll(), task.poll(), task.poll())
        result = await task.wait(TIMEOUT)
    assert_says(result.text, TRANSCRIPTS["hello.wav"][0])
    assert gw.files is not None
    polls = gw.files.tasks[task.task_id].polls
    gaps = [b - a for a, b in itertools.pairwise(polls)]
    assert len(polls) >= 4 and min(gaps) >= 0.95, gaps
    assert task.polls == len(polls)  # the failed poll left no trace in the task


async def test_filetrans_no_speech_is_21050003(gw: Gateway, tmp_path: Path) -> None:
    silent = tmp_path / "silent.wav"
    sf.write(silent, np.zeros(16000 * 2, dtype=np.int16), 16000)
    async with ft_client(gw) as ft:
        result = await ft.transcribe(silent.as_uri(), timeout=TIMEOUT)
    assert result.status == 21050003 and result.sentences == () and result.duration == 2000
    assert STATUS_CODES[21050003].name == "SUCCESS_WITH_NO_VALID_FRAGMENT"


async def test_filetrans_undownloadable_links(gw: Gateway, files: Files, tmp_path: Path) -> None:
    files.extra["notes.wav"] = b"not audio at all"
    async with ft_client(gw) as ft:
        for link, status in [
            (f"{files.url}/f/missing.wav", 41050024),
            ((tmp_path / "missing.wav").as_uri(), 41050002),
            (closed_port_url() + "/a.wav", 41050002),
            (f"{files.url}/f/notes.wav", 41050003),
        ]:
            with pytest.raises(TaskFailedError) as info:
                await ft.transcribe(link, timeout=TIMEOUT)
            assert info.value.status == status, link
            assert not info.value.retryable
            assert info.value.status_text == STATUS_CODES[status].name


async def test_filetrans_refused_tasks_unknown_task_and_appkey(gw: Gateway) -> None:
    async with ft_client(gw) as ft:
        with pytest.raises(TaskFailedError) as info:
            await ft.result("0" * 32)
        assert info.value.status == 41050010
        with pytest.raises(TaskFailedError) as info:
            await ft.submit("ftp://example.com/a.wav")
        assert info.value.status == 41050011
    async with FileTranscriber(AK_ID, AK_SECRET, appkey="other", endpoint=gw.http_url) as ft:
        with pytest.raises(TaskFailedError) as info:
            await ft.submit("https://example.com/a.wav")
        assert info.value.status == 41050015


async def test_bad_signature_and_unknown_access_key(
    gw: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    wrong = "wrong-secret-789"
    async with ft_client(gw, secret=wrong) as ft:
        with pytest.raises(PopError) as info:
            await ft.submit("https://example.com/a.wav")
    assert info.value.code == "SignatureDoesNotMatch" and info.value.http_status == 400
    assert not info.value.retryable and info.value.request_id
    async with FileTranscriber("nobody", wrong, appkey=APPKEY, endpoint=gw.http_url) as ft:
        with pytest.raises(PopError) as info:
            await ft.submit("https://example.com/a.wav")
    assert info.value.code == "InvalidAccessKeyId.NotFound"
    text = caplog.text + str(info.value)
    assert wrong not in text and AK_SECRET not in text


async def test_callback_mode_posts_the_4_0_body(gw: Gateway, files: Files) -> None:
    async with ft_client(gw) as ft:
        task = await ft.submit(f"{files.url}/f/hello.wav", callback_url=f"{files.url}/callback")
        body = await asyncio.wait_for(files.callbacks.get(), TIMEOUT)
    assert body["TaskId"] == task.task_id and body["StatusCode"] == 21050000
    assert body["StatusText"] == "SUCCESS" and "RequestId" not in body
    assert body["RequestTime"] <= body["SolveTime"] and body["BizDuration"] > 0
    (sentence,) = body["Result"]["Sentences"]
    assert_says(sentence["Text"], TRANSCRIPTS["hello.wav"][0])
    assert gw.files is not None and gw.files.tasks[task.task_id].callback_status == 200


async def test_app_key_inside_the_task_and_query_placement(gw: Gateway) -> None:
    """The C++ SDK's ``app_key`` and the Tea SDKs' Task-in-the-query, signed alike."""
    from nlsstream import auth

    task = json.dumps({"app_key": APPKEY, "file_link": (FIXTURES / "hello.wav").as_uri()})
    params = auth.signed_params(
        "POST",
        AK_ID,
        AK_SECRET,
        "SubmitTask",
        region="cn-shanghai",
        version="2018-08-17",
        extra={"Task": task, "SignatureType": ""},
    )
    async with ClientSession() as http, http.post(gw.http_url + "/", params=params) as r:
        body = await r.json()
    assert body["StatusCode"] == 21050000 and len(body["TaskId"]) == 32
    async with ft_client(gw) as ft:
        result = await ft.result(body["TaskId"], timeout=TIMEOUT)
    assert_says(result.text, TRANSCRIPTS["hello.wav"][0])


# --------------------------------------------------------------------------- faults


async def test_faults_on_the_recording_endpoints(gw: Gateway, files: Files) -> None:
    wav = (FIXTURES / "hello.wav").read_bytes()
    async with FlashRecognizer(APPKEY, TOKEN, url=gw.http_url, timeout=1.0) as flash:
        gw.queue_faults(Faults(http_status=500))
        with pytest.raises(GatewayConnectionError, match="HTTP 500"):
            await flash.recognize(wav)
        gw.queue_faults(Faults(fail_status=50000000))
        with pytest.raises(TaskFailedError) as info:
            await flash.recognize(wav)
        assert info.value.status == 50000000 and info.value.retryable
        gw.queue_faults(Faults(drop_at="start"))
        with pytest.raises(GatewayConnectionError):
            await flash.recognize(wav)
        gw.queue_faults(Faults(start_delay=3.0))
        with pytest.raises(GatewayConnectionError, match=r"did not answer within 1\.0 s"):
            await flash.recognize(wav)
    async with ft_client(gw) as ft:
        gw.queue_faults(Faults(fail_status=51050002))
        task = await ft.submit(f"{files.url}/f/hello.wav")
        with pytest.raises(TaskFailedError) as info:
            await task.wait(TIMEOUT)
        assert info.value.status == 51050002 and info.value.retryable


# --------------------------------------------------------------------------- tokens


async def test_create_token_then_realtime_and_flash_with_the_provider(gw: Gateway) -> None:
    provider = AccessKeyTokenProvider(AK_ID, AK_SECRET, endpoint=gw.http_url + "/")
    pcm, _ = read_pcm("hello.wav")
    async with Transcriber(APPKEY, provider, url=gw.url, proxy=None) as t:
        await t.send_audio(pcm)
        result = await asyncio.wait_for(t.stop(), TIMEOUT)
    assert_says(result.text, TRANSCRIPTS["hello.wav"][0])
    async with FlashRecognizer(APPKEY, provider, url=gw.http_url) as flash:
        assert_says((await flash.recognize(pcm)).text, TRANSCRIPTS["hello.wav"][0])
    assert provider.requests == 1
    bad = AccessKeyTokenProvider(AK_ID, "not-the-secret", endpoint=gw.http_url + "/")
    with pytest.raises(nlsstream.TokenError) as info:
        await bad.get_token()
    assert info.value.code == "SignatureDoesNotMatch"


def test_missing_aiohttp_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    monkeypatch.setitem(sys.modules, "aiohttp", None)
    with pytest.raises(ImportError, match=r"nlsstream\[files\]"):
        FlashRecognizer(APPKEY, TOKEN)


async def test_debug_logs_and_errors_never_show_token_or_secret(
    caplog: pytest.LogCaptureFixture, files: Files
) -> None:
    caplog.set_level(logging.DEBUG)  # the root logger: aiohttp's and ours
    token, secret = "SECRET-tok-5e1d", "SECRET-ak-77c2"
    async with Gateway(tokens=[token], access_keys={AK_ID: secret}) as gw:
        async with FlashRecognizer(APPKEY, token, url=gw.http_url) as flash:
            await flash.recognize(audio_address=f"{files.url}/f/hello.wav")
            gw.queue_faults(Faults(http_status=500))
            with pytest.raises(GatewayConnectionError) as info:
                await flash.recognize(FIXTURES / "hello.wav")
        async with ft_client(gw, secret=secret) as ft:
            await ft.transcribe(f"{files.url}/f/hello.wav", timeout=TIMEOUT)
        provider = AccessKeyTokenProvider(AK_ID, secret, endpoint=gw.http_url + "/")
        issued = await provider.get_token()
    assert caplog.records
    for text in (caplog.text, str(info.value), repr(ft), repr(flash)):
        assert token not in text and secret not in text and issued not in text
