"""The lifecycle of a session's stream: :class:`Lifecycle`.

A :class:`~nlsstream.realtime.session.Session` is the facade users call; this is what it
drives, and the one owner of the stream's state: the
:class:`~nlsstream.realtime.router.EventRouter` (the task's record and its end), the
current :class:`~nlsstream.realtime.taskrun.TaskRun` (connection and task), the
:class:`~nlsstream.realtime.sending.AudioSender` and, when resuming is on, the
:class:`~nlsstream.realtime.resume.Resumer`. It starts the first run, stops and drains
the task, ends it once however it ends (the router decides when; :meth:`_on_task_end`
then closes the connection and interrupts the audio), and on a failure a resume can
cure, has a new run take over.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Any

from ..auth import TokenProvider
from ..errors import (
    AuthenticationError,
    GatewayConnectionError,
    InvalidStateError,
    NlsError,
    ProtocolError,
    StartTimeoutError,
    StopTimeoutError,
)
from ..redaction import get_logger
from .connection import Connection
from .events import EventHub
from .options import SessionConfig
from .pacing import Metrics, Pacer
from .protocol import ClientTask, Event, Namespace, Started, State
from .resume import Resumer
from .router import EventRouter
from .sending import AudioSender
from .taskrun import TaskRun, Tokens
from .telemetry import SessionTelemetry

__all__ = ["Lifecycle"]

logger = get_logger("nlsstream.realtime.session")


class Lifecycle:
    """The running part of one session (see the module's docstring).

    ``task`` is the current task (a resume replaces it); ``router``, ``run``, ``writer``
    and ``resumer`` exist from :meth:`start` on.
    """

    def __init__(
        self,
        config: SessionConfig,
        namespace: Namespace,
        task: ClientTask,
        provider: TokenProvider,
        metrics: Metrics,
        hub: EventHub,
        *,
        callbacks: dict[type[Event], Callable[[Any], object] | None],
        on_error: Callable[[NlsError], object] | None,
        on_close: Callable[[], object] | None,
        pacer: Pacer | None,
        keep_sentences: int | None,
        max_audio_ms: int | None,
    ) -> None:
        self.config = config
        self.namespace = namespace
        self.task = task
        self.metrics = metrics
        self.tokens = Tokens(provider)
        self._hub = hub
        self._callbacks = callbacks
        self._on_error = on_error
        self._on_close = on_close
        self._pacer = pacer
        self._keep_sentences = keep_sentences
        self._max_audio_ms = max_audio_ms
        self.router: EventRouter | None = None
        self.run: TaskRun | None = None
        self.writer: AudioSender | None = None
        self.resumer: Resumer | None = None
        self.telemetry: SessionTelemetry | None = None
        self.opened = False
        self._error_raised = False  # the task's error reached the user (raised or aborted)
        self._closed = False  # on_close was called
        self._closer: asyncio.Task[None] | None = None  # closes the connection at the end

    @property
    def task_id(self) -> str:
        return self.task.task_id

    @property
    def state(self) -> State:
        return self.task.state

    @property
    def ended(self) -> bool:
        return self.router is not None and self.router.ended

    def _cause_of(self, timed_out: StopTimeoutError) -> NlsError:
        resumer = self.resumer
        return timed_out if resumer is None else resumer.real_cause(timed_out)

    async def start(self) -> None:
        """Connect, send Start and wait for Started (see ``Session.start``)."""
        if self.opened:
            raise InvalidStateError("a session can be started only once; create a new one")
        self.opened = True
        config = self.config
        if self._pacer is None:
            self._pacer = Pacer.for_loop()
        self.telemetry = SessionTelemetry.begin(self.namespace.name, config.url)
        if config.reconnect is not None:
            seconds = max(config.reconnect.replay_seconds, (self._max_audio_ms or 0) / 1000)
            replay_bytes = int(seconds * 2 * config.sample_rate)
            self.resumer = Resumer(config.reconnect, config.sample_rate, replay_bytes)
        router = self.router = EventRouter(
            self.metrics,
            callbacks=self._callbacks,
            on_error=self._on_error,
            on_end=self._on_task_end,
            hub=self._hub,
            keep_sentences=self._keep_sentences,
            rebase=self._rebase if self.resumer is not None else None,
            recover=self._recover if self.resumer is not None else None,
            observe=self.telemetry.event if self.telemetry is not None else None,
        )
        try:
            run = self.run = self._new_run(self.task)
            conn = await run.connect(self.tokens)
            self.writer = AudioSender(
                conn,
                router,
                self.metrics,
                pacer=self._pacer,
                sample_rate=config.sample_rate,
                max_ahead_bytes=config.max_ahead_bytes,
                gate=self.check_audio,
                failed=self._send_failed,
                replay=self.resumer.replay if self.resumer is not None else None,
            )
            timed_out = await self._start(run)
            if timed_out is not None:
                router.fail(timed_out)
            await self.raise_error()
        except BaseException:
            await self.abort()
            raise

    def _new_run(self, task: ClientTask) -> TaskRun:
        assert self.router is not None
        return TaskRun(task, self.router, self.config, on_lost=self._on_connection_lost)

    async def _start(self, run: TaskRun) -> StartTimeoutError | None:
        """Send Start for ``run``'s task and wait for Started (see TaskRun.wait_started)."""
        self.send_text(run.task.start())
        return await run.wait_started()

    async def stop(self, timeout: float | None) -> None:
        """Send Stop (once) and wait for the end of the task (see ``Session.stop``);
        raises the task's error if it failed."""
        router = self.router
        if router is None:
            raise InvalidStateError("stop() called before the session was started")
        loop = asyncio.get_running_loop()
        overall = loop.time() + timeout if timeout is not None else float("inf")
        await self.resume_done(overall)
        if not router.ended and self.state is State.STARTED:
            if self.writer is not None:
                self.writer.interrupt("stop() was called while stream() was still sending")
            text = self.task.stop()
            router.stop_sent_at = loop.time()
            with contextlib.suppress(GatewayConnectionError):
                self.send_text(text)  # on failure the task's error is raised below
        if not router.ended and router.failing is None:
            await self._wait_completed(router, timeout, overall)
        await self.raise_error()

    async def _wait_completed(
        self, router: EventRouter, timeout: float | None, overall: float
    ) -> None:
        """Wait for the end of the task while the gateway makes progress (see stop())."""
        loop = asyncio.get_running_loop()
        began = loop.time()
        while not router.ended:
            if await self.resume_done(overall):
                began = loop.time()  # the new task's own progress counts from here
            now = loop.time()
            heard = max(began, router.stop_sent_at or began, router.last_message_at or began)
            left = min(heard + self.config.stop_timeout, overall) - now
            if left <= 0:
                if now >= overall:
                    why = f"within {timeout:g} s (the timeout given to stop())"
                else:
                    why = f"after Stop: it sent nothing for {self.config.stop_timeout:g} s"
                timed_out = StopTimeoutError(f"gateway did not complete task {self.task_id} {why}")
                router.fail(self._cause_of(timed_out))
                return
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(router.ended_future), left)

    async def raise_error(self) -> None:
        """Raise the task's error, if it failed, once ``on_error`` has heard of it."""
        router = self.router
        assert router is not None
        if router.error is not None or router.failing is not None:
            await router.settle()
            error = router.error or router.failing
            assert error is not None
            self._error_raised = True
            raise error

    def error_seen(self) -> bool:
        """Whether the task's error reached user code (raised by a call or an iterator)."""
        return self._error_raised or self._hub.error_delivered

    async def abort(self) -> None:
        """Close the connection now, without Stop (see ``Session.abort``)."""
        router, run = self.router, self.run
        if self.resumer is not None:
            self.resumer.cancel()
        if router is not None:
            if not router.ended:
                # The caller chose to abort: nothing to report or to re-raise.
                error = InvalidStateError(f"session for task {self.task_id} was aborted")
                router.fail(error, report=False)
                self._error_raised = True
            router.close()  # callbacks still waiting to run are dropped
        if run is not None and run.conn is not None:
            run.conn.abort()
        await self.close()

    async def close(self) -> None:
        """After the task ended: wait (bounded) for the closing of the connection that
        the end of the task began, and for ``on_close``."""
        closer = self._closer
        if closer is not None:
            await asyncio.wait([closer])
        else:
            await self._call_on_close()

    async def _close_connection(self, run: TaskRun) -> None:
        """The task is over: the closing handshake (code 1000, §1.4), bounded by
        ``stop_timeout``, then ``on_close`` once what is left to report has been."""
        await run.close()
        if self.router is not None:
            await self.router.settle()
        await self._call_on_close()

    async def _call_on_close(self) -> None:
        run = self.run
        if self._closed or not self.opened or run is None or run.conn is None:
            return
        self._closed = True
        if self._on_close is not None and self.router is not None:
            await self.router.call(self._on_close, "on_close")

    # ------------------------------------------------------------------ the task's end

    def _on_task_end(self, error: NlsError | None) -> None:
        """Called once by the router when the task ends, however it ended."""
        if isinstance(error, AuthenticationError):
            self.tokens.invalidate()
        if self.telemetry is not None:
            self.telemetry.end(self.task_id, error, self.metrics)
        if self.resumer is not None:
            self.resumer.cancel()
        if self.writer is not None:
            self.writer.interrupt(
                f"task {self.task_id} ended ({self.state.value}) before all audio was sent",
                error,
            )
        run = self.run
        if run is not None and run.conn is not None:
            if isinstance(error, (StartTimeoutError, StopTimeoutError, ProtocolError)):
                run.conn.abort()  # the gateway is unresponsive or broken: no closing handshake
            self._closer = asyncio.get_running_loop().create_task(
                self._close_connection(run), name=f"nlsstream-close-{self.task_id}"
            )

    def _on_connection_lost(self, run: TaskRun) -> None:
        router = self.router
        if router is None or router.ended:
            return
        error = run.loss()
        if not self._recover(error):
            router.fail(error)

    # ------------------------------------------------------------------ resuming

    def resuming(self) -> bool:
        return self.resumer is not None and self.resumer.resuming

    async def resume_done(self, deadline: float = float("inf")) -> bool:
        """Wait for a resume in progress, if any, until ``deadline`` (the loop's clock);
        True if there was one. A resume still under way at the deadline ends the session
        with the failure that started it."""
        resumer = self.resumer
        if resumer is None:
            return False
        left = deadline - asyncio.get_running_loop().time()
        if await resumer.wait(left if left != float("inf") else None):
            return True
        if resumer.resuming and self.router is not None:
            timed_out = StopTimeoutError(
                f"task {self.task_id} was still resuming when the timeout given to stop() passed"
            )
            self.router.fail(self._cause_of(timed_out))
        return False

    def _rebase(self, event: Event) -> Event | None:
        """The router's ``rebase``: ``event`` on the whole stream's timeline."""
        assert self.resumer is not None and self.router is not None
        if isinstance(event, Started) and self.resumer.resuming:
            # A resumed task's start is the session's news, not the user's.
            if not self.router.started_future.done():
                self.router.started_future.set_result(None)
            return None
        return self.resumer.rebase(event)

    def _recover(self, error: NlsError) -> bool:
        """The router's ``recover``: take over ``error`` by resuming, if it is one a new
        connection can cure and the task is under way."""
        router, resumer = self.router, self.resumer
        if resumer is None or router is None or router.ended:
            return False
        if resumer.resuming:
            # The attempt under way failed: its wait for Started learns of it now.
            resumer.attempt_error = error
            if not router.started_future.done():
                router.started_future.set_result(None)
            return True
        if not resumer.cures(error, self.tokens.refreshable):
            return False
        if not router.started_future.done() or self.writer is None:
            return False  # still starting: start() reports the failure itself
        resumer.task = asyncio.get_running_loop().create_task(
            self._resume(error), name=f"nlsstream-resume-{self.task_id}"
        )
        return True

    async def _send_failed(self, conn: Connection) -> Connection:
        """The writer's ``failed``: after a send on ``conn`` failed, the connection of the
        resume that took over, or the task's error (else the loss) raised."""
        run = self.run
        assert run is not None
        if conn is run.conn and not self.resuming():
            # The transport failed under the write; its connection_lost() (which starts
            # the resume) runs on a later loop iteration.
            await conn.wait_closed(self.config.stop_timeout)
        await self.resume_done()
        run = self.run
        assert run is not None
        if self.router is not None and not self.router.ended and run.conn not in (conn, None):
            assert run.conn is not None
            return run.conn
        await self.raise_error()
        raise run.lost_error()

    async def _resume(self, cause: NlsError) -> None:
        """A new run takes over from the failed one (see :class:`Reconnect`)."""
        router, writer, resumer, old = self.router, self.writer, self.resumer, self.run
        assert router is not None and writer is not None and resumer is not None
        assert old is not None
        loop = asyncio.get_running_loop()
        lost_at = loop.time()
        previous = self.task_id
        if isinstance(cause, AuthenticationError):
            self.tokens.invalidate()  # the new connection asks the provider for a fresh one
        writer.hold()
        old.retire()
        replay = resumer.replay_for(cause, self.metrics.bytes_sent)
        if isinstance(replay, NlsError):
            router.fail(replay)
            return
        logger.info("task %s: %s; resuming", previous, cause)
        run = await resumer.reconnect(cause, self._attempt)
        if isinstance(run, NlsError):
            router.fail(run)
            return
        assert run.conn is not None
        writer.retarget(run.conn, replay)  # the new task recognises the stream from there on
        if router.stop_sent_at is not None:
            self.send_text(self.task.stop())
        gap = loop.time() - lost_at
        namespace = self.namespace.name
        router.deliver(resumer.resumed(namespace, self.task_id, previous, cause, gap, len(replay)))

    async def _attempt(self) -> TaskRun | NlsError:
        """One attempt: a new run (connection and task, same parameters) up to Started."""
        resumer = self.resumer
        assert resumer is not None
        resumer.attempt_error = None
        task = self.task = ClientTask(self.namespace, self.config.appkey, self.config.params)
        run = self.run = self._new_run(task)
        try:
            await run.connect(self.tokens)
            timed_out = await self._start(run)
            if timed_out is not None:
                resumer.attempt_error = timed_out
        except NlsError as exc:
            resumer.attempt_error = exc
        if resumer.attempt_error is None and task.state is State.STARTED:
            return run
        run.retire()
        return resumer.attempt_error or run.lost_error()

    # ------------------------------------------------------------------ sending

    def check_audio(self) -> None:
        """Raise if audio may not be sent now (the task's error, or the wrong state)."""
        router = self.router
        error = None if router is None else router.error or router.failing
        if error is not None and not isinstance(error, InvalidStateError):
            self._error_raised = True
            raise error
        if not self.resuming():  # audio sent meanwhile waits for the new task
            self.task.audio()

    def send_text(self, text: str) -> None:
        run, router = self.run, self.router
        assert run is not None and router is not None
        try:
            run.send_text(text)
        except ConnectionError:
            error = run.lost_error()
            if not self._recover(error):
                router.fail(error)
            raise error from None
