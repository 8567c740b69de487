"""The ``nlsstream`` command line.

Subcommands:

* ``nlsstream transcribe FILE|URL...|-|--mic``: recordings with ``--service``
  (flash by default, filetrans, rest or realtime; :mod:`nlsstream.cli.batch`, also for
  several inputs), standard input and the microphone in real time;
* ``nlsstream recognize FILE|-``: sentence recognition (one utterance, at most 60 s);
* ``nlsstream serve``: run the local NLS gateway until SIGINT/SIGTERM;
* ``nlsstream token``: fetch a token with the AccessKey from the environment.

``transcribe`` and ``recognize`` connect to the cloud when credentials are configured
(see :mod:`nlsstream.config`), to ``--url`` / ``NLS_URL`` when given, and otherwise to an
embedded local gateway (:mod:`nlsstream.quickstart`). Exit status: 0 done (also when
nothing was recognised, which stderr says), 1 failure (one line on stderr, never a
token), 2 usage error, 130 / 143 interrupted by SIGINT (Ctrl-C) / SIGTERM after a clean
stop that kept the sentences already spoken. A batch: 0 every input done or skipped, 1 at
least one failed (:data:`BATCH_EXIT_CODES`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import stat
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TextIO

from .._version import __version__
from ..auth import AccessKeyTokenProvider
from ..config import Settings
from ..errors import NlsError, redact

if TYPE_CHECKING:
    from ..gateway.light import LightGateway
    from ..realtime.protocol import Event
    from ..realtime.session import Session
    from .output import ProgressBar, Renderer

__all__ = ["build_parser", "main"]

log = logging.getLogger("nlsstream.cli.main")

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_TERMINATED = 143  # 128 + SIGTERM

#: What ``transcribe`` and ``recognize`` exit with (their ``--help`` and the README).
EXIT_CODES = (
    "exit status: 0 done (if nothing was recognised, stderr says so), 1 failure (one line "
    "on stderr), 2 usage error, 130 interrupted by Ctrl-C (SIGINT), 143 by SIGTERM; "
    "either signal stops cleanly and keeps the sentences already spoken, a second one "
    "cancels at once"
)
#: The same for a batch (``transcribe`` with several inputs or --output-dir).
BATCH_EXIT_CODES = (
    "with several inputs (or --output-dir): 0 every input done or skipped, 1 at least one "
    "failed (one line each on stderr; every other output is written), 2 usage error, "
    "130/143 interrupted: the first signal starts no more inputs and lets the running ones "
    "finish, a second one cancels them; outputs already written stay"
)

#: Real time: the default limit for connecting, starting and the silence after Stop.
REALTIME_TIMEOUT = 10.0
# How often the progress bar is redrawn (it only writes when the percentage or second changes).
_PROGRESS_INTERVAL = 0.1
# A WAV header is usually 44 bytes; one not complete within this much is not streamed.
_WAV_HEADER_MAX = 64 * 1024
# Bytes per read from a stdin pipe; read1 returns what is there, so this bounds latency only.
_STDIN_CHUNK = 32 * 1024


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="nlsstream",
        description=(
            "Real-time speech recognition with Alibaba Cloud NLS, or offline with the "
            "embedded local gateway when no credentials are configured."
        ),
        epilog=(
            "Credentials come from the environment: NLS_APPKEY, and NLS_TOKEN or "
            "ALIYUN_AK_ID + ALIYUN_AK_SECRET (NLS_URL, NLS_REGION optional). "
            "Run 'nlsstream COMMAND --help' for the options of a command."
        ),
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_transcribe(sub)
    _add_recognize(sub)
    _add_serve(sub)
    _add_token(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    check = getattr(args, "check", None)
    if check is not None:
        problem = check(args)
        if problem:
            args.parser.error(problem)  # exits with status 2
    status: int = func(args)
    return status


# --------------------------------------------------------------------------- errors


def _fail(message: str) -> int:
    print(f"nlsstream: error: {message}", file=sys.stderr, flush=True)
    return EXIT_FAILURE


def _run(coro: Any, *, verbose: bool, secrets: Sequence[str | None] = ()) -> int:
    """Run ``coro`` and turn every expected failure into one line on stderr."""
    try:
        status: int = asyncio.run(coro)
        return status
    except KeyboardInterrupt:  # platforms without loop signal handlers
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (e.g. '| head'): nothing left to say, and nobody to say it to.
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
    except (NlsError, OSError, ValueError, ImportError) as exc:  # ImportError: an extra
        if verbose:
            log.debug("failed", exc_info=True)
        # The SDK never puts a token in a message; redacting here is a second line of defence.
        message = redact(str(exc) or type(exc).__name__, *secrets)
        return _fail(" ".join(message.split()))


# --------------------------------------------------------------------------- transcribe, recognize


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _pace(text: str) -> float:
    value = float(text)
    if value < 0 or value != value:
        raise argparse.ArgumentTypeError(f"must be 0 (as fast as possible) or positive, got {text}")
    return value


def _silence_ms(text: str) -> int:
    value = int(text)
    if not 200 <= value <= 6000:
        raise argparse.ArgumentTypeError(f"must be 200..6000 ms, got {text}")
    return value


def _session_options() -> argparse.ArgumentParser:
    """Options shared by transcribe and recognize."""
    p = argparse.ArgumentParser(add_help=False)
    conn = p.add_argument_group("connection")
    conn.add_argument(
        "--url",
        help="gateway URL (default: NLS_URL; else the cloud when credentials are set; "
        "else an embedded local gateway)",
    )
    conn.add_argument("--appkey", help="project appkey (default: NLS_APPKEY)")
    conn.add_argument(
        "--token",
        help="token (discouraged: visible to other users in the process list; "
        "prefer the NLS_TOKEN or ALIYUN_AK_ID/ALIYUN_AK_SECRET environment variables)",
    )
    conn.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help=(
            "real time: limit for connecting and starting, each, and for the gateway's "
            "silence after Stop (default 10); flash and rest: limit for the request "
            "(default 120 + the audio's duration); filetrans: how long the task is waited "
            "for (default 24 h)"
        ),
    )
    audio = p.add_argument_group("audio")
    audio.add_argument(
        "--sample-rate",
        type=int,
        choices=(8000, 16000),
        default=16000,
        help="rate sent to the gateway; files and containers on stdin are resampled, "
        "headerless stdin must already be PCM16LE mono at this rate (default %(default)s)",
    )
    audio.add_argument(
        "--pace",
        type=_pace,
        metavar="X",
        help="real time: send speed, 1 = real time, 2 = twice as fast, 0 = as fast as "
        "allowed (default 1)",
    )
    rec = p.add_argument_group("recognition")
    rec.add_argument(
        "--intermediate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="ask for intermediate results (default: on for live terminal output)",
    )
    rec.add_argument("--punctuation", action="store_true", help="add punctuation (cloud only)")
    rec.add_argument(
        "--itn",
        action="store_true",
        help="inverse text normalisation: numbers as digits (cloud only)",
    )
    out = p.add_argument_group("output")
    fmt = out.add_mutually_exclusive_group()
    fmt.add_argument(
        "--jsonl",
        dest="format",
        action="store_const",
        const="jsonl",
        help="every event as one JSON object per line",
    )
    fmt.add_argument(
        "--srt", dest="format", action="store_const", const="srt", help="SRT subtitles"
    )
    fmt.add_argument(
        "--vtt", dest="format", action="store_const", const="vtt", help="WebVTT subtitles"
    )
    out.add_argument(
        "-o", "--output", metavar="FILE", help="write to FILE instead of standard output"
    )
    out.add_argument(
        "--no-progress",
        dest="progress",
        action="store_false",
        help="no progress bar on stderr (shown with elapsed time and ETA for files and "
        "containers on stdin when stderr is a terminal, unless live text is on it)",
    )
    out.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")
    p.set_defaults(format="text")
    return p


def _add_transcribe(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "transcribe",
        parents=[_session_options()],
        help="transcribe recordings, standard input or the microphone",
        description=(
            "Transcribe recordings with the service of --service, or standard input and "
            "the microphone in real time (SpeechTranscriber). FILE is any audio file "
            "libsndfile reads (WAV, FLAC, OGG, MP3...) or a .pcm/.raw file; URL is "
            "http(s):// or file:// (flash and filetrans); '-' reads standard input: a WAV, "
            "MP3, OGG or FLAC stream is recognised by its header and decoded, anything else "
            "is PCM16LE mono at --sample-rate. Several inputs (or --output-dir) make a "
            "batch: one output per input (per channel when there are several: "
            "NAME.ch0.srt, ...), -j at once, a progress bar on a terminal."
        ),
        epilog=f"{EXIT_CODES}. {BATCH_EXIT_CODES}.",
    )
    p.add_argument(
        "source",
        nargs="*",
        metavar="FILE|URL|-",
        help="audio files or URLs, or - for stdin",
    )
    p.add_argument(
        "--service",
        choices=("realtime", "flash", "filetrans", "rest"),
        help="realtime: stream through the real-time transcriber (every edition); flash: "
        "FlashRecognizer, a whole recording in one request, every channel (commercial "
        "edition in the cloud); filetrans: FileTrans, a URL the service downloads, hours "
        "of audio, needs ALIYUN_AK_ID/ALIYUN_AK_SECRET (a local path is given to the local "
        "gateway as a file:// URL); rest: one sentence, at most 60 s. Default: flash for "
        "files and URLs; realtime for - and --mic, or when --pace, --intermediate or "
        "--max-sentence-silence is given",
    )
    batch = p.add_argument_group("batch")
    batch.add_argument(
        "--output-dir",
        metavar="DIR",
        help="write one output per input into DIR (NAME.txt, .jsonl, .srt or .vtt; "
        "NAME.chN.EXT per channel when there are several); needed for several inputs",
    )
    batch.add_argument(
        "-j",
        "--jobs",
        type=_positive_int,
        default=2,
        metavar="N",
        help="inputs recognised at once (default %(default)s: the cloud trial's concurrency)",
    )
    batch.add_argument(
        "--force",
        action="store_true",
        help="redo inputs whose output exists (by default they are skipped)",
    )
    p.add_argument("--mic", action="store_true", help="record from the microphone (Ctrl-C ends)")
    p.add_argument("--device", help="microphone device name or number (default: system default)")
    p.add_argument("--words", action="store_true", help="word timestamps (shown with --jsonl)")
    p.add_argument(
        "--max-sentence-silence",
        type=_silence_ms,
        metavar="MS",
        help="silence that ends a sentence, 200..6000 ms (gateway default 800)",
    )
    p.set_defaults(func=_transcribe_cmd, check=_check_transcribe, parser=p, kind="transcriber")


def _add_recognize(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "recognize",
        parents=[_session_options()],
        help="recognise one utterance (at most 60 s) from a file or standard input",
        description=(
            "Sentence recognition (SpeechRecognizer): one result for the whole audio, "
            "which must be at most 60 s. '-' reads standard input (WAV, MP3, OGG, FLAC, "
            "or PCM16LE mono at --sample-rate)."
        ),
        epilog=EXIT_CODES,
    )
    p.add_argument("source", metavar="FILE|-", help="audio file, or - for stdin")
    p.set_defaults(
        func=_transcribe_cmd,
        check=_check_source,
        parser=p,
        kind="recognizer",
        mic=False,
        device=None,
        words=False,
        max_sentence_silence=None,
        service="realtime",
        output_dir=None,
        jobs=1,
        force=False,
        inputs=[],
    )


def _check_source(args: argparse.Namespace) -> str | None:
    if args.mic and args.source:
        return "give either FILE|- or --mic, not both"
    if not args.mic and not args.source:
        return "give an audio FILE, - for standard input, or --mic"
    if args.device is not None and not args.mic:
        return "--device needs --mic"
    return None


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {text}")
    return value


def _check_transcribe(args: argparse.Namespace) -> str | None:
    """Check ``transcribe``'s inputs and options and settle ``args.service``,
    ``args.inputs`` (every input) and ``args.source`` (the one input, if one)."""
    from .batch import collisions, is_url

    inputs: list[str] = list(args.source)
    args.inputs = inputs
    args.source = inputs[0] if len(inputs) == 1 else None
    live = args.mic or "-" in inputs
    if args.mic and inputs:
        return "give either FILE|- or --mic, not both"
    if not args.mic and not inputs:
        return "give an audio FILE, a URL, - for standard input, or --mic"
    if args.device is not None and not args.mic:
        return "--device needs --mic"
    if "-" in inputs and len(inputs) > 1:
        return "- (standard input) cannot be one of several inputs"
    realtime_flags = [
        flag
        for flag, on in (
            ("--pace", args.pace is not None),
            ("--intermediate", args.intermediate is not None),
            ("--max-sentence-silence", args.max_sentence_silence is not None),
        )
        if on
    ]
    if args.service is None:
        args.service = "realtime" if live or realtime_flags else "flash"
    elif args.service != "realtime":
        if live:
            return f"--service {args.service} takes files or URLs; - and --mic are real time"
        if realtime_flags:
            return f"{realtime_flags[0]} applies to --service realtime, not {args.service}"
    urls = [s for s in inputs if is_url(s)]
    if urls and args.service in ("realtime", "rest"):
        return f"--service {args.service} takes files, not URLs ({urls[0]}): use flash or filetrans"
    if args.output_dir is not None and args.output is not None:
        return "give either -o FILE (one input) or --output-dir DIR, not both"
    if len(inputs) > 1 and args.output_dir is None:
        return "several inputs need --output-dir DIR (one output per input)"
    if args.output_dir is not None:
        if live:
            return "--output-dir takes files or URLs, not - or --mic"
        return collisions(inputs, args.output_dir)
    return None


def realtime_params(args: argparse.Namespace) -> dict[str, Any]:
    """The real-time transcriber's extra Start parameters of ``--words`` and
    ``--max-sentence-silence``."""
    params: dict[str, Any] = {}
    if args.words:
        params["enable_words"] = True
    if args.max_sentence_silence is not None:
        params["max_sentence_silence"] = args.max_sentence_silence
    return params


def command_secrets(args: argparse.Namespace) -> tuple[str | None, ...]:
    """What no message may show: the token given and those of the environment."""
    return (args.token, os.environ.get("NLS_TOKEN"), os.environ.get("ALIYUN_AK_SECRET"))


def _transcribe_cmd(args: argparse.Namespace) -> int:
    if args.verbose:
        logging.basicConfig(
            level=logging.DEBUG, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        # websockets logs every frame at DEBUG: hundreds of audio frames per second.
        logging.getLogger("websockets").setLevel(logging.INFO)
    secrets = command_secrets(args)
    if args.output_dir is not None:
        return _run(_interruptible(args, None), verbose=args.verbose, secrets=secrets)
    try:
        with _open_output(args.output) as output:
            run = _interruptible(args, output.file)
            status = _run(run, verbose=args.verbose, secrets=secrets)
            # Real time keeps the sentences spoken before a signal; a recording
            # interrupted has nothing to keep, and leaves an existing FILE as it was.
            output.keep = status == EXIT_OK or (
                args.service == "realtime" and status != EXIT_FAILURE
            )
            return status
    except OSError as exc:  # _run handles everything else: this is opening/closing FILE
        return _fail(f"cannot write {args.output}: {exc.strerror or exc}")


class _Output:
    """Where the transcript goes; ``keep`` says whether a file written is to be kept."""

    def __init__(self, file: TextIO) -> None:
        self.file = file
        self.keep = False


@contextlib.contextmanager
def _open_output(path: str | None) -> Iterator[_Output]:
    """Standard output, or ``path`` written atomically: into a temporary file in the same
    directory that replaces ``path`` only if the run keeps it (a failed run destroys
    nothing). A path that is not a regular file (``/dev/null``, a FIFO) is written as is."""
    if path is None or path == "-":
        yield _Output(sys.stdout)
        return
    target = os.path.realpath(path)  # replace a symlink's file, not the symlink
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.stat(target).st_mode):
            with open(path, "w", encoding="utf-8") as f:
                yield _Output(f)
            return
    folder, name = os.path.split(target)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    # O_EXCL: never follow or reuse anything already there; 0o666 & ~umask, as open() does.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))  # keep the old file's mode
        with open(fd, "w", encoding="utf-8") as f:
            output = _Output(f)
            yield output
        if output.keep:
            os.replace(tmp, target)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class _Interrupt:
    """SIGINT (Ctrl-C) and SIGTERM handling: the first signal runs the current graceful
    action (stop sending, then drain the finals), the second cancels everything."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.count = 0
        self.status = EXIT_INTERRUPTED  # 128 + the first signal's number
        self.graceful: Callable[[], object] | None = None
        self._task: asyncio.Task[Any] | None = None

    def install(self) -> None:
        self._task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in self.SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):  # e.g. Windows
                loop.add_signal_handler(sig, self._on_signal, sig)

    def uninstall(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in self.SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.remove_signal_handler(sig)

    def _on_signal(self, sig: signal.Signals) -> None:
        self.count += 1
        if self.count == 1:
            self.status = 128 + sig
            if self.graceful is not None:
                self.graceful()
                return
        if self._task is not None:
            self._task.cancel()


def _notice(args: argparse.Namespace) -> Callable[[str], None]:
    """The embedded gateway's notice, and what it ignores of the options given."""
    from ..quickstart import print_notice

    unsupported = [
        flag for flag, on in (("--punctuation", args.punctuation), ("--itn", args.itn)) if on
    ]

    def notice(message: str) -> None:
        print_notice(message)
        if unsupported:
            print_notice(f"the local gateway ignores {' and '.join(unsupported)} (cloud only)")

    return notice


async def _interruptible(args: argparse.Namespace, out: TextIO | None) -> int:
    """The run (real time, one recording, or a batch when ``out`` is ``None``) with
    SIGINT/SIGTERM handled by :class:`_Interrupt`."""
    interrupt = _Interrupt()
    interrupt.install()
    try:
        if out is None:
            from .batch import run_batch

            return await run_batch(args, interrupt, _notice(args))
        if args.service != "realtime":
            from .batch import run_recording

            return await run_recording(args, out, interrupt, _notice(args))
        return await _transcribe_session(args, out, interrupt)
    except asyncio.CancelledError:
        if interrupt.count:
            return interrupt.status
        raise
    finally:
        interrupt.uninstall()


async def _transcribe_session(args: argparse.Namespace, out: TextIO, interrupt: _Interrupt) -> int:
    from ..quickstart import print_notice, service_settings
    from ..realtime.session import Recognizer, Transcriber
    from .output import ProgressBar, renderer_for

    # Read and check the audio before connecting: a bad file costs no session.
    pcm: bytes | None = None
    stdin: AsyncGenerator[bytes, None] | None = None
    if args.source == "-":
        audio = await _stdin_audio(args.sample_rate)
        if isinstance(audio, bytes):
            pcm = audio
        else:
            stdin = audio
    elif args.source:
        from ..audio import load_file

        pcm = await asyncio.to_thread(load_file, args.source, args.sample_rate)

    renderer = renderer_for(args.format, out)
    live = args.format == "text" and _isatty(out)
    intermediate = live if args.intermediate is None else args.intermediate
    params = realtime_params(args)
    # Live text and a progress bar on the same terminal would overwrite each other.
    show_progress = pcm is not None and args.progress and _isatty(sys.stderr) and not live
    timeout = args.timeout if args.timeout is not None else REALTIME_TIMEOUT

    async with contextlib.AsyncExitStack() as stack:
        source: Any
        if stdin is not None:
            source = await stack.enter_async_context(contextlib.aclosing(stdin))
        elif args.mic:
            from ..mic import Microphone

            device: int | str | None = args.device
            if isinstance(device, str) and device.isdigit():
                device = int(device)
            source = await stack.enter_async_context(
                Microphone(sample_rate=args.sample_rate, device=device)
            )
        else:
            source = pcm

        # --url may also be the gateway's http(s)://host:port (as for the recordings).
        services = await stack.enter_async_context(
            service_settings(
                url=args.url, appkey=args.appkey, token=args.token, notice=_notice(args)
            )
        )
        url, appkey, token = services.url, services.appkey, services.token
        cls = Transcriber if args.kind == "transcriber" else Recognizer
        session = cls(
            appkey,
            token,
            url=url,
            sample_rate=args.sample_rate,
            enable_intermediate_result=intermediate,
            enable_punctuation_prediction=args.punctuation,
            enable_inverse_text_normalization=args.itn,
            connect_timeout=timeout,
            start_timeout=timeout,
            stop_timeout=timeout,
            **params,
        )
        events = session.events()  # subscribed before start: sees every event
        render_task = asyncio.create_task(_render(events, renderer))
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
            renderer_error = await _finish_render(render_task)
            renderer.close()
        if renderer_error is not None and renderer_error is not session.error:
            raise renderer_error
    if not result.text:
        print_notice("no speech recognised")
    return interrupt.status if interrupt.count else EXIT_OK


async def _wait_sending(
    sender: asyncio.Future[None], progress: ProgressBar | None, session: Session
) -> None:
    if progress is None:
        await sender
        return
    while not sender.done():
        progress.update(session.metrics.audio_ms_sent)
        await asyncio.wait([sender], timeout=_PROGRESS_INTERVAL)
    progress.update(session.metrics.audio_ms_sent)
    await sender


async def _render(events: AsyncIterator[Event], renderer: Renderer) -> NlsError | None:
    """Feed every event to the renderer; returns the error the stream ended with."""
    from ..realtime.protocol import Resumed

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


async def _finish_render(task: asyncio.Task[NlsError | None]) -> NlsError | None:
    # The event stream ends once the session does (both normal end and abort).
    try:
        return await asyncio.wait_for(asyncio.shield(task), 5.0)
    except asyncio.TimeoutError:
        task.cancel()
        return None


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


async def _stdin_audio(sample_rate: int) -> bytes | AsyncGenerator[bytes, None]:
    """Standard input as the session's audio, from its first bytes: a WAV of PCM16 mono
    at ``sample_rate`` is streamed as it arrives (a live recorder's too); other WAV, MP3,
    OGG and FLAC are read to the end and decoded to PCM; anything else is taken as raw
    PCM16LE mono at ``sample_rate`` and streamed."""
    from ..audio import SNIFF_BYTES, decode_bytes, sniff_container, wav_stream_layout
    from ..errors import AudioFormatError

    chunks = _stdin_chunks()
    head = b""
    async with contextlib.AsyncExitStack() as stack:
        stack.push_async_callback(chunks.aclose)  # unless handed on below
        while len(head) < SNIFF_BYTES and (chunk := await anext(chunks, b"")):
            head += chunk
        if not head:
            raise AudioFormatError("standard input is empty: there is no audio to transcribe")
        kind = sniff_container(head)
        if kind is None:
            stack.pop_all()
            return _chain(head, chunks)
        if kind == "WAV":
            layout = wav_stream_layout(head, sample_rate)
            while layout is None and len(head) < _WAV_HEADER_MAX:
                if not (chunk := await anext(chunks, b"")):
                    break
                head += chunk
                layout = wav_stream_layout(head, sample_rate)
            if layout is not None:
                stack.pop_all()
                offset, size = layout
                return _chain(head[offset:], chunks, size)
        rest = [chunk async for chunk in chunks]
    name = f"standard input ({kind})"
    return await asyncio.to_thread(decode_bytes, head + b"".join(rest), sample_rate, name)


async def _chain(
    first: bytes, rest: AsyncGenerator[bytes, None], limit: int | None = None
) -> AsyncGenerator[bytes, None]:
    """``first`` then ``rest``, ``limit`` bytes in all (``None``: to the end)."""
    async with contextlib.aclosing(rest):
        chunk = first
        while limit != 0:
            if limit is not None:
                chunk = chunk[:limit]
                limit -= len(chunk)
            if chunk:
                yield chunk
            if not (chunk := await anext(rest, b"")):
                return


async def _stdin_chunks() -> AsyncGenerator[bytes, None]:
    """Standard input as chunks of bytes, without blocking the event loop.

    Pipes and terminals are read through the event loop; regular files (``< file.pcm``)
    cannot be, and never block for long, so they are read in a worker thread.
    """
    stdin = sys.stdin.buffer
    if stat.S_ISREG(os.fstat(stdin.fileno()).st_mode):
        while chunk := await asyncio.to_thread(stdin.read, _STDIN_CHUNK):
            yield chunk
        return
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=_STDIN_CHUNK)
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), stdin)
    try:
        while chunk := await reader.read(_STDIN_CHUNK):
            yield chunk
    finally:
        transport.close()


# --------------------------------------------------------------------------- token


def _add_token(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "token",
        help="print a token fetched with the AccessKey in the environment",
        description=(
            "Fetch a token with CreateToken using ALIYUN_AK_ID and ALIYUN_AK_SECRET from "
            "the environment. Only the token goes to standard output (for scripts: "
            "export NLS_TOKEN=$(nlsstream token)); its expiry goes to standard error."
        ),
    )
    p.add_argument("--region", help="token service region (default: NLS_REGION or cn-shanghai)")
    p.add_argument(
        "--endpoint",
        metavar="URL",
        help="CreateToken endpoint (default: https://nls-meta.REGION.aliyuncs.com/)",
    )
    p.set_defaults(func=_token_cmd)


def _token_cmd(args: argparse.Namespace) -> int:
    # NLS_TOKEN is a token already; this command is about the AccessKey.
    env = {k: v for k, v in os.environ.items() if k != "NLS_TOKEN"}
    if args.region:
        env["NLS_REGION"] = args.region
    try:
        settings = Settings.from_env(env)
    except NlsError as exc:
        return _fail(str(exc))
    provider = settings.token_provider
    if not isinstance(provider, AccessKeyTokenProvider):
        return _fail("set ALIYUN_AK_ID and ALIYUN_AK_SECRET to fetch a token")
    if args.endpoint:
        provider.endpoint = args.endpoint
    return _run(_fetch_token(provider), verbose=False)


async def _fetch_token(provider: AccessKeyTokenProvider) -> int:
    token = await provider.get_token_info()
    print(token.value, flush=True)
    remaining = token.expire_time - time.time()
    expiry = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(token.expire_time))
    print(f"nlsstream: token expires {expiry} (in {remaining / 3600:.1f} h)", file=sys.stderr)
    return EXIT_OK


# --------------------------------------------------------------------------- serve
# (the gateway engineer's code follows unchanged)


#: What the gateways enforce and what a client sees then (``serve --help``, README).
GATEWAY_LIMITS = """\
limits (what a client sees when it hits one):
  message size        1 MiB per WebSocket message: close 1009
  idle connection     --idle-timeout s (10) without a message: TaskFailed 40000004
  sentence length     recognizer: 60 s of audio, TaskFailed 41010104;
                      transcriber: a sentence is cut at 60 s and the next one begins
  decoders            --max-decoders (8) sentences decoded at once (full gateway); a
                      sentence that finds none free within --decoder-wait (5) s:
                      TaskFailed 52010001 (retryable)
  a client that reads nothing for 10 s while events wait for it: dropped (no close)
  handshake           request line and each header at most 8190 bytes: HTTP 400
                      (--light: the whole request about 64 KiB, else a reset);
                      wrong path: 404; missing or wrong token: 403
  connections         no limit of its own: the process's open-file limit
  session records     the newest 1000 (Gateway.sessions)
  recordings          FlashRecognizer 100 MB and 2 h (status 40000000), REST 60 s
                      (41010104); FileTrans: 2 tasks recognised at once, the rest
                      QUEUEING; the newest 1000 tasks kept (older: 41050010)
"""


class _ServeHelp(argparse.Action):
    """``serve --help``: the limits and the ``--fault`` syntax, which lives with its parser
    in the gateway package (imported only here: other commands do not load the gateway)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from ..gateway.faults import FAULT_SYNTAX

        parser.epilog = GATEWAY_LIMITS + "\n" + FAULT_SYNTAX
        parser.print_help()
        parser.exit()


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the local NLS gateway",
        description=(
            "Run a local NLS gateway on ws://HOST:PORT/ws/v1 that any NLS client (nlsstream "
            "or the official SDKs) can use; the same port serves FlashRecognizer "
            "(/stream/v1/FlashRecognizer), one-sentence REST (/stream/v1/asr) and POP RPC "
            "on / (FileTrans SubmitTask/GetTaskResult, CreateToken). Prints every endpoint "
            "once listening; stops cleanly on Ctrl-C or SIGTERM."
        ),
        epilog=GATEWAY_LIMITS,
        add_help=False,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "-h", "--help", action=_ServeHelp, nargs=0, help="show this help message and exit"
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument(
        "--port", type=int, default=8765, help="port, 0 for a free one (default %(default)s)"
    )
    p.add_argument(
        "--token",
        action="append",
        metavar="TOKEN",
        help="accepted token (repeatable; or NLS_GATEWAY_TOKEN, comma-separated, which "
        "keeps it out of `ps`); without either any token is accepted",
    )
    p.add_argument(
        "--appkey",
        action="append",
        metavar="APPKEY",
        help="accepted appkey (repeatable); without it any appkey is accepted",
    )
    p.add_argument(
        "--access-key",
        action="append",
        metavar="ID:SECRET",
        help="AccessKey pair accepted by the POP RPC on / (FileTrans, CreateToken; "
        "repeatable; or NLS_GATEWAY_ACCESS_KEYS, comma-separated, which keeps the secrets "
        "out of `ps`); without either any AccessKey is accepted and signatures are not "
        "checked",
    )
    p.add_argument(
        "--recognizer",
        choices=("auto", "sphinx", "span"),
        help="auto: PocketSphinx if installed, else span (default auto; full gateway only)",
    )
    p.add_argument(
        "--light",
        action="store_true",
        help="run the light load-gateway instead: no recognition, one numbered sentence "
        "per second of audio, per-frame lateness measured (needs the 'light' extra)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="TaskFailed 40000004 after this long without a message (default %(default)s)",
    )
    p.add_argument(
        "--max-decoders",
        type=int,
        default=8,
        metavar="N",
        help="sentences decoded at once, about 45 MB each (default %(default)s; full gateway)",
    )
    p.add_argument(
        "--decoder-wait",
        type=float,
        default=5.0,
        metavar="SECONDS",
        help="how long a sentence waits for a free decoder before TaskFailed 52010001 "
        "(default %(default)s)",
    )
    p.add_argument(
        "--fault",
        action="append",
        default=[],
        metavar="SPEC",
        help="inject a fault, e.g. drop@audio+2s (repeatable; syntax below; full gateway)",
    )
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="default %(default)s",
    )
    p.set_defaults(func=_serve)


def _serve(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # websockets' and picows' INFO lines (every handshake) are noise next to our session lines.
    for noisy in ("websockets", "picows"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))
    from ..gateway import Gateway
    from ..gateway.faults import parse_faults

    if not args.token and os.environ.get("NLS_GATEWAY_TOKEN"):
        args.token = [t for t in os.environ["NLS_GATEWAY_TOKEN"].split(",") if t.strip()]
    if not args.access_key and os.environ.get("NLS_GATEWAY_ACCESS_KEYS"):
        pairs = os.environ["NLS_GATEWAY_ACCESS_KEYS"].split(",")
        args.access_key = [k for k in pairs if k.strip()]
    try:
        if args.light:
            if args.recognizer is not None:
                raise ValueError("--recognizer applies to the full gateway, not --light")
            try:
                from ..gateway.light import LightGateway
            except ImportError as exc:
                missing = f"--light needs the 'light' extra ({exc.name} is missing)"
                raise ValueError(missing) from None
            if args.access_key:
                raise ValueError("--access-key applies to the full gateway, not --light")
            if args.fault or args.max_decoders != 8 or args.decoder_wait != 5.0:
                raise ValueError("--fault and the decoder options apply to the full gateway")
            light = LightGateway(
                args.host,
                args.port,
                token=args.token,
                appkeys=args.appkey,
                idle_timeout=args.idle_timeout,
            )
            run = _run_light(light)
        else:
            if args.max_decoders < 1 or not 0 <= args.decoder_wait <= 3600:
                raise ValueError("--max-decoders must be >= 1 and --decoder-wait 0..3600 s")
            every, once = parse_faults(args.fault)
            gateway = Gateway(
                args.host,
                args.port,
                tokens=args.token,
                appkeys=args.appkey,
                recognizer=args.recognizer or "auto",
                idle_timeout=args.idle_timeout,
                access_keys=_access_keys(args.access_key),
                faults=every,
                max_decoders=args.max_decoders,
                decoder_wait=args.decoder_wait,
            )
            if once is not None:
                gateway.queue_faults(once)
            run = _run_gateway(gateway)
    except ValueError as exc:
        print(f"nlsstream serve: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(run)
    except KeyboardInterrupt:  # platforms without loop signal handlers
        pass
    except OSError as exc:
        print(f"nlsstream serve: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def _access_keys(pairs: list[str] | None) -> dict[str, str] | None:
    """``--access-key ID:SECRET`` values as a dict (the secret is never echoed)."""
    if not pairs:
        return None
    keys = {}
    for pair in pairs:
        key_id, sep, secret = pair.partition(":")
        if not sep or not key_id or not secret:
            raise ValueError("--access-key takes ID:SECRET")
        keys[key_id] = secret
    return keys


async def _run_gateway(gateway: object) -> None:
    from ..gateway import Gateway

    assert isinstance(gateway, Gateway)
    async with gateway:
        print(f"NLS gateway listening on {gateway.url}", flush=True)
        for url, what in gateway.endpoints.items():
            print(f"  {url:<48} {what}", flush=True)
        await _signalled()
        log.info("shutting down")
    done = sum(1 for s in gateway.sessions if s.outcome == "completed")
    log.info("gateway stopped after %d sessions (%d completed)", len(gateway.sessions), done)


async def _run_light(gateway: LightGateway) -> None:
    async with gateway:
        print(f"NLS light gateway listening on {gateway.url}", flush=True)
        await _signalled()
        log.info("shutting down")
        overall = gateway.stats()["overall"]
    log.info(
        "light gateway stopped after %d sessions (%d completed)",
        overall["sessions"],
        overall["completed"],
    )


async def _signalled() -> None:
    """Return on SIGINT or SIGTERM (where the loop supports signal handlers)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()
