"""The official Python SDK (``nls``), unmodified, against the local gateway.

The SDK blocks and reports everything through callbacks (``start()`` returns None), so
the gateway runs in a background thread (the ``nls_gateway`` fixture of our pytest
plugin) and the tests collect the callbacks' JSON messages.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import pytest
from helpers import TRANSCRIPTS, read_pcm, word_errors

from nlsstream.gateway import Faults, Gateway
from nlsstream.gateway.engine import sphinx_available

nls = pytest.importorskip("nls")


class Calls:
    """Collects (callback name, parsed message) pairs from the SDK's threads."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any] | None]] = []
        self.closed = threading.Event()
        self.lock = threading.Lock()

    def cb(self, name: str) -> Any:
        def record(message: str, *args: Any) -> None:
            with self.lock:
                self.items.append((name, json.loads(message)))

        return record

    def on_close(self, *args: Any) -> None:
        with self.lock:
            self.items.append(("on_close", None))
        self.closed.set()

    def names(self) -> list[str]:
        return [n for n, _ in self.items]

    def payloads(self, name: str) -> list[dict[str, Any]]:
        return [m.get("payload", {}) for n, m in self.items if n == name and m is not None]


def transcriber(gw: Gateway, calls: Calls, token: str | None = None) -> Any:
    return nls.NlsSpeechTranscriber(
        url=gw.url,
        token=token or gw.token,
        appkey=gw.appkey,
        on_start=calls.cb("on_start"),
        on_sentence_begin=calls.cb("on_sentence_begin"),
        on_sentence_end=calls.cb("on_sentence_end"),
        on_result_changed=calls.cb("on_result_changed"),
        on_completed=calls.cb("on_completed"),
        on_error=calls.cb("on_error"),
        on_close=calls.on_close,
    )


def recognizer(gw: Gateway, calls: Calls) -> Any:
    return nls.NlsSpeechRecognizer(
        url=gw.url,
        token=gw.token,
        appkey=gw.appkey,
        on_start=calls.cb("on_start"),
        on_result_changed=calls.cb("on_result_changed"),
        on_completed=calls.cb("on_completed"),
        on_error=calls.cb("on_error"),
        on_close=calls.on_close,
    )


def send(sdk: Any, pcm: bytes, chunk: int = 6400) -> None:
    for i in range(0, len(pcm), chunk):
        sdk.send_audio(pcm[i : i + chunk])


def wer(expected: list[str], got: list[str]) -> float:
    ref = " ".join(expected)
    return word_errors(ref, " ".join(got)) / len(ref.split())


@pytest.mark.skipif(not sphinx_available(), reason="pocketsphinx not installed")
def test_transcriber(nls_gateway: Gateway) -> None:
    pcm, _ = read_pcm("three_sentences.wav")
    calls = Calls()
    sdk = transcriber(nls_gateway, calls)
    assert sdk.start(enable_intermediate_result=True, ex={"enable_words": True}) is None
    send(sdk, pcm)
    sdk.stop()
    assert calls.closed.wait(5)
    names = calls.names()
    assert names[0] == "on_start" and "on_error" not in names
    assert names.count("on_sentence_begin") == 3 and names.count("on_sentence_end") == 3
    assert "on_result_changed" in names
    assert names.index("on_completed") > max(
        i for i, n in enumerate(names) if n == "on_sentence_end"
    )
    ends = calls.payloads("on_sentence_end")
    assert wer(TRANSCRIPTS["three_sentences.wav"], [e["result"] for e in ends]) <= 0.10
    assert all(e["words"] and e["begin_time"] < e["time"] for e in ends)
    record = nls_gateway.sessions[-1]
    assert record.status == 20000000 and record.audio_bytes == len(pcm)
    assert record.params["enable_words"] is True


def test_transcriber_ctrl_changes_sentence_silence(nls_gateway: Gateway) -> None:
    pcm, _ = read_pcm("three_sentences.wav")
    calls = Calls()
    sdk = transcriber(nls_gateway, calls)
    sdk.start()
    cut = 32000 * 32 // 10  # inside the first pause, after the first sentence ended
    send(sdk, pcm[:cut])
    sdk.ctrl(max_sentence_silence=2000)
    send(sdk, pcm[cut:])
    sdk.stop()
    assert calls.closed.wait(5)
    assert calls.names().count("on_sentence_end") == 2


@pytest.mark.parametrize("intermediate", [False, True])
def test_recognizer(nls_gateway: Gateway, intermediate: bool) -> None:
    pcm, _ = read_pcm("weather.wav")
    calls = Calls()
    sdk = recognizer(nls_gateway, calls)
    sdk.start(enable_intermediate_result=intermediate)
    send(sdk, pcm)
    sdk.stop()
    assert calls.closed.wait(5)
    names = calls.names()
    assert names[0] == "on_start" and names[-1] == "on_close"
    assert ("on_result_changed" in names) is intermediate
    [completed] = calls.payloads("on_completed")
    assert completed["duration"] == len(pcm) // 32
    if sphinx_available():
        assert wer(TRANSCRIPTS["weather.wav"], [completed["result"]]) <= 0.10


def test_recognizer_voice_detection_ends_task(nls_gateway: Gateway) -> None:
    pcm, _ = read_pcm("hello.wav")
    calls = Calls()
    sdk = recognizer(nls_gateway, calls)
    sdk.start(ex={"enable_voice_detection": True, "max_end_silence": 300})
    send(sdk, pcm + bytes(32000))
    assert calls.closed.wait(5)  # completed without stop()
    assert calls.names()[-2:] == ["on_completed", "on_close"]


def test_bad_token_only_closes(nls_gateway: Gateway) -> None:
    calls = Calls()
    sdk = transcriber(nls_gateway, calls, token="not-the-token")
    assert sdk.start() is None  # the SDK's documented silent failure (docs/protocol.md §7.4)
    assert calls.closed.wait(5)
    assert "on_start" not in calls.names()
    assert nls_gateway.sessions == []  # rejected at the handshake


def test_task_failed_reaches_on_error(nls_gateway: Gateway) -> None:
    nls_gateway.queue_faults(Faults(fail_status=40000005))
    calls = Calls()
    sdk = transcriber(nls_gateway, calls)
    sdk.start(timeout=2)
    assert calls.closed.wait(5)
    [(_name, message)] = [(n, m) for n, m in calls.items if n == "on_error"]
    assert message is not None
    assert message["header"]["status"] == 40000005
    assert message["header"]["namespace"] == "Default"


@pytest.mark.nls_gateway(appkeys=["only-this"])
def test_unknown_appkey(nls_gateway: Gateway) -> None:
    calls = Calls()
    sdk = nls.NlsSpeechRecognizer(
        url=nls_gateway.url,
        token=nls_gateway.token,
        appkey="another",
        on_error=calls.cb("on_error"),
        on_close=calls.on_close,
    )
    sdk.start(timeout=2)
    assert calls.closed.wait(5)
    [message] = calls.payloads("on_error") and [m for n, m in calls.items if n == "on_error"]
    assert message is not None and message["header"]["status"] == 40020105
