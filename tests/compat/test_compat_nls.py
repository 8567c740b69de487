"""The drop-in ``nlsstream.compat.nls``: the same official-SDK user programs, run once
with the real ``import nls`` and once with the compat module against the local gateway,
must see the same callbacks, in the same order, with the same texts.

The programs below are written as official-SDK user code: they only receive the module.
"""

from __future__ import annotations

import contextlib
import json
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from helpers import AK_ID, AK_SECRET, FakeTokenService, read_pcm

import nlsstream.compat.nls as compat_nls
from nlsstream.gateway import Faults, Gateway
from nlsstream.sync import loop_thread

official_nls = pytest.importorskip("nls")
SDKS = pytest.mark.parametrize("nls", [official_nls, compat_nls], ids=["official", "compat"])
pytestmark = pytest.mark.nls_gateway(recognizer="span")
WAIT = 20.0  # generous bound for a slow machine


class Calls:
    """What a user program records from its callbacks (on whatever thread they run)."""

    def __init__(self) -> None:
        self.items: list[tuple[str, dict[str, Any] | None, tuple[Any, ...]]] = []
        self.closed = threading.Event()
        self.lock = threading.Lock()

    def cb(self, name: str) -> Any:
        def record(message: str, *args: Any) -> None:
            with self.lock:
                self.items.append((name, json.loads(message), args))

        return record

    def on_close(self, *args: Any) -> None:
        with self.lock:
            self.items.append(("on_close", None, args))
        self.closed.set()

    def names(self) -> list[str]:
        """Callback names, consecutive partial results counted once."""
        out: list[str] = []
        for name, _, _ in self.items:
            if not (name == "on_result_changed" and out and out[-1] == name):
                out.append(name)
        return out

    def payloads(self, name: str) -> list[dict[str, Any]]:
        return [m.get("payload", {}) for n, m, _ in self.items if n == name and m is not None]

    def headers(self, name: str) -> list[dict[str, Any]]:
        return [m["header"] for n, m, _ in self.items if n == name and m is not None]


# ------------------------------------------------------------- the user programs


def transcribe(
    nls: Any,
    gw: Gateway,
    pcm: bytes,
    *,
    appkey: str | None = None,
    ctrl_at: int | None = None,
    **start: Any,
) -> Calls:
    """Every callback; 640-byte chunks; ``ctrl(max_sentence_silence=2000)`` after
    ``ctrl_at`` bytes, if given."""
    calls = Calls()
    tr = nls.NlsSpeechTranscriber(
        url=gw.url,
        token=gw.token,
        appkey=appkey or gw.appkey,
        on_start=calls.cb("on_start"),
        on_sentence_begin=calls.cb("on_sentence_begin"),
        on_sentence_end=calls.cb("on_sentence_end"),
        on_result_changed=calls.cb("on_result_changed"),
        on_completed=calls.cb("on_completed"),
        on_error=calls.cb("on_error"),
        on_close=calls.on_close,
        callback_args=["user-arg"],
    )
    tr.start(**start)
    for i in range(0, len(pcm), 640):
        if i == ctrl_at:
            tr.ctrl(max_sentence_silence=2000)
        tr.send_audio(pcm[i : i + 640])
    tr.stop()
    assert calls.closed.wait(WAIT)
    tr.shutdown()
    return calls


def recognize(nls: Any, gw: Gateway, pcm: bytes, **start: Any) -> Calls:
    calls = Calls()
    sr = nls.NlsSpeechRecognizer(
        url=gw.url,
        token=gw.token,
        appkey=gw.appkey,
        on_start=calls.cb("on_start"),
        on_result_changed=calls.cb("on_result_changed"),
        on_completed=calls.cb("on_completed"),
        on_error=calls.cb("on_error"),
        on_close=calls.on_close,
    )
    sr.start(**start)
    for i in range(0, len(pcm), 6400):
        try:
            sr.send_audio(pcm[i : i + 6400])
        except nls.exception.NotStartException:  # the gateway's VAD ended the task
            break
    sr.stop()
    assert calls.closed.wait(WAIT)
    return calls


def both(program: Any, *args: Any, **kwargs: Any) -> tuple[Calls, Calls]:
    return program(official_nls, *args, **kwargs), program(compat_nls, *args, **kwargs)


# ------------------------------------------------------------- same behaviour


def test_transcriber_same_callbacks_and_texts(nls_gateway: Gateway) -> None:
    pcm, _ = read_pcm("three_sentences.wav")
    official, compat = both(
        transcribe,
        nls_gateway,
        pcm,
        enable_intermediate_result=True,
        enable_punctuation_prediction=True,
        ex={"enable_words": True},
    )
    assert compat.names() == official.names()
    assert official.names()[0] == "on_start" and official.names()[-2:] == [
        "on_completed",
        "on_close",
    ]
    for name in ("on_sentence_end", "on_sentence_begin", "on_completed"):
        assert compat.payloads(name) == official.payloads(name)
    assert all(args == ("user-arg",) for _, _, args in compat.items + official.items)
    official_rec, compat_rec = nls_gateway.sessions[-2:]
    assert compat_rec.params == official_rec.params
    assert compat_rec.params["enable_words"] is True
    assert compat_rec.audio_bytes == official_rec.audio_bytes == len(pcm)


def test_transcriber_ctrl_same_effect(nls_gateway: Gateway) -> None:
    pcm, _ = read_pcm("three_sentences.wav")
    cut = 32000 * 32 // 10  # inside the first pause, after the first sentence ended
    official, compat = both(transcribe, nls_gateway, pcm, ctrl_at=cut)
    assert compat.names() == official.names()
    assert official.names().count("on_sentence_end") == 2
    assert compat.payloads("on_sentence_end") == official.payloads("on_sentence_end")


@pytest.mark.parametrize("intermediate", [False, True])
def test_recognizer_same_callbacks_and_result(nls_gateway: Gateway, intermediate: bool) -> None:
    pcm, _ = read_pcm("weather.wav")
    official, compat = both(recognize, nls_gateway, pcm, enable_intermediate_result=intermediate)
    assert compat.names() == official.names()
    assert ("on_result_changed" in compat.names()) is intermediate
    assert compat.payloads("on_completed") == official.payloads("on_completed")
    assert compat.payloads("on_completed")[0]["result"].startswith("speech ")


def test_recognizer_voice_detection_ends_the_task_alike(nls_gateway: Gateway) -> None:
    pcm, _ = read_pcm("hello.wav")
    start = {"ex": {"enable_voice_detection": True, "max_end_silence": 300}}
    official, compat = both(recognize, nls_gateway, pcm + bytes(64000), **start)
    assert compat.names() == official.names() == ["on_start", "on_completed", "on_close"]


def test_task_failed_goes_to_on_error_then_on_close(nls_gateway: Gateway) -> None:
    pcm, _ = read_pcm("hello.wav")
    official, compat = both(transcribe, nls_gateway, pcm, appkey="no-such-appkey")
    # The official SDK calls on_close twice here (its core's and its socket's); once is
    # what its documentation promises, and what the compat module does.
    assert official.names() in (["on_error", "on_close"], ["on_error", "on_close", "on_close"])
    assert compat.names() == ["on_error", "on_close"]
    [o], [c] = official.headers("on_error"), compat.headers("on_error")
    assert c["status"] == o["status"] == 40020105
    assert c["status_text"] == o["status_text"] and c["name"] == o["name"] == "TaskFailed"


def test_timeouts_raise_the_same_exceptions(nls_gateway: Gateway) -> None:
    for nls in (official_nls, compat_nls):
        nls_gateway.queue_faults(Faults(start_delay=1.0))
        tr = nls.NlsSpeechTranscriber(
            url=nls_gateway.url,
            token=nls_gateway.token,
            appkey=nls_gateway.appkey,
            on_close=lambda *a: None,
        )
        with pytest.raises(nls.exception.StartTimeoutException):
            tr.start(timeout=0.2)
        tr.shutdown()

        nls_gateway.queue_faults(Faults(complete_delay=1.0))
        sr = nls.NlsSpeechRecognizer(
            url=nls_gateway.url,
            token=nls_gateway.token,
            appkey=nls_gateway.appkey,
            on_close=lambda *a: None,
        )
        sr.start()
        sr.send_audio(bytes(6400))
        with pytest.raises(nls.exception.StopTimeoutException):
            sr.stop(timeout=0.2)
        sr.shutdown()


@SDKS
def test_argument_errors_alike(nls: Any, nls_gateway: Gateway) -> None:
    with pytest.raises(nls.exception.InvalidParameter):
        nls.NlsSpeechTranscriber(url=nls_gateway.url, token=None, appkey="a")
    tr = nls.NlsSpeechTranscriber(url=nls_gateway.url, token="t", appkey="a", on_close=print)
    with pytest.raises(ValueError):
        tr.start(ch=2)
    with pytest.raises(ValueError):
        tr.start(aformat="flac")
    sr = nls.NlsSpeechRecognizer(url=nls_gateway.url, token="t", appkey="a", on_close=print)
    with pytest.raises(nls.exception.InvalidParameter):
        sr.start(ch=2)
    with pytest.raises(nls.exception.NotStartException):
        sr.send_audio(b"\0\0")
    with pytest.raises(nls.exception.InvalidParameter):
        tr.ctrl()


# ------------------------------------------------------------- deliberate differences


def test_403_reaches_on_error_where_the_official_sdk_swallows_it(nls_gateway: Gateway) -> None:
    pcm, _ = read_pcm("hello.wav")
    calls = {}
    for nls in (official_nls, compat_nls):
        c = calls[nls] = Calls()
        tr = nls.NlsSpeechTranscriber(
            url=nls_gateway.url,
            token="wrong",
            appkey=nls_gateway.appkey,
            on_error=c.cb("on_error"),
            on_close=c.on_close,
        )
        started = tr.start()
        assert started is (None if nls is official_nls else False)
        assert tr.send_audio(pcm[:640]) is (None if nls is official_nls else False)
        assert c.closed.wait(WAIT)
    assert calls[official_nls].names() == ["on_close"]
    assert calls[compat_nls].names() == ["on_error", "on_close"]
    [header] = calls[compat_nls].headers("on_error")
    assert header["status"] == 40000001 and "wrong" not in json.dumps(header)


def test_compat_returns_true_runs_callbacks_off_the_loop_and_accepts_old_spellings(
    nls_gateway: Gateway,
) -> None:
    pcm, _ = read_pcm("three_sentences.wav")
    threads: set[threading.Thread] = set()
    done = threading.Event()
    tr = compat_nls.NlsSpeechTranscriber(
        url=nls_gateway.url,
        token=nls_gateway.token,
        appkey=nls_gateway.appkey,
        on_sentence_end=lambda m, *a: threads.add(threading.current_thread()),
        on_close=lambda *a: done.set(),
    )
    assert tr.start(enable_punctutation_prediction=True) is True
    assert tr.send_audio(pcm) is True
    assert tr.ctrl(ex={"max_sentence_silence": 700}) is True  # the older ctrl(ex=...) API
    assert tr.stop() is True
    assert done.is_set()  # stop() returns after on_close
    # The session's callbacks ran in order on a callback worker, never on the loop thread.
    assert threads and loop_thread().thread not in threads
    record = nls_gateway.sessions[-1]
    assert record.params["enable_punctuation_prediction"] is True
    assert tr.send_audio(pcm[:640]) is False  # after the end: refused, not sent
    assert tr.stop() is True and tr.ctrl(a=1) is False
    tr.shutdown()
    tr.shutdown()  # repeated calls do nothing


def test_compat_ctrl_and_shutdown_from_a_callback(
    nls_gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    pcm, _ = read_pcm("three_sentences.wav")
    closed = threading.Event()
    holder: list[Any] = []
    ends: list[str] = []

    def on_sentence_end(message: str, *args: Any) -> None:
        ends.append(message)
        if len(ends) == 1:
            assert holder[0].ctrl(max_sentence_silence=700) is True  # a blocking call: allowed
            raise RuntimeError("a failing user callback")  # logged; the session goes on
        holder[0].shutdown()

    tr = compat_nls.NlsSpeechTranscriber(
        url=nls_gateway.url,
        token=nls_gateway.token,
        appkey=nls_gateway.appkey,
        on_sentence_end=on_sentence_end,
        on_close=lambda *a: closed.set(),
    )
    holder.append(tr)
    tr.start()
    tr.send_audio(pcm)
    assert closed.wait(WAIT)  # shutdown() from the second callback closed the connection
    assert len(ends) == 2 and tr.stop() is False  # aborted: no Completed
    assert "a failing user callback" in caplog.text


def test_compat_reports_a_lost_connection_where_the_official_sdk_is_silent(
    nls_gateway: Gateway,
) -> None:
    pcm, _ = read_pcm("three_sentences.wav")
    calls = Calls()
    nls_gateway.queue_faults(Faults(drop_at="audio", drop_after_bytes=32000))
    tr = compat_nls.NlsSpeechTranscriber(
        url=nls_gateway.url,
        token=nls_gateway.token,
        appkey=nls_gateway.appkey,
        on_error=calls.cb("on_error"),
        on_close=calls.on_close,
    )
    assert tr.start() is True
    for i in range(0, len(pcm), 3200):
        if not tr.send_audio(pcm[i : i + 3200]):
            break
    assert calls.closed.wait(WAIT)
    assert tr.stop() is False
    assert calls.names() == ["on_error", "on_close"]
    [header] = calls.headers("on_error")
    assert header["status_text"].startswith("nlsstream:GatewayConnectionError:")


def test_get_token_from_an_access_key(service: FakeTokenService) -> None:
    token = compat_nls.token.getToken(AK_ID, AK_SECRET, url=service.url)
    assert token and service.requests[0][0] == "POST"
    with pytest.raises(compat_nls.exception.GetTokenFailed) as failed:
        compat_nls.token.getToken(AK_ID, "wrong-secret", url=service.url)
    assert "wrong-secret" not in str(failed.value)
    with pytest.raises(compat_nls.exception.GetTokenFailed):
        compat_nls.token.getToken(None, None)


def test_one_blocking_callback_delays_only_its_own_session(nls_gateway: Gateway) -> None:
    """Official-SDK-style code: one session's on_sentence_end blocks (a slow database
    write); ten other sessions, each in its own thread, start, stream and complete
    meanwhile, as with the official SDK (each session has its own callback thread)."""
    long_pcm, _ = read_pcm("three_sentences.wav")
    pcm, _ = read_pcm("hello.wav")
    entered, release = threading.Event(), threading.Event()
    blocked = Calls()

    def slow_sentence_end(message: str, *args: Any) -> None:
        blocked.cb("on_sentence_end")(message)
        entered.set()
        release.wait(120)  # blocks until every other session is done

    def blocker() -> None:
        tr = compat_nls.NlsSpeechTranscriber(
            url=nls_gateway.url,
            token=nls_gateway.token,
            appkey=nls_gateway.appkey,
            on_sentence_end=slow_sentence_end,
            on_error=blocked.cb("on_error"),
            on_close=blocked.on_close,
        )
        tr.start()
        for i in range(0, len(long_pcm), 640):
            tr.send_audio(long_pcm[i : i + 640])
        # Its own callbacks may outlast stop(): only this session waits.
        with contextlib.suppress(compat_nls.StopTimeoutException):
            tr.stop()

    first = threading.Thread(target=blocker, daemon=True)
    first.start()
    try:
        assert entered.wait(60), "the blocking session never reached on_sentence_end"
        with ThreadPoolExecutor(10) as pool:
            others = list(pool.map(lambda _: transcribe(compat_nls, nls_gateway, pcm), range(10)))
        assert not release.is_set()  # all of that happened while the callback blocked
    finally:
        release.set()
    for calls in others:
        assert calls.names()[-2:] == ["on_completed", "on_close"], calls.names()
        assert calls.payloads("on_sentence_end")[0]["result"].startswith("speech ")
    first.join(60)
    assert blocked.closed.wait(WAIT)
    # The blocked session lost nothing: its later events waited for its callback.
    assert len(blocked.payloads("on_sentence_end")) == 3
    assert blocked.payloads("on_error") == []


def test_stop_and_send_audio_from_a_callback(nls_gateway: Gateway) -> None:
    """As with the official SDK's callback thread, a callback may call the blocking
    methods: here on_start sends the audio and the first on_sentence_end stops."""
    pcm, _ = read_pcm("three_sentences.wav")
    calls = Calls()
    holder: list[Any] = []
    stopped: list[bool] = []

    def on_start(message: str, *args: Any) -> None:
        assert holder[0].send_audio(pcm) is True

    def on_sentence_end(message: str, *args: Any) -> None:
        calls.cb("on_sentence_end")(message)
        if not stopped:
            stopped.append(holder[0].stop())  # does not wait for the callbacks behind it

    tr = compat_nls.NlsSpeechTranscriber(
        url=nls_gateway.url,
        token=nls_gateway.token,
        appkey=nls_gateway.appkey,
        on_start=on_start,
        on_sentence_end=on_sentence_end,
        on_completed=calls.cb("on_completed"),
        on_close=calls.on_close,
    )
    holder.append(tr)
    assert tr.start() is True
    assert calls.closed.wait(WAIT)
    assert stopped == [True]
    assert calls.names()[-2:] == ["on_completed", "on_close"]
