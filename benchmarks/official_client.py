"""N concurrent sessions of the official SDK's ``NlsSpeechTranscriber``, paced at real time.

This is the best user code the official SDK allows: its API is blocking, so each session
gets its own thread (the SDK adds two more per session: its socket reader and its pinger).
``--sdk compat`` runs the very same code with only the import changed: ``import
nlsstream.compat.nls as nls`` (no SDK thread; every session on nlsstream's one loop
thread), the benchmark's ``compat`` client.
Each thread paces against absolute deadlines (frame k is sent at ``t0 + k * 20 ms`` with
``time.monotonic`` and ``sleep(max(0, deadline - now))``, so a late frame does not shift
the ones after it), streaming 640-byte frames of ``tests/fixtures/three_sentences.wav``
looped to ``--seconds``. Then ``stop()`` waits for TranscriptionCompleted.

Ramp: session *i* calls ``start()`` at ``i * ramp / N`` seconds, so the TCP connects and
handshakes (the SDK waits at most 10 s for each connect, hard-coded) are spread out
instead of arriving as one storm; ``--ramp`` defaults to ``max(1, N / 400)`` s.

Prints one JSON object (``benchmarks.common.client_result``); run
``python -m benchmarks.official_client --help``.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.common import (
    BENCH_TOKEN,
    FRAME_S,
    Clock,
    SteadyCpu,
    client_result,
    default_ramp,
    lag_summary,
    load_pcm,
    raise_nofile_limit,
    rss_kib,
    split_frames,
    write_result,
)


class _Session:
    """One official-SDK session on its own thread; callbacks run on the SDK's reader thread."""

    def __init__(self, index: int) -> None:
        self.index = index
        self.task_id = ""
        self.started = False
        self.completed = False
        self.frames_sent = 0
        self.errors: list[str] = []
        self.sentence_ends: list[int] = []
        self.send_lag: list[float] = []
        #: compat only: the session's own pacing figures (underruns, client p99 lateness).
        self.pacing: dict[str, float] = {}

    def on_start(self, message: str, *args: Any) -> None:
        self.started = True
        self.task_id = json.loads(message)["header"]["task_id"]

    def on_sentence_end(self, message: str, *args: Any) -> None:
        self.sentence_ends.append(json.loads(message)["payload"]["index"])

    def on_completed(self, message: str, *args: Any) -> None:
        self.completed = True

    def on_error(self, message: str, *args: Any) -> None:
        self.errors.append(f"session {self.index}: on_error {message[:200]}")

    def run(self, nls: Any, url: str, start_at: float, frames: list[bytes]) -> None:
        delay = start_at - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            tr = nls.NlsSpeechTranscriber(
                url=url,
                token=BENCH_TOKEN,
                appkey="benchmark-appkey",
                on_start=self.on_start,
                on_sentence_end=self.on_sentence_end,
                on_completed=self.on_completed,
                on_error=self.on_error,
            )
            tr.start()
            if not self.started:
                # The SDK's start() can return None without raising on a failed handshake.
                self.errors.append(f"session {self.index}: start() returned without Started")
                tr.shutdown()
                return
            t0 = time.monotonic()
            lag = self.send_lag
            for k, frame in enumerate(frames):
                deadline = t0 + k * FRAME_S
                now = time.monotonic()
                if deadline > now:
                    time.sleep(deadline - now)
                tr.send_audio(frame)
                lag.append(time.monotonic() - deadline)
                self.frames_sent += 1
            tr.stop()
            self.pacing = _pacing(tr)
            if not self.completed:
                self.errors.append(f"session {self.index}: stop() returned without Completed")
            tr.shutdown()
        except Exception as exc:
            self.errors.append(f"session {self.index}: {type(exc).__name__}: {exc}"[:300])


#: The module each ``--sdk`` imports as ``nls``; the user code is the same.
SDKS = {"official": "nls", "compat": "nlsstream.compat.nls"}


def run(
    url: str, sessions: int, seconds: float, ramp: float, sdk: str = "official"
) -> dict[str, Any]:
    """Run the sessions and return the client result (see ``benchmarks.common``)."""
    nls = importlib.import_module(SDKS[sdk])

    # The SDK attaches stream handlers to these loggers; keep the benchmark output clean.
    for name in ("nls", "websocket", "nlsstream"):
        logging.getLogger(name).setLevel(logging.CRITICAL)
    raise_nofile_limit()
    frames = split_frames(load_pcm(seconds))
    rss_base = rss_kib()
    clock = Clock()
    t_start = time.monotonic() + 0.2
    states = [_Session(i) for i in range(sessions)]
    threads = [
        threading.Thread(
            target=s.run,
            args=(nls, url, t_start + i * ramp / sessions, frames),
            name=f"bench-{i}",
            daemon=True,
        )
        for i, s in enumerate(states)
    ]
    steady = SteadyCpu.for_run(t_start, ramp, seconds, sessions)
    peak_threads = 0
    for th in threads:
        th.start()
    deadline = time.monotonic() + ramp + seconds + 60
    for th in threads:
        while th.is_alive() and time.monotonic() < deadline:
            peak_threads = max(peak_threads, threading.active_count())
            th.join(0.5)
    errors = [e for s in states for e in s.errors]
    stuck = sum(1 for th in threads if th.is_alive())
    if stuck:
        errors.append(f"{stuck} session threads still running at the deadline")
    return client_result(
        client=sdk,
        sessions=sessions,
        seconds=seconds,
        ramp=ramp,
        clock=clock,
        rss_base_kib=rss_base,
        started=sum(s.started for s in states),
        completed=sum(s.completed for s in states),
        frames_sent=sum(s.frames_sent for s in states),
        errors=errors,
        sentence_ends={s.task_id: s.sentence_ends for s in states if s.task_id},
        send_lag=lag_summary([x for s in states for x in s.send_lag]),
        steady_cpu=steady,
        extra={
            "threads_peak": peak_threads,
            "sdk": _sdk_version(nls),
            **_pacing_summary([s.pacing for s in states if s.pacing]),
        },
    )


def _pacing_summary(pacing: list[dict[str, float]]) -> dict[str, Any]:
    if not pacing:
        return {}
    underruns = sorted(p["underruns"] for p in pacing)
    return {
        "client_underruns": sum(underruns),
        "client_underruns_max": underruns[-1],
        "client_worst_p99_ms": max(p["p99_ms"] for p in pacing),
    }


def _pacing(tr: Any) -> dict[str, float]:
    """A compat session's own pacing figures (its underlying nlsstream session's
    metrics); nothing for the official SDK, which has none."""
    session = getattr(tr, "_session", None)
    metrics = getattr(session, "metrics", None)
    if metrics is None:
        return {}
    return {"underruns": metrics.underruns, "p99_ms": metrics.p99_lateness_ms}


def _sdk_version(nls: Any) -> str:
    from importlib.metadata import PackageNotFoundError, version

    if nls.__name__ != "nls":
        return f"{nls.__name__} {nls.__version__}"
    try:
        return f"alibabacloud-nls-python-sdk {version('alibabacloud-nls-python-sdk')}"
    except PackageNotFoundError:
        return "nls (unknown version)"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--url", required=True, help="gateway URL, e.g. ws://127.0.0.1:8080/ws/v1")
    parser.add_argument("--sessions", type=int, default=10)
    parser.add_argument("--seconds", type=float, default=10.0, help="audio per session")
    parser.add_argument("--ramp", type=float, help="seconds over which sessions start")
    parser.add_argument("--out", help="write the JSON result here instead of stdout")
    parser.add_argument(
        "--sdk", choices=sorted(SDKS), default="official", help="the module imported as nls"
    )
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.seconds <= 0:
        parser.error("--sessions must be >= 1 and --seconds > 0")
    ramp = args.ramp if args.ramp is not None else default_ramp(args.sessions)
    write_result(run(args.url, args.sessions, args.seconds, ramp, args.sdk), args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
