"""The ``nlsstream`` command line.

Subcommands:

* ``nlsstream transcribe FILE|URL...|-|--mic``: recordings with ``--service``
  (flash by default, filetrans, rest or realtime; :mod:`nlsstream.cli.recordings`, and
  :mod:`nlsstream.cli.batch` for several inputs), standard input and the microphone in
  real time (:mod:`nlsstream.cli.realtime`);
* ``nlsstream recognize FILE|-``: sentence recognition (one utterance, at most 60 s);
* ``nlsstream result TASK_ID``: the result of a FileTrans task (one that ``transcribe
  --service filetrans`` stopped waiting for);
* ``nlsstream serve``: run the local NLS gateway until SIGINT/SIGTERM
  (:mod:`nlsstream.cli.serve`, also ``--light``);
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
import sys
import time
import urllib.parse
from collections.abc import Sequence
from typing import TextIO

from nlsstream import AccessKeyTokenProvider, NlsError, Settings, __version__
from nlsstream.quickstart import print_notice

from .batch import collisions, run_batch
from .common import (
    BATCH_EXIT_CODES,
    EXIT_CODES,
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    Interrupt,
    command_secrets,
    fail,
    notice_for,
    open_output,
    run,
    token_given,
)
from .realtime import transcribe_session
from .recordings import FILE_TRANS_WAIT, is_url, run_recording, run_result
from .serve import add_serve

__all__ = ["build_parser", "main"]


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
    _add_result(sub)
    add_serve(sub)
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


# --------------------------------------------------------------------------- transcribe, recognize


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _proxy(text: str) -> str:
    if text.lower() == "none":
        return "none"
    parts = urllib.parse.urlsplit(text)
    if parts.scheme not in ("http", "https", "socks4", "socks5") or not parts.hostname:
        raise argparse.ArgumentTypeError(
            "must be none or a proxy URL such as http://HOST:PORT or socks5://HOST:PORT"
        )
    return text


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


_TIMEOUT_HELP_REALTIME = (
    "limit for connecting and starting, each, and for the gateway's silence after Stop (default 10)"
)
_TIMEOUT_HELP = (
    "real time: " + _TIMEOUT_HELP_REALTIME + "; flash and rest: limit for the request "
    "(default 120 + the audio's duration); filetrans: how long the task is waited for "
    "(default 24 h)"
)


def _session_options(recordings: bool) -> argparse.ArgumentParser:
    """Options shared by transcribe and recognize (``recordings``: transcribe's services)."""
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
        "--token-endpoint",
        metavar="URL",
        help="where tokens are made from ALIYUN_AK_ID/ALIYUN_AK_SECRET (CreateToken; "
        "default: the --url/NLS_URL host, which a local gateway serves it on, else "
        "https://nls-meta.REGION.aliyuncs.com/)",
    )
    conn.add_argument(
        "--proxy",
        type=_proxy,
        metavar="URL|none",
        help="connect through this proxy (real time: http://, https://, socks4://, "
        "socks5://, with the 'proxy' extra; recordings: http://), or 'none' to connect "
        "directly (default: the "
        "https_proxy/http_proxy/all_proxy/no_proxy variables; a loopback address and the "
        "embedded gateway are never proxied)",
    )
    conn.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help=_TIMEOUT_HELP if recordings else _TIMEOUT_HELP_REALTIME,
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
    _output_options(
        p,
        progress="shown with elapsed time and ETA for files and containers "
        "on stdin when stderr is a terminal, unless live text is on it; for one "
        "recording its phase: uploading, recognising, queueing...",
    )
    _stats_option(p)
    p.set_defaults(format="text")
    return p


def _output_options(p: argparse.ArgumentParser, *, progress: str) -> None:
    """The output options of transcribe, recognize and result."""
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
        help=f"no progress on stderr ({progress})",
    )
    out.add_argument("-v", "--verbose", action="store_true", help="log details to stderr")


def _stats_option(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--stats",
        action="store_true",
        help="at the end, the session's figures on stderr, one a line: audio sent, frames, "
        "lateness, time to first partial, final-sentence latency p50/p90/p99, first-partial "
        "latency, stop -> completed, resumes, replayed and keepalive audio (real time); "
        "the time of each phase (a recording)",
    )


def _add_transcribe(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "transcribe",
        parents=[_session_options(recordings=True)],
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
        metavar="N",
        help="inputs recognised at once (default 2: the cloud trial's concurrency)",
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
        parents=[_session_options(recordings=False)],
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


def _add_result(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "result",
        help="print the result of a FileTrans task (e.g. one transcribe stopped waiting for)",
        description=(
            "Print the result of a FileTrans task submitted earlier (by 'transcribe "
            "--service filetrans', which names the task when its --timeout passes, or by "
            "any other client), waiting while it is queued or running. Asks the cloud "
            "with ALIYUN_AK_ID/ALIYUN_AK_SECRET, or the gateway of --url / NLS_URL."
        ),
        epilog="exit status: 0 done, 1 failure (one line on stderr: the task failed, is "
        "unknown, or did not finish within --timeout), 2 usage error, 130/143 interrupted",
    )
    p.add_argument("task_id", metavar="TASK_ID", help="the task's id")
    conn = p.add_argument_group("connection")
    conn.add_argument(
        "--url", help="gateway URL (default: NLS_URL; else the cloud's FileTrans endpoint)"
    )
    conn.add_argument("--appkey", help="project appkey (default: NLS_APPKEY)")
    conn.add_argument(
        "--proxy",
        type=_proxy,
        metavar="URL|none",
        help="an http:// proxy, or 'none' to connect directly (default: the system's)",
    )
    conn.add_argument(
        "--timeout",
        type=_positive_float,
        metavar="SECONDS",
        help=f"how long the task is waited for (default {FILE_TRANS_WAIT / 3600:g} h)",
    )
    _output_options(p, progress="the task's status and the time elapsed, on a terminal")
    p.set_defaults(
        func=_result_cmd,
        format="text",
        service="filetrans",
        token=None,
        token_endpoint=None,
        jobs=1,
        punctuation=False,
        itn=False,
    )


def _result_cmd(args: argparse.Namespace) -> int:
    _log_verbosely(args.verbose)
    try:
        with open_output(args.output) as output:
            secrets = command_secrets(args)
            status = run(_interruptible(args, output.file), verbose=args.verbose, secrets=secrets)
            output.keep = status == EXIT_OK
            return status
    except OSError as exc:  # run() handles everything else: this is opening/closing FILE
        return fail(f"cannot write {args.output}: {exc.strerror or exc}")


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
    inputs: list[str] = list(args.source)
    args.inputs = inputs
    args.ignored = _ignored_options(args)
    args.jobs = args.jobs or 2
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
    if args.output not in (None, "-") and (same := _same_file(args.output, inputs)):
        return f"-o {args.output} is the input {same}: it would replace the recording"
    if len(inputs) > 1 and args.output_dir is None:
        return "several inputs need --output-dir DIR (one output per input)"
    if args.output_dir is not None:
        if live:
            return "--output-dir takes files or URLs, not - or --mic"
        if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
            return f"--output-dir {args.output_dir} is a file, not a directory"
        return collisions(inputs, args.output_dir)
    return None


def _ignored_options(args: argparse.Namespace) -> list[str]:
    """Options given that this run would silently ignore (each said once on stderr)."""
    ignored = []
    batch = args.output_dir is not None or len(args.source) > 1
    if not batch and args.force:
        ignored.append("--force applies to a batch (--output-dir), not to one input")
    if not batch and args.jobs is not None:
        ignored.append("-j applies to a batch (--output-dir), not to one input")
    if batch and args.stats:
        ignored.append("--stats applies to one input, not to a batch")
    if args.words and args.format != "jsonl":
        ignored.append("--words shows word times in --jsonl output only")
    return ignored


def _transcribe_cmd(args: argparse.Namespace) -> int:
    for warning in getattr(args, "ignored", ()):
        print_notice(f"warning: {warning}")
    _log_verbosely(args.verbose)
    secrets = command_secrets(args)
    token = token_given(args)
    if args.output_dir is not None:
        coro = _interruptible(args, None)
        return run(coro, verbose=args.verbose, secrets=secrets, token=token)
    try:
        with open_output(args.output) as output:
            coro = _interruptible(args, output.file)
            status = run(coro, verbose=args.verbose, secrets=secrets, token=token)
            # Real time keeps the sentences spoken before a signal; a recording
            # interrupted has nothing to keep, and leaves an existing FILE as it was.
            output.keep = status == EXIT_OK or (
                args.service == "realtime" and status != EXIT_FAILURE
            )
            regular = args.output not in (None, "-") and not _special(args.output)
            if not output.keep and regular and _written(output.file):
                # A live run that failed part-way: FILE stays as it was, and nothing
                # recognised is lost.
                output.salvage = f"{args.output}.partial"
                print_notice(f"what was recognised before the failure is in {output.salvage}")
            return status
    except OSError as exc:  # run() handles everything else: this is opening/closing FILE
        return fail(f"cannot write {args.output}: {exc.strerror or exc}")


def _log_verbosely(verbose: bool) -> None:
    """``-v``: nlsstream's details on stderr."""
    if verbose:
        logging.basicConfig(
            level=logging.DEBUG, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
        )
        # websockets logs every frame at DEBUG: hundreds of audio frames per second.
        logging.getLogger("websockets").setLevel(logging.INFO)


def _special(path: str) -> bool:
    """Whether ``path`` exists and is not a regular file (``/dev/null``, a FIFO)."""
    return os.path.exists(path) and not os.path.isfile(path)


def _written(file: TextIO) -> bool:
    """Whether anything was written to ``file`` (a regular file being written)."""
    try:
        return file.tell() > 0
    except (OSError, ValueError):
        return False


def _same_file(output: str, inputs: list[str]) -> str | None:
    """The input that ``output`` is (or links to), if any."""
    for source in inputs:
        if source == "-" or is_url(source):
            continue
        with contextlib.suppress(OSError):
            if os.path.samefile(output, source):
                return source
    return None


async def _interruptible(args: argparse.Namespace, out: TextIO | None) -> int:
    """The run (real time, one recording, or a batch when ``out`` is ``None``) with
    SIGINT/SIGTERM handled by :class:`~nlsstream.cli.common.Interrupt`."""
    interrupt = Interrupt()
    interrupt.install()
    try:
        if out is None:
            return await run_batch(args, interrupt, notice_for(args))
        if args.command == "result":
            return await run_result(args, out, interrupt, notice_for(args))
        if args.service != "realtime":
            return await run_recording(args, out, interrupt, notice_for(args))
        return await transcribe_session(args, out, interrupt)
    except asyncio.CancelledError:
        if interrupt.count:
            if out is not None and args.service != "realtime":
                print_notice("interrupted before the recording was recognised")
            return interrupt.status
        raise
    finally:
        interrupt.uninstall()


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
        return fail(str(exc))
    provider = settings.token_provider
    if not isinstance(provider, AccessKeyTokenProvider):
        return fail("set ALIYUN_AK_ID and ALIYUN_AK_SECRET to fetch a token")
    if args.endpoint:
        provider.endpoint = args.endpoint
    return run(_fetch_token(provider), verbose=False)


async def _fetch_token(provider: AccessKeyTokenProvider) -> int:
    token = await provider.get_token_info()
    print(token.value, flush=True)
    remaining = token.expire_time - time.time()
    expiry = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(token.expire_time))
    print(f"nlsstream: token expires {expiry} (in {remaining / 3600:.1f} h)", file=sys.stderr)
    return EXIT_OK
