"""Every error path of the client sessions, against the local gateway's fault injection:
typed errors, useful messages without the token, and nothing left behind."""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import soundfile
from helpers import wait_until
from websockets.asyncio.server import ServerConnection, serve

from nlsstream import (
    AudioFormatError,
    AuthenticationError,
    GatewayConnectionError,
    InvalidStateError,
    NlsError,
    ProtocolError,
    Recognizer,
    StartTimeoutError,
    StopTimeoutError,
    TaskFailedError,
    Transcriber,
)
from nlsstream.gateway import Faults, Gateway
from nlsstream.realtime.protocol import TRANSCRIBER, State, build_event

FIXTURES = Path(__file__).parents[1] / "fixtures"
THREE = str(FIXTURES / "three_sentences.wav")
HELLO = str(FIXTURES / "hello.wav")
TOKEN = "tok-SECRET-1234567890"


@pytest.fixture
async def gw() -> AsyncIterator[Gateway]:
    async with Gateway(tokens=[TOKEN], appkeys=["app"], recognizer="span") as g:
        yield g


def kw(gw: Gateway, **extra: Any) -> dict[str, Any]:
    return {"url": gw.url, "start_timeout": 2.0, "stop_timeout": 2.0, **extra}


async def settle(gw: Gateway, before: set[asyncio.Task[Any]]) -> None:
    current = asyncio.current_task()
    left: set[asyncio.Task[Any]] = set()
    for _ in range(300):
        left = {t for t in asyncio.all_tasks() - before if t is not current and not t.done()}
        if not left and not gw._connections:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"left behind: tasks {left}, connections {len(gw._connections)}")


def no_secret(error: BaseException) -> None:
    text = f"{error} {error!r} {getattr(error, 'status_text', '')}"
    assert TOKEN not in text


# --------------------------------------------------------------------------- handshake


async def test_bad_token_is_an_authentication_error_with_redacted_body(gw: Gateway) -> None:
    class Provider:
        def __init__(self) -> None:
            self.invalidated: list[str | None] = []

        async def get_token(self) -> str:
            return "wrong-" + TOKEN

        def invalidate(self, token: str | None = None) -> None:
            self.invalidated.append(token)

    provider = Provider()
    errors: list[NlsError] = []
    closed: list[bool] = []
    before = asyncio.all_tasks()
    with pytest.raises(AuthenticationError) as info:
        async with Transcriber(
            "app", provider, on_error=errors.append, on_close=lambda: closed.append(True), **kw(gw)
        ):
            pytest.fail("must not get here")
    err = info.value
    assert err.http_status == 403
    assert "403" in str(err) and gw.url in str(err)
    assert "ACCESS_DENIED" in err.status_text
    assert "wrong-" not in str(err) and "wrong-" not in err.status_text
    no_secret(err)
    assert err.retryable
    assert provider.invalidated == ["wrong-" + TOKEN]
    assert closed == []  # never connected, so never closed
    await settle(gw, before)


async def test_task_failed_40000001_is_an_authentication_error(gw: Gateway) -> None:
    gw.queue_faults(Faults(fail_status=40000001, fail_at="start"))
    with pytest.raises(AuthenticationError) as info:
        async with Recognizer("app", TOKEN, **kw(gw)):
            pass
    assert info.value.status == 40000001 and info.value.task_id
    no_secret(info.value)


async def test_connection_refused() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]  # bound but not listening: connections are refused
        url = f"ws://127.0.0.1:{port}/ws/v1"
        with pytest.raises(GatewayConnectionError, match=f"cannot connect to {url}") as info:
            async with Transcriber("app", TOKEN, url=url):
                pass
    assert info.value.retryable
    no_secret(info.value)


async def test_connect_timeout_when_the_server_never_answers() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(100000)  # swallow the upgrade request, never answer

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        # The handshake gets what is left of connect_timeout after the token: 0.3 s, or a
        # hair less on a busy machine ("0.298 s").
        with pytest.raises(
            GatewayConnectionError, match=r"timed out after 0\.(3|29\d*) s connecting"
        ):
            async with Recognizer(
                "app", TOKEN, url=f"ws://127.0.0.1:{port}/ws/v1", connect_timeout=0.3
            ):
                pass
    finally:
        server.close()
        await server.wait_closed()


async def test_non_websocket_endpoint_is_a_connection_error(gw: Gateway) -> None:
    with pytest.raises(GatewayConnectionError, match="HTTP 404"):
        async with Recognizer("app", TOKEN, url=gw.url.replace("/ws/v1", "/nope")):
            pass


# --------------------------------------------------------------------------- task failures


async def test_task_failed_at_start(gw: Gateway) -> None:
    gw.queue_faults(Faults(fail_status=40000005, fail_at="start"))
    errors: list[NlsError] = []
    before = asyncio.all_tasks()
    t = Transcriber("app", TOKEN, on_error=errors.append, **kw(gw))
    with pytest.raises(TaskFailedError) as info:
        async with t:
            pass
    err = info.value
    assert (err.status, err.task_id, err.retryable) == (40000005, t.task_id, True)
    assert "40000005" in str(err) and "TOO_MANY_REQUESTS" in str(err)
    assert errors == [err]
    assert t.state is State.FAILED
    await settle(gw, before)


async def test_task_failed_mid_stream_reaches_stream_iterators_and_stop(gw: Gateway) -> None:
    gw.queue_faults(Faults(fail_status=41040201, fail_at="audio", fail_after_bytes=64000))
    errors: list[NlsError] = []
    before = asyncio.all_tasks()
    async with Transcriber("app", TOKEN, on_error=errors.append, **kw(gw)) as t:
        sentences = t.sentences()
        events = t.events()
        with pytest.raises(TaskFailedError) as info:
            await t.stream(THREE, pace=20)
        err = info.value
        assert err.status == 41040201 and err.task_id == t.task_id
        with pytest.raises(TaskFailedError):
            async for _ in sentences:
                pass
        seen: list[Any] = []
        with pytest.raises(TaskFailedError):
            async for e in events:
                seen.append(e)
        assert seen[-1].name == "TaskFailed"
        with pytest.raises(TaskFailedError):
            await t.stop()
        with pytest.raises(TaskFailedError):
            await t.send_audio(b"\x00\x00")
        # An iterator created after the failure raises at once.
        with pytest.raises(TaskFailedError):
            await t.events().__anext__()
    assert errors == [err]
    await settle(gw, before)


async def test_failure_not_yet_seen_is_raised_when_leaving_the_block(gw: Gateway) -> None:
    gw.queue_faults(Faults(fail_status=50000000, fail_at="audio", fail_after_bytes=640))
    with pytest.raises(TaskFailedError) as info:
        async with Recognizer("app", TOKEN, reconnect=False, **kw(gw)) as r:
            await r.send_audio(b"\x00\x00" * 3200)
            await wait_until(lambda: r.state is State.FAILED)
    assert info.value.retryable


# --------------------------------------------------------------------------- connection loss


async def test_connection_dropped_mid_stream(gw: Gateway) -> None:
    gw.queue_faults(Faults(drop_at="audio", drop_after_bytes=32000))
    errors: list[NlsError] = []
    closed: list[bool] = []
    before = asyncio.all_tasks()
    async with Transcriber(
        "app",
        TOKEN,
        on_error=errors.append,
        on_close=lambda: closed.append(True),
        reconnect=False,
        **kw(gw),
    ) as t:
        it = t.sentences()
        with pytest.raises(GatewayConnectionError) as info:
            await t.stream(THREE, pace=50)
        with pytest.raises(GatewayConnectionError):
            async for _ in it:
                pass
    assert "lost during task" in str(info.value) and t.task_id in str(info.value)
    assert errors == [info.value]
    assert closed == [True]
    no_secret(info.value)
    await settle(gw, before)


async def test_connection_dropped_during_stop(gw: Gateway) -> None:
    gw.queue_faults(Faults(drop_at="stop"))
    async with Recognizer("app", TOKEN, reconnect=False, **kw(gw)) as r:
        await r.stream(HELLO, pace=None)
        with pytest.raises(GatewayConnectionError, match=r"lost during task .*stopping"):
            await r.stop()


async def test_malformed_server_json_aborts_with_protocol_error(gw: Gateway) -> None:
    gw.queue_faults(Faults(malformed_at="audio", malformed_after_bytes=16000))
    errors: list[NlsError] = []
    before = asyncio.all_tasks()
    async with Transcriber("app", TOKEN, on_error=errors.append, **kw(gw)) as t:
        with pytest.raises(ProtocolError, match=r"invalid JSON.*connection aborted") as info:
            await t.stream(THREE, pace=None)
            await t.stop()
    assert errors == [info.value]
    assert isinstance(info.value.__cause__, ProtocolError)
    await settle(gw, before)
    assert gw.sessions[-1].outcome != "completed"


async def test_malformed_json_at_start(gw: Gateway) -> None:
    gw.queue_faults(Faults(malformed_at="start"))
    with pytest.raises(ProtocolError):
        async with Recognizer("app", TOKEN, **kw(gw)):
            pass


# --------------------------------------------------------------------------- timeouts


@pytest.mark.parametrize("fault", [Faults(start_delay=1.0), Faults(stall_at="start")])
async def test_start_timeout(gw: Gateway, fault: Faults) -> None:
    gw.queue_faults(fault)
    errors: list[NlsError] = []
    before = asyncio.all_tasks()
    t = Transcriber("app", TOKEN, start_timeout=0.3, on_error=errors.append, url=gw.url)
    with pytest.raises(StartTimeoutError, match=r"within 0.3 s") as info:
        async with t:
            pass
    assert t.task_id in str(info.value)
    assert errors == [info.value]
    await settle(gw, before)


@pytest.mark.parametrize("fault", [Faults(complete_delay=1.0), Faults(stall_at="stop")])
async def test_stop_timeout(gw: Gateway, fault: Faults) -> None:
    gw.queue_faults(fault)
    before = asyncio.all_tasks()
    async with Recognizer("app", TOKEN, url=gw.url, stop_timeout=5) as r:
        await r.send_audio(b"\x00\x00" * 1600)
        with pytest.raises(StopTimeoutError, match=r"within 0.3 s \(the timeout given to stop"):
            await r.stop(timeout=0.3)
        assert r.state is State.FAILED
    await settle(gw, before)


async def test_stop_timeout_counts_silence_not_the_whole_wait(gw: Gateway) -> None:
    gw.queue_faults(Faults(stall_at="stop"))
    async with Recognizer("app", TOKEN, url=gw.url, stop_timeout=0.3) as r:
        await r.send_audio(b"\x00\x00" * 1600)
        with pytest.raises(StopTimeoutError, match=r"it sent nothing for 0.3 s"):
            await r.stop()


async def test_stop_waits_while_the_gateway_makes_progress(gw: Gateway) -> None:
    """A gateway working through a backlog keeps sending results: stop() waits for it as
    long as it makes progress, even when the whole wait is far longer than stop_timeout
    (on main before this, a fixed stop_timeout ran out mid-backlog)."""
    delay = 0.4
    gw.queue_faults(Faults(event_delay=delay))
    async with Transcriber("app", TOKEN, url=gw.url, stop_timeout=4 * delay) as t:
        await t.stream(THREE, pace=None)
        await t.stream(THREE, pace=None)
        result = await t.stop()
    assert len(result.sentences) == 6
    assert t.metrics.stop_to_completed_ms is not None
    assert t.metrics.stop_to_completed_ms > 4 * delay * 1000  # longer than stop_timeout


async def test_slow_completion_within_the_timeout_is_fine(gw: Gateway) -> None:
    gw.queue_faults(Faults(complete_delay=0.3))
    async with Recognizer("app", TOKEN, **kw(gw)) as r:
        await r.stream(HELLO, pace=None)
        result = await r.stop()
    assert result.text
    assert r.metrics.stop_to_completed_ms is not None and r.metrics.stop_to_completed_ms >= 300


# --------------------------------------------------------------------------- cancellation


@pytest.mark.parametrize("where", ["connecting", "streaming", "iterating", "stopping"])
async def test_cancellation_leaves_no_task_and_no_socket(gw: Gateway, where: str) -> None:
    if where == "connecting":
        gw.queue_faults(Faults(start_delay=1.0))
    if where == "stopping":
        gw.queue_faults(Faults(complete_delay=1.0))
    closed: list[bool] = []
    reached = asyncio.Event()
    before = asyncio.all_tasks()

    async def user() -> None:
        t = Transcriber(
            "app", TOKEN, on_close=lambda: closed.append(True), **kw(gw, start_timeout=10)
        )
        if where == "connecting":
            reached.set()
        async with t:
            if where == "streaming":
                reached.set()
                await t.stream(THREE, pace=1)
            elif where == "iterating":
                asyncio.get_running_loop().call_soon(reached.set)
                async for _ in t.events():
                    pass
            else:
                await t.stream(HELLO, pace=None)
                reached.set()
                await t.stop(timeout=10)

    task = asyncio.create_task(user())
    await asyncio.wait_for(reached.wait(), 5)
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await settle(gw, before)
    if where != "connecting":
        assert closed == [True]


async def test_exception_in_block_aborts_without_stop(gw: Gateway) -> None:
    before = asyncio.all_tasks()
    with pytest.raises(ZeroDivisionError):
        async with Transcriber("app", TOKEN, **kw(gw)) as t:
            it = t.events()
            await t.send_audio(b"\x00\x00" * 1600)
            1 / 0  # noqa: B018
    with pytest.raises(InvalidStateError, match="aborted"):
        await it.__anext__()
    await settle(gw, before)
    record = gw.sessions[-1]
    assert "TranscriptionCompleted" not in record.events
    assert record.outcome in ("disconnected", "failed")


async def test_backed_up_connection_holds_its_stream_without_stalling_others(
    gw: Gateway,
) -> None:
    """A gateway that stops reading: TCP backs up, the transport pauses, the session
    holds its paced stream (counted in stalled_ticks, nothing dropped) while another
    session on the same pacer streams to completion."""
    hold = asyncio.Event()

    async def deaf_gateway(ws: ServerConnection) -> None:
        start = json.loads(await ws.recv())
        task_id = start["header"]["task_id"]
        await ws.send(json.dumps(build_event(TRANSCRIBER.name, TRANSCRIBER.started, task_id)))
        await hold.wait()  # never read again: with max_queue=1 the server stops reading

    async with serve(
        deaf_gateway, "127.0.0.1", 0, max_queue=1, compression=None, close_timeout=0.1
    ) as server:
        port = next(iter(server.sockets)).getsockname()[1]
        try:
            slow = Transcriber("app", TOKEN, url=f"ws://127.0.0.1:{port}", stop_timeout=0.5)
            await slow.start()
            # 10 minutes of audio at 500x: more than the loopback socket buffers hold.
            sending = asyncio.create_task(slow.stream(b"\x00\x01" * 16000 * 600, pace=500))
            await wait_until(lambda: slow.metrics.stalled_ticks > 0)
            async with Transcriber("app", TOKEN, **kw(gw)) as fast:
                await fast.stream(HELLO, pace=20)
                result = await fast.stop()
            assert fast.metrics.stalled_ticks == 0
            assert fast.metrics.bytes_sent == gw.sessions[-1].audio_bytes > 0
            assert result.duration > 0
            assert not sending.done()
            await slow.abort()
            with pytest.raises(InvalidStateError, match="buffered bytes were not sent"):
                await asyncio.wait_for(sending, 2)
        finally:
            hold.set()


# --------------------------------------------------------------------------- the 60 s limit


async def test_recognizer_refuses_a_recording_longer_than_60_s_before_sending(
    gw: Gateway,
) -> None:
    """On main before this, the audio went out and stop() timed out before the gateway's
    TOO_LONG_SPEECH: the client knew the length before sending."""
    too_long = np.zeros(16000 * 61, dtype=np.int16)
    async with Recognizer("app", TOKEN, **kw(gw)) as r:
        with pytest.raises(
            AudioFormatError, match=r"61.0 s of audio is more than Recognizer's limit of 60 s"
        ):
            await r.stream(too_long, pace=None)
        assert r.metrics.bytes_sent == 0
        await r.send_audio(b"\x00\x00" * 16000 * 30)
        with pytest.raises(AudioFormatError, match=r"30.0 s left\); nothing was sent"):
            await r.send_audio(b"\x00\x00" * 16000 * 31)
        assert r.state is State.STARTED
        await r.stop()


async def test_recognizer_stops_a_live_source_at_60_s_with_a_clear_error(gw: Gateway) -> None:
    async def live() -> AsyncIterator[bytes]:
        for _ in range(70):
            yield b"\x00\x00" * 16000  # one second

    async with Recognizer("app", TOKEN, **kw(gw)) as r:
        with pytest.raises(AudioFormatError, match=r"stopped sending at Recognizer's limit"):
            await r.stream(live(), pace=None)
        assert r.metrics.bytes_sent == 2 * 16000 * 60
        result = await r.stop()  # what the 60 s held, not a timeout
    assert result.duration == 60_000


async def test_a_live_source_within_what_is_left_of_the_60_s_is_not_refused(gw: Gateway) -> None:
    async def live() -> AsyncIterator[bytes]:
        for _ in range(10):
            yield b"\x00\x00" * 16000

    async with Recognizer("app", TOKEN, **kw(gw)) as r:
        await r.send_audio(b"\x00\x00" * 16000 * 40)
        await r.stream(live(), pace=None)  # 10 s more: 50 s in all
        await r.stop()
    assert r.metrics.bytes_sent == 2 * 16000 * 50


# --------------------------------------------------------------------------- keepalive


def on_hold(seconds: float) -> AsyncIterator[bytes]:
    """A live call: a second of audio, then nothing for ``seconds`` (the caller is on
    hold: the pause is the scenario, not a synchronisation), then another second."""

    async def source() -> AsyncIterator[bytes]:
        yield b"\x01\x00" * 16000
        await asyncio.sleep(seconds)
        yield b"\x01\x00" * 16000

    return source()


@pytest.mark.parametrize("pace", [None, 1.0], ids=["unpaced", "paced"])
async def test_keepalive_carries_a_live_source_through_a_pause(pace: float | None) -> None:
    """On main before keepalive, a pause longer than the gateway's idle timeout ended the
    task with 40000004."""
    gateway = Gateway(tokens=[TOKEN], appkeys=["app"], recognizer="span", idle_timeout=1.0)
    async with gateway as g, Transcriber("app", TOKEN, url=g.url, keepalive=0.3) as t:
        await t.stream(on_hold(1.6), pace=pace)  # 60 % longer than the idle timeout
        await t.stop()
    assert t.metrics.keepalive_bytes > 0
    # Silence went out at about real time while the source was quiet (a bound, not a
    # timing target: 1.6 s of pause can hold at most ~1.3 s of silence plus a tick).
    assert t.metrics.keepalive_bytes <= 2 * 16000 * 1.6
    assert t.metrics.bytes_sent == 2 * 32000 + t.metrics.keepalive_bytes


async def test_without_keepalive_a_pause_ends_the_task_with_the_idle_timeout() -> None:
    async with Gateway(tokens=[TOKEN], appkeys=["app"], recognizer="span", idle_timeout=1.0) as g:
        t = Transcriber("app", TOKEN, url=g.url, keepalive=False, reconnect=False)

        async def until_given_up() -> AsyncIterator[bytes]:
            # A second of audio, then a pause as long as the gateway takes to end the
            # task (bounded: with keepalive wrongly on, it never does).
            yield b"\x01\x00" * 16000
            await wait_until(lambda: t.state is State.FAILED)
            yield b"\x01\x00" * 16000

        with pytest.raises(TaskFailedError) as info:
            async with t:
                await t.stream(until_given_up(), pace=None)
    assert info.value.status == 40000004
    assert t.metrics.keepalive_bytes == 0


async def test_keepalive_is_validated() -> None:
    with pytest.raises(ValueError, match="keepalive must be"):
        Transcriber("app", TOKEN, keepalive=-1)


async def test_a_failure_behind_a_slow_callback_reaches_stream_as_itself(gw: Gateway) -> None:
    """A coroutine callback still running holds later events back, the TaskFailed among
    them; stream() sending meanwhile gets that TaskFailedError (on main before this, an
    InvalidStateError 'cannot send audio while the task is failed' lost it)."""
    release = asyncio.Event()

    async def slow(_: Any) -> None:
        await asyncio.wait_for(release.wait(), 30)

    async def live() -> AsyncIterator[bytes]:
        pcm = soundfile.read(THREE, dtype="int16")[0].tobytes()
        for i in range(0, len(pcm), 3200):
            yield pcm[i : i + 3200]
            await asyncio.sleep(0.005)  # a live source, about 20x real time

    gw.queue_faults(Faults(fail_status=41040201, fail_at="audio", fail_after_bytes=2 * 16000 * 4))
    try:
        with pytest.raises(TaskFailedError) as info:
            async with Transcriber("app", TOKEN, on_sentence_end=slow, **kw(gw)) as t:
                await t.stream(live(), pace=None)
    finally:
        release.set()
    assert info.value.status == 41040201
