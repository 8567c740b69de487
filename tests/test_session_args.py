"""What a session does with the arguments a new user gets wrong: unknown keyword
arguments, a missing token, numpy audio at another rate, ``pace=0``; and the hint a
failed task's error carries. Against the local gateway over loopback."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nlsstream import (
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
