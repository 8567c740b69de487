"""The ``nlsstream`` command line.

Subcommands:

* ``nlsstream serve``: run the local NLS gateway until SIGINT/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
from collections.abc import Sequence

__all__ = ["build_parser", "main"]

log = logging.getLogger("nlsstream.cli")


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with one subparser per subcommand."""
    parser = argparse.ArgumentParser(
        prog="nlsstream", description="Alibaba Cloud NLS real-time speech tools."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    _add_serve(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    func = getattr(args, "func", None)
    if func is None:
        parser.print_help(sys.stderr)
        return 2
    status: int = func(args)
    return status


# --------------------------------------------------------------------------- serve


def _add_serve(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "serve",
        help="run the local NLS gateway",
        description=(
            "Run a local NLS gateway on ws://HOST:PORT/ws/v1 that any NLS client (nlsstream "
            "or the official SDKs) can use. Prints the URL once listening; stops cleanly "
            "on Ctrl-C or SIGTERM."
        ),
    )
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default %(default)s)")
    p.add_argument(
        "--port", type=int, default=8765, help="port, 0 for a free one (default %(default)s)"
    )
    p.add_argument(
        "--token",
        action="append",
        metavar="TOKEN",
        help="accepted token (repeatable); without it any token is accepted",
    )
    p.add_argument(
        "--appkey",
        action="append",
        metavar="APPKEY",
        help="accepted appkey (repeatable); without it any appkey is accepted",
    )
    p.add_argument(
        "--recognizer",
        choices=("auto", "sphinx", "span"),
        default="auto",
        help="auto: PocketSphinx if installed, else span (default %(default)s)",
    )
    p.add_argument(
        "--idle-timeout",
        type=float,
        default=10.0,
        metavar="SECONDS",
        help="TaskFailed 40000004 after this long without a message (default %(default)s)",
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
    # websockets' own INFO lines (every handshake) are noise next to our session lines.
    logging.getLogger("websockets").setLevel(max(logging.WARNING, logging.root.level))
    from .gateway import Gateway

    try:
        gateway = Gateway(
            args.host,
            args.port,
            tokens=args.token,
            appkeys=args.appkey,
            recognizer=args.recognizer,
            idle_timeout=args.idle_timeout,
        )
    except ValueError as exc:
        print(f"nlsstream serve: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(_run_gateway(gateway))
    except KeyboardInterrupt:  # platforms without loop signal handlers
        pass
    except OSError as exc:
        print(f"nlsstream serve: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        return 1
    return 0


async def _run_gateway(gateway: object) -> None:
    from .gateway import Gateway

    assert isinstance(gateway, Gateway)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        with contextlib.suppress(NotImplementedError, RuntimeError):
            loop.add_signal_handler(sig, stop.set)
    async with gateway:
        print(f"NLS gateway listening on {gateway.url}", flush=True)
        await stop.wait()
        log.info("shutting down")
    done = sum(1 for s in gateway.sessions if s.outcome == "completed")
    log.info("gateway stopped after %d sessions (%d completed)", len(gateway.sessions), done)
