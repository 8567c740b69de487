"""Why official-style code on ``nlsstream.compat.nls`` runs late at 450 sessions: an
isolation of the sending threads from the loop thread's own work.

The same N compat sessions, started the same way, stream the same audio at real time
in 640-byte ``send_audio()`` chunks at absolute 20 ms deadlines (as
``benchmarks.official_client`` does), against the benchmark gateway (each process
pinned to its own core). Only who calls ``send_audio()`` differs:

* ``threads``: one thread per session, as official-SDK code is written;
* ``one``: a single thread keeps every session's deadlines, in time order, and calls
  ``send_audio()`` for each: the same calls at the same instants, from one thread.

So the loop thread has the same work in both (the same frames, ticks and writes); what
``threads`` adds is N threads waking 50 times a second each. For every pacer tick of the
loop thread (a wrapper around ``Pacer._on_timer``, benchmark-only, as in
``benchmarks.herd_trace``) it records how late the tick started, how long it ran, and
for ticks that ran over 20 ms how much of that the loop thread was on the CPU
(``time.thread_time``) and its voluntary (it waited: for the GIL, a lock, I/O) and
involuntary (the OS preempted it) context switches (``getrusage(RUSAGE_THREAD)``).
Modes alternate, ``--repeat`` times::

    python -m benchmarks.compat_isolation --sessions 450 --seconds 15 --repeat 3

``--gc off`` disables the cyclic garbage collector once the sessions are started (an
isolation of its pauses, not a recommendation). Writes a Markdown table
(``--out``, default ``benchmarks/RESULTS-compat-isolation.md``).
"""

from __future__ import annotations

import argparse
import gc
import heapq
import json
import logging
import resource
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import concurrency
from benchmarks.common import (
    BENCH_TOKEN,
    FRAME_S,
    cpu_seconds,
    default_ramp,
    lag_summary,
    load_pcm,
    raise_nofile_limit,
    split_frames,
)

MODES = ("threads", "one")
SLOW_TICK_S = 0.02


class TickTrace:
    """Per-tick records of the compat loop thread's pacer (see the module docstring)."""

    def __init__(self) -> None:
        self.ticks: list[tuple[float, float]] = []  # (late s, run s)
        self.slow: list[tuple[float, float, int, int]] = []  # (run, cpu, vol, invol)
        self.active = False  # recording (during the steady window)
        #: Outside the window (starts, ends): the latest tick, as (late s, at monotonic s).
        self.outside = (0.0, 0.0)

    def install(self) -> None:
        from nlsstream.realtime import pacing

        trace = self
        on_timer = pacing.Pacer._on_timer

        def traced_on_timer(self: pacing.Pacer) -> None:
            before = resource.getrusage(resource.RUSAGE_THREAD)
            cpu = time.thread_time()
            start = time.perf_counter()
            late = self.clock() - (self._origin + self._tick_index * self.tick)
            on_timer(self)
            if not trace.active:
                if late > trace.outside[0]:
                    trace.outside = (late, time.monotonic())
                return
            run = time.perf_counter() - start
            trace.ticks.append((late, run))
            if run > SLOW_TICK_S:
                after = resource.getrusage(resource.RUSAGE_THREAD)
                trace.slow.append(
                    (
                        run,
                        time.thread_time() - cpu,
                        after.ru_nvcsw - before.ru_nvcsw,
                        after.ru_nivcsw - before.ru_nivcsw,
                    )
                )

        pacing.Pacer._on_timer = traced_on_timer  # type: ignore[method-assign]

    def record(self, active: bool) -> None:
        """Start (from scratch) or stop recording."""
        if active:
            self.ticks.clear()
            self.slow.clear()
        self.active = active

    def summary(self) -> dict[str, Any]:
        slow = self.slow
        return {
            "ticks": len(self.ticks),
            "tick_late_ms": lag_summary([t[0] for t in self.ticks]),
            "tick_run_ms": lag_summary([t[1] for t in self.ticks]),
            "slow_ticks": len(slow),
            "slow_run_ms_median": round(statistics.median(s[0] for s in slow) * 1e3, 1)
            if slow
            else None,
            "slow_cpu_ms_median": round(statistics.median(s[1] for s in slow) * 1e3, 1)
            if slow
            else None,
            "slow_voluntary_switches": sum(s[2] for s in slow),
            "slow_involuntary_switches": sum(s[3] for s in slow),
        }


def run(
    url: str,
    sessions: int,
    seconds: float,
    mode: str,
    trace: TickTrace,
    gc_off: bool,
    callbacks: bool = False,
) -> dict[str, Any]:
    """Start ``sessions`` compat transcribers, stream ``seconds`` of audio to each at real
    time (session *i* from ``i * ramp / sessions`` s on), stop them; CPU is measured
    while every session streams."""
    import nlsstream.compat.nls as nls
    from nlsstream.sync._callbacks import workers

    pool = workers()

    frames = split_frames(load_pcm(seconds))
    # Session i streams from i * ramp / sessions s on: its deadlines are at a phase of
    # the 20 ms period of its own, as those of official-SDK code that starts each
    # session's clock when its start() returns.
    ramp = default_ramp(sessions)
    offsets = [i * ramp / sessions for i in range(sessions)]
    transcribers: list[Any] = [None] * sessions
    errors: list[str] = []

    def start(i: int) -> None:
        # As benchmarks.official_client's: each SentenceEnd decoded on a callback worker.
        on_sentence_end = (lambda message, *args: json.loads(message)) if callbacks else None
        tr = nls.NlsSpeechTranscriber(
            url=url,
            token=BENCH_TOKEN,
            appkey="benchmark-appkey",
            on_sentence_end=on_sentence_end,
        )
        try:
            tr.start()
            transcribers[i] = tr
        except Exception as exc:
            errors.append(f"session {i}: start: {type(exc).__name__}: {exc}"[:200])

    starters = [threading.Thread(target=start, args=(i,), daemon=True) for i in range(sessions)]
    for th in starters:
        th.start()
    for th in starters:
        th.join(60)
    live = [(tr, off) for tr, off in zip(transcribers, offsets, strict=True) if tr is not None]
    t0 = time.monotonic() + 0.3
    # Steady state: from 1 s after the last session's first frame to 1 s before the
    # first session's last.
    window = (t0 + max(offsets) + 1.0, t0 + len(frames) * FRAME_S - 1.0)
    marks: dict[str, tuple[float, float]] = {}

    peak = [0]

    def mark_window() -> None:
        for name, at in zip(("a", "b"), window, strict=True):
            while (delay := at - time.monotonic()) > 0:
                time.sleep(min(delay, 0.25))
                if name == "b":  # within the window
                    peak[0] = max(peak[0], pool.threads)
            marks[name] = (time.monotonic(), cpu_seconds())
            trace.record(name == "a")

    def send_one(tr: Any, offset: float) -> None:
        start_at = t0 + offset
        for k, frame in enumerate(frames):
            delay = start_at + k * FRAME_S - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            tr.send_audio(frame)

    def send_all() -> None:
        # The same deadlines, in time order, kept by one thread.
        due = [(t0 + offset, i, 0) for i, (_, offset) in enumerate(live)]
        heapq.heapify(due)
        while due:
            at, i, k = heapq.heappop(due)
            delay = at - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            live[i][0].send_audio(frames[k])
            if k + 1 < len(frames):
                heapq.heappush(due, (at + FRAME_S, i, k + 1))

    trace.outside = (0.0, 0.0)
    if gc_off:
        gc.disable()
    senders = (
        [threading.Thread(target=send_one, args=pair, daemon=True) for pair in live]
        if mode == "threads"
        else [threading.Thread(target=send_all, daemon=True)]
    )
    watcher = threading.Thread(target=mark_window, daemon=True)
    watcher.start()
    for th in senders:
        th.start()
    for th in senders:
        th.join(seconds + 60)
    watcher.join(5)
    gc.enable()
    ticks = trace.summary()
    peak_workers = peak[0]
    late, at = trace.outside
    ticks["latest_tick_outside_window"] = {
        "late_ms": round(late * 1e3, 1),
        "at_s": round(at - t0, 2),
    }
    for tr, _ in live:
        try:
            tr.stop()
        except Exception as exc:
            errors.append(f"stop: {type(exc).__name__}: {exc}"[:200])
        tr.shutdown()
    (ta, ca), (tb, cb) = marks["a"], marks["b"]
    return {
        "mode": mode,
        "sessions": len(live),
        "gc": "off" if gc_off else "on",
        "callbacks": callbacks,
        "callback_workers_peak": peak_workers,
        "core_share": round((cb - ca) / (tb - ta), 2),
        "cpu_ms_per_audio_s": round(1e3 * (cb - ca) / ((tb - ta) * len(live)), 3),
        "errors": errors,
        **ticks,
    }


def _ms3(summary: dict[str, float]) -> str:
    """p50 / p99 / max of a :func:`lag_summary`, to 0.1 ms."""
    return " / ".join(f"{summary[k]:.1f}" for k in ("p50_ms", "p99_ms", "max_ms"))


def _table(rows: list[dict[str, Any]]) -> list[str]:
    lines = [
        "| run | sending threads | sessions | GC | callbacks (peak workers) "
        "| worst p99 ms | best-fit worst p99 ms "
        "| client core share | CPU ms / audio s | tick late p50 / p99 / max ms "
        "| tick run p50 / p99 / max ms | ticks over 20 ms | their run / CPU ms (median) "
        "| their voluntary / involuntary switches | latest tick outside the window ms (at s) "
        "| errors |",
        "|" + "---|" * 16,
    ]
    for r in rows:
        late, tick_run = r["tick_late_ms"], r["tick_run_ms"]
        outside = r["latest_tick_outside_window"]
        senders = "one per session" if r["mode"] == "threads" else "one for all sessions"
        lines.append(
            f"| {r['run']} | {senders} "
            f"| {r['sessions']} | {r['gc']} "
            f"| {'yes (' + str(r['callback_workers_peak']) + ')' if r['callbacks'] else 'no'} "
            f"| {r['worst_p99_ms']} | {r['best_fit_worst_p99_ms']} "
            f"| {r['core_share']} | {r['cpu_ms_per_audio_s']} "
            f"| {_ms3(late)} | {_ms3(tick_run)} | {r['slow_ticks']} "
            f"| {r['slow_run_ms_median'] or '-'} / {r['slow_cpu_ms_median'] or '-'} "
            f"| {r['slow_voluntary_switches']} / {r['slow_involuntary_switches']} "
            f"| {outside['late_ms']} ({outside['at_s']}) | {len(r['errors'])} |"
        )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, default=450)
    parser.add_argument("--seconds", type=float, default=15.0)
    parser.add_argument("--repeat", type=int, default=3, help="runs of each mode, alternating")
    parser.add_argument("--modes", default=",".join(MODES), help="threads,one")
    parser.add_argument("--gc", choices=("on", "off"), default="on")
    parser.add_argument(
        "--callbacks",
        action="store_true",
        help="an on_sentence_end callback per session (json.loads), as official_client's",
    )
    parser.add_argument("--no-pin", action="store_true")
    parser.add_argument("--out", default="benchmarks/RESULTS-compat-isolation.md")
    args = parser.parse_args(argv)
    modes = args.modes.split(",")
    if not set(modes) <= set(MODES) or args.sessions < 1 or args.repeat < 1:
        parser.error(f"--modes takes {', '.join(MODES)}; --sessions and --repeat at least 1")
    logging.getLogger("nlsstream").setLevel(logging.CRITICAL)
    raise_nofile_limit()
    gw_cpu, client_cpu = concurrency.cpu_plan(not args.no_pin)
    if client_cpu is not None:
        concurrency._pin(0, client_cpu)
    trace = TickTrace()
    trace.install()
    rows: list[dict[str, Any]] = []
    gw = concurrency.start_gateway(sentence_ms=1000, cpu=gw_cpu)
    try:
        for rep in range(1, args.repeat + 1):
            for mode in modes:
                concurrency.reset_stats(gw)
                row = run(
                    gw.url,
                    args.sessions,
                    args.seconds,
                    mode,
                    trace,
                    args.gc == "off",
                    args.callbacks,
                )
                time.sleep(0.3)
                server = concurrency.fetch_stats(gw, reset=True)["overall"]
                row.update(
                    run=rep,
                    worst_p99_ms=server.get("worst_session_p99_ms"),
                    best_fit_worst_p99_ms=server.get("best_fit", {}).get("worst_session_p99_ms"),
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        concurrency.stop_gateway(gw)
    command = "python -m benchmarks.compat_isolation " + " ".join(argv or sys.argv[1:])
    text = [
        "# Compat at scale: the sending threads isolated from the loop thread",
        "",
        f"Generated {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime())} by `{command}`. "
        "See the docstring of `benchmarks/compat_isolation.py` for what each column is.",
        "",
        *_table(rows),
        "",
    ]
    Path(args.out).write_text("\n".join(text), encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
