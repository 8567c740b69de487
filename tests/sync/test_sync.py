"""The blocking face (``nlsstream.sync``) against the local gateway over loopback:
results, typed errors, iterators, the one shared loop thread, and the refusal to block
inside a running event loop."""

from __future__ import annotations

import _thread
import asyncio
import signal
import threading
from collections.abc import AsyncIterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from helpers import read_pcm

import nlsstream
import nlsstream.sync
from nlsstream import (
    AuthenticationError,
    CallbackError,
    EventOverflowError,
    InvalidStateError,
    NlsError,
    SentenceEnd,
    StartTimeoutError,
    TaskFailedError,
)
from nlsstream.gateway import Faults, Gateway
from nlsstream.realtime.protocol import State
from nlsstream.sync import loop_thread

pytestmark = pytest.mark.nls_gateway(recognizer="span")


def kwargs(gw: Gateway, **kw: Any) -> dict[str, Any]:
    return {"appkey": gw.appkey, "token": gw.token, "url": gw.url, "stop_timeout": 5.0, **kw}


def test_transcriber_stream_stop_and_buffered_sentences(nls_gateway: Gateway) -> None:
    pcm, _ = read_pcm("three_sentences.wav")
    with nlsstream.sync.Transcriber(**kwargs(nls_gateway)) as t:
        assert t.state is State.STARTED
        sentences = t.sentences()  # subscribed before any audio: misses nothing
        t.stream(pcm, pace=None)
        result = t.stop()
        assert t.stop() == result  # as the async session: the same result again
    assert isinstance(result, nlsstream.Result) and len(result.sentences) == 3
    assert [s.text for s in sentences] == [s.text for s in result.sentences]
    assert t.result == result and t.state is State.COMPLETED
    record = nls_gateway.sessions[-1]
    assert record.outcome == "completed" and record.audio_bytes == len(pcm)


def test_sentences_iterated_while_another_thread_streams(nls_gateway: Gateway) -> None:
    pcm, _ = read_pcm("three_sentences.wav")
    got: list[SentenceEnd] = []
    with nlsstream.sync.Transcriber(**kwargs(nls_gateway)) as t, ThreadPoolExecutor(1) as pool:
        sentences = t.sentences()
        sending = pool.submit(lambda: (t.stream(pcm, pace=None), t.stop())[1])
        for s in sentences:  # ends at Completed
            got.append(s)
        result = sending.result(timeout=30)
    assert len(got) == 3 and tuple(got) == result.sentences


def test_recognizer_send_audio_callbacks_and_result(nls_gateway: Gateway) -> None:
    pcm, _ = read_pcm("weather.wav")
    seen: list[str] = []
    with nlsstream.sync.Recognizer(
        **kwargs(nls_gateway),
        enable_intermediate_result=True,
        on_start=lambda e: seen.append(type(e).__name__),
        on_completed=lambda e: seen.append(type(e).__name__),
        on_close=lambda: seen.append("close"),
    ) as r:
        events = r.events()
        for i in range(0, len(pcm), 6400):
            r.send_audio(pcm[i : i + 6400])
        result = r.stop()
    assert result.text.startswith("speech ") and result.duration == len(pcm) // 32
    assert seen == ["Started", "Completed", "close"]
    names = [type(e).__name__ for e in events]
    assert names[-1] == "Completed" and "ResultChanged" in names


def test_typed_errors_propagate(nls_gateway: Gateway) -> None:
    with pytest.raises(AuthenticationError):
        nlsstream.sync.Transcriber(**kwargs(nls_gateway, token="wrong")).__enter__()

    nls_gateway.queue_faults(Faults(start_delay=3.0))
    with pytest.raises(StartTimeoutError):
        nlsstream.sync.Transcriber(**kwargs(nls_gateway, start_timeout=0.2)).__enter__()

    nls_gateway.queue_faults(Faults(fail_status=50000000, fail_at="stop"))
    with (
        pytest.raises(TaskFailedError) as failed,
        # Without resuming (on by default), which would cure the retryable failure.
        nlsstream.sync.Transcriber(**kwargs(nls_gateway, reconnect=False)) as t,
    ):
        t.send_audio(bytes(6400))
        t.stop()
    assert failed.value.status == 50000000 and failed.value.retryable
    with pytest.raises(TaskFailedError):  # as the async session: the task's error again
        t.send_audio(bytes(640))
    with pytest.raises(InvalidStateError):
        nlsstream.sync.Transcriber(**kwargs(nls_gateway)).stop()  # before start

    with pytest.raises(ValueError, match="sample_rate"):
        nlsstream.sync.Recognizer(**kwargs(nls_gateway, sample_rate=44100))


def test_an_exception_in_the_block_aborts_the_session(nls_gateway: Gateway) -> None:
    closed = threading.Event()
    with (
        pytest.raises(KeyError),
        nlsstream.sync.Transcriber(**kwargs(nls_gateway, on_close=closed.set)) as t,
    ):
        t.send_audio(bytes(640))
        raise KeyError("boom")
    assert closed.wait(10)
    assert t.state is State.FAILED


def test_many_sessions_share_one_loop_thread(nls_gateway: Gateway) -> None:
    pcm, _ = read_pcm("hello.wav")
    threads: set[threading.Thread] = set()

    def one(_: int) -> str:
        with nlsstream.sync.Recognizer(
            **kwargs(nls_gateway), on_start=lambda e: threads.add(threading.current_thread())
        ) as r:
            r.stream(pcm, pace=None)
            return r.stop().text

    with ThreadPoolExecutor(8) as pool:
        texts = list(pool.map(one, range(24)))
    assert all(text.startswith("speech ") for text in texts)
    # Callbacks ran on the shared callback workers, never on the loop thread.
    assert loop_thread().thread not in threads
    assert all(t.name.startswith("nlsstream-callbacks-") for t in threads)
    assert loop_thread().thread.name == "nlsstream-loop"
    # Besides the test's own threads: the one loop thread, the loop's bounded default
    # executor (name resolution) and callback workers while callbacks run; nothing per
    # session.
    names = [t.name for t in threading.enumerate()]
    assert names.count("nlsstream-loop") == 1, names
    assert len(names) < 24, names


def test_blocking_call_inside_a_running_loop_raises() -> None:
    async def inside() -> None:
        nlsstream.sync.Transcriber(appkey="app", token="tok", url="ws://127.0.0.1:9/ws/v1").start()

    with pytest.raises(RuntimeError, match="running event loop"):
        asyncio.run(inside())


def test_blocking_calls_from_a_callback_work(nls_gateway: Gateway) -> None:
    """Callbacks run on a worker thread, not on the loop: they may call the blocking
    API (here ctrl() after the first sentence), and a failing one reaches on_error."""
    errors: list[NlsError] = []
    pcm, _ = read_pcm("three_sentences.wav")
    holder: list[nlsstream.sync.Transcriber] = []
    threads: set[threading.Thread] = set()
    controlled = threading.Event()

    def on_sentence_end(s: SentenceEnd) -> None:
        threads.add(threading.current_thread())
        if len(threads) == 1 and not errors:
            holder[0].ctrl(max_sentence_silence=500)  # a blocking call: allowed here
            controlled.set()
            raise KeyError("a failing callback")

    with nlsstream.sync.Transcriber(
        **kwargs(nls_gateway), on_sentence_end=on_sentence_end, on_error=errors.append
    ) as t:
        holder.append(t)
        t.stream(pcm, pace=None)
        assert controlled.wait(30)  # before Stop: ctrl() is refused once the task stops
        result = t.stop()
    assert len(result.sentences) == 3  # the session went on
    assert threads and loop_thread().thread not in threads
    assert [type(e) for e in errors] == [CallbackError]
    assert isinstance(errors[0].__cause__, KeyError)


def test_coroutine_callbacks_are_refused(nls_gateway: Gateway) -> None:
    async def on_start(e: object) -> None: ...

    with pytest.raises(TypeError, match="plain functions"):
        nlsstream.sync.Transcriber(**kwargs(nls_gateway), on_start=on_start)


def test_one_blocking_callback_delays_only_its_own_session(nls_gateway: Gateway) -> None:
    """One session's on_sentence_end blocks; ten other sessions, each sending with
    send_audio() from its own thread, complete meanwhile."""
    long_pcm, _ = read_pcm("three_sentences.wav")
    pcm, _ = read_pcm("hello.wav")
    entered, release = threading.Event(), threading.Event()
    blocked_ends: list[SentenceEnd] = []

    def slow(s: SentenceEnd) -> None:
        blocked_ends.append(s)
        entered.set()
        release.wait(120)

    def blocker() -> nlsstream.Result:
        with nlsstream.sync.Transcriber(
            **kwargs(nls_gateway, stop_timeout=120), on_sentence_end=slow
        ) as t:
            for i in range(0, len(long_pcm), 640):
                t.send_audio(long_pcm[i : i + 640])
            return t.stop()

    def other(_: int) -> nlsstream.Result:
        with nlsstream.sync.Transcriber(**kwargs(nls_gateway)) as t:
            for i in range(0, len(pcm), 640):
                t.send_audio(pcm[i : i + 640])
            return t.stop()

    with ThreadPoolExecutor(1) as one:
        blocking = one.submit(blocker)
        try:
            assert entered.wait(60), "the blocking session never reached on_sentence_end"
            with ThreadPoolExecutor(10) as pool:
                results = list(pool.map(other, range(10)))
            assert not release.is_set()  # all of that while the callback blocked
        finally:
            release.set()
        assert all(r.text.startswith("speech ") for r in results)
        assert len(blocking.result(60).sentences) == 3
    assert len(blocked_ends) == 3  # its events waited for its callback: none lost


def test_callbacks_that_fall_too_far_behind_fail_the_session(nls_gateway: Gateway) -> None:
    """The per-session callback queue is bounded (event_queue_size): beyond it the
    session is aborted with EventOverflowError, which on_error hears after the queued
    callbacks, and stop() raises."""
    pcm, _ = read_pcm("three_sentences.wav")
    errors: list[NlsError] = []
    holder: list[nlsstream.sync.Transcriber] = []
    overflowed = threading.Event()

    def blocked(e: object) -> None:  # blocks until the session has overflowed
        while holder[0].error is None and not overflowed.wait(0.01):
            pass
        overflowed.set()

    with (
        pytest.raises(EventOverflowError, match="callbacks fell behind"),
        nlsstream.sync.Transcriber(
            **kwargs(nls_gateway, reconnect=False),
            event_queue_size=2,
            enable_intermediate_result=True,
            on_result_changed=blocked,
            on_error=errors.append,
        ) as t,
    ):
        holder.append(t)
        t.stream(pcm, pace=None)
        t.stop()
    assert overflowed.is_set()
    assert [type(e) for e in errors] == [EventOverflowError]
    assert t.state is State.FAILED


# --------------------------------------------------------------- the generic bridge


class AsyncThing:
    """Any async client (as the recording clients will be): a context manager with a
    coroutine method, an async iterator and a method that may hang."""

    def __init__(self) -> None:
        self.entered = self.exited = False
        self.cancelled = threading.Event()

    async def __aenter__(self) -> AsyncThing:
        self.entered = True
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        self.exited = True

    async def add(self, a: int, b: int, timeout: float | None = None) -> int:
        await asyncio.sleep(0)
        if a < 0:
            raise InvalidStateError("negative")
        return a + b

    async def work(self, seconds: float, timeout: float = 5.0) -> float:
        """A call as long as ``seconds``, bounded by its own ``timeout`` argument."""
        await asyncio.wait_for(asyncio.sleep(seconds), timeout)
        return seconds

    async def block(self, release: threading.Event) -> None:
        """Block the loop thread itself, as a callback that blocks would."""
        release.wait(30)

    async def child(self) -> AsyncThing:
        return AsyncThing()

    async def count(self, n: int) -> AsyncIterator[int]:
        for i in range(n):
            yield i

    async def hang(self) -> None:
        try:
            await asyncio.Event().wait()
        finally:
            self.cancelled.set()


class BlockingThing(nlsstream.sync.BlockingFacade[AsyncThing]):
    call_timeout = 0.5
    add = nlsstream.sync.blocking(AsyncThing.add)
    count = nlsstream.sync.iterating(AsyncThing.count)
    hang = nlsstream.sync.blocking(AsyncThing.hang)
    work = nlsstream.sync.blocking(AsyncThing.work)
    block = nlsstream.sync.blocking(AsyncThing.block, bounded=False)


class BlockingParent(BlockingThing):
    child = nlsstream.sync.blocking(AsyncThing.child, wrap=BlockingThing)


def test_any_async_object_gets_a_blocking_face_with_bounded_waits() -> None:
    with BlockingThing(AsyncThing()) as thing:
        assert thing.wrapped.entered
        assert thing.add(2, 3) == 5
        assert list(thing.count(4)) == [0, 1, 2, 3]
        with pytest.raises(InvalidStateError, match="negative"):
            thing.add(-1, 1)
        with pytest.raises(TimeoutError, match="does a callback block"):
            thing.hang()
        assert thing.wrapped.cancelled.wait(10)  # the stuck coroutine was cancelled
    assert thing.wrapped.exited


def test_a_timeout_argument_extends_the_bound_even_by_its_default() -> None:
    thing = BlockingThing(AsyncThing())
    # Each call lasts 1 s, beyond call_timeout (0.5 s) but within its own timeout.
    assert thing.work(1.0) == 1.0  # the default timeout (5 s) counts, as a given one does
    assert thing.work(1.0, 3.0) == 1.0
    assert thing.work(1.0, timeout=3.0) == 1.0
    with pytest.raises(TimeoutError):  # the method's own timeout, well within the bound
        thing.work(10.0, timeout=0.1)


def test_even_an_unbounded_wait_ends_when_the_loop_thread_stops_running() -> None:
    runner = nlsstream.sync.LoopThread(name="test-loop")  # not the shared one
    runner.stuck_after = 0.5
    thing = BlockingThing(AsyncThing())
    thing._runner = runner
    release = threading.Event()
    try:
        with pytest.raises(TimeoutError, match="has not run"):
            thing.block(release)  # as long as it takes, but the loop itself is stuck
    finally:
        release.set()
        runner.stop()
    assert not runner.thread.is_alive()


def test_stop_waits_as_long_as_the_gateway_makes_progress(nls_gateway: Gateway) -> None:
    pcm, _ = read_pcm("three_sentences.wav")
    nls_gateway.queue_faults(Faults(event_delay=0.7))  # each sentence comes 0.7 s late
    with nlsstream.sync.Transcriber(**kwargs(nls_gateway, stop_timeout=3.0)) as t:
        t.stream(pcm, pace=None)
        t.call_timeout = 1.0  # what bounds the calls that end by themselves
        result = t.stop()  # longer than that: the gateway's progress bounds it
    assert len(result.sentences) == 3


def test_a_returned_async_object_gets_its_blocking_face() -> None:
    child = BlockingParent(AsyncThing()).child()
    assert isinstance(child, BlockingThing) and isinstance(child.wrapped, AsyncThing)
    assert child.add(1, 2) == 3 and child._runner is loop_thread()


def test_ctrl_c_during_stream_cancels_it_and_aborts_the_session(nls_gateway: Gateway) -> None:
    pcm, _ = read_pcm("three_sentences.wav")
    closed = threading.Event()
    # Python's own SIGINT handler, whatever an earlier test left installed (an event
    # loop's signal handler would swallow the interrupt: the flake of issue 17).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with (
            pytest.raises(KeyboardInterrupt),
            nlsstream.sync.Transcriber(
                **kwargs(nls_gateway),
                on_sentence_begin=lambda e: _thread.interrupt_main(),  # as if Ctrl-C
                on_close=closed.set,
            ) as t,
        ):
            t.stream(pcm, pace=1.0)  # ~9 s at real time: interrupted in the first sentence
    finally:
        signal.signal(signal.SIGINT, previous)
    assert closed.wait(10)
    assert t.state is State.FAILED
    assert t.metrics.bytes_sent < len(pcm)


def test_send_audio_does_not_wake_the_loop_per_call(
    nls_gateway: Gateway, monkeypatch: pytest.MonkeyPatch
) -> None:
    """send_audio() is a deque append: 100 calls cost the loop thread no wake-up each
    (the loop collects the queue on its own timer); the audio arrives whole and in order."""
    pcm, _ = read_pcm("hello.wav")
    loop = loop_thread().loop
    wakeups: list[object] = []
    original = loop.call_soon_threadsafe

    def counting(callback: Any, *args: Any, **kw: Any) -> Any:
        if threading.current_thread() is threading.main_thread():
            wakeups.append(callback)
        return original(callback, *args, **kw)

    with nlsstream.sync.Transcriber(**kwargs(nls_gateway)) as t:
        monkeypatch.setattr(loop, "call_soon_threadsafe", counting)
        chunks = [pcm[i : i + 640] for i in range(0, len(pcm), 640)]
        for chunk in chunks:
            t.send_audio(chunk)
        monkeypatch.undo()
        result = t.stop()
    assert len(chunks) > 50 and len(wakeups) <= 2, wakeups
    assert result.duration == len(pcm) // 32
    assert nls_gateway.sessions[-1].audio_bytes == len(pcm)
