"""The command line's batches (``nlsstream transcribe A B ... --output-dir DIR``).

Several inputs, or ``--output-dir``: a batch, each input recognised as
:func:`nlsstream.cli.recordings.recognise` does. At most ``-j`` inputs at once, one output per
input (per channel when a recording has several), each written atomically as soon as it
is done; a failed input costs only its own output; inputs whose output exists are
skipped unless ``--force``.

Everything here runs on the CLI's event loop; files are read and written in worker
threads.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from nlsstream import NlsError
from nlsstream.quickstart import Services
from nlsstream.redaction import get_logger
from nlsstream.retry import backoff, is_retryable

from .common import (
    EXIT_FAILURE,
    EXIT_OK,
    PROGRESS_INTERVAL,
    Interrupt,
    command_secrets,
    isatty,
    one_line,
    open_output,
    token_given,
)
from .output import ProgressBar, Transcript, render
from .recordings import file_link, is_url, recognise, services_for

__all__ = [
    "EXTENSIONS",
    "SERVICES",
    "collisions",
    "output_base",
    "run_batch",
]

log = get_logger("nlsstream.cli.batch")

SERVICES = ("realtime", "flash", "filetrans", "rest")
#: The extension of each output format's files (``--output-dir``).
EXTENSIONS = {"text": ".txt", "jsonl": ".jsonl", "srt": ".srt", "vtt": ".vtt"}


def _stem(source: str) -> str:
    name = urllib.parse.urlsplit(source).path if is_url(source) else source
    base = os.path.basename(name.rstrip("/")) or "audio"
    stem, _ = os.path.splitext(base)
    return stem or base


def output_base(source: str, output_dir: str) -> str:
    """The output path of ``source`` without its extension: ``DIR/name`` for
    ``.../name.wav`` (a URL's last path segment likewise)."""
    return os.path.join(output_dir, _stem(source))


def output_paths(base: str, fmt: str, channels: int) -> list[str]:
    """``base.srt`` for one channel, ``base.ch0.srt``, ``base.ch1.srt``... for several."""
    ext = EXTENSIONS[fmt]
    if channels <= 1:
        return [base + ext]
    return [f"{base}.ch{c}{ext}" for c in range(channels)]


def _done(base: str, fmt: str) -> bool:
    """Whether an earlier run wrote this input's output (one channel or several)."""
    ext = EXTENSIONS[fmt]
    return os.path.exists(base + ext) or os.path.exists(f"{base}.ch0{ext}")


def collisions(sources: Sequence[str], output_dir: str) -> str | None:
    """A usage error if two inputs would write the same output, else ``None``."""
    seen: dict[str, str] = {}
    for source in sources:
        base = output_base(source, output_dir)
        if base in seen and seen[base] != source:
            return f"inputs {seen[base]} and {source} would both write {base}.*: rename one"
        seen[base] = source
    return None


#: Tries per input when the service says a failure is transient (a full decoder pool,
#: throttling, a dropped connection): a batch of many files meets them by design.
BATCH_ATTEMPTS = 5


async def recognise_retrying(
    args: argparse.Namespace, services: Services, source: str
) -> Transcript:
    """:func:`recognise`, tried again (jittered backoff: about 1, 2, 4, 8 s) after a
    failure the service calls retryable."""
    for attempt in range(1, BATCH_ATTEMPTS + 1):
        try:
            return await recognise(args, services, source)
        except NlsError as exc:
            if not is_retryable(exc) or attempt == BATCH_ATTEMPTS:
                raise
            delay = backoff(attempt, base=1.0, cap=8.0)
            log.info("%s: %s; trying again in %.1f s", source, exc, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


# --------------------------------------------------------------------------- output


def _write_outputs(transcript: Transcript, base: str, fmt: str, channel_ids: bool) -> list[str]:
    """Every output of one input, each written atomically (blocking: a worker thread)."""
    paths = output_paths(base, fmt, transcript.channels)
    for channel, path in enumerate(paths):
        events = transcript.events if len(paths) == 1 else transcript.channel(channel)
        buffer = io.StringIO()
        render(events, fmt, buffer, channel_ids=channel_ids)
        with open_output(path) as output:
            output.file.write(buffer.getvalue())
            output.keep = True
    return paths


# --------------------------------------------------------------------------- entry points


@dataclass
class _Tally:
    total: int
    started: int = 0
    done: int = 0
    failed: int = 0

    @property
    def finished(self) -> int:
        return self.done + self.failed

    def label(self) -> str:
        return f"{self.finished}/{self.total} files, {self.failed} failed"


def _summary(tally: _Tally, inputs: int, skipped: int) -> str:
    """The batch's last line: what was done, failed, skipped and left."""
    parts = [f"{tally.done} of {inputs} done"]
    if tally.failed:
        parts.append(f"{tally.failed} failed")
    if skipped:
        parts.append(f"{skipped} skipped (output exists; --force redoes them)")
    if cancelled := tally.started - tally.finished:
        parts.append(f"{cancelled} cancelled (interrupted)")
    if not_started := tally.total - tally.started:
        parts.append(f"{not_started} not started (interrupted)")
    return f"nlsstream: {', '.join(parts)}"


async def run_batch(
    args: argparse.Namespace, interrupt: Interrupt, notice: Callable[[str], None]
) -> int:
    """Every input of ``args.inputs`` into ``args.output_dir``; see the module docstring."""
    try:
        await asyncio.to_thread(os.makedirs, args.output_dir, exist_ok=True)
    except OSError as exc:  # e.g. a file on the way to it
        raise OSError(f"cannot create --output-dir {args.output_dir}: {exc.strerror}") from None
    bases = {s: output_base(s, args.output_dir) for s in args.inputs}
    skipped = [s for s in args.inputs if not args.force and _done(bases[s], args.format)]
    todo = [s for s in args.inputs if s not in skipped]
    tally = _Tally(len(todo))
    progress: ProgressBar | None = None

    def refresh() -> None:
        if progress is not None:
            progress.label = tally.label()
            progress.update(tally.finished)

    def say(line: str) -> None:
        if progress is not None:
            progress.close()
        print(line, file=sys.stderr, flush=True)
        refresh()

    if todo:
        stopping = asyncio.Event()

        def stop_starting() -> None:  # the first signal: start no more inputs
            stopping.set()
            running = tally.started - tally.finished
            say(f"nlsstream: interrupted: finishing {running} running (again to cancel them)")

        interrupt.graceful = stop_starting
        limit = asyncio.Semaphore(args.jobs)
        secrets = command_secrets(args)

        async def one(source: str, services: Services) -> None:
            async with limit:
                if stopping.is_set():
                    return
                tally.started += 1
                try:
                    transcript = await recognise_retrying(args, services, source)
                    paths = await asyncio.to_thread(
                        _write_outputs,
                        transcript,
                        bases[source],
                        args.format,
                        args.service != "realtime",
                    )
                except Exception as exc:  # one input's failure is its own
                    tally.failed += 1
                    log.debug("%s failed", source, exc_info=True)
                    expected = isinstance(exc, (NlsError, OSError, ValueError, TimeoutError))
                    shown = exc if expected else RuntimeError(f"{type(exc).__name__}: {exc}")
                    message = one_line(shown, secrets, token=token_given(args))
                    # Name the input once: many errors already name their file.
                    named = message if source in message else f"{source}: {message}"
                    say(f"nlsstream: error: {named}")
                    return
                tally.done += 1
                refresh()
                if not transcript.text:
                    say(f"nlsstream: {source}: no speech recognised")
                log.info("%s -> %s", source, ", ".join(paths))

        try:
            async with services_for(args, notice) as services:
                if args.service == "filetrans" and not services.local:
                    for source in todo:  # a local path the service cannot fetch: say so now
                        if not is_url(source):
                            file_link(source, services)
                if args.progress and isatty(sys.stderr):
                    progress = ProgressBar(len(todo), sys.stderr, label=tally.label())
                jobs = {asyncio.ensure_future(one(source, services)) for source in todo}
                try:
                    pending = set(jobs)
                    while pending:
                        refresh()  # the elapsed time and ETA, between completions too
                        _, pending = await asyncio.wait(pending, timeout=PROGRESS_INTERVAL)
                finally:
                    for job in jobs:
                        job.cancel()
                    await asyncio.gather(*jobs, return_exceptions=True)
                    interrupt.graceful = None
                    if progress is not None:
                        progress.close()
        except asyncio.CancelledError:
            if not interrupt.count:
                raise
            # The second signal cancelled the running inputs (and the embedded gateway
            # was left without waiting for them): the summary still says what was done.
    print(_summary(tally, len(args.inputs), len(skipped)), file=sys.stderr, flush=True)
    if interrupt.count:
        return interrupt.status
    return EXIT_FAILURE if tally.failed else EXIT_OK
