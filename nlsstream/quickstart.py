"""Where to connect: the cloud when credentials are configured, else an embedded local
gateway. Shared by the command line and the examples, so "it just runs" offline.

::

    async with session_settings() as (url, appkey, token):
        async with Transcriber(appkey, token, url=url) as t:
            ...

The rules, in order:

1. An explicit ``url`` argument or ``NLS_URL`` is used as given, with the configured
   appkey and token; when none is configured, placeholders are sent (fine for gateways
   that do not check them, such as ``nlsstream serve``).
2. Credentials (``NLS_TOKEN``, or ``ALIYUN_AK_ID`` + ``ALIYUN_AK_SECRET``) select the
   cloud gateway; ``NLS_APPKEY`` must then be set too.
3. Otherwise a local :class:`~nlsstream.gateway.Gateway` is started in-process for the
   duration of the ``async with`` block (PocketSphinx recognition when installed), and
   one line on stderr says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import sys
import urllib.parse
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import NamedTuple

from .auth import AccessKeyTokenProvider, TokenSource
from .config import ConfigurationError, Settings

__all__ = [
    "Endpoint",
    "Services",
    "http_base",
    "print_notice",
    "service_settings",
    "session_settings",
    "ws_url",
]

# Sent when the user configured nothing and talks to a gateway that checks nothing.
PLACEHOLDER_TOKEN = "local-token"
PLACEHOLDER_APPKEY = "local-appkey"
PLACEHOLDER_ACCESS_KEY_ID = "local-access-key"
PLACEHOLDER_ACCESS_KEY_SECRET = "local-access-key-secret"

#: How long the embedded gateway's close may take when its block is left by an
#: exception (a cancelled or failed run), rather than the handlers' whole grace period.
ABANDON_TIMEOUT = 0.5

_RECOGNIZER_NAMES = {"sphinx": "PocketSphinx", "span": "no speech recognizer: speech spans only"}


class Endpoint(NamedTuple):
    """What a session needs to connect: gateway ``url``, ``appkey`` and ``token``
    (a string or a token provider). Unpacks as ``url, appkey, token``."""

    url: str
    appkey: str
    token: TokenSource


def print_notice(message: str) -> None:
    """The default notice: one line on stderr, prefixed ``nlsstream:``."""
    print(f"nlsstream: {message}", file=sys.stderr, flush=True)


@asynccontextmanager
async def session_settings(
    *,
    url: str | None = None,
    appkey: str | None = None,
    token: TokenSource | None = None,
    environ: Mapping[str, str] | None = None,
    recognizer: str = "auto",
    notice: Callable[[str], None] | None = print_notice,
) -> AsyncIterator[Endpoint]:
    """Yield the :class:`Endpoint` to use, starting a local gateway if nothing is configured.

    ``url``, ``appkey`` and ``token`` override the environment (``environ``, default
    ``os.environ``; see :class:`~nlsstream.config.Settings`). ``recognizer`` is passed to
    the embedded :class:`~nlsstream.gateway.Gateway`; ``notice`` receives the one-line
    message announcing it (``None``: stay silent). Raises
    :class:`~nlsstream.config.ConfigurationError` for an incomplete configuration
    (an AccessKey id without its secret, credentials without ``NLS_APPKEY``).
    """
    env = os.environ if environ is None else environ
    explicit_url = url or env.get("NLS_URL", "").strip() or None
    if explicit_url is not None and not explicit_url.startswith(("ws://", "wss://")):
        raise ConfigurationError(
            f"the gateway URL must start with ws:// or wss://, got {explicit_url!r}"
        )
    async with service_settings(
        url=url, appkey=appkey, token=token, environ=env, recognizer=recognizer, notice=notice
    ) as services:
        yield Endpoint(services.url, services.appkey, services.token)


class Services(NamedTuple):
    """Where every service is, from :func:`service_settings`.

    ``url``: the real-time gateway (``ws(s)://.../ws/v1``); ``http_url``: the base
    (``http(s)://host[:port]``) of the recording services and POP RPC when they share
    a host with it (a local gateway or an explicit URL), ``None`` for the cloud (each
    client's documented endpoint); ``access_key``: the AccessKey pair FileTrans signs
    with (``None``: not configured); ``local``: the embedded gateway of this process (it
    can read local files, so FileTrans may be given ``file://`` links).
    """

    url: str
    http_url: str | None
    appkey: str
    token: TokenSource
    access_key: tuple[str, str] | None
    region: str
    local: bool


def http_base(url: str) -> str:
    """``http(s)://host[:port]`` of a gateway URL given as ``ws(s)://host[:port]/ws/v1``
    or ``http(s)://host[:port][/...]``."""
    parts = urllib.parse.urlsplit(url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    if scheme not in ("http", "https") or not parts.netloc:
        raise ConfigurationError(
            f"the gateway URL must be ws(s)://host[:port]/ws/v1 or http(s)://host[:port], "
            f"got {url!r}"
        )
    return f"{scheme}://{parts.netloc}"


def _is_cloud(url: str) -> bool:
    """Whether a gateway URL is Alibaba Cloud's (whose CreateToken is elsewhere)."""
    host = (urllib.parse.urlsplit(url).hostname or "").rstrip(".").lower()
    return host == "aliyuncs.com" or host.endswith((".aliyuncs.com", ".aliyun.com"))


def ws_url(url: str) -> str:
    """The real-time URL of a gateway URL given as ``ws(s)://...`` (as it is) or
    ``http(s)://host[:port]`` (``/ws/v1`` on the same host)."""
    if url.startswith(("ws://", "wss://")):
        return url
    base = http_base(url)
    return "ws" + base[len("http") :] + "/ws/v1"


@asynccontextmanager
async def service_settings(
    *,
    url: str | None = None,
    appkey: str | None = None,
    token: TokenSource | None = None,
    environ: Mapping[str, str] | None = None,
    recognizer: str = "auto",
    notice: Callable[[str], None] | None = print_notice,
    access_key_needed: bool = False,
    file_workers: int = 2,
    service_name: str | None = None,
    token_endpoint: str | None = None,
) -> AsyncIterator[Services]:
    """:func:`session_settings` for every service: yields :class:`Services`.

    The same rules, with the recording services in mind: an explicit ``url`` (or
    ``NLS_URL``) may also be ``http(s)://host[:port]``; ``access_key_needed`` (FileTrans)
    selects the cloud by an AccessKey rather than a token (a token alone then raises
    :class:`~nlsstream.config.ConfigurationError`). The embedded gateway gets an
    AccessKey pair of its own (checked like the cloud's) and ``file_workers``; the notice
    names ``service_name``'s URL (default: the real-time one).

    Tokens made from an AccessKey come from ``token_endpoint`` when given, else from the
    explicit URL's host when it is not the cloud's (``http(s)://host[:port]/``: a local
    gateway serves CreateToken on the same port as the services), else from the cloud's
    CreateToken of the region.
    """
    env = os.environ if environ is None else environ
    # NLS_URL may be an http(s) URL here: read it before Settings, which wants ws(s).
    explicit_url = url or env.get("NLS_URL", "").strip() or None
    settings = Settings.from_env({k: v for k, v in env.items() if k != "NLS_URL"})
    token_source: TokenSource | None = token if token else settings.token_provider
    endpoint = token_endpoint
    if endpoint is None and explicit_url is not None and not _is_cloud(explicit_url):
        endpoint = http_base(explicit_url) + "/"
    if not token and endpoint is not None and settings.access_key is not None:
        ak_id, ak_secret = settings.access_key
        token_source = AccessKeyTokenProvider(ak_id, ak_secret, settings.region, endpoint)
    key = appkey or settings.appkey
    if explicit_url is not None:
        yield Services(
            ws_url(explicit_url),
            http_base(explicit_url),
            key or PLACEHOLDER_APPKEY,
            token_source or PLACEHOLDER_TOKEN,
            settings.access_key or (PLACEHOLDER_ACCESS_KEY_ID, PLACEHOLDER_ACCESS_KEY_SECRET),
            settings.region,
            False,
        )
        return
    if token_source is not None or settings.access_key is not None:
        if access_key_needed and settings.access_key is None:
            raise ConfigurationError(
                f"{service_name or 'this service'} signs its requests with an AccessKey: set "
                "ALIYUN_AK_ID and ALIYUN_AK_SECRET (a token is not enough)"
            )
        if not key:
            settings.require_cloud()  # raises, naming NLS_APPKEY
        assert key is not None and token_source is not None
        yield Services(
            settings.url, None, key, token_source, settings.access_key, settings.region, False
        )
        return
    from .gateway import Gateway  # imported lazily: the gateway pulls in the recognisers

    # An AccessKey pair of its own, so that FileTrans' signatures are really checked.
    pair = ("LTAIlocal" + secrets.token_hex(6), secrets.token_urlsafe(18))
    gateway = Gateway(
        recognizer=recognizer, access_keys=dict([pair]), file_workers=max(file_workers, 1)
    )
    gw = await gateway.__aenter__()
    try:
        if notice is not None:
            name = _RECOGNIZER_NAMES.get(gw.recognizer.name, gw.recognizer.name)
            where = gw.url if service_name is None else gw.http_url
            notice(
                "no NLS credentials configured; using the embedded local gateway "
                f"({name}) at {where}"
            )
        yield Services(gw.url, gw.http_url, key or gw.appkey, gw.token, pair, settings.region, True)
    except BaseException:
        # Cancelled (Ctrl-C) or failed: the work still in the gateway is for this
        # process's own clients, which are gone. Closing waits for its handlers (seconds,
        # for a long recording being decoded): bound it, so that an interrupt is quick.
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(gateway.close(), ABANDON_TIMEOUT)
        raise
    await gateway.close()
