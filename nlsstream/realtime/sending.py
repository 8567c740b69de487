"""How a session's audio leaves: now, paced, or as fast as the socket takes it.

:class:`AudioSender` is the one way out for a session's audio once it is connected:
unpaced binary messages (``send_audio``), 640-byte frames as fast as the socket takes
them (``stream(pace=None)``), frames paced by the event loop's shared
:class:`~nlsstream.realtime.pacing.Pacer` (``stream(pace=1.0)``; the pacer writes them
and counts them, one write per session per tick), keepalive silence, and a resume's
replay. Each byte is counted in the session's :class:`~nlsstream.realtime.pacing.Metrics`
once, where it is written. Before each frame it asks the session whether audio may still
go out (``gate``), so nothing is sent before Started or after the task ended; a paced
stream that the task's end interrupts fails with the reason (:meth:`AudioSender.interrupt`)
and says how much audio was not sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import (
    AsyncGenerator,
    AsyncIterable,
    AsyncIterator,
    Awaitable,
    Callable,
    Iterator,
)
from contextlib import aclosing, contextmanager

from .. import audio
from ..audio import FRAME_BYTES, Framer
from ..errors import AudioFormatError, InvalidStateError
from .connection import Connection
from .live import AudioQueue
from .pacing import Metrics, PacedStream, Pacer
from .resume import ReplayBuffer
from .router import EventRouter

__all__ = ["AudioLimit", "AudioSender"]

# Keepalive silence goes out in pieces of 1/10 s, one piece every 1/10 s.
_KEEPALIVE_PER_S = 10


class AudioLimit:
    """The most audio one task of ``owner`` takes (a Recognizer's 60 s), against the
    audio ``metrics`` say was sent."""

    def __init__(self, owner: str, max_ms: int, sample_rate: int, metrics: Metrics) -> None:
        self._owner = owner
        self._max_bytes = max_ms * 2 * sample_rate // 1000
        self._bytes_per_s = 2 * sample_rate
        self._metrics = metrics

    def left(self) -> int:
        """PCM bytes the task may still take."""
        return max(0, self._max_bytes - self._metrics.bytes_sent)

    def text(self) -> str:
        seconds = self._max_bytes // self._bytes_per_s
        return f"{self._owner}'s limit of {seconds} s of audio per task"

    def check(self, size: int) -> None:
        """Refuse ``size`` bytes, before any is sent, if they do not fit."""
        left = self.left()
        if size > left:
            ms = size * 1000 // self._bytes_per_s
            raise AudioFormatError(
                f"{ms / 1000:.1f} s of audio is more than {self.text()} "
                f"({left * 1000 // self._bytes_per_s / 1000:.1f} s left); nothing was "
                "sent: use a Transcriber for longer audio"
            )


class AudioSender:
    """The audio path of one connected session.

    ``gate()`` raises if audio may not be sent now. ``failed(conn)``, after a send on
    ``conn`` failed, returns the connection that took over (a resume) or raises why the
    task cannot go on. A session that can resume gives its ``replay`` buffer, which is
    handed all audio as it goes out.
    """

    def __init__(
        self,
        conn: Connection,
        router: EventRouter,
        metrics: Metrics,
        *,
        pacer: Pacer,
        sample_rate: int,
        max_ahead_bytes: int,
        gate: Callable[[], None],
        failed: Callable[[Connection], Awaitable[Connection]],
        replay: ReplayBuffer | None = None,
    ) -> None:
        self.conn = conn
        self._router = router
        self._metrics = metrics
        self._pacer = pacer
        self.sample_rate = sample_rate
        self.max_ahead_bytes = max_ahead_bytes
        self._check = gate
        self._failed = failed
        self._keep = replay.add if replay is not None else None
        self._paced: PacedStream | None = None
        self.streaming = False

    def hold(self) -> None:
        """Stop the running paced stream's frames until :meth:`retarget` (a resume)."""
        self.conn.attach(None)
        if self._paced is not None:
            self._paced.held = True

    def retarget(self, conn: Connection, replay: bytes) -> None:
        """A resume: give the new task on ``conn`` the audio it must recognise again
        (``replay``, as fast as the socket takes it; counted in ``replayed_bytes``, not in
        the stream's clock), then send on ``conn`` from now on; the running paced stream
        goes on there, on its own schedule (frames that fell due meanwhile go out at once)."""
        if replay:
            self._write_frames(conn, replay)
            self._metrics.replayed_bytes += len(replay)
        self._metrics.reconnects += 1
        self.conn = conn
        paced = self._paced
        if paced is not None:
            paced.retarget(conn)
            conn.attach(paced)

    def interrupt(self, why: str, error: BaseException | None = None) -> None:
        """Fail the paced stream running now, if any: with ``error`` (the task's own
        failure), else with InvalidStateError saying ``why`` and how much buffered audio
        was not sent. Its buffered audio is discarded."""
        paced = self._paced
        if paced is None:
            return
        if error is None or isinstance(error, InvalidStateError):
            error = InvalidStateError(f"{why}: {paced.buffered_bytes} buffered bytes were not sent")
        paced.abort(error)

    @property
    def buffered_bytes(self) -> int:
        """PCM bytes of the running paced stream not yet written."""
        return self._paced.buffered_bytes if self._paced is not None else 0

    async def send(self, data: bytes) -> None:
        """One binary message now; waits while the socket is backed up (or, for a session
        that resumes, until it has)."""
        conn = self.conn
        loop = asyncio.get_running_loop()
        while True:
            # send_binary writes at once, then waits while the socket is backed up: the
            # audio went out now, not when the wait ends.
            now = loop.time()
            try:
                await conn.send_binary(data)
                break
            except ConnectionError:
                conn = await self._failed(conn)
        if self._keep is not None:
            self._keep(data)
        router = self._router
        if router.first_audio_at is None:
            router.first_audio_at = now
        self._metrics.record_audio(len(data), now)

    async def stream_source(
        self,
        source: audio.AudioSource | AudioQueue,
        pace: float | None,
        sample_rate: float | None,
        *,
        keepalive: float | None,
        limit: AudioLimit | None,
    ) -> None:
        """What ``Session.stream()`` sends: ``source`` as PCM at the session's rate, up to
        ``limit`` (a whole source that does not fit is refused before anything is sent; a
        live one is cut there, and AudioFormatError raised once the rest was sent), with
        ``keepalive`` silence while a live source is quiet."""
        if isinstance(source, AudioQueue):
            if not pace:
                raise ValueError("an AudioQueue is sent at real time: give a pace (e.g. 1.0)")
            if sample_rate is not None and sample_rate != self.sample_rate:
                raise AudioFormatError("an AudioQueue holds PCM at the session's rate")
            self.streaming = True
            try:
                await self._queued(source, pace, keepalive, limit)
            finally:
                self.streaming = False
            return
        rate = self.sample_rate
        cut: list[bool] = []
        if limit is None:
            chunks = audio.pcm_chunks(source, rate, sample_rate)
        elif audio.is_whole(source):
            pcm = await audio.whole_pcm(source, rate, sample_rate)
            limit.check(len(pcm))
            chunks = audio.pcm_chunks(pcm, rate)
        else:
            chunks = _up_to(audio.pcm_chunks(source, rate, sample_rate), limit.left(), cut)
        live = isinstance(source, AsyncIterable) and not audio.is_whole(source)
        async with aclosing(chunks) as limited:
            await self.stream(limited, pace, keepalive if live else None)
        if cut:
            assert limit is not None
            raise AudioFormatError(
                f"stream() stopped sending at {limit.text()}: the rest of the live "
                "source was not sent; stop() returns what was recognised up to there"
            )

    async def stream(
        self, chunks: AsyncIterator[bytes], pace: float | None, keepalive: float | None = None
    ) -> None:
        """``chunks`` of PCM as 640-byte frames, paced at ``pace`` times real time, or
        as fast as the socket takes them (``None`` or ``0``). With ``keepalive``, silence goes out
        at real time whenever the source has produced nothing for that many seconds."""
        self.streaming = True
        try:
            if keepalive is None:
                await self._send_chunks(chunks, pace)
            else:
                async with aclosing(self._kept_alive(chunks, keepalive)) as kept:
                    await self._send_chunks(kept, pace)
        finally:
            self.streaming = False

    async def _send_chunks(self, chunks: AsyncIterator[bytes], pace: float | None) -> None:
        if not pace:
            await self._unpaced(chunks)
        else:
            await self._paced_stream(chunks, pace)

    async def _kept_alive(
        self, chunks: AsyncIterator[bytes], after: float
    ) -> AsyncGenerator[bytes, None]:
        """``chunks``; while the next one is ``after`` s or more late, 100 ms of silence
        per 100 ms is sent in its place. A timer armed only while waiting for the source:
        a few microseconds per chunk, no task."""
        loop = asyncio.get_running_loop()
        piece = bytes(2 * self.sample_rate // _KEEPALIVE_PER_S)
        handle: asyncio.TimerHandle | None = None

        def quiet() -> None:
            nonlocal handle
            self.send_silence(piece)
            handle = loop.call_later(1 / _KEEPALIVE_PER_S, quiet)

        while True:
            handle = loop.call_later(after, quiet)
            try:
                chunk = await anext(chunks)
            except StopAsyncIteration:
                return
            finally:
                handle.cancel()
            yield chunk

    def send_silence(self, pcm: bytes) -> None:
        """One piece of keepalive silence, in stream order (the producer is parked waiting
        for its source), counted in the metrics and kept for a replay."""
        paced = self._paced
        if paced is not None:
            if paced.finished:
                return
            paced.put_nowait(pcm)
        elif self.conn.open:
            self._write_frames(self.conn, pcm)
            self._metrics.record_audio(len(pcm), asyncio.get_running_loop().time())
        else:
            return  # a resume is under way: nothing to keep alive
        self._metrics.keepalive_bytes += len(pcm)
        if self._keep is not None:
            self._keep(pcm)

    @staticmethod
    def _write_frames(conn: Connection, pcm: bytes) -> None:
        conn.write_frames(b"".join(conn.encode_frames(pcm, FRAME_BYTES)))

    async def _unpaced(self, chunks: AsyncIterator[bytes]) -> None:
        framer = Framer(FRAME_BYTES)
        async for chunk in chunks:
            for frame in framer.push(chunk):
                self._check()
                await self.send(frame)
            # send() only yields when the socket is backed up: let everyone else run
            # between chunks.
            await asyncio.sleep(0)
        tail = framer.flush()
        if tail:
            self._check()
            await self.send(tail)

    def _open_paced(self, pace: float) -> PacedStream:
        paced = self._pacer.open(
            self.conn,
            2 * self.sample_rate * pace,
            self._metrics,
            max_ahead_bytes=self.max_ahead_bytes,
            frame_bytes=FRAME_BYTES,
        )
        self._paced = paced
        return paced

    async def _paced_stream(self, chunks: AsyncIterator[bytes], pace: float) -> None:
        router, keep = self._router, self._keep
        paced = self._open_paced(pace)
        with self._running(paced):
            async for chunk in chunks:
                await paced.put(chunk)
                if keep is not None:
                    keep(chunk)
                if router.first_audio_at is None:
                    router.first_audio_at = paced.start_time
            await paced.finish()

    @contextmanager
    def _running(self, paced: PacedStream) -> Iterator[None]:
        """``paced`` running on the connection: checked first (the task may have ended
        while the source was being opened), held by the connection while it cannot
        write, aborted by any exception (its buffered audio discarded, waiters told)."""
        try:
            self._check()
            self.conn.attach(paced)
            yield
        except BaseException as exc:
            paced.abort(exc)
            raise
        finally:
            self.conn.attach(None)
            self._paced = None

    async def _queued(
        self, queue: AudioQueue, pace: float, keepalive: float | None, limit: AudioLimit | None
    ) -> None:
        """``queue`` paced at ``pace`` until it is closed and sent: a tap of the pacer
        (:class:`QueueTap`) moves its audio into the paced stream at each tick."""
        paced = self._open_paced(pace)
        tap = QueueTap(queue, paced, self, keepalive, limit)
        with self._running(paced):
            self._pacer.add_tap(tap)
            try:
                await tap.drained
            finally:
                self._pacer.remove_tap(tap)
            if self._router.first_audio_at is None:  # known once the tick encoded it
                self._router.first_audio_at = paced.start_time
            await paced.finish()
        if tap.cut:
            assert limit is not None
            raise AudioFormatError(
                f"stream() stopped sending at {limit.text()}: the rest of the queued "
                "audio was not sent; stop() returns what was recognised up to there"
            )

    def queued_audio(self, pcm: bytes, paced: PacedStream) -> None:
        """Bookkeeping for audio a queue's tap put into ``paced``."""
        if self._keep is not None:
            self._keep(pcm)
        if self._router.first_audio_at is None:
            self._router.first_audio_at = paced.start_time


class QueueTap:
    """Called by the pacer at every tick while a queue is streamed: moves what is queued
    into the paced stream (after the queue's cushion, at first), up to its bound and the
    task's limit; keepalive silence while the queue is empty; sets :attr:`drained` once
    the queue is closed and empty, or the stream ended."""

    def __init__(
        self,
        queue: AudioQueue,
        paced: PacedStream,
        sender: AudioSender,
        keepalive: float | None,
        limit: AudioLimit | None,
    ) -> None:
        self.queue = queue
        self.paced = paced
        self.sender = sender
        self.keepalive = keepalive
        self.limit = limit
        self.cut = False
        self.drained: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        rate = 2 * sender.sample_rate
        self._cushion_bytes = int(queue.cushion * rate) // 2 * 2
        self._max_ahead = sender.max_ahead_bytes
        self._first_seen: float | None = None  # when the first audio was seen, until sent
        self._started = False
        self._heard = 0.0  # when audio was last taken (for keepalive)
        self._silence = bytes(rate // _KEEPALIVE_PER_S)

    def __call__(self, now: float) -> None:
        if self.drained.done():
            return
        try:
            self._tick(now)
        except BaseException as exc:  # never into the pacer's tick: fail this stream
            self.paced.abort(exc)
            self._done()

    def _tick(self, now: float) -> None:
        queue, paced = self.queue, self.paced
        if paced.finished:
            self._done()
            return
        if not self._started:
            if not queue.queued_bytes:
                return
            if self._first_seen is None:
                self._first_seen = now
            waited = now - self._first_seen
            if (
                queue.queued_bytes < self._cushion_bytes
                and waited < queue.cushion
                and not queue.closed
            ):
                return
            self._started = True
        room = self._max_ahead - paced.buffered_bytes
        if self.limit is not None:
            left = self.limit.left() - paced.buffered_bytes
            if queue.queued_bytes > left and left <= room:  # the rest goes over it
                room, self.cut = left, True
        pcm = queue.take(room)
        if pcm:
            paced.put_batched(pcm)
            self.sender.queued_audio(pcm, paced)
            self._heard = now
        elif self.keepalive is not None and now - self._heard >= self.keepalive:
            self.sender.send_silence(self._silence)
            self._heard = now - self.keepalive + 1 / _KEEPALIVE_PER_S
        if self.cut or (queue.closed and not queue.queued_bytes):
            self._done()  # nothing more to put: the stream sends what it holds

    def _done(self) -> None:
        if not self.drained.done():
            self.drained.set_result(None)


async def _up_to(
    chunks: AsyncGenerator[bytes, None], limit: int, cut: list[bool]
) -> AsyncGenerator[bytes, None]:
    """``chunks`` until ``limit`` bytes have come (the last one cut to fit); then ends,
    appending to ``cut`` if there was more."""
    async with aclosing(chunks) as source:
        async for chunk in source:
            if len(chunk) > limit:
                if limit:
                    yield chunk[:limit]
                cut.append(True)
                return
            limit -= len(chunk)
            yield chunk
