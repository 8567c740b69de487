"""Real time on the command line: a file, standard input or the microphone through a
:class:`~nlsstream.Transcriber` or :class:`~nlsstream.Recognizer`, rendered as the events
arrive (``transcribe --service realtime``, ``recognize``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import sys
import urllib.parse
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any, Literal, TextIO

from nlsstream import (
    ConfigurationError,
    Event,
    Metrics,
    NlsError,
    Recognizer,
    Resumed,
    Transcriber,
)
from nlsstream.audio import load_file
from nlsstream.proxies import redact_proxy, system_proxy
from nlsstream.quickstart import Services, print_notice, service_settings

from .common import EXIT_OK, PROGRESS_INTERVAL, Interrupt, isatty, notice_for
from .output import ProgressBar, Renderer, Transcript, renderer_for
from .stdin import stdin_audio

__all__ = [
    "REALTIME_TIMEOUT",
    "file_transcript",
    "print_stats",
    "realtime_params",
    "session_stats",
    "transcribe_session",
]

#: Real time: the default limit for connecting, starting and the silence after Stop.
REALTIME_TIMEOUT = 10.0
# How long the renderer may take to see the end of the events once the session is over.
_RENDER_GRACE = 5.0


def realtime_params(args: argparse.Namespace) -> dict[str, Any]:
    """The real-time transcriber's extra Start parameters of ``--words`` and
    ``--max-sentence-silence``."""
    params: dict[str, Any] = {}
    if args.words:
        params["enable_words"] = True
    if args.max_sentence_silence is not None:
        params["max_sentence_silence"] = args.max_sentence_silence
    return params


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms"


def _seconds(nbytes: int, metrics: Metrics) -> str:
    return f"{nbytes / (2 * metrics.sample_rate):.2f} s"


def session_stats(metrics: Metrics) -> list[tuple[str, str]]:
    """A real-time session's figures for ``--stats``, as ``(name, value)``; ``n/a``
    for what the session never measured (no paced frame, no sentence, no partial)."""
    paced = metrics.paced_frames > 0
    return [
        ("audio sent", f"{metrics.audio_ms_sent / 1000:.2f} s"),
        ("frames sent", str(metrics.frames_sent)),
        ("lateness p99", f"{metrics.p99_lateness_ms:.1f} ms" if paced else "n/a"),
        ("lateness max", f"{metrics.max_lateness_ms:.1f} ms" if paced else "n/a"),
        ("time to first partial", _ms(metrics.time_to_first_partial_ms)),
        *[(f"final latency p{p}", _ms(metrics.final_latency_ms(p))) for p in (50, 90, 99)],
        ("first-partial latency p50", _ms(metrics.first_partial_latency_ms(50))),
        ("stop -> completed", _ms(metrics.stop_to_completed_ms)),
        ("resumes", str(metrics.reconnects)),
        ("replayed audio", _seconds(metrics.replayed_bytes, metrics)),
        ("keepalive audio", _seconds(metrics.keepalive_bytes, metrics)),
    ]


def print_stats(figures: list[tuple[str, str]]) -> None:
    """``--stats``: one line a figure on stderr (``nlsstream: stats: NAME: VALUE``)."""
    for name, value in figures:
        print(f"nlsstream: stats: {name}: {value}", file=sys.stderr)
    sys.stderr.flush()


def session_proxy(args: argparse.Namespace, services: Services) -> str | Literal[True] | None:
    """The session's ``proxy=`` of ``--proxy`` (default ``True``: the system's settings);
    the embedded gateway is always reached directly. Raises
    :class:`~nlsstream.ConfigurationError` when a proxy is to be used but python-socks is
    missing, naming the options rather than Python arguments."""
    proxy: str | Literal[True] | None = True
    if services.local or args.proxy == "none":
        proxy = None
    elif args.proxy is not None:
        proxy = args.proxy
    parts = urllib.parse.urlsplit(services.url)
    chosen = system_proxy(parts.scheme, parts.hostname or "") if proxy is True else proxy
    if chosen is not None and importlib.util.find_spec("python_socks") is None:
        raise ConfigurationError(
            f"a proxy is set for {parts.hostname} ({redact_proxy(chosen)}) but python-socks "
            "is not installed: pip install 'nlsstream[proxy]', or give --proxy none to "
            "connect directly"
        )
    return proxy


def _session(
    args: argparse.Namespace, services: Services, *, intermediate: bool
) -> Transcriber | Recognizer:
    """The session of ``args`` (``args.kind``: transcriber or recognizer)."""
    timeout = args.timeout if args.timeout is not None else REALTIME_TIMEOUT
    cls = Transcriber if args.kind == "transcriber" else Recognizer
    return cls(
        services.appkey,
        services.token,
        url=services.url,
        proxy=session_proxy(args, services),
        sample_rate=args.sample_rate,
        enable_intermediate_result=intermediate,
        enable_punctuation_prediction=args.punctuation,
        enable_inverse_text_normalization=args.itn,
        connect_timeout=timeout,
        start_timeout=timeout,
        stop_timeout=timeout,
        **realtime_params(args),
    )


async def render_events(events: AsyncIterator[Event], renderer: Renderer) -> NlsError | None:
    """Feed every event to the renderer; returns the error the stream ended with."""
    try:
        async for event in events:
            if isinstance(event, Resumed):
                # Said on stderr, whatever the format: the transcript itself goes on.
                print(
                    f"nlsstream: {event.cause}; resumed on a new connection after "
                    f"{event.gap_ms / 1000:.1f} s (replayed {event.replayed_ms / 1000:.1f} s "
                    "of audio)",
                    file=sys.stderr,
                    flush=True,
                )
            renderer.handle(event)
    except NlsError as exc:
        return exc
    return None


async def finish_render(task: asyncio.Task[NlsError | None]) -> NlsError | None:
    """The renderer's end: the event stream ends once the session does (both a normal
    end and an abort); a renderer that does not see it in time is cancelled."""
    try:
        return await asyncio.wait_for(asyncio.shield(task), _RENDER_GRACE)
    except asyncio.TimeoutError:
        task.cancel()
        return None


class _Collect:
    """A renderer that keeps the events (real-time runs in a batch)."""

    def __init__(self) -> None:
        self.events: list[Event] = []

    def handle(self, event: Event) -> None:
        self.events.append(event)

    def close(self) -> None:
        pass


async def file_transcript(args: argparse.Namespace, services: Services, source: str) -> Transcript:
    """One file through a real-time Transcriber at ``--pace`` (a batch's input)."""
    pcm = await asyncio.to_thread(load_file, source, args.sample_rate)
    session = _session(args, services, intermediate=bool(args.intermediate))
    collect = _Collect()
    render_task = asyncio.create_task(render_events(session.events(), collect))
    try:
        async with session:
            await session.stream(pcm, pace=args.pace if args.pace is not None else 1.0)
            await session.stop()
    finally:
        error = await finish_render(render_task)
    if error is not None and error is not session.error:
        raise error
    return Transcript([(0, e) for e in collect.events], 1)


async def _wait_sending(
    sender: asyncio.Future[None], progress: ProgressBar | None, session: Transcriber | Recognizer
) -> None:
    if progress is None:
        await sender
        return
    while not sender.done():
        progress.update(session.metrics.audio_ms_sent)
        await asyncio.wait([sender], timeout=PROGRESS_INTERVAL)
    progress.update(session.metrics.audio_ms_sent)
    await sender


async def _source(
    args: argparse.Namespace, stack: contextlib.AsyncExitStack
) -> tuple[Any, bytes | None]:
    """What to stream, read and checked before connecting (a bad file costs no session),
    and the whole PCM when it is known in advance (for the progress bar)."""
    if args.source == "-":
        audio = await stdin_audio(args.sample_rate)
        if isinstance(audio, bytes):
            return audio, audio
        stdin: AsyncGenerator[bytes, None] = audio
        return await stack.enter_async_context(contextlib.aclosing(stdin)), None
    if args.mic:
        from nlsstream import Microphone

        device: int | str | None = args.device
        if isinstance(device, str) and device.isdigit():
            device = int(device)
        mic = Microphone(sample_rate=args.sample_rate, device=device)
        return await stack.enter_async_context(mic), None
    pcm = await asyncio.to_thread(load_file, args.source, args.sample_rate)
    return pcm, pcm


async def transcribe_session(args: argparse.Namespace, out: TextIO, interrupt: Interrupt) -> int:
    """A file, standard input or the microphone in real time, rendered into ``out``."""
    renderer = renderer_for(args.format, out)
    live = args.format == "text" and isatty(out)
    intermediate = live if args.intermediate is None else args.intermediate
    async with contextlib.AsyncExitStack() as stack:
        source, pcm = await _source(args, stack)
        # Live text and a progress bar on the same terminal would overwrite each other.
        show_progress = pcm is not None and args.progress and isatty(sys.stderr) and not live
        # --url may also be the gateway's http(s)://host:port (as for the recordings).
        services = await stack.enter_async_context(
            service_settings(
                url=args.url,
                appkey=args.appkey,
                token=args.token,
                notice=notice_for(args),
                token_endpoint=args.token_endpoint,
            )
        )
        session = _session(args, services, intermediate=intermediate)
        if args.stats:  # at the end, whatever the end
            stack.callback(lambda: print_stats(session_stats(session.metrics)))
        events = session.events()  # subscribed before start: sees every event
        render_task = asyncio.create_task(render_events(events, renderer))
        try:
            async with session:
                progress = None
                if show_progress and pcm is not None:
                    progress = ProgressBar(len(pcm) * 1000 / (2 * args.sample_rate), sys.stderr)
                # Live sources are already real time; pacing them again only adds delay.
                pace = None if args.mic else args.pace if args.pace is not None else 1.0
                sender = asyncio.ensure_future(session.stream(source, pace=pace))
                interrupt.graceful = sender.cancel
                try:
                    await _wait_sending(sender, progress, session)
                except asyncio.CancelledError:
                    if not interrupt.count or not sender.cancelled():
                        raise
                finally:
                    interrupt.graceful = None
                    if progress is not None:
                        progress.close()
                result = await session.stop()
        finally:
            renderer_error = await finish_render(render_task)
            renderer.close()
        if renderer_error is not None and renderer_error is not session.error:
            raise renderer_error
    if not result.text:
        print_notice("no speech recognised")
    return interrupt.status if interrupt.count else EXIT_OK
