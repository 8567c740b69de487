"""The blocking face of nlsstream: the same sessions, for code that is not asyncio.

:class:`Transcriber` and :class:`Recognizer` take the same arguments as
:class:`nlsstream.Transcriber` and :class:`nlsstream.Recognizer`, return the same
:class:`~nlsstream.Result` and events, and raise the same typed errors; their methods
block instead of being awaited::

    with nlsstream.sync.Transcriber(appkey="APPKEY", token="TOKEN") as t:
        t.stream("meeting.wav")
        result = t.stop()

**One loop thread.** Every blocking session of a process runs on one background
event-loop thread, ``nlsstream-loop``, started on first use and stopped at interpreter
exit; there is no thread per session. Each blocking call hands its coroutine to that
loop (:func:`asyncio.run_coroutine_threadsafe`) and waits for it. Calls that end by
themselves (connect, start, ctrl, abort) wait at most the session's own timeouts (those
of a resume included) plus a margin (:attr:`BlockingFacade.call_timeout`): beyond that
the loop thread is stuck and the call raises ``TimeoutError``. Calls whose length is the
audio's or the gateway's progress (``stream()``, iterating events, ``stop()`` and leaving
``with``) wait for as long as the session makes progress; the session bounds them itself
(keepalive, ``stop_timeout`` of silence, task end). Every wait also ends with
``TimeoutError`` when the loop thread has not run at all for :data:`STUCK_AFTER` seconds.

**send_audio() queues.** It appends the audio to the session's queue and returns at
once, with no lock and no wake-up of the loop thread per call; the loop streams what is
queued at real time (:mod:`nlsstream.sync._feed`: 60-80 ms behind the caller, which
absorbs a sending thread's jitter), in order, before a later ``stream()``, ``ctrl()`` or
``stop()``. Audio sent faster than real time waits in the queue (up to 1 MiB, then
``send_audio()`` waits).

**Callbacks run off the loop thread**, each session's in order on a worker thread of a
shared, bounded pool (:mod:`nlsstream.sync._callbacks`): a callback may block (a
database write, an HTTP request) and delays only its own session's later callbacks; the
session's audio and events go on meanwhile. A session's queued callbacks are bounded by
its ``event_queue_size``: a session whose callbacks fall further behind fails with
:class:`~nlsstream.EventOverflowError` (``on_error`` hears it after the queued ones).
``start()`` returns once ``on_start`` has run; ``stop()`` and leaving ``with`` once the
callbacks queued by then have (at most ``stop_timeout`` + 10 s, then ``TimeoutError``).
Blocking calls may be made from a callback (``send_audio()``, ``ctrl()``, ``stop()``:
from its own callback, ``stop()`` does not wait for the callbacks queued behind the
running one). Callbacks must be plain functions.

Blocking calls are thread-safe: one thread may ``stream()`` while another iterates
``sentences()``. Calling them from inside a running event loop (an ``async def``)
raises ``RuntimeError``: use the async classes there.

The recording clients have blocking faces too: :class:`FlashRecognizer`,
:class:`RestRecognizer` and :class:`FileTranscriber` (whose ``submit()`` returns a
blocking :class:`FileTransTask`), with the same arguments, results and errors. Their
calls wait at most two requests' ``timeout`` plus a margin; ``wait()``,
``transcribe()`` and ``result()`` also their own ``timeout`` (default 3600 s).

Other async objects get a blocking face the same way: subclass :class:`BlockingFacade`
and list their coroutine methods with :class:`blocking` and their async iterators with
:class:`iterating`.
"""

from __future__ import annotations

from ._bridge import (
    CALL_MARGIN,
    SHUTDOWN_TIMEOUT,
    STUCK_AFTER,
    BlockingFacade,
    BlockingIterator,
    LoopThread,
    blocking,
    iterating,
    loop_thread,
)
from ._files import PREPARE_MARGIN, FileTranscriber, FileTransTask, FlashRecognizer, RestRecognizer
from ._session import BlockingSession, Recognizer, Transcriber

__all__ = [
    "CALL_MARGIN",
    "PREPARE_MARGIN",
    "SHUTDOWN_TIMEOUT",
    "STUCK_AFTER",
    "BlockingFacade",
    "BlockingIterator",
    "BlockingSession",
    "FileTransTask",
    "FileTranscriber",
    "FlashRecognizer",
    "LoopThread",
    "Recognizer",
    "RestRecognizer",
    "Transcriber",
    "blocking",
    "iterating",
    "loop_thread",
]
