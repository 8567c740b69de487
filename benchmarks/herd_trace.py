"""Where a herd of ``stream()`` starts spends the event loop's time: a per-tick trace.

Runs the nlsstream benchmark client's sessions (``benchmarks.nlsstream_client``) against
the benchmark gateway, with the pacer instrumented from the outside (wrappers around
``Pacer._on_timer`` and ``PacedStream`` methods, benchmark-only; nothing in the library
changes). For every pacer tick it records how late the tick ran, how long its
``run_due`` took, and what else the loop did since the previous tick: producer
``put()`` calls (cutting and framing audio) with their time and their streams, and
received messages (``Connection.data_received``). Prints the slowest ticks, the
producers' wake-ups per tick and a summary, as JSON::

    python -m benchmarks.herd_trace --sessions 1000 --seconds 15 --spread 0
    python -m benchmarks.herd_trace --sessions 1000 --seconds 15 --spread 2

``--sentence-ms 0`` makes the gateway send no SentenceBegin/SentenceEnd (only
Started/Completed), as a neutral sink would.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import concurrency, nlsstream_client
from benchmarks.common import default_ramp


class Trace:
    """Per-tick records, filled by the wrappers installed by :meth:`install`."""

    def __init__(self) -> None:
        self.ticks: list[dict[str, Any]] = []
        self.put_s = 0.0
        self.put_cpu_s = 0.0  # the same in thread CPU time (not counting preemption)
        self.puts = 0
        self.put_streams: set[int] = set()
        self.recv_s = 0.0
        self.recvs = 0
        self.max_put_s = 0.0
        self.gc_s = 0.0
        self.gc_gens: list[int] = []
        self._gc_start = 0.0

    def _gc(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._gc_start = time.perf_counter()
        else:
            self.gc_s += time.perf_counter() - self._gc_start
            self.gc_gens.append(info["generation"])

    def install(self) -> None:
        from nlsstream.realtime import connection, pacing

        trace = self
        gc.callbacks.append(self._gc)
        on_timer = pacing.Pacer._on_timer
        put_nowait = pacing.PacedStream.put_nowait
        data_received = connection.Connection.data_received

        def traced_on_timer(self: pacing.Pacer) -> None:
            due = self._origin + self._tick_index * self.tick
            start = time.perf_counter()
            now = self.clock()
            on_timer(self)
            trace.ticks.append(
                {
                    "t": now,
                    "late_ms": (now - due) * 1e3,
                    "run_ms": (time.perf_counter() - start) * 1e3,
                    "streams": len(self._streams),
                    "puts_before": trace.puts,
                    "put_ms_before": trace.put_s * 1e3,
                    "put_cpu_ms_before": trace.put_cpu_s * 1e3,
                    "put_streams_before": len(trace.put_streams),
                    "max_put_us": trace.max_put_s * 1e6,
                    "recvs_before": trace.recvs,
                    "recv_ms_before": trace.recv_s * 1e3,
                    "gc_ms_before": trace.gc_s * 1e3,
                    "gc_gens_before": max(trace.gc_gens, default=-1),
                }
            )
            trace.put_s = trace.recv_s = trace.max_put_s = trace.gc_s = trace.put_cpu_s = 0.0
            trace.gc_gens.clear()
            trace.puts = trace.recvs = 0
            trace.put_streams.clear()

        def traced_put_nowait(self: pacing.PacedStream, pcm: Any) -> None:
            start = time.perf_counter()
            cpu = time.thread_time()
            put_nowait(self, pcm)
            trace.put_cpu_s += time.thread_time() - cpu
            spent = time.perf_counter() - start
            trace.put_s += spent
            trace.max_put_s = max(trace.max_put_s, spent)
            trace.puts += 1
            trace.put_streams.add(id(self))

        def traced_data_received(self: connection.Connection, data: bytes) -> None:
            start = time.perf_counter()
            data_received(self, data)
            trace.recv_s += time.perf_counter() - start
            trace.recvs += 1

        pacing.Pacer._on_timer = traced_on_timer  # type: ignore[method-assign]
        pacing.PacedStream.put_nowait = traced_put_nowait  # type: ignore[method-assign]
        connection.Connection.data_received = traced_data_received  # type: ignore[method-assign]

    def summary(self, top: int) -> dict[str, Any]:
        ticks = [t for t in self.ticks if t["streams"] > 0]
        lates = sorted(t["late_ms"] for t in ticks)
        worst = sorted(ticks, key=lambda t: -t["late_ms"])[:top]
        t0 = ticks[0]["t"] if ticks else 0.0
        for t in worst:
            t["t"] = round(t["t"] - t0, 3)
            for k, v in list(t.items()):
                if isinstance(v, float):
                    t[k] = round(v, 2)
        wakes = Counter(t["put_streams_before"] for t in ticks)
        put_cpu = sorted(t["put_cpu_ms_before"] for t in ticks[1:])  # not the start
        return {
            "ticks": len(ticks),
            "tick_late_ms": {
                "p50": round(statistics.median(lates), 2) if lates else None,
                "p99": round(lates[int(len(lates) * 0.99)], 2) if lates else None,
                "max": round(lates[-1], 2) if lates else None,
                "over_10ms": sum(x > 10 for x in lates),
            },
            # How many streams' producers ran between two ticks, and how often.
            "producers_per_tick_gap": dict(sorted(wakes.items())[-12:]),
            "max_producers_per_tick_gap": max(
                (t["put_streams_before"] for t in ticks[1:]), default=0
            ),
            # CPU the producers took between two ticks (after the start): the work that
            # holds the next tick back.
            "put_cpu_ms_per_tick_gap": {
                "p99": round(put_cpu[int(len(put_cpu) * 0.99)], 2) if put_cpu else None,
                "max": round(put_cpu[-1], 2) if put_cpu else None,
            },
            "worst_ticks": worst,
        }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--spread", type=float, default=0.0, help="stream() spread, s")
    parser.add_argument("--sentence-ms", type=int, default=0, help="0: no sentence events")
    parser.add_argument("--top", type=int, default=12)
    parser.add_argument("--no-pin", action="store_true")
    args = parser.parse_args(argv)
    gw_cpu, client_cpu = concurrency.cpu_plan(not args.no_pin)
    gw = concurrency.start_gateway(sentence_ms=args.sentence_ms, cpu=gw_cpu)
    try:
        if client_cpu is not None:
            concurrency._pin(0, client_cpu)
        trace = Trace()
        trace.install()
        result = nlsstream_client.run(
            gw.url, args.sessions, args.seconds, default_ramp(args.sessions), "auto", args.spread
        )
        time.sleep(0.3)
        server = concurrency.fetch_stats(gw, reset=True)
    finally:
        concurrency.stop_gateway(gw)
    best_fit = server["overall"].get("best_fit", {})
    out = {
        "sessions": args.sessions,
        "spread": args.spread,
        "best_fit_worst_p99_ms": best_fit.get("worst_session_p99_ms"),
        "worst_p99_ms": server["overall"]["worst_session_p99_ms"],
        "client_worst_p99_ms": result["send_lag"]["p99_ms"],
        "cpu_ms_per_audio_s": result["cpu_ms_per_audio_s"],
        "errors": result["error_count"],
        "underruns": result.get("underruns"),
        **trace.summary(args.top),
    }
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    asyncio.set_event_loop_policy(None)
    sys.exit(main())
