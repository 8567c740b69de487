"""Recognition quality of the local gateway: word error rate per service and rate.

Over the held-out phrase set in ``tests/fixtures/phrases`` (48 phrases, four flite
voices, 16 kHz and 8 kHz; ``make_phrases.sh`` made them), each phrase one session:

* ``engine-live`` / ``engine-batch``: the gateway's recognition engine called directly
  (a real-time task / a recording's channel), no network: what ``tests/gateway/test_accuracy.py``
  guards; ``engine-partials``: ``engine-live`` with partial results asked for
  (``enable_intermediate_result``), which costs a provisional decode of each sentence's
  start (the same words: the CPU columns of the two rows compare them);
* ``realtime-pace0`` / ``realtime-pace1``: ``nlsstream.Transcriber`` against a
  ``nlsstream serve`` process, as fast as possible / at real time;
* ``flash``, ``filetrans`` (a ``file://`` link), ``rest``: the recording services.

For each: WER (word-level edit distance over all reference words), how many times
faster than real time the phrases were recognised (audio seconds / wall seconds, with
``--concurrency`` sessions at once) and the gateway's CPU seconds per audio second (for
the engine rows: this process's, which runs the engine).
Writes ``benchmarks/RESULTS-accuracy.md`` (``--out``). One command::

    python -m benchmarks.accuracy            # everything, ~10 min on 2 busy cores
    python -m benchmarks.accuracy --services engine-live,flash --rates 16000
"""

from __future__ import annotations

import argparse
import asyncio
import platform
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import soundfile

ROOT = Path(__file__).resolve().parent.parent
PHRASES = ROOT / "tests" / "fixtures" / "phrases"
DEFAULT_OUT = Path(__file__).resolve().parent / "RESULTS-accuracy.md"
SERVICES = (
    "engine-live",
    "engine-partials",
    "engine-batch",
    "realtime-pace0",
    "realtime-pace1",
    "flash",
    "filetrans",
    "rest",
)
RATES = (16000, 8000)
APPKEY = "accuracy"


@dataclass(frozen=True)
class Phrase:
    name: str
    voice: str
    text: str

    def path(self, rate: int) -> Path:
        return PHRASES / f"{rate // 1000}k" / f"{self.name}.flac"

    def pcm(self, rate: int) -> bytes:
        data, sr = soundfile.read(self.path(rate), dtype="int16")
        assert sr == rate, (self.path(rate), sr)
        return bytes(data.tobytes())


def load_phrases() -> list[Phrase]:
    """The phrase set, in index.tsv order."""
    rows = (PHRASES / "index.tsv").read_text(encoding="utf-8").splitlines()
    return [Phrase(*row.split("\t")) for row in rows if row.strip()]


def word_errors(ref: str, hyp: str) -> int:
    """Word-level edit distance (substitutions + deletions + insertions)."""
    r, h = ref.split(), hyp.split()
    row = list(range(len(h) + 1))
    for i, rw in enumerate(r, 1):
        prev, row[0] = row[0], i
        for j, hw in enumerate(h, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (rw != hw))
    return row[-1]


def wer(pairs: list[tuple[str, str]]) -> float:
    """Word error rate of (reference, hypothesis) pairs, as a fraction."""
    words = sum(len(ref.split()) for ref, _ in pairs)
    return sum(word_errors(ref, hyp) for ref, hyp in pairs) / max(words, 1)


# --------------------------------------------------------------------------- the engine


async def engine_text(
    pcm: bytes, rate: int, *, batch: bool, recognizer: Any = None, partials: bool = False
) -> str:
    """One session's text from the gateway's engine directly: a transcriber task fed the
    audio, as the real-time path (``batch=False``) or the recordings path do; ``partials``:
    the session asks for partial results (``enable_intermediate_result``)."""
    from nlsstream.gateway.engine import DecoderSlots, TranscriberTask, shared_sphinx
    from nlsstream.realtime.protocol import TRANSCRIBER, StartParams

    texts: list[str] = []

    async def emit(name: str, payload: dict[str, Any] | None) -> None:
        if name == "SentenceEnd" and payload is not None and payload["result"]:
            texts.append(payload["result"])

    async def run(fn: Callable[..., Any], /, *args: Any) -> Any:
        return await asyncio.to_thread(fn, *args)

    params = StartParams(TRANSCRIBER.name, sample_rate=rate, enable_intermediate_result=partials)
    # (batch= only when asked: the same call then runs on engines before it existed)
    more = {"batch": True} if batch else {}
    engine = recognizer or shared_sphinx()
    task = TranscriberTask(params, engine, run, emit, DecoderSlots(64, 60.0), **more)
    try:
        step = rate * 2 // 5  # 200 ms chunks, as a paced client sends them
        for i in range(0, len(pcm), step):
            await task.audio(pcm[i : i + step])
        await task.stop()
    finally:
        await task.close()
    return " ".join(texts)


async def engine_pairs(
    phrases: list[Phrase],
    rate: int,
    *,
    batch: bool,
    recognizer: Any = None,
    partials: bool = False,
) -> list[tuple[str, str]]:
    """(reference, hypothesis) of each phrase through :func:`engine_text`."""
    return [
        (
            p.text,
            await engine_text(
                p.pcm(rate), rate, batch=batch, recognizer=recognizer, partials=partials
            ),
        )
        for p in phrases
    ]


# --------------------------------------------------------------------------- services


async def _realtime(gw: Any, p: Phrase, rate: int, pace: float) -> str:
    import nlsstream

    async with nlsstream.Transcriber(
        appkey=APPKEY,
        token="t",
        url=f"ws://127.0.0.1:{gw.port}/ws/v1",
        sample_rate=rate,
        stop_timeout=60,  # a shared machine: measure the words, not the queueing
    ) as t:
        await t.stream(p.pcm(rate), pace=pace or None)
        return (await t.stop()).text


async def _flash(gw: Any, p: Phrase, rate: int) -> str:
    import nlsstream

    async with nlsstream.FlashRecognizer(APPKEY, "t", url=gw.url) as flash:
        return (await flash.recognize(p.path(rate))).text


async def _rest(gw: Any, p: Phrase, rate: int) -> str:
    import nlsstream

    async with nlsstream.RestRecognizer(APPKEY, "t", url=gw.url) as rest:
        return (await rest.recognize(p.path(rate))).text


async def _filetrans(gw: Any, p: Phrase, rate: int) -> str:
    import nlsstream

    link = p.path(rate).resolve().as_uri()
    async with nlsstream.FileTranscriber(
        gw.ak_id, gw.ak_secret, appkey=APPKEY, endpoint=gw.url + "/", poll_interval=1.0
    ) as ft:
        return (await ft.transcribe(link, timeout=600)).text


async def service_pairs(
    gw: Any, service: str, phrases: list[Phrase], rate: int, concurrency: int
) -> list[tuple[str, str]]:
    """(reference, hypothesis) of each phrase through ``service`` of the gateway process."""
    calls: dict[str, Callable[[Phrase], Awaitable[str]]] = {
        "realtime-pace0": lambda p: _realtime(gw, p, rate, 0),
        "realtime-pace1": lambda p: _realtime(gw, p, rate, 1.0),
        "flash": lambda p: _flash(gw, p, rate),
        "rest": lambda p: _rest(gw, p, rate),
        "filetrans": lambda p: _filetrans(gw, p, rate),
    }
    call = calls[service]
    gate = asyncio.Semaphore(concurrency)

    async def one(p: Phrase) -> tuple[str, str]:
        async with gate:
            return p.text, await call(p)

    return list(await asyncio.gather(*(one(p) for p in phrases)))


# --------------------------------------------------------------------------- memory


def rss_mb(pid: int) -> float:
    """Resident memory of a process, MB (Linux /proc)."""
    with open(f"/proc/{pid}/status", encoding="ascii") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


async def _burst(gw: Any, phrases: list[Phrase], sessions: int, samples: list[float]) -> None:
    async def sample() -> None:
        while True:
            samples.append(rss_mb(gw.proc.pid))
            await asyncio.sleep(0.1)

    sampler = asyncio.create_task(sample())
    try:
        await asyncio.gather(
            *(_realtime(gw, phrases[i % len(phrases)], 16000, 1.0) for i in range(sessions)),
        )
    finally:
        sampler.cancel()


def measure_memory(phrases: list[Phrase], sessions: int, after_s: float) -> dict[str, Any]:
    """A fresh gateway's RSS: at rest, at the peak of ``sessions`` real-time speakers at
    once (paced), and ``after_s`` seconds after they all left."""
    from benchmarks.recordings import start_gateway, stop_gateway

    # The default pool of 8 decoders; the others wait for one (none is turned away).
    gw = start_gateway(extra=("--decoder-wait", "120", "--log-level", "ERROR"))
    try:
        asyncio.run(_realtime(gw, phrases[0], 16000, 0))  # one session: the warm state
        time.sleep(1.0)
        base = rss_mb(gw.proc.pid)
        samples: list[float] = []
        asyncio.run(_burst(gw, phrases, sessions, samples))
        left = time.monotonic()
        back_s: float | None = None
        while (waited := time.monotonic() - left) < after_s:
            if back_s is None and rss_mb(gw.proc.pid) <= base + 200:
                back_s = waited
            time.sleep(0.2)
        after = rss_mb(gw.proc.pid)
    finally:
        stop_gateway(gw)
    row = {
        "sessions": sessions,
        "base_mb": base,
        "peak_mb": max(samples, default=base),
        "after_mb": after,
        "after_s": after_s,
        "back_within_s": back_s,
    }
    print(
        f"memory: {sessions} speakers: base {base:.0f} MB, peak {row['peak_mb']:.0f} MB, "
        f"{after_s:g} s after {after:.0f} MB (+{after - base:.0f} MB)",
        flush=True,
    )
    return row


# --------------------------------------------------------------------------- the run


def measure(
    services: list[str], rates: list[int], concurrency: int, phrases: list[Phrase]
) -> list[dict[str, Any]]:
    """One row per (service, rate): WER, speed and gateway CPU."""
    from benchmarks.recordings import start_gateway, stop_gateway

    rows = []
    if any(s.startswith("engine") for s in services):
        from nlsstream.gateway.engine import shared_sphinx

        shared_sphinx().warm_up()  # the first engine row does not pay for the decoder
    gw = start_gateway() if any(not s.startswith("engine") for s in services) else None
    try:
        for rate in rates:
            audio_s = sum(len(p.pcm(rate)) / (2 * rate) for p in phrases)
            for service in services:
                t0 = time.monotonic()
                if service.startswith("engine"):
                    batch, partials = service == "engine-batch", service == "engine-partials"
                    cpu0 = time.process_time()  # the engine runs in this process
                    pairs = asyncio.run(engine_pairs(phrases, rate, batch=batch, partials=partials))
                    cpu = time.process_time() - cpu0
                else:
                    assert gw is not None
                    cpu0 = gw.cpu()
                    pairs = asyncio.run(service_pairs(gw, service, phrases, rate, concurrency))
                    cpu = gw.cpu() - cpu0
                wall = time.monotonic() - t0
                row = {
                    "service": service,
                    "rate": rate,
                    "phrases": len(pairs),
                    "words": sum(len(r.split()) for r, _ in pairs),
                    "wer": wer(pairs),
                    "speed": audio_s / wall,
                    "gateway_cpu_per_audio_s": None if cpu is None else cpu / audio_s,
                }
                rows.append(row)
                print(_line(row), flush=True)
    finally:
        if gw is not None:
            stop_gateway(gw)
    return rows


def _line(row: dict[str, Any]) -> str:
    cpu = row["gateway_cpu_per_audio_s"]
    return (
        f"{row['service']:<15} {row['rate'] // 1000:>2} kHz  WER {100 * row['wer']:5.1f} %  "
        f"({row['words']} words)  {row['speed']:5.1f}x real time  gateway CPU "
        + ("-" if cpu is None else f"{cpu:.3f} s per audio s")
    )


def render(
    rows: list[dict[str, Any]], command: str, concurrency: int, memory: dict[str, Any] | None
) -> str:
    out = [
        "# Recognition accuracy of the local gateway (PocketSphinx)",
        "",
        f"Command: `{command}`  ",
        f"Machine: {platform.platform()}, Python {platform.python_version()}  ",
        f"Phrase set: tests/fixtures/phrases ({rows[0]['phrases']} phrases, voices slt, "
        "kal16, awb, rms), each phrase one session; "
        f"{concurrency} sessions at once through the gateway; the engine rows' CPU is the "
        "benchmark process's, which runs the engine.",
        "",
        "| service | rate | WER | words | speed (x real time) | gateway CPU s / audio s |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        cpu = r["gateway_cpu_per_audio_s"]
        out.append(
            f"| {r['service']} | {r['rate'] // 1000} kHz | {100 * r['wer']:.1f} % | "
            f"{r['words']} | {r['speed']:.1f} | {'-' if cpu is None else f'{cpu:.3f}'} |"
        )
    if memory is not None:
        back = memory["back_within_s"]
        out += [
            "",
            f"Memory of a fresh `nlsstream serve` (RSS), {memory['sessions']} real-time "
            "speakers at once (paced, 16 kHz), then none:",
            "",
            "| base | peak | after | back to base + 200 MB |",
            "|---|---|---|---|",
            f"| {memory['base_mb']:.0f} MB | {memory['peak_mb']:.0f} MB "
            f"(+{memory['peak_mb'] - memory['base_mb']:.0f}) | {memory['after_mb']:.0f} MB "
            f"(+{memory['after_mb'] - memory['base_mb']:.0f}) {memory['after_s']:g} s later | "
            + ("not within the wait" if back is None else f"within {back:.1f} s")
            + " |",
        ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--services", default=",".join(SERVICES), help="comma-separated")
    ap.add_argument("--rates", default="16000,8000", help="comma-separated: 16000, 8000")
    ap.add_argument("--concurrency", type=int, default=4, help="sessions at once (gateway)")
    ap.add_argument("--limit", type=int, default=0, help="only the first N phrases")
    ap.add_argument(
        "--memory-sessions", type=int, default=24, help="speakers of the memory run (0: none)"
    )
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="Markdown results")
    args = ap.parse_args(argv)
    services = [s for s in args.services.split(",") if s]
    unknown = set(services) - set(SERVICES)
    if unknown:
        ap.error(f"unknown services {sorted(unknown)}: choose from {', '.join(SERVICES)}")
    rates = [int(r) for r in args.rates.split(",") if r]
    if set(rates) - set(RATES):
        ap.error("rates are 16000 and 8000")
    phrases = load_phrases()[: args.limit or None]
    rows = measure(services, rates, args.concurrency, phrases)
    memory = None
    if args.memory_sessions:
        memory = measure_memory(phrases, args.memory_sessions, 20.0)
    command = "python -m benchmarks.accuracy " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    tmp = args.out.with_suffix(".tmp")
    tmp.write_text(render(rows, command.strip(), args.concurrency, memory), encoding="utf-8")
    tmp.replace(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
