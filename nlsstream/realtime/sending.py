"""How a session's audio leaves: now, paced, or as fast as the socket takes it.

:class:`AudioSender` is the session's audio path once it is connected: unpaced binary
messages (``send_audio``), 640-byte frames as fast as the socket takes them
(``stream(pace=None)``), or frames paced by the event loop's shared
:class:`~nlsstream.realtime.pacing.Pacer` (``stream(pace=1.0)``). Before each frame it asks the
session whether audio may still go out (``check``), so nothing is sent before Started or
after the task ended; a paced stream that the task's end interrupts fails with the
reason (:meth:`AudioSender.interrupt`) and says how much audio was not sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import aclosing

from ..audio import FRAME_BYTES, Framer
from ..errors import GatewayConnectionError, InvalidStateError
from .connection import Connection
from .pacing import Metrics, PacedStream, Pacer
from .router import EventRouter

__all__ = ["AudioSender"]

# Keepalive silence goes out in pieces of 1/10 s, one piece every 1/10 s.
_KEEPALIVE_PER_S = 10


class AudioSender:
    """The audio path of one connected session.

    ``check()`` raises if audio may not be sent now; ``lost()`` is the error for a
    connection that went away under a send; ``raise_error()`` raises the task's own
    error first, when it has one (the real cause, rather than the lost connection).
    A session that can resume also gives ``keep(pcm)``, told of all audio as it is
    handed over (for the replay buffer), and ``resumed(conn)``, which returns True once
    a new connection has taken over from ``conn`` (see :meth:`retarget`).
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
        check: Callable[[], None],
        lost: Callable[[], GatewayConnectionError],
        raise_error: Callable[[], Awaitable[None]],
        keep: Callable[[bytes], None] | None = None,
        resumed: Callable[[Connection], Awaitable[bool]] | None = None,
    ) -> None:
        self.conn = conn
        self._router = router
        self._metrics = metrics
        self._pacer = pacer
        self._sample_rate = sample_rate
        self._max_ahead_bytes = max_ahead_bytes
        self._check = check
        self._lost = lost
        self._raise_error = raise_error
        self._keep = keep
        self._resumed = resumed
        self._paced: PacedStream | None = None
        self.streaming = False

    def hold(self) -> None:
        """Stop the running paced stream's frames until :meth:`retarget` (a resume)."""
        self.conn.attach(None)
        if self._paced is not None:
            self._paced.held = True

    def retarget(self, conn: Connection) -> None:
        """Send on ``conn`` from now on; the running paced stream goes on there, on its
        own schedule (frames that fell due meanwhile go out at once)."""
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
        while True:
            conn = self.conn
            try:
                await conn.send_binary(data)
                break
            except ConnectionError:
                if self._resumed is None or not await self._resumed(conn):
                    await self._raise_error()
                    raise self._lost() from None
        if self._keep is not None:
            self._keep(data)
        router = self._router
        if router.first_audio_at is None:
            router.first_audio_at = asyncio.get_running_loop().time()
        self._metrics.record_audio(len(data))

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
        piece = bytes(2 * self._sample_rate // _KEEPALIVE_PER_S)
        handle: asyncio.TimerHandle | None = None

        def quiet() -> None:
            nonlocal handle
            self._send_silence(piece)
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

    def _send_silence(self, pcm: bytes) -> None:
        """One piece of keepalive silence, in stream order (the producer is parked waiting
        for its source), counted in the metrics and kept for a replay."""
        paced = self._paced
        if paced is not None:
            if paced.finished:
                return
            paced.put_nowait(pcm)
        elif self.conn.open:
            self.conn.write_frames(b"".join(self.conn.encode_frames(pcm, FRAME_BYTES)))
            self._metrics.record_audio(len(pcm))
        else:
            return  # a resume is under way: nothing to keep alive
        self._metrics.keepalive_bytes += len(pcm)
        if self._keep is not None:
            self._keep(pcm)

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

    async def _paced_stream(self, chunks: AsyncIterator[bytes], pace: float) -> None:
        conn, router, keep = self.conn, self._router, self._keep
        paced = self._pacer.open(
            conn,
            2 * self._sample_rate * pace,
            self._metrics,
            max_ahead_bytes=self._max_ahead_bytes,
            frame_bytes=FRAME_BYTES,
        )
        self._paced = paced
        try:
            # The task may have ended while the source was being opened; from now on
            # the end of the task interrupts the stream.
            self._check()
            conn.attach(paced)  # the connection holds the stream while it cannot write
            async for chunk in chunks:
                await paced.put(chunk)
                if keep is not None:
                    keep(chunk)
                if router.first_audio_at is None:
                    router.first_audio_at = paced.start_time
            await paced.finish()
        except BaseException as exc:
            paced.abort(exc)
            raise
        finally:
            self.conn.attach(None)
            self._paced = None
