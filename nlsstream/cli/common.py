"""What every command of the command line shares: exit statuses, the one-line error,
signal handling, atomic output files, the secrets no message may show.

Nothing here knows a service; :mod:`nlsstream.cli.realtime`,
:mod:`nlsstream.cli.recordings` and :mod:`nlsstream.cli.batch` build on it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import re
import signal
import stat
import sys
import time
import urllib.parse
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TextIO

from nlsstream import AuthenticationError, NlsError
from nlsstream.errors import redact
from nlsstream.quickstart import print_notice
from nlsstream.redaction import get_logger, register

__all__ = [
    "BATCH_EXIT_CODES",
    "EXIT_CODES",
    "EXIT_FAILURE",
    "EXIT_INTERRUPTED",
    "EXIT_OK",
    "EXIT_TERMINATED",
    "EXIT_USAGE",
    "PROGRESS_INTERVAL",
    "Interrupt",
    "Output",
    "cli_words",
    "command_secrets",
    "fail",
    "isatty",
    "notice_for",
    "one_line",
    "open_output",
    "run",
    "token_given",
]

log = get_logger("nlsstream.cli")

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

#: How often progress lines are redrawn (they only write when what they show changes).
PROGRESS_INTERVAL = 0.1


#: The library's words for Python users, and the command line's for the same thing: every
#: message leaving the command line passes here (:func:`one_line`).
_CLI_WORDS: tuple[tuple[re.Pattern[str], str], ...] = (
    (re.compile(r"\bFlashRecognizer or FileTranscriber\b"), "--service flash or filetrans"),
    (re.compile(r"\bthe (flash|rest) service takes at most"), r"--service \1 takes at most"),
    (re.compile(r"\bFlashRecognizer takes at most"), "--service flash takes at most"),
    (re.compile(r"\buse FileTranscriber\b"), "use --service filetrans"),
    (re.compile(r"\bpass proxy=None\b"), "give --proxy none"),
)
#: Said after a rejected token when the command was given none.
_NO_TOKEN = (
    "; no token was configured: set NLS_TOKEN or give --token (or set ALIYUN_AK_ID and "
    "ALIYUN_AK_SECRET, from which tokens are made)"
)


def cli_words(text: str) -> str:
    """``text`` with the library's Python names (classes, arguments) replaced by the
    command line's options."""
    for pattern, words in _CLI_WORDS:
        text = pattern.sub(words, text)
    return text


def one_line(exc: BaseException, secrets: Sequence[str | None] = (), *, token: bool = True) -> str:
    """An expected failure as one line in the command line's words (:func:`cli_words`),
    secrets redacted, whitespace folded; ``token``: whether a token was configured (a
    rejected one without says how to configure it).

    The SDK never puts a token in a message; redacting here is a second line of defence.
    """
    text = cli_words(str(exc) or type(exc).__name__)
    if isinstance(exc, AuthenticationError) and not token:
        text += _NO_TOKEN
    return " ".join(redact(text, *secrets).split())


def fail(message: str) -> int:
    """Say ``message`` as the one error line on stderr; returns :data:`EXIT_FAILURE`."""
    print(f"nlsstream: error: {message}", file=sys.stderr, flush=True)
    return EXIT_FAILURE


def run(coro: Any, *, verbose: bool, secrets: Sequence[str | None] = (), token: bool = True) -> int:
    """Run ``coro`` and turn every expected failure into one line on stderr
    (:func:`one_line`; the ``secrets`` are hidden in log lines too)."""
    register(*secrets)
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
        return fail(one_line(exc, secrets, token=token))


def _password(url: str | None) -> str | None:
    with contextlib.suppress(ValueError):
        return urllib.parse.urlsplit(url or "").password
    return None


def command_secrets(args: argparse.Namespace) -> tuple[str | None, ...]:
    """What no message may show: the token given and those of the environment, and the
    password of any URL given (``http://user:PASSWORD@host``)."""
    urls = (getattr(args, name, None) for name in ("url", "proxy", "token_endpoint", "endpoint"))
    return (
        getattr(args, "token", None),
        os.environ.get("NLS_TOKEN"),
        os.environ.get("ALIYUN_AK_SECRET"),
        *(_password(url) for url in (*urls, os.environ.get("NLS_URL"))),
    )


def token_given(args: argparse.Namespace) -> bool:
    """Whether a token is configured: ``--token``, ``NLS_TOKEN``, or an AccessKey that
    makes them."""
    env = os.environ
    return bool(
        getattr(args, "token", None)
        or env.get("NLS_TOKEN")
        or (env.get("ALIYUN_AK_ID") and env.get("ALIYUN_AK_SECRET"))
    )


def isatty(stream: TextIO) -> bool:
    """Whether ``stream`` is a terminal (``False`` for a closed or unreal stream)."""
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def notice_for(args: argparse.Namespace) -> Callable[[str], None]:
    """The embedded gateway's notice, and what it ignores of the options given."""
    unsupported = [
        flag for flag, on in (("--punctuation", args.punctuation), ("--itn", args.itn)) if on
    ]

    def notice(message: str) -> None:
        print_notice(message)
        if unsupported:
            print_notice(f"the local gateway ignores {' and '.join(unsupported)} (cloud only)")

    return notice


class Output:
    """Where the transcript goes; ``keep`` says whether a file written is to be kept,
    ``salvage`` where to save it otherwise (``None``: nowhere)."""

    def __init__(self, file: TextIO) -> None:
        self.file = file
        self.keep = False
        self.salvage: str | None = None


@contextlib.contextmanager
def open_output(path: str | None) -> Iterator[Output]:
    """Standard output, or ``path`` written atomically: into a temporary file in the same
    directory that replaces ``path`` only if the run keeps it (a failed run destroys
    nothing), or else becomes ``salvage`` if the run sets one. A path that is not a
    regular file (``/dev/null``, a FIFO) is written as is."""
    if path is None or path == "-":
        yield Output(sys.stdout)
        return
    target = os.path.realpath(path)  # replace a symlink's file, not the symlink
    with contextlib.suppress(FileNotFoundError):
        if not stat.S_ISREG(os.stat(target).st_mode):
            with open(path, "w", encoding="utf-8") as f:
                yield Output(f)
            return
    folder, name = os.path.split(target)
    tmp = os.path.join(folder, f".{name}.{os.getpid()}.{time.monotonic_ns()}.tmp")
    # O_EXCL: never follow or reuse anything already there; 0o666 & ~umask, as open() does.
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with contextlib.suppress(FileNotFoundError):
            os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))  # keep the old file's mode
        with open(fd, "w", encoding="utf-8") as f:
            output = Output(f)
            yield output
        if output.keep:
            os.replace(tmp, target)
        elif output.salvage is not None:
            os.replace(tmp, output.salvage)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)


class Interrupt:
    """SIGINT (Ctrl-C) and SIGTERM handling: the first signal runs the current graceful
    action (stop sending, then drain the finals), the second cancels everything."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.count = 0
        self.status = EXIT_INTERRUPTED  # 128 + the first signal's number
        self.graceful: Callable[[], object] | None = None
        self._task: asyncio.Task[Any] | None = None

    def install(self) -> None:
        """Handle both signals on the running loop, for the task calling this."""
        self._task = asyncio.current_task()
        loop = asyncio.get_running_loop()
        for sig in self.SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):  # e.g. Windows
                loop.add_signal_handler(sig, self._on_signal, sig)

    def uninstall(self) -> None:
        """Give both signals back to their default handling."""
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
