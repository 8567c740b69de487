"""What a session does with the arguments a new user gets wrong: unknown keyword
arguments, a missing token, numpy audio at another rate, ``pace=0``; and the hint a
failed task's error carries. Against the local gateway over loopback."""

from __future__ import annotations

import re
import warnings
from collections.abc import AsyncIterator
from pathlib import Path

import numpy as np
import pytest
import soundfile
import soxr

from nlsstream import (
    AudioFormatError,
    ConfigurationError,
    Recognizer,
    TaskFailedError,
    Transcriber,
)
from nlsstream.gateway import Gateway
from nlsstream.realtime.protocol import RECOGNIZER, TRANSCRIBER

ROOT = Path(__file__).resolve().parents[2]
HELLO = str(ROOT / "tests" / "fixtures" / "hello.wav")
NOWHERE = "ws://127.0.0.1:9/ws/v1"  # nothing listens: constructing must not need it


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    async with Gateway(tokens=["tok"], appkeys=["app"], recognizer="span") as g:
        yield g


# --------------------------------------------------------------------------- keyword arguments


def test_a_callback_the_class_does_not_have_is_refused_naming_it() -> None:
    with pytest.raises(TypeError, match=r"'on_sentence_end'.*Recognizer has no such callback"):
        Recognizer("app", "tok", url=NOWHERE, on_sentence_end=print)


@pytest.mark.parametrize("value", [{1, 2}, object(), float("nan")])
def test_a_value_that_is_not_json_is_refused_naming_it(value: object) -> None:
    with pytest.raises(TypeError, match="'vocabulary_id' cannot be sent"):
        Transcriber("app", "tok", url=NOWHERE, vocabulary_id=value)
    with pytest.raises(TypeError, match="'custom' cannot be sent"):
        Transcriber("app", "tok", url=NOWHERE, params={"custom": value})


async def test_an_undocumented_name_warns_once_and_params_does_not(gw: Gateway) -> None:
    with pytest.warns(UserWarning, match=r"did you mean 'enable_intermediate_result'") as seen:
        t = Transcriber("app", "tok", url=gw.url, enable_intermediate_results=True)
    assert len(seen) == 1 and seen[0].filename == __file__  # points at the caller
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second time, and params={...}: silent
        again = Recognizer("app", "tok", url=gw.url, enable_intermediate_results=True)
        explicit = Transcriber("app", "tok", url=gw.url, params={"x_custom_flag": 1})
    del again
    for session in (t, explicit):
        async with session:
            await session.send_audio(b"\0" * 640)
            await session.stop()
    # Sent as given all the same: the gateway decides what it makes of them.
    assert gw.sessions[-2].params["enable_intermediate_results"] is True
    assert gw.sessions[-1].params["x_custom_flag"] == 1


def _documented(section: str) -> set[str]:
    """The parameter names in the first table of a section of docs/protocol.md."""
    text = (ROOT / "docs" / "protocol.md").read_text()
    body = text.split(f"### {section}", 1)[1].split("\n### ", 1)[0]
    names: set[str] = set()
    for row in re.findall(r"^\| (`[^|]*)\|", body, re.MULTILINE):
        names.update(re.findall(r"`([a-z_]+)`", row))
    return names


def test_the_documented_parameters_are_the_ones_in_the_protocol_reference() -> None:
    assert _documented("3.2 StartTranscription") == TRANSCRIBER.parameters
    assert _documented("4.1 Directives") == RECOGNIZER.parameters


# --------------------------------------------------------------------------- token


@pytest.mark.parametrize("token", [None, ""])
def test_no_token_says_how_to_give_credentials(token: str | None) -> None:
    with pytest.raises(ConfigurationError) as info:
        Transcriber("app", token, url=NOWHERE)  # type: ignore[arg-type]
    message = str(info.value)
    for way in ("token=", "AccessKeyTokenProvider", "NLS_TOKEN", "ALIYUN_AK_ID"):
        assert way in message


def test_a_token_of_the_wrong_type_is_a_type_error() -> None:
    with pytest.raises(TypeError, match="token must be a string or a token provider"):
        Recognizer("app", 12345, url=NOWHERE)  # type: ignore[arg-type]


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
