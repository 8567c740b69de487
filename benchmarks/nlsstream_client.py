"""N concurrent ``nlsstream.Transcriber`` sessions in ONE process and ONE event loop.

No thread per session: every session is a task on the same loop, and their audio is
paced by the loop's single shared clock (``nlsstream.realtime.pacing``). Each session streams
640-byte frames of ``tests/fixtures/three_sentences.wav`` looped to ``--seconds`` with
``await t.stream(pcm, pace=1.0)``, then ``await t.stop()`` drains until Completed.
SentenceEnd events are collected with the ``on_sentence_end`` callback, so the harness
can check that none was lost, with each sentence's final latency
(``SentenceEnd.latency_ms``: from the write of the audio at the sentence's end to the
event's arrival). The result pools every sentence's latency of every session
(``final_latency``: p50/p90/p99/max, ms) and splits it at the light gateway's send stamp
into ``uplink`` (client write -> gateway send) and ``event_delivery`` (gateway send ->
callback); ``final_latency.worst_session_p99_ms`` is the largest per-session
``metrics.final_latency_ms(99)`` (the library's histogram, 10 ms resolution).

Ramp: session *i* connects at ``i * ramp / N`` seconds (default ``max(1, N / 400)`` s),
the same ramp as ``official_client.py``, and streams as soon as its task has started.
``--stream-spread S`` separates connecting from streaming: every session connects (over
the ramp) and waits; once all have started (or failed), session *i* calls ``stream()``
at ``i * S / N`` s, and with ``S = 0`` all N ``stream()`` calls start in the same
event-loop iteration (a thundering herd of starts). Uses uvloop when it is installed
(``--loop asyncio`` to compare). Prints one JSON object (``benchmarks.common``).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    BENCH_TOKEN,
    Clock,
    SteadyCpu,
    client_result,
    default_ramp,
    lag_summary,
    load_pcm,
    ms_summary,
    raise_nofile_limit,
    rss_kib,
    write_result,
)

#: After the last session has started, the gate waits this long before releasing the
#: streams, so that the tail of the connect storm is not part of the herd.
GATE_SETTLE_S = 0.5

#: ``1``: call ``gc.freeze()`` once the sessions have started (the GC-isolation runs).
GC_FREEZE_ENV = "NLSSTREAM_BENCH_GC_FREEZE"


class StartGate:
    """Holds every session's ``stream()`` until all sessions are ready (or failed), then
    releases them: all at once (``spread`` 0) or session *i* at ``i * spread / N`` s."""

    def __init__(self, sessions: int, spread: float) -> None:
        self.sessions = sessions
        self.spread = spread
        self.arrived: set[int] = set()  # ready to stream, or failed before
        self.all_arrived = asyncio.Event()
        self.go = asyncio.Event()
        self.go_at = 0.0  # loop time of the release

    def arrive(self, index: int) -> None:
        self.arrived.add(index)
        if len(self.arrived) >= self.sessions:
            self.all_arrived.set()

    async def wait(self, index: int) -> None:
        """Session ``index`` is ready: return when it may call ``stream()``."""
        self.arrive(index)
        await self.go.wait()
        if self.spread > 0:
            loop = asyncio.get_running_loop()
            delay = self.go_at + index * self.spread / self.sessions - loop.time()
            await asyncio.sleep(max(0.0, delay))
        # With no spread, nothing awaits between the release and stream(): every
        # session's first frames are cut and framed in the same loop iteration.

    def release(self) -> None:
        self.go_at = asyncio.get_running_loop().time()
        self.go.set()


class _Record:
    __slots__ = (
        "completed",
        "delivery",
        "errors",
        "final_latency",
        "latency_p99_ms",
        "max_ms",
        "p99_ms",
        "sentence_ends",
        "started",
        "task_id",
        "underruns",
        "uplink",
    )

    def __init__(self) -> None:
        self.task_id = ""
        self.started = False
        self.completed = False
        self.errors: list[str] = []
        self.sentence_ends: list[int] = []
        #: Seconds from the gateway sending each SentenceEnd to our callback running.
        self.delivery: list[float] = []
        #: Each SentenceEnd's ``latency_ms``, and its part before the gateway sent it.
        self.final_latency: list[int] = []
        self.uplink: list[float] = []
        self.latency_p99_ms: float | None = None  # metrics.final_latency_ms(99)
        self.p99_ms = 0.0
        self.max_ms = 0.0
        self.underruns = 0


async def _session(
    index: int,
    url: str,
    start_at: float,
    pcm: bytes,
    rec: _Record,
    frames: list[int],
    gate: StartGate | None = None,
) -> None:
    from nlsstream.errors import NlsError
    from nlsstream.realtime.protocol import SentenceEnd
    from nlsstream.realtime.session import Transcriber

    loop = asyncio.get_running_loop()
    await asyncio.sleep(max(0.0, start_at - loop.time()))

    def on_sentence_end(event: SentenceEnd) -> None:
        rec.sentence_ends.append(event.index)
        sent_at = event.raw.get("payload", {}).get("gateway_sent_monotonic")
        delivery = None
        if sent_at is not None:  # the light gateway's stamp (same machine, same clock)
            delivery = time.monotonic() - sent_at
            rec.delivery.append(delivery)
        if event.latency_ms is not None:
            rec.final_latency.append(event.latency_ms)
            if delivery is not None:  # latency_ms is whole ms: this split is to about 1 ms
                rec.uplink.append(max(0.0, event.latency_ms - delivery * 1000))

    t = Transcriber(
        "benchmark-appkey",
        BENCH_TOKEN,
        url=url,
        on_sentence_end=on_sentence_end,
    )
    rec.task_id = t.task_id
    try:
        async with t:
            rec.started = True
            if gate is not None:
                await gate.wait(index)
            await t.stream(pcm, pace=1.0)
            await t.stop()
            rec.completed = True
    except (NlsError, OSError, ValueError) as exc:
        rec.errors.append(f"session {index}: {type(exc).__name__}: {exc}"[:300])
    finally:
        if gate is not None:
            gate.arrive(index)  # a session that failed early must not hold the others
        frames[index] = t.metrics.frames_sent
        rec.p99_ms = t.metrics.p99_lateness_ms
        rec.max_ms = t.metrics.max_lateness_ms
        # getattr: A/B runs against versions of nlsstream that did not count underruns.
        rec.underruns = getattr(t.metrics, "underruns", 0)
        rec.latency_p99_ms = t.metrics.final_latency_ms(99)


async def run_async(
    url: str, sessions: int, seconds: float, ramp: float, spread: float | None = None
) -> dict[str, Any]:
    """Run the sessions on the running loop and return the client result; with
    ``spread``, their ``stream()`` calls wait for a :class:`StartGate`."""
    import nlsstream.realtime.session  # noqa: F401  (imported before the clock starts)

    loop = asyncio.get_running_loop()
    pcm = load_pcm(seconds)
    rss_base = rss_kib()
    clock = Clock()
    t_start = loop.time() + 0.2
    # loop.time() is time.monotonic() for both asyncio and uvloop loops on Linux.
    gate = StartGate(sessions, spread) if spread is not None else None
    steady = None
    if gate is None:
        steady = SteadyCpu.for_run(time.monotonic() + 0.2, ramp, seconds, sessions)
    records = [_Record() for _ in range(sessions)]
    frames = [0] * sessions
    tasks = [
        asyncio.create_task(_session(i, url, t_start + i * ramp / sessions, pcm, rec, frames, gate))
        for i, rec in enumerate(records)
    ]
    deadline = loop.time() + ramp + seconds + 60
    errors: list[str] = []
    gc_frozen = os.environ.get(GC_FREEZE_ENV) == "1"
    if gc_frozen:
        # Isolates the collector's full passes from the figures: what an application
        # running thousands of sessions does once they are set up (benchmarks/README.md).
        loop.call_later(ramp + 0.5 if gate is None else ramp + 1.0, gc.freeze)
    if gate is not None:
        try:
            await asyncio.wait_for(gate.all_arrived.wait(), ramp + 60)
        except asyncio.TimeoutError:
            errors.append(f"{sessions - len(gate.arrived)} sessions not ready at the release")
        await asyncio.sleep(GATE_SETTLE_S)
        gate.release()
        # loop.time() is time.monotonic(): the steady window starts 1 s after the last
        # stream() call and ends when the first stream does.
        steady = SteadyCpu(gate.go_at + gate.spread + 1.0, gate.go_at + seconds, sessions)
        deadline = gate.go_at + gate.spread + seconds + 60
    done, pending = await asyncio.wait(tasks, timeout=max(1.0, deadline - loop.time()))
    for task in pending:
        task.cancel()
    errors += [e for r in records for e in r.errors]
    if pending:
        errors.append(f"{len(pending)} sessions still running at the deadline")
    for task in done:
        if task.exception() is not None:
            errors.append(f"session task crashed: {task.exception()!r}"[:300])
    p99s = [r.p99_ms for r in records if r.started]
    final_latency = ms_summary([x for r in records for x in r.final_latency])
    session_p99s = [r.latency_p99_ms for r in records if r.latency_p99_ms is not None]
    final_latency["worst_session_p99_ms"] = round(max(session_p99s), 3) if session_p99s else None
    return client_result(
        client="nlsstream",
        sessions=sessions,
        seconds=seconds,
        ramp=ramp,
        clock=clock,
        rss_base_kib=rss_base,
        started=sum(r.started for r in records),
        completed=sum(r.completed for r in records),
        frames_sent=sum(frames),
        errors=errors,
        sentence_ends={r.task_id: r.sentence_ends for r in records if r.task_id},
        # nlsstream's own pacing metrics: median and worst per-session p99, and the max.
        send_lag={
            "p50_ms": round(statistics.median(p99s), 3) if p99s else 0.0,
            "p99_ms": round(max(p99s, default=0.0), 3),
            "max_ms": round(max((r.max_ms for r in records), default=0.0), 3),
        },
        steady_cpu=steady,
        extra={
            "loop": type(loop).__module__.split(".")[0],
            "event_delivery": lag_summary([d for r in records for d in r.delivery]),
            # Pooled over every sentence of every session (not per-session percentiles).
            "final_latency": final_latency,
            "uplink": ms_summary([u for r in records for u in r.uplink], (50, 99)),
            "stream_spread_s": spread,
            # The pacer found a session's buffer empty when a frame was due: the client
            # could not produce audio in time (counted in nlsstream.realtime.pacing.Metrics).
            "underruns": sum(r.underruns for r in records),
            "gc_frozen": gc_frozen,
        },
    )


def run(
    url: str,
    sessions: int,
    seconds: float,
    ramp: float,
    loop: str = "auto",
    spread: float | None = None,
) -> dict[str, Any]:
    raise_nofile_limit()
    logging.getLogger("nlsstream").setLevel(logging.CRITICAL)
    use_uvloop = loop == "uvloop"
    if loop == "auto":
        try:
            import uvloop

            use_uvloop = True
        except ImportError:
            use_uvloop = False
    coro = run_async(url, sessions, seconds, ramp, spread)
    if use_uvloop:
        import uvloop

        result: dict[str, Any] = uvloop.run(coro)
    else:
        result = asyncio.run(coro)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="gateway URL, e.g. ws://127.0.0.1:8080/ws/v1")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio per session")
    parser.add_argument("--ramp", type=float, help="seconds over which sessions start")
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    parser.add_argument(
        "--stream-spread",
        type=float,
        help="connect every session first, then start their stream() calls spread over "
        "this many seconds (0: all at once); default: each streams once started",
    )
    parser.add_argument("--out", help="write the JSON result here instead of stdout")
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.seconds <= 0:
        parser.error("--sessions must be >= 1 and --seconds > 0")
    if args.stream_spread is not None and args.stream_spread < 0:
        parser.error("--stream-spread must be >= 0")
    ramp = args.ramp if args.ramp is not None else default_ramp(args.sessions)
    started = time.monotonic()
    result = run(args.url, args.sessions, args.seconds, ramp, args.loop, args.stream_spread)
    result["process_wall_s"] = round(time.monotonic() - started, 3)
    write_result(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
