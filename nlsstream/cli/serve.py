"""``nlsstream serve``: the local NLS gateway (:class:`~nlsstream.gateway.Gateway`), or
with ``--light`` the light load-gateway (``nlsstream.gateway.light.LightGateway``), until
SIGINT/SIGTERM. The one place both are started from a shell; every option of ``serve``
is defined here (:func:`add_serve`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from nlsstream.redaction import get_logger

if TYPE_CHECKING:
    from nlsstream.gateway import Gateway
    from nlsstream.gateway.light import LightGateway

__all__ = ["GATEWAY_LIMITS", "add_serve", "serve_command"]

log = get_logger("nlsstream.cli.serve")

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
                      QUEUEING; the newest 1000 tasks kept (older: 41050010);
                      audio checked from its header before decoding: 8000-96000 Hz
                      (41010101), at most 2 channels (40270004); FileTrans 512 MB, 12 h
  HTTP requests       headers within --header-timeout s (30), else closed; a body
                      within --body-timeout s (300), no read waiting over 30 s:
                      HTTP 408 (40000004); --max-uploads (16) bodies at once, more:
                      HTTP 429 (40000005); bodies over 1 MiB spooled to a temp file
  POP RPC             Timestamp within 15 min, SignatureNonce single-use: HTTP 400
                      (InvalidTimeStamp.*, SignatureNonceUsed); tokens and no
                      AccessKeys: CreateToken refused (InvalidAccessKeyId.NotFound)
  file:// links       regular files only, under --file-root DIR when given
"""


class _ServeHelp(argparse.Action):
    """``serve --help``: the limits and the ``--fault`` syntax, which lives with its parser
    in the gateway package (imported only here: other commands do not load the gateway)."""

    def __call__(self, parser: argparse.ArgumentParser, *_: Any) -> None:
        from nlsstream.gateway.faults import FAULT_SYNTAX

        parser.epilog = GATEWAY_LIMITS + "\n" + FAULT_SYNTAX
        parser.print_help()
        parser.exit()


def add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """The ``serve`` subcommand and its options."""
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
        "--idle-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="TaskFailed 40000004 after this long without a message (default %(default)s)",
    )
    _add_full_gateway_options(p)
    p.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        choices=("DEBUG", "INFO", "WARNING", "ERROR"),
        help="default %(default)s",
    )
    _add_light_options(p)
    p.set_defaults(func=serve_command)


def _add_light_options(p: argparse.ArgumentParser) -> None:
    light = p.add_argument_group("light gateway (--light)")
    light.add_argument(
        "--light",
        action="store_true",
        help="run the light load-gateway instead: no recognition, one numbered sentence "
        "per --sentence-ms of audio, per-frame lateness measured (needs the 'light' extra)",
    )
    light.add_argument(
        "--sentence-ms",
        type=int,
        metavar="MS",
        help="audio per SentenceEnd (default 1000)",
    )
    light.add_argument("--stats-file", metavar="FILE", help="write the stats JSON here on exit")
    light.add_argument("--reuse-port", action="store_true", help="set SO_REUSEPORT")
    light.add_argument(
        "--control",
        action="store_true",
        help="also serve GET /stats (?reset=1) and GET /reset on the same port, to requests "
        "with a --token (or NLS_GATEWAY_TOKEN) in X-NLS-Token; requires one",
    )
    light.add_argument(
        "--nap-us",
        type=int,
        metavar="US",
        help="poll the sockets, napping this long between loop iterations, instead of "
        "sleeping in epoll (default 0: off); benchmarks/README.md says why",
    )
    light.add_argument(
        "--loop",
        choices=("auto", "uvloop", "asyncio"),
        help="event loop (default auto: uvloop when installed)",
    )


def _add_full_gateway_options(p: argparse.ArgumentParser) -> None:
    """Decoders, faults and the recordings' HTTP limits (the full gateway's)."""
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
        "--file-root",
        metavar="DIR",
        help="file:// links (FileTrans file_link, Flash audio_address) may name only "
        "regular files under DIR (default: any regular file this process can read; set "
        "it whenever the gateway is reachable by others)",
    )
    p.add_argument(
        "--header-timeout",
        type=float,
        default=30.0,
        metavar="SECONDS",
        help="close an HTTP connection whose request headers take longer (default %(default)s)",
    )
    p.add_argument(
        "--body-timeout",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="HTTP 408 for a request body that takes longer (default %(default)s)",
    )
    p.add_argument(
        "--max-uploads",
        type=int,
        default=16,
        metavar="N",
        help="recording uploads received at once; more get HTTP 429 (default %(default)s)",
    )


#: The options only the light gateway takes, with the value that means "not given".
_LIGHT_ONLY = {
    "--sentence-ms": "sentence_ms",
    "--stats-file": "stats_file",
    "--reuse-port": "reuse_port",
    "--control": "control",
    "--nap-us": "nap_us",
    "--loop": "loop",
}


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # websockets' and picows' INFO lines (every handshake) are noise next to our session lines.
    for noisy in ("websockets", "picows"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.root.level))


def _from_env(args: argparse.Namespace) -> None:
    """Tokens and AccessKeys from the environment when none is given (kept out of `ps`)."""
    if not args.token and os.environ.get("NLS_GATEWAY_TOKEN"):
        args.token = [t for t in os.environ["NLS_GATEWAY_TOKEN"].split(",") if t.strip()]
    if not args.access_key and os.environ.get("NLS_GATEWAY_ACCESS_KEYS"):
        pairs = os.environ["NLS_GATEWAY_ACCESS_KEYS"].split(",")
        args.access_key = [k for k in pairs if k.strip()]


def serve_command(
    args: argparse.Namespace, light_factory: Callable[..., LightGateway] | None = None
) -> int:
    """``nlsstream serve``: 0 after a clean stop, 1 when it cannot listen, 2 for bad
    options. ``light_factory`` makes the ``--light`` gateway (default ``LightGateway``;
    the benchmarks pass a measuring subclass)."""
    _configure_logging(args.log_level)
    _from_env(args)
    try:
        if args.light:
            return _serve_light(args, light_factory)
        given = [flag for flag, name in _LIGHT_ONLY.items() if getattr(args, name)]
        if given:
            raise ValueError(f"{given[0]} applies to --light, not the full gateway")
        from nlsstream.gateway import Gateway, HttpLimits
        from nlsstream.gateway.faults import parse_faults

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
            file_root=args.file_root,
            http_limits=HttpLimits(
                header_timeout=args.header_timeout,
                body_timeout=args.body_timeout,
                max_uploads=args.max_uploads,
            ),
            faults=every,
            max_decoders=args.max_decoders,
            decoder_wait=args.decoder_wait,
        )
        if once is not None:
            gateway.queue_faults(once)
    except ValueError as exc:
        print(f"nlsstream serve: {exc}", file=sys.stderr)
        return 2
    return _listen(args, lambda: _run_gateway(gateway))


def _listen(args: argparse.Namespace, run: Callable[[], Any], uvloop: bool = False) -> int:
    try:
        if uvloop:
            import uvloop as uv

            uv.run(run())
        else:
            asyncio.run(run())
    except KeyboardInterrupt:  # platforms without loop signal handlers
        pass
    except OSError as exc:
        print(f"nlsstream serve: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


def _serve_light(args: argparse.Namespace, factory: Callable[..., LightGateway] | None) -> int:
    """``serve --light``: the light gateway made by ``factory`` until a signal, then its
    stats to ``--stats-file``."""
    if args.recognizer is not None:
        raise ValueError("--recognizer applies to the full gateway, not --light")
    if args.access_key:
        raise ValueError("--access-key applies to the full gateway, not --light")
    if args.fault or args.max_decoders != 8 or args.decoder_wait != 5.0:
        raise ValueError("--fault and the decoder options apply to the full gateway")
    if args.control and not args.token:
        raise ValueError("--control requires a token: --token or NLS_GATEWAY_TOKEN")
    if factory is None:
        try:
            from nlsstream.gateway.light import LightGateway
        except ImportError as exc:
            raise ValueError(f"--light needs the 'light' extra ({exc.name} is missing)") from None
        factory = LightGateway
    gateway = factory(
        args.host,
        args.port,
        sentence_ms=args.sentence_ms or 1000,
        token=args.token,
        appkeys=args.appkey,
        idle_timeout=args.idle_timeout,
        reuse_port=args.reuse_port,
        control=args.control,
    )
    _raise_nofile_limit()
    stats: dict[str, Any] = {}

    async def run() -> None:
        stats.update(await _run_light(gateway, (args.nap_us or 0) / 1e6))

    status = _listen(args, run, uvloop=_want_uvloop(args.loop or "auto"))
    if status == 0 and args.stats_file:
        with open(args.stats_file, "w", encoding="utf-8") as fh:
            json.dump(stats, fh)
    return status


def _want_uvloop(loop: str) -> bool:
    if loop != "auto":
        return loop == "uvloop"
    try:
        import uvloop  # noqa: F401
    except ImportError:
        return False
    return True


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


async def _run_gateway(gateway: Gateway) -> None:
    async with gateway:
        print(f"NLS gateway listening on {gateway.url}", flush=True)
        for url, what in gateway.endpoints.items():
            print(f"  {url:<48} {what}", flush=True)
        await _signalled()
        log.info("shutting down")
    done = sum(1 for s in gateway.sessions if s.outcome == "completed")
    log.info("gateway stopped after %d sessions (%d completed)", len(gateway.sessions), done)


async def _run_light(gateway: LightGateway, nap: float) -> dict[str, Any]:
    async with gateway:
        if nap > 0:
            asyncio.get_running_loop().call_soon(_nap, nap)
        loop_name = type(asyncio.get_running_loop()).__module__.split(".")[0]
        print(f"NLS light gateway listening on {gateway.url} (loop: {loop_name})", flush=True)
        await _signalled()
        log.info("shutting down")
        stats = gateway.stats()
    overall = stats["overall"]
    log.info(
        "light gateway stopped after %d sessions (%d completed)",
        overall["sessions"],
        overall["completed"],
    )
    return stats


async def _signalled() -> None:
    """Return on SIGINT or SIGTERM (where the loop supports signal handlers)."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    await stop.wait()


def _raise_nofile_limit() -> None:
    # Thousands of sockets need more than the usual 1024 descriptors.
    try:
        import resource
    except ImportError:  # not on Windows
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 65536)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


def _nap(seconds: float) -> None:
    """Poll instead of sleeping in the kernel: nap ``seconds`` between loop iterations.

    On loopback a client's ``send`` runs the receiver's TCP input in the client's own
    system call, including waking the receiver if it sleeps in ``epoll_wait`` (an
    inter-processor interrupt, costly in a VM). Over a real network that work is the
    receiving machine's. While this callback stays ready the loop polls with a zero
    timeout and never sleeps in ``epoll_wait``, so clients are charged for their sends
    only; arrival times are then read up to ``seconds`` late (same for every frame of a
    session, so lateness is barely affected).
    """
    # A deliberate block of the loop, bounded by ``seconds`` per iteration: the sockets
    # are polled between naps, so nothing waits longer than that.
    time.sleep(seconds)
    asyncio.get_running_loop().call_soon(_nap, seconds)
