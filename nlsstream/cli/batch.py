"""The command line's recordings and batches (``nlsstream transcribe``).

* ``--service flash|filetrans|rest`` recognises a recording with that service
  (:mod:`nlsstream.recordings.services`); ``realtime`` streams it through a
  :class:`~nlsstream.Transcriber` (:mod:`nlsstream.realtime.session`).
* Several inputs, or ``--output-dir``: a batch. At most ``-j`` inputs at once, one output
  per input (per channel when a recording has several), each written atomically as soon
  as it is done; a failed input costs only its own output; inputs whose output exists
  are skipped unless ``--force``.

Everything here runs on the CLI's event loop; files are read and written in worker
threads.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import random
import sys
import urllib.parse
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from ..auth import DEFAULT_REGION
from ..errors import (
    AuthenticationError,
    GatewayConnectionError,
    NlsError,
    TaskFailedError,
    redact,
)
from ..redaction import get_logger

if TYPE_CHECKING:
    from ..quickstart import Services
    from ..realtime.protocol import Event
    from .main import _Interrupt
    from .output import ProgressBar

__all__ = [
    "EXTENSIONS",
    "SERVICES",
    "is_url",
    "output_base",
    "recognise",
    "run_batch",
    "run_recording",
]

log = get_logger("nlsstream.cli.batch")

SERVICES = ("realtime", "flash", "filetrans", "rest")
#: The extension of each output format's files (``--output-dir``).
EXTENSIONS = {"text": ".txt", "jsonl": ".jsonl", "srt": ".srt", "vtt": ".vtt"}
#: What each service's sentences are called in JSON Lines (``namespace``).
_NAMESPACES = {"flash": "FlashRecognizer", "filetrans": "FileTrans", "rest": "RestRecognizer"}
#: How long FileTrans is waited for when ``--timeout`` is not given: the trial's
#: turnaround (paid tasks finish within 3 h).
FILE_TRANS_WAIT = 24 * 3600.0
#: Flash and REST request timeout without ``--timeout``: this much, plus the audio's
#: duration (the local emulator recognises at several times real time, not in seconds).
_REQUEST_TIMEOUT = 120.0
_URL_SCHEMES = ("http", "https", "file")
_LOOPBACK = ("127.0.0.1", "localhost", "::1", "[::1]")


def is_url(source: str) -> bool:
    """Whether an input names a URL (``http(s)://`` or ``file://``) rather than a path."""
    return urllib.parse.urlsplit(source).scheme in _URL_SCHEMES


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


# --------------------------------------------------------------------------- recognition


@dataclass
class Transcript:
    """One input's events, each with its channel (0 for real time, which is mono)."""

    events: list[tuple[int, Event]]
    channels: int

    @property
    def text(self) -> bool:
        """Whether anything was recognised."""
        return any(getattr(event, "text", "") for _, event in self.events)

    def channel(self, channel: int) -> list[tuple[int, Event]]:
        return [(c, e) for c, e in self.events if c == channel]


def _timeout(args: argparse.Namespace, extra: float) -> float:
    if args.timeout is not None:
        return float(args.timeout)
    return _REQUEST_TIMEOUT + extra


def _audio_info(path: str) -> tuple[float, int]:
    """An audio file's duration and channels ((0, 1) when libsndfile cannot tell: raw
    PCM, AAC...)."""
    import soundfile

    try:
        info = soundfile.info(path)
    except (soundfile.SoundFileError, RuntimeError, OSError, ValueError, TypeError):
        return 0.0, 1
    return float(info.duration), int(info.channels)


def _file_link(source: str, services: Services) -> str:
    """What FileTrans is to download for ``source``: a URL as it is; a local path as a
    ``file://`` URL when the gateway runs on this machine (the embedded one, or an
    explicit one on a loopback address), else a clear error."""
    if is_url(source):
        return source
    host = urllib.parse.urlsplit(services.http_url or "").hostname or ""
    if services.local or host in _LOOPBACK:
        path = Path(source)
        if not path.is_file():
            from ..errors import AudioFormatError

            raise AudioFormatError(f"audio file not found: {source}")
        return path.resolve().as_uri()
    raise ValueError(
        f"FileTrans downloads its audio from a URL: give an http(s):// URL the service can "
        f"fetch instead of {source}, or use --service flash for a local file"
    )


_hinted: list[bool] = []


def _flash_edition_hint() -> None:
    """Once per run: the cloud refused Flash, which the trial edition does not have."""
    from ..quickstart import print_notice

    if not _hinted:
        _hinted.append(True)
        print_notice(
            "FlashRecognizer needs a commercial-edition appkey in the cloud; "
            "--service realtime works on every edition"
        )


def _cloud_url(services: Services) -> str | None:
    """The base URL of Flash and REST: the gateway's, or the cloud's in the region."""
    if services.http_url is not None:
        return services.http_url
    if services.region == DEFAULT_REGION:
        return None  # the clients' documented default
    return f"https://nls-gateway-{services.region}.aliyuncs.com"


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
        except (TaskFailedError, GatewayConnectionError) as exc:
            if not exc.retryable or attempt == BATCH_ATTEMPTS:
                raise
            delay = 2.0 ** (attempt - 1) * (0.5 + random.random() / 2)
            log.info("%s: %s; trying again in %.1f s", source, exc, delay)
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


async def recognise(args: argparse.Namespace, services: Services, source: str) -> Transcript:
    """Recognise one input with ``args.service``."""
    service = args.service
    if service == "realtime":
        return await _realtime(args, services, source)
    from ..recordings.services import FileTranscriber, FlashRecognizer, RestRecognizer
    from .output import recording_events

    params: dict[str, Any] = {}
    if args.punctuation:
        params["enable_punctuation_prediction"] = True
    if args.itn:
        params["enable_inverse_text_normalization"] = True
    if args.words:  # each service's name for word times
        params["enable_words" if service == "filetrans" else "enable_word_level_result"] = True
    # What the file holds: outputs are per channel of the file, even a silent channel.
    seconds, channels = (0.0, 1) if is_url(source) else await asyncio.to_thread(_audio_info, source)
    if service == "filetrans":
        assert services.access_key is not None
        ak_id, ak_secret = services.access_key
        local = services.http_url is not None
        async with FileTranscriber(
            ak_id,
            ak_secret,
            appkey=services.appkey,
            region=services.region,
            endpoint=services.http_url,
            # The local emulator finishes in seconds: poll it every second (its limit).
            max_poll_interval=1.0 if local else 10.0,
        ) as ft:
            task = await ft.submit(_file_link(source, services), **params)
            wait = args.timeout if args.timeout is not None else FILE_TRANS_WAIT
            result = await task.wait(timeout=wait)
    else:
        url = _cloud_url(services)
        timeout = _timeout(args, seconds)
        if service == "flash":
            async with FlashRecognizer(services.appkey, services.token, url, timeout=timeout) as f:
                try:
                    if is_url(source):
                        result = await f.recognize(audio_address=source, **params)
                    else:
                        result = await f.recognize(source, sample_rate=args.sample_rate, **params)
                except (TaskFailedError, AuthenticationError):
                    if services.http_url is None:
                        _flash_edition_hint()
                    raise
        else:
            params.pop("enable_word_level_result", None)  # one sentence: no word times
            async with RestRecognizer(services.appkey, services.token, url, timeout=timeout) as r:
                result = await r.recognize(source, sample_rate=args.sample_rate, **params)
    events: list[tuple[int, Event]] = list(recording_events(result, _NAMESPACES[service]))
    if service == "rest":
        channels = 1  # mixed to mono before upload
    channels = max(channels, 1 + max((s.channel_id for s in result.sentences), default=0))
    return Transcript(events, channels)


class _Collect:
    """A renderer that keeps the events (real-time runs in a batch)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def handle(self, event: Event) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


async def _realtime(args: argparse.Namespace, services: Services, source: str) -> Transcript:
    """One file through a real-time Transcriber at ``--pace``."""
    from ..audio import load_file
    from ..realtime.session import Transcriber
    from .main import REALTIME_TIMEOUT, _finish_render, _render, realtime_params

    pcm = await asyncio.to_thread(load_file, source, args.sample_rate)
    timeout = args.timeout if args.timeout is not None else REALTIME_TIMEOUT
    session = Transcriber(
        services.appkey,
        services.token,
        url=services.url,
        sample_rate=args.sample_rate,
        enable_intermediate_result=bool(args.intermediate),
        enable_punctuation_prediction=args.punctuation,
        enable_inverse_text_normalization=args.itn,
        connect_timeout=timeout,
        start_timeout=timeout,
        stop_timeout=timeout,
        **realtime_params(args),
    )
    collect = _Collect()
    render_task = asyncio.create_task(_render(session.events(), collect))
    try:
        async with session:
            await session.stream(pcm, pace=args.pace if args.pace is not None else 1.0)
            await session.stop()
    finally:
        error = await _finish_render(render_task)
    if error is not None and error is not session.error:
        raise error
    return Transcript([(0, e) for e in collect.events], 1)


# --------------------------------------------------------------------------- output


def render(
    events: Iterable[tuple[int, Event]], fmt: str, out: TextIO, *, channel_ids: bool
) -> None:
    """Write ``events`` in ``fmt`` with the renderers of :mod:`nlsstream.cli.output` (JSON
    Lines of a recording also carry each sentence's ``channel_id``)."""
    from .output import event_to_json, renderer_for

    if fmt == "jsonl" and channel_ids:
        for channel, event in events:
            record = {**event_to_json(event), "channel_id": channel}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
        out.flush()
        return
    renderer = renderer_for(fmt, out, live=False)
    for _, event in events:
        renderer.handle(event)
    renderer.close()


def _write_outputs(transcript: Transcript, base: str, fmt: str, channel_ids: bool) -> list[str]:
    """Every output of one input, each written atomically (blocking: a worker thread)."""
    from .main import _open_output

    paths = output_paths(base, fmt, transcript.channels)
    for channel, path in enumerate(paths):
        events = transcript.events if len(paths) == 1 else transcript.channel(channel)
        buffer = io.StringIO()
        render(events, fmt, buffer, channel_ids=channel_ids)
        with _open_output(path) as output:
            output.file.write(buffer.getvalue())
            output.keep = True
    return paths


# --------------------------------------------------------------------------- entry points


def _services(
    args: argparse.Namespace, notice: Any
) -> contextlib.AbstractAsyncContextManager[Services]:
    from ..quickstart import service_settings

    if args.service != "realtime":
        from ..recordings.services import _aiohttp

        _aiohttp()  # before anything starts: ImportError naming the 'files' extra

    return service_settings(
        url=args.url,
        appkey=args.appkey,
        token=args.token,
        notice=notice,
        access_key_needed=args.service == "filetrans",
        file_workers=args.jobs,
        service_name=None if args.service == "realtime" else args.service,
    )


async def run_recording(
    args: argparse.Namespace, out: TextIO, interrupt: _Interrupt, notice: Any
) -> int:
    """One input, one output (standard output or ``-o``): every channel in time order."""
    from ..quickstart import print_notice
    from .main import EXIT_OK

    if not is_url(args.source) and not await asyncio.to_thread(os.path.isfile, args.source):
        from ..errors import AudioFormatError

        # Before any gateway or connection: a missing file costs nothing.
        raise AudioFormatError(f"audio file not found: {args.source}")
    async with _services(args, notice) as services:
        transcript = await recognise(args, services, args.source)
    render(transcript.events, args.format, out, channel_ids=args.service != "realtime")
    if not transcript.text:
        print_notice("no speech recognised")
    return interrupt.status if interrupt.count else EXIT_OK


@dataclass
class _Tally:
    total: int
    done: int = 0
    failed: int = 0

    @property
    def finished(self) -> int:
        return self.done + self.failed

    def label(self) -> str:
        return f"{self.finished}/{self.total} files, {self.failed} failed"


async def run_batch(args: argparse.Namespace, interrupt: _Interrupt, notice: Any) -> int:
    """Every input of ``args.inputs`` into ``args.output_dir``; see the module docstring."""
    from .main import _PROGRESS_INTERVAL, EXIT_FAILURE, EXIT_OK, _isatty, command_secrets
    from .output import ProgressBar

    await asyncio.to_thread(os.makedirs, args.output_dir, exist_ok=True)
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
        interrupt.graceful = stopping.set  # the first signal: start no more inputs
        limit = asyncio.Semaphore(args.jobs)
        secrets = command_secrets(args)

        async def one(source: str, services: Services) -> None:
            async with limit:
                if stopping.is_set():
                    return
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
                    text = str(exc) if expected else f"{type(exc).__name__}: {exc}"
                    message = " ".join(redact(text or type(exc).__name__, *secrets).split())
                    say(f"nlsstream: error: {source}: {message}")
                    return
                tally.done += 1
                refresh()
                if not transcript.text:
                    say(f"nlsstream: {source}: no speech recognised")
                log.info("%s -> %s", source, ", ".join(paths))

        async with _services(args, notice) as services:
            if args.service == "filetrans" and not services.local:
                for source in todo:  # a local path the service cannot fetch: say so now
                    if not is_url(source):
                        _file_link(source, services)
            if args.progress and _isatty(sys.stderr):
                progress = ProgressBar(len(todo), sys.stderr, label=tally.label())
            jobs = {asyncio.ensure_future(one(source, services)) for source in todo}
            try:
                pending = set(jobs)
                while pending:
                    refresh()  # the elapsed time and ETA, between completions too
                    _, pending = await asyncio.wait(pending, timeout=_PROGRESS_INTERVAL)
            finally:
                for job in jobs:
                    job.cancel()
                await asyncio.gather(*jobs, return_exceptions=True)
                interrupt.graceful = None
                if progress is not None:
                    progress.close()
    not_run = len(todo) - tally.finished
    parts = [f"{tally.done} of {len(args.inputs)} done"]
    if tally.failed:
        parts.append(f"{tally.failed} failed")
    if skipped:
        parts.append(f"{len(skipped)} skipped (output exists; --force redoes them)")
    if not_run:
        parts.append(f"{not_run} not started (interrupted)")
    print(f"nlsstream: {', '.join(parts)}", file=sys.stderr, flush=True)
    if interrupt.count:
        return interrupt.status
    return EXIT_FAILURE if tally.failed else EXIT_OK
