"""Final latency at 1 session against N, on the same gateway, in one run.

Issue 22: "at 1,000 sessions, the client must not add latency". The concurrency
harness (``python -m benchmarks.concurrency --latency-compare N``) runs the nlsstream
client with 1 session, then with N, against one light gateway, ``--repeat`` times in
turn; this module turns those rows into ``RESULTS-latency.md``.

*Final latency* is the session's own figure, ``SentenceEnd.latency_ms``: from the
moment the pacer wrote the audio at a sentence's end to the socket to the moment the
sentence's SentenceEnd reached the session. The light gateway sends a sentence's
SentenceEnd from the callback of the audio frame that completes the sentence (no
recognition, no waiting), so the figure is client + loopback + gateway. The gateway
stamps the send (``gateway_sent_monotonic``), which splits it per sentence into
*uplink* (client write -> gateway send) and *event delivery* (gateway send -> the
client's callback: loopback, the client's loop reading, parsing and routing it).
Percentiles pool every sentence of every session of the step.

What the library's figure includes (``nlsstream/realtime/pacing.py``, ``router.py``):
the pacer stamps every write of a tick with the tick's start time, so the time from
the tick's start to this session's write (up to the tick's length at N sessions) is in
the latency and in the uplink, with the kernel send, loopback, and the gateway's
polling nap (``--nap-us``) and loop lag. Under uvloop ``loop.time()`` has 1 ms
resolution (libuv's clock), so ``latency_ms`` is to about +-1 ms.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

#: What "the client adds no latency at N" allows: the N-session p99 final latency at
#: most this much above the 1-session p99 of the same run. One pacer tick (20 ms) is
#: the granularity at which a busy client loop delays what it reads, and the frame
#: lateness target; change it here, the verdict and the README follow.
ADDED_LATENCY_LIMIT_MS = 20.0


def _fmt(value: Any, digits: int = 1) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def final_cell(row: dict[str, Any]) -> str:
    """``p50 / p90 / p99`` final latency (ms) of a row, ``-`` without figures."""
    fl = row.get("final_latency") or {}
    if not fl.get("count"):
        return "-"
    return " / ".join(_fmt(fl.get(k)) for k in ("p50_ms", "p90_ms", "p99_ms"))


def _pair(summary: dict[str, Any] | None, keys: tuple[str, str] = ("p50_ms", "p99_ms")) -> str:
    if not summary or not summary.get("max_ms"):
        return "-"
    return " / ".join(_fmt(summary.get(k)) for k in keys)


def _load(row: dict[str, Any]) -> str:
    return f"{_fmt(row.get('load_before'))}-{_fmt(row.get('load_after'))}"


def verdict_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per run (and client), each N against the 1-session row of the same run."""
    out = ["", "## Verdict (computed from the table)", ""]
    groups: dict[tuple[int, str], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r.get("run", 1), r["client"]), []).append(r)
    worst_added: float | None = None
    for (run, client), mine in groups.items():
        one = next((r for r in mine if r["sessions"] == 1), None)
        ref = (one or {}).get("final_latency") or {}
        for r in mine:
            fl = r.get("final_latency") or {}
            if r is one or not fl.get("count"):
                continue
            if not ref.get("count"):
                out.append(f"- run {run}, {client}: no 1-session figures to compare with.")
                continue
            added = fl["p99_ms"] - ref["p99_ms"]
            worst_added = added if worst_added is None else max(worst_added, added)
            lost = r["errors"] + r["events_lost"]
            out.append(
                f"- run {run}, {client}: at {r['sessions']:,} sessions final latency p50 / p90 / "
                f"p99 {final_cell(r)} ms against {final_cell(one or {})} ms at 1 session: p99 "
                f"{added:+.1f} ms, p50 {fl['p50_ms'] - ref['p50_ms']:+.1f} ms; "
                + (
                    f"within the {ADDED_LATENCY_LIMIT_MS:.0f} ms allowed"
                    if added <= ADDED_LATENCY_LIMIT_MS
                    else f"**over** the {ADDED_LATENCY_LIMIT_MS:.0f} ms allowed"
                )
                + (f"; **errors {r['errors']}, events lost {r['events_lost']}**" if lost else "")
                + f"; machine load {_load(r)}."
            )
    if worst_added is not None:
        out += [
            "",
            f"Largest p99 added by N sessions over 1, in any run: {worst_added:+.1f} ms "
            f"(allowed: {ADDED_LATENCY_LIMIT_MS:.0f} ms, `benchmarks/latency_compare.py`).",
        ]
    return out


def render(
    rows: list[dict[str, Any]],
    notes: list[str],
    machine: dict[str, Any],
    command: str,
    generated: str | None = None,
) -> str:
    """The RESULTS-latency.md text (``generated``: when the run was; default now)."""
    generated = generated or time.strftime("%Y-%m-%d %H:%M:%S %Z")
    lines = [
        "# Final latency: 1 session against N, same gateway, one run",
        "",
        f"Generated {generated} by `{command}`.",
        "",
        "Machine: "
        + ", ".join(f"{k} {v}" for k, v in machine.items())
        + ". Gateway and client in separate processes, each pinned to its own core when "
        "there are two or more. *Load* is the 1-minute load average before and after "
        "each step (other work on the machine).",
        "",
        "*Final latency* is each sentence's `SentenceEnd.latency_ms`: from the moment the "
        "session wrote the audio at the sentence's end to the socket to the moment the "
        "SentenceEnd reached the session (whole ms). The light gateway sends it from the "
        "callback of the frame that completes the sentence (one sentence per "
        "`--sentence-ms` of audio; no recognition), so it is client + loopback + gateway. "
        "p50 / p90 / p99 / max pool every sentence of every session of the step; "
        "*sentences* is how many. *Worst session p99 (Metrics)* is the largest "
        "`metrics.final_latency_ms(99)` of a session (the library's histogram: 10 ms "
        "buckets, so figures under 10 ms read as the session's largest). *Uplink* "
        "(client write -> gateway send) and *event delivery* (gateway send -> the "
        "client's `on_sentence_end`) split each sentence's latency at the gateway's send "
        "stamp (same monotonic clock). The session stamps a write with its pacer tick's "
        "start, so the uplink holds the wait within the tick for this session's write, "
        "the kernel send, loopback and the gateway's polling nap and loop lag; under "
        "uvloop the session's clock has 1 ms resolution (`latency_ms` is to about +-1 "
        "ms). Final latency starts when the audio was *written*, so a frame written late "
        "is not in it: *worst p99 lateness* (at the gateway, against each session's first "
        "frame / its best-fit schedule) is that part; with a live source the two add up. "
        "The 1-session row has only `--seconds` / `--sentence-ms` sentences per run: a "
        "stall of the machine shows in it only if it hits one of them.",
        "",
        "| run | client | sessions | peak concurrent | sentences | final p50 / p90 / p99 ms "
        "| final max ms | worst session p99 (Metrics) ms | uplink p50 / p99 ms "
        "| event delivery p50 / p99 ms | worst p99 lateness ms | client CPU share "
        "| gateway CPU share | gateway loop lag p99 ms | load | errors | events lost |",
        "|" + "---|" * 17,
    ]
    for r in rows:
        fl = r.get("final_latency") or {}
        lines.append(
            "| "
            + " | ".join(
                [
                    str(r.get("run", 1)),
                    r["client"],
                    f"{r['sessions']:,}",
                    str(r["peak_concurrent"]),
                    str(fl.get("count", 0)),
                    final_cell(r),
                    _fmt(fl.get("max_ms")),
                    _fmt(fl.get("worst_session_p99_ms")),
                    _pair(r.get("uplink")),
                    _pair(r.get("event_delivery")),
                    f"{_fmt(r['worst_session_p99_ms'])} / "
                    f"{_fmt(r.get('best_fit_worst_session_p99_ms'))}",
                    _fmt(r["client_cpu_share"], 2),
                    _fmt(r["gateway_cpu_share"], 2),
                    _fmt(r["gateway_loop_lag_p99_ms"]),
                    _load(r),
                    str(r["errors"]),
                    str(r["events_lost"]),
                ]
            )
            + " |"
        )
    lines += verdict_lines(rows)
    if notes:
        lines += ["", "Notes:", ""] + [f"- {n}" for n in notes]
    samples = [(r["client"], r["sessions"], r["client_errors_sample"]) for r in rows]
    samples = [s for s in samples if s[2]]
    if samples:
        lines += ["", "First client errors per run:", ""]
        lines += [f"- {c} at {n}: {'; '.join(e)}" for c, n, e in samples]
    return "\n".join(lines) + "\n"


def write(
    rows: list[dict[str, Any]],
    notes: list[str],
    machine: dict[str, Any],
    out: Path,
    command: str,
) -> tuple[Path, Path]:
    """Write the Markdown report and the raw rows (``.json`` next to it), each
    atomically (a failed write leaves the previous results whole)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_suffix(".json")
    generated = time.strftime("%Y-%m-%d %H:%M:%S %Z")
    data = {"machine": machine, "rows": rows, "notes": notes, "command": command}
    data["generated"] = generated
    for path, text in (
        (out, render(rows, notes, machine, command, generated)),
        (raw, json.dumps(data, indent=1)),
    ):
        tmp = path.with_name(path.name + ".partial")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    return out, raw
