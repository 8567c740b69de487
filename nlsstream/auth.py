"""Token providers: where a session gets the token it sends as ``X-NLS-Token``.

Besides a fixed token (:class:`StaticTokenProvider`), :class:`AccessKeyTokenProvider` fetches
tokens with an AccessKey through the CreateToken POP RPC (docs/protocol.md §8), caches them and
refreshes them before they expire. The request signing (§8.2, signature v1.0, HMAC-SHA1) is
implemented here directly, once for every POP call of the project (CreateToken here,
FileTrans in :mod:`nlsstream.recordings.services`); no Alibaba Cloud SDK is needed.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import math
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypeVar, runtime_checkable

from .errors import PopError, ProtocolError, TokenError, redact
from .redaction import get_logger, register

__all__ = [
    "CREATE_TOKEN_VERSION",
    "DEFAULT_REGION",
    "AccessKeyTokenProvider",
    "RefreshableTokenProvider",
    "StaticTokenProvider",
    "Token",
    "TokenProvider",
    "TokenSource",
    "as_provider",
    "canonical_query",
    "create_token",
    "percent_encode",
    "pop_failure",
    "pop_signature",
    "signed_params",
    "string_to_sign",
    "token_endpoint",
]

logger = get_logger("nlsstream.auth")

DEFAULT_REGION = "cn-shanghai"
#: The CreateToken API version documented for every region (docs/protocol.md §8.1).
CREATE_TOKEN_VERSION = "2019-02-28"

# Largest CreateToken answer we read; real ones are ~200 bytes.
_MAX_RESPONSE_BYTES = 64 * 1024
#: Most JSON objects and lists one answer may hold (a 12 h recording's words fit): what
#: parsing costs grows with them, not only with the bytes (17 M empty objects in 50 MB
#: took 89 s and 5.4 GB).
MAX_JSON_CONTAINERS = 1_000_000
#: A token's id longer than this is no token.
_MAX_TOKEN_CHARS = 1024
# A cached token is still handed out after a failed refresh only if it stays valid this long.
_MIN_REMAINING_VALIDITY = 5.0


@runtime_checkable
class TokenProvider(Protocol):
    """Anything that can hand out a currently valid token.

    Sessions call :meth:`get_token` before every connection, so a provider that caches
    and refreshes (see ``AccessKeyTokenProvider``) keeps long-running programs working.
    """

    async def get_token(self) -> str:
        """Return a token that is valid now."""
        ...


@runtime_checkable
class RefreshableTokenProvider(TokenProvider, Protocol):
    """A provider that can drop a token the gateway rejected and fetch a new one.

    A session that gets HTTP 403 / status 40000001 calls ``invalidate(token)`` and then
    :meth:`get_token` again. A fixed token cannot be refreshed, so retrying is pointless.
    """

    def invalidate(self, token: str | None = None) -> None:
        """Forget the cached token (only if it is ``token``, when given)."""
        ...


class StaticTokenProvider:
    """A fixed token, e.g. one copied from the console."""

    def __init__(self, token: str) -> None:
        register(token)
        self._token = token

    async def get_token(self) -> str:
        return self._token

    def __repr__(self) -> str:
        return "StaticTokenProvider(token=***)"


#: What sessions accept wherever a token is expected.
TokenSource = str | TokenProvider


def as_provider(token: TokenSource) -> TokenProvider:
    """Wrap a plain string token in a :class:`StaticTokenProvider`."""
    return StaticTokenProvider(token) if isinstance(token, str) else token


# --------------------------------------------------------------------------------------
# POP RPC signature v1.0 (docs/protocol.md §8.2)


def percent_encode(text: str) -> str:
    """RFC 3986 encoding as POP wants it: only ``A-Za-z0-9-_.~`` stay, ``%XX`` uppercase."""
    return urllib.parse.quote(text, safe="-_.~")


def _canonical_query(params: Mapping[str, str]) -> str:
    encoded = sorted((percent_encode(k), percent_encode(v)) for k, v in params.items())
    return "&".join(f"{k}={v}" for k, v in encoded)


def string_to_sign(method: str, params: Mapping[str, str]) -> str:
    """``METHOD&%2F&percentEncode(CanonicalizedQueryString)`` (``Signature`` excluded)."""
    query = _canonical_query({k: v for k, v in params.items() if k != "Signature"})
    return f"{method.upper()}&{percent_encode('/')}&{percent_encode(query)}"


def pop_signature(method: str, params: Mapping[str, str], access_key_secret: str) -> str:
    """The Base64 HMAC-SHA1 ``Signature`` of a POP RPC request (key: ``secret + "&"``)."""
    digest = hmac.new(
        (access_key_secret + "&").encode(),
        string_to_sign(method, params).encode(),
        hashlib.sha1,
    ).digest()
    return base64.b64encode(digest).decode("ascii")


# --------------------------------------------------------------------------------------
# CreateToken


def token_endpoint(region: str = DEFAULT_REGION) -> str:
    """The CreateToken endpoint of ``region`` (Singapore uses ``nlsmeta.``; §8.1)."""
    if region == "ap-southeast-1":
        return "https://nlsmeta.ap-southeast-1.aliyuncs.com/"
    return f"https://nls-meta.{region}.aliyuncs.com/"


@dataclass(frozen=True)
class Token:
    """A token and its expiry (``expire_time``: Unix seconds, as the server sent it)."""

    value: str = field(repr=False)
    expire_time: float

    def __repr__(self) -> str:
        return f"Token(value=***, expire_time={self.expire_time})"


HttpMethod = Literal["GET", "POST"]


def signed_params(
    method: HttpMethod,
    access_key_id: str,
    access_key_secret: str,
    action: str,
    *,
    region: str,
    version: str,
    extra: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Every parameter of a POP RPC call, ``Signature`` included (§8.2).

    The one signer of the project: CreateToken and FileTrans' ``SubmitTask`` /
    ``GetTaskResult`` all go through it. ``extra`` holds the business parameters
    (``Task``, ``TaskId``); they are signed wherever they travel (query or form body).
    """
    params = {
        "AccessKeyId": access_key_id,
        "Action": action,
        "Format": "JSON",
        "RegionId": region,
        "SignatureMethod": "HMAC-SHA1",
        "SignatureNonce": str(uuid.uuid4()),
        "SignatureVersion": "1.0",
        "Timestamp": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "Version": version,
        **(extra or {}),
    }
    params["Signature"] = pop_signature(method, params, access_key_secret)
    return params


def canonical_query(params: Mapping[str, str]) -> str:
    """``params`` percent-encoded (§8.2 rule 2), sorted and joined: a query string or
    form body as POP expects it."""
    return _canonical_query(params)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    """Redirects are not followed (urllib's documented handler hook): a 3xx answer is
    returned as it is, so the signed request never reaches another host."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


_opener = urllib.request.build_opener(_NoRedirect)


# Why urllib in a worker thread rather than a hand-written asyncio HTTP client: a token is
# fetched about once a day, so one short-lived pool thread costs nothing, while urllib
# already does TLS verification, proxies (HTTPS_PROXY), chunked answers and error bodies
# correctly. Its timeout bounds each socket operation; ``asyncio.wait_for`` bounds the whole.
def _http_request(
    method: HttpMethod, url: str, body: bytes | None, timeout: float
) -> tuple[int, bytes]:
    headers = {"Accept": "application/json", "User-Agent": "nlsstream"}
    if body is not None:
        headers["Content-Type"] = "application/x-www-form-urlencoded"
    request = urllib.request.Request(url, data=body, headers=headers, method=method)
    try:
        with _opener.open(request, timeout=timeout) as response:
            return int(response.status), response.read(_MAX_RESPONSE_BYTES)
    except urllib.error.HTTPError as exc:
        with exc:
            return exc.code, exc.read(_MAX_RESPONSE_BYTES)


def _is_retryable(http_status: int, code: str | None) -> bool:
    if http_status >= 500 or http_status == 429:
        return True
    return code is not None and (code.startswith("Throttling") or code == "ServiceUnavailable")


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def json_object(body: bytes, *, max_containers: int = MAX_JSON_CONTAINERS) -> dict[str, Any] | None:
    """``body`` decoded as a JSON object, or ``None`` if it is not one (``NaN`` and
    ``Infinity`` are not JSON; nor is a number of more than 4300 digits).

    Raises :class:`~nlsstream.errors.ProtocolError` for a body that would cost too much
    to parse: more than ``max_containers`` objects and lists (counted before parsing),
    or nested deeper than Python's recursion limit.
    """
    if body.count(b"{") + body.count(b"[") > max_containers:
        raise ProtocolError(
            f"the answer holds more than {max_containers} JSON objects and lists: refused"
        )
    try:
        data: Any = json.loads(body.decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError):
        return None
    except RecursionError:
        raise ProtocolError("the answer's JSON is nested too deeply: refused") from None
    return data if isinstance(data, dict) else None


E = TypeVar("E", bound=PopError)


def pop_failure(
    action: str,
    host: str,
    http_status: int,
    body: bytes,
    secret: str,
    error: type[E],
    *,
    data: Mapping[str, Any] | None = None,
    detail: str = "",
) -> E:
    """The :class:`PopError` (of class ``error``) for a POP answer that is not a success:
    the server's ``Code``/``Message``/``RequestId`` (the generic POP error envelope), or
    a snippet of a non-JSON body; the secret redacted. ``data`` is ``body`` decoded,
    when the caller already did that."""
    data = data if data is not None else json_object(body)
    if data is None:
        snippet = redact(body[:200].decode("utf-8", "replace"), secret)
        return error(
            f"{action} at {host} answered HTTP {http_status} with a non-JSON body: {snippet!r}",
            http_status=http_status,
            retryable=_is_retryable(http_status, None),
        )
    request_id = _short(data.get("RequestId"))
    code = _short(data.get("Code"))
    message = redact(_short(data.get("Message")) or _short(data.get("ErrMsg")) or "", secret)
    retryable = _is_retryable(http_status, code)
    if code is None and not message:
        code, message = "InvalidResponse", detail or "the answer is not a success"
    return error(
        f"{action} at {host} failed (HTTP {http_status}): {code}: {message}"
        + (f" (RequestId {request_id})" if request_id else ""),
        code=code,
        server_message=message,
        http_status=http_status,
        request_id=request_id,
        retryable=retryable,
    )


def _short(value: Any, limit: int = 500) -> str | None:
    """A text field of an error answer: strings and numbers only (anything else could be
    a structure that is costly to print), cut to ``limit`` characters."""
    if isinstance(value, str):
        return value[:limit]
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) < 2**63:
        return str(value)
    return None


def _expire_time(value: Any) -> float | None:
    """``Token.ExpireTime`` as Unix seconds, if it is a finite, positive number."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, int) and not 0 < value < 2**53:
        return None  # also keeps float() from overflowing
    expire = float(value)
    return expire if math.isfinite(expire) and expire > 0 else None


def _parse_answer(status: int, body: bytes, host: str, secret: str) -> Token:
    try:
        data = json_object(body, max_containers=64)
    except ProtocolError as exc:
        raise TokenError(
            f"CreateToken at {host} answered malformed JSON: {exc}",
            code="InvalidResponse",
            http_status=status,
        ) from None
    if data is not None and status == 200:
        token = data.get("Token")
        if isinstance(token, dict) and token.get("Id"):
            token_id = token["Id"]
            expire = _expire_time(token.get("ExpireTime"))
            problem = None
            if not isinstance(token_id, str) or len(token_id) > _MAX_TOKEN_CHARS:
                problem = "a Token.Id that is not a string of at most 1024 characters"
            elif expire is None:
                problem = "without a finite, positive, numeric Token.ExpireTime"
            if problem is None:
                assert isinstance(token_id, str) and expire is not None
                register(token_id)
                return Token(token_id, expire)
            request_id = data.get("RequestId")
            raise TokenError(
                f"CreateToken at {host} answered {problem}",
                code="InvalidResponse",
                http_status=status,
                request_id=str(request_id)[:100] if request_id is not None else None,
            )
    raise pop_failure(
        "CreateToken",
        host,
        status,
        body,
        secret,
        TokenError,
        data=data,
        detail="the answer has no Token.Id",
    )


async def create_token(
    access_key_id: str,
    access_key_secret: str,
    region: str = DEFAULT_REGION,
    endpoint: str | None = None,
    *,
    timeout: float = 10.0,
    method: HttpMethod = "GET",
    version: str = CREATE_TOKEN_VERSION,
) -> Token:
    """Call CreateToken once and return the new :class:`Token` (no caching).

    ``method="GET"`` puts the signed parameters in the query string, as DOC-TOKEN
    describes and the old official Python SDK does; ``"POST"`` sends them as a form body.
    Raises :class:`~nlsstream.errors.TokenError` (with the server's ``Code``/``Message``)
    on any failure, including network errors and ``timeout`` (retryable).
    """
    if method not in ("GET", "POST"):
        raise ValueError(f"method must be 'GET' or 'POST', not {method!r}")
    url = endpoint or token_endpoint(region)
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ValueError(f"CreateToken endpoint must be an http(s) URL, not {url!r}")
    host = parts.netloc
    base = urllib.parse.urlunsplit((parts.scheme, parts.netloc, parts.path or "/", "", ""))
    params = signed_params(
        method, access_key_id, access_key_secret, "CreateToken", region=region, version=version
    )
    encoded = _canonical_query(params)
    if method == "GET":
        url, body = f"{base}?{encoded}", None
    else:
        url, body = base, encoded.encode("ascii")
    try:
        status, answer = await asyncio.wait_for(
            asyncio.to_thread(_http_request, method, url, body, timeout), timeout
        )
    except (asyncio.TimeoutError, TimeoutError) as exc:
        raise TokenError(
            f"CreateToken at {host} did not answer within {timeout} s", retryable=True
        ) from exc
    except OSError as exc:  # URLError, refused, DNS, TLS
        reason = getattr(exc, "reason", exc)
        raise TokenError(
            f"CreateToken request to {host} failed: {redact(str(reason), access_key_secret)}",
            retryable=True,
        ) from None
    return _parse_answer(status, answer, host, access_key_secret)


class AccessKeyTokenProvider:
    """Tokens from an AccessKey pair via CreateToken, cached and refreshed before expiry.

    A token is reused until ``ExpireTime - margin``, where the margin is the larger of
    ``refresh_margin`` seconds and 10 % of the token's lifetime (at most half of it).
    Concurrent callers share one request: fifty sessions starting at once cause a single
    CreateToken call. If a refresh fails while the cached token is still valid, the cached
    token is returned (and a warning logged); otherwise :class:`TokenError` is raised.
    The secret never appears in ``repr()``, logs or exceptions.

    ``endpoint`` defaults to :func:`token_endpoint` of ``region``; ``method`` picks GET
    (default) or POST, see :func:`create_token`. ``clock`` (Unix seconds) is for tests.
    """

    def __init__(
        self,
        access_key_id: str,
        access_key_secret: str,
        region: str = DEFAULT_REGION,
        endpoint: str | None = None,
        *,
        refresh_margin: float = 60.0,
        timeout: float = 10.0,
        method: HttpMethod = "GET",
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not access_key_id or not access_key_secret:
            raise ValueError("AccessKeyTokenProvider needs both access_key_id and secret")
        if timeout <= 0:
            raise ValueError("timeout must be positive")
        if refresh_margin < 0:
            raise ValueError("refresh_margin must not be negative")
        self._access_key_id = access_key_id
        self._secret = access_key_secret
        register(access_key_secret)
        self.region = region
        self.endpoint = endpoint or token_endpoint(region)
        self._refresh_margin = refresh_margin
        self._timeout = timeout
        self._method: HttpMethod = method
        self._clock = clock
        self._token: Token | None = None
        self._refresh_at = 0.0
        self._inflight: asyncio.Task[Token] | None = None
        #: How many CreateToken requests this provider has made (for monitoring and tests).
        self.requests = 0

    def __repr__(self) -> str:
        key_id = self._access_key_id[:4] + "***"
        return (
            f"AccessKeyTokenProvider(access_key_id={key_id!r}, region={self.region!r}, "
            f"endpoint={self.endpoint!r})"
        )

    @property
    def cached(self) -> Token | None:
        """The cached token, if any (it may be due for refresh)."""
        return self._token

    async def get_token(self) -> str:
        """Return a valid token, fetching a new one only when needed."""
        return (await self.get_token_info()).value

    async def get_token_info(self) -> Token:
        """Like :meth:`get_token` but returns the :class:`Token` with its expiry."""
        token = self._token
        if token is not None and self._clock() < self._refresh_at:
            return token
        loop = asyncio.get_running_loop()
        task = self._inflight
        if task is None or task.done() or task.get_loop() is not loop:
            task = loop.create_task(self._refresh())
            task.add_done_callback(_retrieve_exception)
            self._inflight = task
        # shield: one caller giving up must not cancel the request the others wait for.
        return await asyncio.shield(task)

    def invalidate(self, token: str | None = None) -> None:
        """Drop the cached token so the next :meth:`get_token` fetches a new one.

        Pass the rejected ``token`` to make this a no-op when a newer token is already
        cached: many sessions failing with the same old token then cause one refresh.
        """
        if self._token is not None and (token is None or token == self._token.value):
            self._token = None
            self._refresh_at = 0.0

    async def _refresh(self) -> Token:
        try:
            self.requests += 1
            token = await create_token(
                self._access_key_id,
                self._secret,
                self.region,
                self.endpoint,
                timeout=self._timeout,
                method=self._method,
            )
        except TokenError as exc:
            old = self._token
            if old is not None and self._clock() < old.expire_time - _MIN_REMAINING_VALIDITY:
                logger.warning("token refresh failed, using the cached token meanwhile: %s", exc)
                return old
            raise
        finally:
            if self._inflight is asyncio.current_task():
                self._inflight = None
        now = self._clock()
        lifetime = token.expire_time - now
        if lifetime <= 0:
            logger.warning(
                "CreateToken returned a token that expired %.0f s ago by the local clock; "
                "check the system time",
                -lifetime,
            )
        margin = max(0.0, min(max(self._refresh_margin, 0.1 * lifetime), 0.5 * lifetime))
        self._token = token
        self._refresh_at = token.expire_time - margin
        logger.info(
            "fetched a new NLS token from %s (valid for %.0f s)",
            urllib.parse.urlsplit(self.endpoint).netloc,
            lifetime,
        )
        return token


def _retrieve_exception(task: asyncio.Task[Token]) -> None:
    # Every waiter may have been cancelled; mark the failure as seen so asyncio does not
    # log "Task exception was never retrieved".
    if not task.cancelled():
        task.exception()
