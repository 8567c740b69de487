"""Secrets never leave in text: the one place tokens and AccessKey secrets are hidden.

nlsstream registers every token and AccessKey secret it is given or obtains
(:func:`register`), and hides them, and any token whatever its value (quoted in a
server's text, in an ``X-NLS-Token`` header, a URL's ``token`` parameter), where text
leaves the library:

* log records of nlsstream's loggers (:func:`get_logger` gives each one the
  :class:`RedactingFilter`; websockets' connection logger gets it too);
* exception messages (``NlsError.__str__``);
* the command line's output (it calls :func:`redact_known`).

A secret is replaced only where it stands as a whole word, so hiding it never garbles
the rest of a message.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict

__all__ = ["RedactingFilter", "get_logger", "redact", "redact_known", "register"]

# Where a token can appear whatever its value: quoted back in a server's text ("The token
# '...' is invalid!"), in the X-NLS-Token header (websockets' DEBUG lines), in a URL's
# token parameter.
_QUOTED_TOKEN = re.compile(r"(token\s*')[^']*(')", re.IGNORECASE)
_TOKEN_HEADER = re.compile(r"(X-NLS-Token\s*:\s*)\S+", re.IGNORECASE)
_TOKEN_PARAM = re.compile(r"([?&;]token=)[^&#;\s'\"]*", re.IGNORECASE)
# A secret is replaced only where it stands on its own, never inside a longer word: not
# next to a character a token is made of, nor a "." inside a word (token "1" leaves
# "ws://127.0.0.1/ws/v1" alone, but not "says 1."). "=" may end a secret (base64
# padding) but also introduces a value ("token=...").
_WORD = r"A-Za-z0-9_~+/%-"
_ALONE = (rf"(?<![{_WORD}])(?<![{_WORD}]\.)", rf"(?![={_WORD}])(?!\.[{_WORD}])")


def redact(text: str, *secrets: str | None) -> str:
    """Return ``text`` with every token hidden as ``***``: quoted tokens, the
    ``X-NLS-Token`` header, a URL's ``token`` parameter, and each of ``secrets`` where it
    stands as a whole word (however short), never part of a longer one."""
    text = _QUOTED_TOKEN.sub(r"\1***\2", text)
    text = _TOKEN_HEADER.sub(r"\1***", text)
    text = _TOKEN_PARAM.sub(r"\1***", text)
    for secret in secrets:
        if secret:
            text = re.sub(_ALONE[0] + re.escape(secret) + _ALONE[1], "***", text)
    return text


# The secrets registered, newest last; bounded (a process that refreshes tokens for
# years keeps the latest ones, which are the ones that can still leak).
_MAX_SECRETS = 256
_known: OrderedDict[str, None] = OrderedDict()


#: Shorter secrets are not registered process-wide: hiding a word like "1" or "app" in
#: every message would garble them (real tokens and AccessKey secrets are 30+ characters;
#: short ones are still hidden where the code that holds them redacts them itself).
MIN_REGISTERED_LENGTH = 8


def register(*secrets: str | None) -> None:
    """Hide each of ``secrets`` (of at least :data:`MIN_REGISTERED_LENGTH` characters)
    wherever nlsstream's text leaves from now on."""
    for secret in secrets:
        if secret and len(secret) >= MIN_REGISTERED_LENGTH:
            _known[secret] = None
            _known.move_to_end(secret)
            while len(_known) > _MAX_SECRETS:
                _known.popitem(last=False)


def redact_known(text: str) -> str:
    """:func:`redact` with every registered secret."""
    return redact(text, *_known)


class RedactingFilter(logging.Filter):
    """Rewrites a log record's message with the secrets hidden (once, before any handler
    formats it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        hidden = redact_known(message)
        if hidden != message or record.args:
            record.msg, record.args = hidden, None
        return True


_FILTER = RedactingFilter()


def get_logger(name: str) -> logging.Logger:
    """The logger ``name`` with the :class:`RedactingFilter` (a logger's filters apply
    only to its own records, so each of nlsstream's loggers gets it)."""
    logger = logging.getLogger(name)
    if _FILTER not in logger.filters:
        logger.addFilter(_FILTER)
    return logger
