"""The blocking recording clients (``nlsstream.sync.FlashRecognizer``, ``FileTranscriber``,
``RestRecognizer``) against the local gateway's recording services over loopback, with
real speech (PocketSphinx): the same results and typed errors as the async clients, the
FileTrans task's wait and its timeout, and the one shared loop thread.

The tests are plain (not ``async``) functions: a blocking call inside a running event
loop is refused. The gateway runs in its own thread (the ``nls_gateway`` fixture).
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import pytest
from helpers import AK_ID, AK_SECRET, FIXTURES, TRANSCRIPTS, read_pcm, word_errors

import nlsstream
import nlsstream.sync
from nlsstream import (
    AudioFormatError,
    AuthenticationError,
    FileResult,
    PopError,
    TaskFailedError,
)
from nlsstream.gateway import Faults, Gateway
from nlsstream.gateway.engine import sphinx_available
from nlsstream.sync import loop_thread

pytestmark = [
    pytest.mark.skipif(not sphinx_available(), reason="needs pocketsphinx"),
    # 12 recordings at once share 4 decoders: on a loaded machine one may wait for a
    # decoder longer than the gateway's default 5 s (then 52010001 fails it).
    pytest.mark.nls_gateway(access_keys={AK_ID: AK_SECRET}, max_decoders=4, decoder_wait=60.0),
]

#: Bound of every wait for recognition (a loaded 2-CPU machine, several seconds of audio).
TIMEOUT = 60.0
TWO = "two_channel.flac"


def assert_says(text: str, expected: str, max_errors: int = 1) -> None:
    assert word_errors(expected, text) <= max_errors, (expected, text)


def flash(gw: Gateway, token: Any = None, **kw: Any) -> nlsstream.sync.FlashRecognizer:
    return nlsstream.sync.FlashRecognizer(gw.appkey, token or gw.token, url=gw.http_url, **kw)


def rest(gw: Gateway, token: Any = None, **kw: Any) -> nlsstream.sync.RestRecognizer:
    return nlsstream.sync.RestRecognizer(gw.appkey, token or gw.token, url=gw.http_url, **kw)


def filetrans(gw: Gateway, secret: str = AK_SECRET, **kw: Any) -> nlsstream.sync.FileTranscriber:
    return nlsstream.sync.FileTranscriber(
        AK_ID, secret, appkey=gw.appkey, endpoint=gw.http_url, **kw
    )


def link(name: str) -> str:
    """A fixture as a ``file://`` link (the emulator downloads those too)."""
    return (FIXTURES / name).as_uri()


# --------------------------------------------------------------------------- results


def test_flash_recognizes_every_channel_as_the_async_client_does(nls_gateway: Gateway) -> None:
    gw = nls_gateway
    with flash(gw) as f:
        result = f.recognize(FIXTURES / TWO, enable_word_level_result=True)
        pcm, rate = read_pcm("weather.wav")
        array = f.recognize(np.frombuffer(pcm, "<i2"), sample_rate=rate)
    assert isinstance(result, FileResult) and len(result.task_id) == 32
    for channel, expected in enumerate(TRANSCRIPTS[TWO]):
        (sentence,) = result.channel(channel)
        assert_says(sentence.text, expected)
        assert [w.text for w in sentence.words] == sentence.text.split()
    assert_says(array.text, TRANSCRIPTS["weather.wav"][0])

    async def the_async_one() -> FileResult:
        async with nlsstream.FlashRecognizer(gw.appkey, gw.token, url=gw.http_url) as a:
            return await a.recognize(FIXTURES / TWO, enable_word_level_result=True)

    same = asyncio.run(the_async_one())
    assert same.duration == result.duration
    assert [s.channel_id for s in same.sentences] == [s.channel_id for s in result.sentences]
    for a, b in zip(same.sentences, result.sentences, strict=True):
        assert_says(b.text, a.text)  # the decoder's timing may differ by a frame


def test_rest_recognizes_one_sentence(nls_gateway: Gateway) -> None:
    with rest(nls_gateway) as r:
        result = r.recognize(FIXTURES / "weather.wav")
        again = r.recognize((FIXTURES / "hello.wav").read_bytes())
    assert isinstance(result, FileResult) and len(result.sentences) == 1
    assert_says(result.text, TRANSCRIPTS["weather.wav"][0])
    assert_says(again.text, TRANSCRIPTS["hello.wav"][0])


def test_filetrans_submit_returns_a_blocking_task_that_waits(nls_gateway: Gateway) -> None:
    with filetrans(nls_gateway) as ft:
        task = ft.submit(link(TWO), enable_words=True)
        assert isinstance(task, nlsstream.sync.FileTransTask)
        assert len(task.task_id) == 32 and task.status == 21050002
        result = task.wait(timeout=TIMEOUT)
        assert task.status == 21050000
        fetched = ft.result(task.task_id, timeout=TIMEOUT)  # "submitted elsewhere"
        handle = ft.task(task.task_id)
        polled = handle.poll()  # done: one GetTaskResult gives the result
        transcribed = ft.transcribe(link("weather.wav"), timeout=TIMEOUT)
    assert result.status == 21050000 and result.task_id == task.task_id
    for channel, expected in enumerate(TRANSCRIPTS[TWO]):
        (s,) = result.channel(channel)
        assert_says(s.text, expected)
        assert [w.text for w in s.words] == s.text.split()
    assert fetched.text == result.text and polled is not None and polled.text == result.text
    assert_says(transcribed.text, TRANSCRIPTS["weather.wav"][0])


def test_filetrans_wait_times_out_then_waits_again(nls_gateway: Gateway) -> None:
    nls_gateway.queue_faults(Faults(complete_delay=4.0))  # the task stays RUNNING a while
    with filetrans(nls_gateway) as ft:
        task = ft.submit(link("hello.wav"))
        with pytest.raises(TimeoutError, match=task.task_id):  # the client's, not the bridge's
            task.wait(timeout=1.5)
        assert task.status in (21050001, 21050002)  # the task goes on
        result = task.wait(timeout=TIMEOUT)
    assert_says(result.text, TRANSCRIPTS["hello.wav"][0])


# --------------------------------------------------------------------------- errors


def test_typed_errors_are_the_async_clients(nls_gateway: Gateway) -> None:
    gw = nls_gateway
    with flash(gw, token="bad-token-456") as f, pytest.raises(AuthenticationError) as info:
        f.recognize(FIXTURES / "hello.wav")
    assert "bad-token-456" not in str(info.value)
    with rest(gw, token="bad-token-456") as r, pytest.raises(AuthenticationError):
        r.recognize(FIXTURES / "hello.wav")
    with flash(gw) as f, pytest.raises(AudioFormatError, match="sample_rate"):
        f.recognize(np.zeros(16000, dtype=np.int16))  # an array needs its rate
    with rest(gw) as r, pytest.raises(AudioFormatError, match="at most 60 s"):
        r.recognize(np.zeros(16000 * 61, dtype=np.int16), sample_rate=16000)
    with filetrans(gw, secret="wrong-secret-789") as ft, pytest.raises(PopError) as pop:
        ft.submit(link("hello.wav"))
    assert pop.value.code == "SignatureDoesNotMatch" and "wrong-secret-789" not in str(pop.value)
    with filetrans(gw) as ft:
        with pytest.raises(TaskFailedError) as failed:
            ft.transcribe(link("missing.wav"), timeout=TIMEOUT)
        assert failed.value.status == 41050002 and not failed.value.retryable
        gw.queue_faults(Faults(fail_status=51050002))
        task = ft.submit(link("hello.wav"))
        with pytest.raises(TaskFailedError) as failed:
            task.wait(timeout=TIMEOUT)
        assert failed.value.status == 51050002 and failed.value.retryable
    with pytest.raises(ValueError, match="give either"):
        flash(gw).recognize()  # refused at once, as the async client does


# --------------------------------------------------------------------------- one loop thread


class ThreadRecordingTokens:
    """A token provider that notes the thread each request for a token runs on."""

    def __init__(self, token: str) -> None:
        self.token = token
        self.threads: set[threading.Thread] = set()

    async def get_token(self) -> str:
        self.threads.add(threading.current_thread())
        return self.token


def test_recording_clients_share_the_one_loop_thread(nls_gateway: Gateway) -> None:
    gw = nls_gateway
    tokens = ThreadRecordingTokens(gw.token)
    wav = (FIXTURES / "hello.wav").read_bytes()

    def one(i: int) -> str:
        if i % 3 == 0:
            with flash(gw, token=tokens) as f:
                return f.recognize(wav).text
        if i % 3 == 1:
            with rest(gw, token=tokens) as r:
                return r.recognize(wav).text
        with filetrans(gw) as ft:
            return ft.transcribe(link("hello.wav"), timeout=TIMEOUT).text

    with ThreadPoolExecutor(6) as pool:
        texts = list(pool.map(one, range(12)))
    for text in texts:
        assert_says(text, TRANSCRIPTS["hello.wav"][0])
    assert tokens.threads == {loop_thread().thread}
    names = [t.name for t in threading.enumerate()]
    assert names.count("nlsstream-loop") == 1, names
    # Besides the test's own threads (main, the gateway's, the pool's 6): the loop
    # thread and at most its bounded default executor (audio preparation); nothing per
    # client.
    assert len(names) < 12 + 6, names
