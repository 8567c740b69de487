"""What a session does with the arguments a new user gets wrong: unknown keyword
arguments, a missing token, numpy audio at another rate, ``pace=0``; and the hint a
failed task's error carries. Against the local gateway over loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

from nlsstream import (
    AudioFormatError,
    Recognizer,
    TaskFailedError,
    Transcriber,
)
from nlsstream.gateway import Gateway

ROOT = Path(__file__).resolve().parent.parent
HELLO = str(ROOT / "tests" / "fixtures" / "hello.wav")
NOWHERE = "ws://127.0.0.1:9/ws/v1"  # nothing listens: constructing must not need it


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    async with Gateway(tokens=["tok"], appkeys=["app"], recognizer="span") as g:
        yield g


# --------------------------------------------------------------------------- audio


async def test_a_numpy_array_at_another_rate_is_resampled(gw: Gateway) -> None:
    samples, rate = soundfile.read(HELLO, dtype="float64")
    assert rate == 16000
    at_44k = soxr.resample(samples, 16000, 44100)
    async with Recognizer("app", "tok", url=gw.url) as r:
        await r.stream(at_44k, pace=None, sample_rate=44100)
        await r.stop()
    # What arrives is the 16 kHz signal again: as long, not 2.76 times longer.
    assert gw.sessions[-1].audio_bytes == pytest.approx(2 * len(samples), abs=8)


async def test_a_numpy_array_at_another_rate_is_recognised() -> None:
    pytest.importorskip("pocketsphinx")
    samples, _ = soundfile.read(HELLO, dtype="int16")
    at_32k = np.repeat(samples, 2)  # each sample twice: the same speech at 32 kHz
    async with (
        Gateway(recognizer="sphinx") as sphinx,
        Recognizer(sphinx.appkey, sphinx.token, url=sphinx.url) as r,
    ):
        await r.stream(at_32k, pace=0, sample_rate=32000)
        result = await r.stop()
    assert result.text == "hello world"


async def test_sample_rate_for_an_iterable_is_a_clear_error(gw: Gateway) -> None:
    async with Recognizer("app", "tok", url=gw.url) as r:
        with pytest.raises(AudioFormatError, match="whole array"):
            await r.stream([b"\0\0"], sample_rate=44100)
        await r.send_audio(b"\0" * 640)
        await r.stop()


async def test_pace_0_is_as_fast_as_possible(gw: Gateway) -> None:
    async with Recognizer("app", "tok", url=gw.url) as r:
        await r.stream(HELLO, pace=0)
        await r.stop()
    assert r.metrics.frames_sent > 0
    assert r.metrics._paced_frames == 0  # written as the socket takes them, like pace=None
    with pytest.raises(ValueError, match="pace"):
        async with Recognizer("app", "tok", url=gw.url) as r2:
            await r2.stream(HELLO, pace=-1)


# --------------------------------------------------------------------------- hints


async def test_the_hint_for_a_bad_parameter_does_not_contradict_the_server(gw: Gateway) -> None:
    with pytest.raises(TaskFailedError) as info:
        async with Transcriber("app", "tok", url=gw.url, max_sentence_silence=50):
            pass
    message = str(info.value)
    assert info.value.status == 40000003
    assert "max_sentence_silence" in message and "appkey" not in message.lower()


def test_the_appkey_hint_comes_when_the_server_speaks_of_the_appkey() -> None:
    error = TaskFailedError(40000003, "Gateway:PARAMETER_INVALID:appkey not set!", "t")
    assert str(error).endswith("(The appkey is not set or invalid: use the project's appkey.)")
