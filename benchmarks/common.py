"""Shared pieces of the benchmark clients: audio, process measurements, result schema.

Both clients (``official_client.py``, ``nlsstream_client.py``) print one JSON object
(:func:`client_result`) so the harness treats them alike.
"""

from __future__ import annotations

import json
import resource
import threading
import time
import wave
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
FIXTURE = ROOT / "tests" / "fixtures" / "three_sentences.wav"
SAMPLE_RATE = 16000
FRAME_BYTES = 640  # 20 ms of 16 kHz 16-bit mono PCM
FRAME_S = FRAME_BYTES / (SAMPLE_RATE * 2)
#: The token the benchmark clients send and the light gateway requires (its control
#: endpoints too); a benchmark runs on loopback only.
BENCH_TOKEN = "benchmark-token"


def load_pcm(seconds: float, path: Path = FIXTURE) -> bytes:
    """``seconds`` of 16 kHz mono PCM16 from ``path``, looped, cut to whole 640-byte frames."""
    with wave.open(str(path), "rb") as w:
        if (w.getframerate(), w.getnchannels(), w.getsampwidth()) != (SAMPLE_RATE, 1, 2):
            raise ValueError(f"{path} is not 16 kHz mono 16-bit PCM")
        pcm = w.readframes(w.getnframes())
    frames = max(1, round(seconds / FRAME_S))
    need = frames * FRAME_BYTES
    reps = need // len(pcm) + 1
    return (pcm * reps)[:need]


def split_frames(pcm: bytes) -> list[bytes]:
    return [pcm[i : i + FRAME_BYTES] for i in range(0, len(pcm), FRAME_BYTES)]


def cpu_seconds() -> float:
    """User + system CPU time of this process (all threads)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def system_cpu_seconds() -> float:
    """System (kernel) CPU time of this process: mostly the socket system calls."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_stime


def rss_kib() -> int:
    """Current resident set size in KiB (Linux ``/proc/self/status``), 0 if unknown."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def peak_rss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def raise_nofile_limit() -> None:
    """Thousands of sockets need more than the default 1024 file descriptors."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def percentile_ms(values: list[float], q: float) -> float:
    """The ``q``-th percentile (nearest rank) of ``values`` seconds, in ms."""
    if not values:
        return 0.0
    ordered = sorted(values)
    k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
    return round(ordered[k] * 1000, 3)


def lag_summary(lags: list[float]) -> dict[str, float]:
    """p50/p99/max in ms of per-frame send lags given in seconds."""
    return {
        "p50_ms": percentile_ms(lags, 50),
        "p99_ms": percentile_ms(lags, 99),
        "max_ms": round(max(lags, default=0.0) * 1000, 3),
    }


def ms_summary(
    values_ms: list[float], percentiles: tuple[int, ...] = (50, 90, 99)
) -> dict[str, Any]:
    """Nearest-rank percentiles (``p50_ms``, ...), ``max_ms`` and ``count`` of figures
    already in ms; the percentiles and max are ``None`` when there is no figure."""
    ordered = sorted(values_ms)
    out: dict[str, Any] = {"count": len(ordered)}
    for q in percentiles:
        k = min(len(ordered) - 1, max(0, round(q / 100 * (len(ordered) - 1))))
        out[f"p{q}_ms"] = round(float(ordered[k]), 3) if ordered else None
    out["max_ms"] = round(float(ordered[-1]), 3) if ordered else None
    return out


class Clock:
    """Wall and CPU time since construction, for a client's measurement window."""

    def __init__(self) -> None:
        self.wall0 = time.monotonic()
        self.cpu0 = cpu_seconds()
        self.sys0 = system_cpu_seconds()

    def wall(self) -> float:
        return time.monotonic() - self.wall0

    def cpu(self) -> float:
        return cpu_seconds() - self.cpu0

    def system_cpu(self) -> float:
        return system_cpu_seconds() - self.sys0


class SteadyCpu:
    """CPU per audio second while every session is streaming (no connects, no stops).

    A daemon thread reads the process CPU time at ``begin`` and ``end`` (``time.monotonic``
    instants); with ``sessions`` streaming in real time that window holds
    ``sessions * (end - begin)`` seconds of audio. ``None`` if the window is under 1 s.
    """

    def __init__(self, begin: float, end: float, sessions: int) -> None:
        self.begin, self.end, self.sessions = begin, end, sessions
        self.value: float | None = None
        self._thread: threading.Thread | None = None
        if end - begin >= 1.0:
            self._thread = threading.Thread(target=self._run, name="steady-cpu", daemon=True)
            self._thread.start()

    def _run(self) -> None:
        time.sleep(max(0.0, self.begin - time.monotonic()))
        cpu0, t0 = cpu_seconds(), time.monotonic()
        time.sleep(max(0.0, self.end - t0))
        cpu1, t1 = cpu_seconds(), time.monotonic()
        self.value = (cpu1 - cpu0) * 1000 / (self.sessions * (t1 - t0))

    def result(self) -> float | None:
        """ms of CPU per audio second in the window (waits briefly for the thread)."""
        if self._thread is not None:
            self._thread.join(timeout=1.0)
        return None if self.value is None else round(self.value, 4)

    @classmethod
    def for_run(cls, t_start: float, ramp: float, seconds: float, sessions: int) -> SteadyCpu:
        """The window from 1 s after the last session started until the first one ends."""
        return cls(t_start + ramp + 1.0, t_start + seconds, sessions)


def client_result(
    *,
    client: str,
    sessions: int,
    seconds: float,
    ramp: float,
    clock: Clock,
    rss_base_kib: int,
    started: int,
    completed: int,
    frames_sent: int,
    errors: list[str],
    sentence_ends: dict[str, list[int]],
    send_lag: dict[str, float],
    steady_cpu: SteadyCpu | None = None,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The JSON object every benchmark client prints (one line) when it is done.

    ``sentence_ends`` maps each task id to the SentenceEnd indices received, so the harness
    can compare them with what the gateway sent. ``send_lag`` is the client's own view of
    its pacing (p50/p99/max ms, see :func:`lag_summary`); lateness that counts is the
    gateway's.
    """
    cpu = clock.cpu()
    audio_s = frames_sent * FRAME_S
    peak = peak_rss_kib()
    out: dict[str, Any] = {
        "client": client,
        "sessions": sessions,
        "seconds": seconds,
        "ramp_s": ramp,
        "wall_s": round(clock.wall(), 3),
        "cpu_s": round(cpu, 3),
        "audio_s": round(audio_s, 3),
        "cpu_ms_per_audio_s": round(cpu * 1000 / audio_s, 4) if audio_s else None,
        "system_cpu_ms_per_audio_s": (
            round(clock.system_cpu() * 1000 / audio_s, 4) if audio_s else None
        ),
        "steady_cpu_ms_per_audio_s": steady_cpu.result() if steady_cpu else None,
        "rss_base_kib": rss_base_kib,
        "rss_peak_kib": peak,
        "rss_per_session_kib": round((peak - rss_base_kib) / sessions, 1) if sessions else 0,
        "started": started,
        "completed": completed,
        "frames_sent": frames_sent,
        "error_count": len(errors),
        "errors": errors[:20],
        "sentence_ends": sentence_ends,
        "send_lag": send_lag,
    }
    if extra:
        out.update(extra)
    return out


def write_result(result: dict[str, Any], path: str | None) -> None:
    text = json.dumps(result)
    if path:
        Path(path).write_text(text, encoding="utf-8")
    else:
        print(text, flush=True)


def default_ramp(sessions: int) -> float:
    """Seconds over which both clients spread their session starts, so the connect storm
    does not dominate the measurement (documented in benchmarks/README.md)."""
    return max(1.0, sessions / 400)
