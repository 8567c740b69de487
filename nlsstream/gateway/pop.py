"""POP RPC request checks, as the cloud makes them (docs/protocol.md §8.2, §11.3).

:class:`PopGuard` checks one request's common parameters: all present, the AccessKey
known and the signature right (when the gateway has AccessKeys), the ``Timestamp``
well formed and within :data:`TIMESTAMP_WINDOW` of now, and, when requests are signed,
the ``SignatureNonce`` not seen before within that window (a replayed request is
refused; the nonces kept are bounded by :data:`MAX_NONCES`: beyond it, requests are
throttled rather than remembered without bound). A gateway without AccessKeys takes
any request unsigned: anyone may make a new one, so refusing a replayed one would
protect nothing, and remembering nonces would let anyone fill the memory and throttle
everyone; it remembers none. Every refusal is the generic POP error envelope with the
cloud's code and HTTP 4xx.
"""

from __future__ import annotations

import calendar
import collections
import hmac
import time
from collections.abc import Callable, Mapping

from .. import auth
from ..recordings import wire
from ..redaction import get_logger

__all__ = ["MAX_NONCES", "TIMESTAMP_WINDOW", "PopGuard", "PopRefusal"]

log = get_logger("nlsstream.gateway.pop")

#: A request's Timestamp may differ from the gateway's clock by at most this (seconds).
TIMESTAMP_WINDOW = 15 * 60
#: Nonces remembered at most (those older than twice the window are forgotten first).
MAX_NONCES = 100_000
_COMMON = ("AccessKeyId", "Signature", "SignatureNonce", "Timestamp")


class PopRefusal(Exception):
    """A POP request refused: ``code`` of :data:`~nlsstream.recordings.wire.POP_ERRORS`."""

    def __init__(self, code: str, *args: str) -> None:
        super().__init__(code)
        self.code = code
        self.args_ = args

    def answer(self) -> tuple[int, dict[str, object]]:
        return wire.pop_error(self.code, *self.args_)


def parse_timestamp(text: str) -> float:
    """``YYYY-MM-DDThh:mm:ssZ`` (UTC) as Unix seconds, else :class:`PopRefusal`."""
    try:
        parsed = time.strptime(text, "%Y-%m-%dT%H:%M:%SZ")
    except (ValueError, OverflowError):
        raise PopRefusal("InvalidTimeStamp.Format") from None
    return float(calendar.timegm(parsed))


class PopGuard:
    """The checks of every POP request of one gateway; ``access_keys`` ``None``
    accepts any AccessKey unsigned (a local emulator's default)."""

    def __init__(
        self,
        access_keys: Mapping[str, str] | None,
        *,
        clock: Callable[[], float] = time.time,
        max_nonces: int = MAX_NONCES,
    ) -> None:
        self.access_keys = access_keys
        self.clock = clock
        self.max_nonces = max_nonces
        self._nonces: collections.OrderedDict[tuple[str, str], float] = collections.OrderedDict()

    def check(self, method: str, params: Mapping[str, str]) -> str:
        """The request's AccessKeyId once every check passed, else :class:`PopRefusal`."""
        for name in _COMMON:
            if not params.get(name):
                raise PopRefusal("MissingParameter", name)
        key_id = params["AccessKeyId"]
        if self.access_keys is not None:
            secret = self.access_keys.get(key_id)
            if secret is None:
                raise PopRefusal("InvalidAccessKeyId.NotFound")
            expected = auth.pop_signature(method, params, secret)
            # Compared as bytes: a non-ASCII Signature is a mismatch, not a TypeError.
            given = params["Signature"].encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(expected.encode("ascii"), given):
                log.info("POP %s: signature mismatch", params.get("Action", "-")[:40])
                raise PopRefusal("SignatureDoesNotMatch", auth.string_to_sign(method, params))
        now = self.clock()
        stamp = parse_timestamp(params["Timestamp"])
        if abs(stamp - now) > TIMESTAMP_WINDOW:
            raise PopRefusal("InvalidTimeStamp.Expired")
        if self.access_keys is not None:
            self._use_nonce((key_id, params["SignatureNonce"]), now)
        return key_id

    def _use_nonce(self, nonce: tuple[str, str], now: float) -> None:
        nonces = self._nonces
        horizon = now - 2 * TIMESTAMP_WINDOW
        while nonces:
            oldest = next(iter(nonces.values()))
            if oldest >= horizon:
                break
            nonces.popitem(last=False)
        if nonce in nonces:
            raise PopRefusal("SignatureNonceUsed")
        if len(nonces) >= self.max_nonces:
            raise PopRefusal("Throttling.User")
        nonces[nonce] = now
