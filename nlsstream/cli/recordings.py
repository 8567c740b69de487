"""One recording on the command line: ``transcribe FILE|URL --service flash|filetrans|rest``
(:class:`~nlsstream.FlashRecognizer`, :class:`~nlsstream.FileTranscriber`,
:class:`~nlsstream.RestRecognizer`), or ``realtime`` through
:func:`nlsstream.cli.realtime.file_transcript`. Files are read in worker threads."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import os
import sys
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable
from typing import Any, Literal, TextIO

from nlsstream import (
    AuthenticationError,
    Event,
    FileResult,
    FileTranscriber,
    FileTransTask,
    FlashRecognizer,
    RestRecognizer,
    TaskFailedError,
)
from nlsstream.audio import check_audio_path
from nlsstream.auth import DEFAULT_REGION
from nlsstream.proxies import redact_proxy
from nlsstream.quickstart import Services, print_notice, service_settings

from .common import EXIT_OK, PROGRESS_INTERVAL, Interrupt, isatty
from .output import ProgressBar, Transcript, recording_events, render
from .realtime import file_transcript, print_stats

__all__ = [
    "FILE_TRANS_WAIT",
    "Phases",
    "is_url",
    "recognise",
    "run_recording",
    "run_result",
    "services_for",
]

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


#: What FileTrans' pending statuses are called on the progress line.
_FILE_TRANS_PHASES = {21050001: "running", 21050002: "queueing"}


class Phases:
    """One recording's phases (``preparing``, ``uploading``, ``recognising``; FileTrans:
    ``submitting``, ``queueing``, ``running``): shown on ``bar`` (a terminal's progress
    line, or ``None``) and timed for ``--stats`` (:attr:`times`, seconds per phase)."""

    def __init__(self, bar: ProgressBar | None) -> None:
        self.bar = bar
        self.times: dict[str, float] = {}
        self._phase: str | None = None
        self._since = self.started = time.monotonic()
        self._done = 0.0
        self._task: FileTransTask | None = None

    def enter(
        self, phase: str | None, label: str | None = None, total: float | None = None
    ) -> None:
        """Now in ``phase`` (``None``: over), shown as ``label`` (default: the phase)
        with a bar of ``total`` (``None``: no bar)."""
        now = time.monotonic()
        if phase != self._phase:
            if self._phase is not None:
                self.times[self._phase] = self.times.get(self._phase, 0.0) + now - self._since
            self._phase, self._since, self._done = phase, now, 0.0
        if self.bar is not None and phase is not None:
            self.bar.label, self.bar.total = label or phase, total
            self.bar.update(self._done)

    def upload(self, sent: int, total: int) -> None:
        """The recording clients' ``on_progress``: uploading, then recognising."""
        if sent >= total:
            self.enter("recognising")
            return
        self.enter("uploading", f"uploading {sent / 1e6:.1f}/{total / 1e6:.1f} MB", total)
        self._done = sent
        if self.bar is not None:
            self.bar.update(sent)

    def watch(self, task: FileTransTask) -> None:
        """Follow a FileTrans task's status (queueing, running) as it is polled."""
        self._task = task
        self.tick()

    def tick(self) -> None:
        """Redraw: the time elapsed, and a watched task's latest status."""
        if self._task is not None:
            phase = _FILE_TRANS_PHASES.get(self._task.status, "waiting")
            self.enter(phase, f"FileTrans task {self._task.task_id} {phase}")
        elif self.bar is not None:
            self.bar.update(self._done)

    @contextlib.asynccontextmanager
    async def shown(self) -> AsyncIterator[None]:
        """Redraw every :data:`PROGRESS_INTERVAL` (the elapsed time) while inside; end
        the last phase and erase the line on the way out."""
        ticker = asyncio.create_task(self._tick()) if self.bar is not None else None
        try:
            yield
        finally:
            if ticker is not None:
                ticker.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await ticker
            self.enter(None)
            if self.bar is not None:
                self.bar.close()

    async def _tick(self) -> None:
        while True:
            await asyncio.sleep(PROGRESS_INTERVAL)
            self.tick()


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


def file_link(source: str, services: Services) -> str:
    """What FileTrans is to download for ``source``: a URL as it is; a local path as a
    ``file://`` URL when the gateway runs on this machine (the embedded one, or an
    explicit one on a loopback address), else a clear error."""
    if is_url(source):
        return source
    host = urllib.parse.urlsplit(services.http_url or "").hostname or ""
    if services.local or host in _LOOPBACK:
        return check_audio_path(source).resolve().as_uri()
    raise ValueError(
        f"FileTrans downloads its audio from a URL: give an http(s):// URL the service can "
        f"fetch instead of {source}, or use --service flash for a local file"
    )


_hinted: list[bool] = []


def _flash_edition_hint() -> None:
    """Once per run: the cloud refused Flash, which the trial edition does not have."""
    if not _hinted:
        _hinted.append(True)
        print_notice(
            "--service flash needs a commercial-edition appkey in the cloud; "
            "--service realtime works on every edition"
        )


def _cloud_url(services: Services) -> str | None:
    """The base URL of Flash and REST: the gateway's, or the cloud's in the region."""
    if services.http_url is not None:
        return services.http_url
    if services.region == DEFAULT_REGION:
        return None  # the clients' documented default
    return f"https://nls-gateway-{services.region}.aliyuncs.com"


def _params(args: argparse.Namespace) -> dict[str, Any]:
    """The recording services' parameters of the options (each service's names)."""
    params: dict[str, Any] = {}
    if args.punctuation:
        params["enable_punctuation_prediction"] = True
    if args.itn:
        params["enable_inverse_text_normalization"] = True
    if args.words and args.service != "rest":  # one sentence: no word times
        name = "enable_words" if args.service == "filetrans" else "enable_word_level_result"
        params[name] = True
    return params


def _file_transcriber(args: argparse.Namespace, services: Services) -> FileTranscriber:
    assert services.access_key is not None
    ak_id, ak_secret = services.access_key
    local = services.http_url is not None
    return FileTranscriber(
        ak_id,
        ak_secret,
        appkey=services.appkey,
        region=services.region,
        endpoint=services.http_url,
        # The local emulator finishes in seconds: poll it every second (its limit).
        max_poll_interval=1.0 if local else 10.0,
        proxy=_proxy(args, services),
    )


async def _wait_task(
    args: argparse.Namespace, services: Services, task: FileTransTask, phases: Phases | None
) -> FileResult:
    """Wait ``--timeout`` for a FileTrans task; past it, say how to get the result later."""
    if phases is not None:
        phases.watch(task)
    wait = args.timeout if args.timeout is not None else FILE_TRANS_WAIT
    try:
        return await task.wait(timeout=wait)
    except TimeoutError:
        late = f"FileTrans task {task.task_id} did not finish within {wait:g} s (--timeout)"
        if services.local:
            raise TimeoutError(
                f"{late}; the embedded gateway's tasks end with this run: give a longer --timeout"
            ) from None
        url = f" --url {redact_proxy(args.url)}" if args.url else ""
        raise TimeoutError(
            f"{late}; it goes on: 'nlsstream result {task.task_id}{url}' prints its "
            "result once it is done"
        ) from None


async def _file_trans(
    args: argparse.Namespace,
    services: Services,
    source: str,
    params: dict[str, Any],
    phases: Phases | None,
) -> FileResult:
    async with _file_transcriber(args, services) as ft:
        if phases is not None:
            phases.enter("submitting")
        task = await ft.submit(file_link(source, services), **params)
        return await _wait_task(args, services, task, phases)


async def _flash(
    args: argparse.Namespace,
    services: Services,
    source: str,
    params: dict[str, Any],
    seconds: float,
    phases: Phases | None,
) -> FileResult:
    url, timeout = _cloud_url(services), _timeout(args, seconds)
    async with FlashRecognizer(
        services.appkey, services.token, url, timeout=timeout, proxy=_proxy(args, services)
    ) as f:
        try:
            if is_url(source):
                if phases is not None:
                    phases.enter("recognising")  # the service downloads the URL
                return await f.recognize(audio_address=source, **params)
            return await f.recognize(
                source, sample_rate=args.sample_rate, on_progress=_uploading(phases), **params
            )
        except (TaskFailedError, AuthenticationError):
            if services.http_url is None:
                _flash_edition_hint()
            raise


async def _rest(
    args: argparse.Namespace,
    services: Services,
    source: str,
    params: dict[str, Any],
    seconds: float,
    phases: Phases | None,
) -> FileResult:
    url, timeout = _cloud_url(services), _timeout(args, seconds)
    async with RestRecognizer(
        services.appkey, services.token, url, timeout=timeout, proxy=_proxy(args, services)
    ) as r:
        return await r.recognize(
            source, sample_rate=args.sample_rate, on_progress=_uploading(phases), **params
        )


def _uploading(phases: Phases | None) -> Callable[[int, int], None] | None:
    """The upload's progress callback (the phases enter "preparing"), if shown."""
    if phases is None:
        return None
    phases.enter("preparing")
    return phases.upload


def _proxy(args: argparse.Namespace, services: Services) -> str | Literal[True] | None:
    """The recording clients' ``proxy=`` of ``--proxy``: as the real-time session's (the
    system's settings by default; the embedded gateway always directly)."""
    if services.local or args.proxy == "none":
        return None
    return args.proxy if args.proxy is not None else True


async def recognise(
    args: argparse.Namespace, services: Services, source: str, phases: Phases | None = None
) -> Transcript:
    """Recognise one input with ``args.service``; a recording's phases are shown and
    timed on ``phases`` when given."""
    service = args.service
    if service == "realtime":
        return await file_transcript(args, services, source)
    params = _params(args)
    # What the file holds: outputs are per channel of the file, even a silent channel.
    seconds, channels = (0.0, 1) if is_url(source) else await asyncio.to_thread(_audio_info, source)
    if service == "filetrans":
        result = await _file_trans(args, services, source, params, phases)
    elif service == "flash":
        result = await _flash(args, services, source, params, seconds, phases)
    else:
        result = await _rest(args, services, source, params, seconds, phases)
    if service == "rest":
        channels = 1  # mixed to mono before upload
    return _result_transcript(result, _NAMESPACES[service], channels)


def _phase_stats(phases: Phases) -> list[tuple[str, str]]:
    """``--stats`` of a recording: the time of each phase and in all (latencies,
    lateness and resumes are figures of a real-time session)."""
    total = time.monotonic() - phases.started
    figures = [(name, f"{seconds:.2f} s") for name, seconds in phases.times.items()]
    figures.append(("total", f"{total:.2f} s"))
    figures.append(("note", "latencies, lateness and resumes are measured with --service realtime"))
    return figures


def _result_transcript(result: FileResult, namespace: str, channels: int) -> Transcript:
    """A recording's result as the renderers take it: every channel, in time order."""
    events: list[tuple[int, Event]] = list(recording_events(result, namespace))
    channels = max(channels, 1 + max((s.channel_id for s in result.sentences), default=0))
    return Transcript(events, channels)


async def run_result(
    args: argparse.Namespace, out: TextIO, interrupt: Interrupt, notice: Callable[[str], None]
) -> int:
    """``nlsstream result TASK_ID``: a FileTrans task's result, waited for up to
    ``--timeout``, rendered as ``transcribe`` renders a recording's."""
    if not (args.url or os.environ.get("NLS_URL")) and not (
        os.environ.get("ALIYUN_AK_ID") and os.environ.get("ALIYUN_AK_SECRET")
    ):
        raise ValueError(
            "a task is asked of the FileTrans service that runs it: set ALIYUN_AK_ID and "
            "ALIYUN_AK_SECRET for the cloud, or give --url of the gateway"
        )
    shown = args.progress and isatty(sys.stderr)
    phases = Phases(ProgressBar(None, sys.stderr, label="starting") if shown else None)
    async with (
        services_for(args, notice) as services,
        phases.shown(),
        _file_transcriber(args, services) as ft,
    ):
        result = await _wait_task(args, services, ft.task(args.task_id), phases)
    render(_result_transcript(result, "FileTrans", 1).events, args.format, out, channel_ids=True)
    if not result.text:
        print_notice("no speech recognised")
    return interrupt.status if interrupt.count else EXIT_OK


def _check_files_extra() -> None:
    """Before anything starts: the recording clients need the ``files`` extra."""
    if importlib.util.find_spec("aiohttp") is None:
        raise ImportError(
            "nlsstream's recording clients need aiohttp: pip install 'nlsstream[files]'"
        )


def services_for(
    args: argparse.Namespace, notice: Callable[[str], None]
) -> contextlib.AbstractAsyncContextManager[Services]:
    """Where the services of ``args`` are (:func:`nlsstream.quickstart.service_settings`)."""
    if args.service != "realtime":
        _check_files_extra()
    return service_settings(
        url=args.url,
        appkey=args.appkey,
        token=args.token,
        notice=notice,
        access_key_needed=args.service == "filetrans",
        file_workers=args.jobs,
        service_name=None if args.service == "realtime" else args.service,
        token_endpoint=args.token_endpoint,
    )


async def run_recording(
    args: argparse.Namespace, out: TextIO, interrupt: Interrupt, notice: Callable[[str], None]
) -> int:
    """One input, one output (standard output or ``-o``): every channel in time order."""
    if not is_url(args.source):
        # Before any gateway or connection: a missing file costs nothing.
        await asyncio.to_thread(check_audio_path, args.source)
    shown = args.progress and isatty(sys.stderr)
    phases = Phases(ProgressBar(None, sys.stderr, label="starting") if shown else None)
    try:
        async with services_for(args, notice) as services, phases.shown():
            transcript = await recognise(args, services, args.source, phases)
    finally:
        if args.stats:
            print_stats(_phase_stats(phases))
    render(transcript.events, args.format, out, channel_ids=args.service != "realtime")
    if not transcript.text:
        print_notice("no speech recognised")
    return interrupt.status if interrupt.count else EXIT_OK
