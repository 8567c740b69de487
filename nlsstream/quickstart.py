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

import os
import sys
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import NamedTuple

from .auth import TokenSource
from .config import ConfigurationError, Settings

__all__ = ["Endpoint", "print_notice", "session_settings"]

# Sent when the user configured nothing and talks to a gateway that checks nothing.
PLACEHOLDER_TOKEN = "local-token"
PLACEHOLDER_APPKEY = "local-appkey"

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
    settings = Settings.from_env(env)
    explicit_url = url or env.get("NLS_URL", "").strip() or None
    token_source: TokenSource | None = token if token else settings.token_provider
    key = appkey or settings.appkey
    if explicit_url is not None:
        if not explicit_url.startswith(("ws://", "wss://")):
            raise ConfigurationError(
                f"the gateway URL must start with ws:// or wss://, got {explicit_url!r}"
            )
        yield Endpoint(explicit_url, key or PLACEHOLDER_APPKEY, token_source or PLACEHOLDER_TOKEN)
        return
    if token_source is not None:
        if not key:
            settings.require_cloud()  # raises, naming NLS_APPKEY
        assert key is not None
        yield Endpoint(settings.url, key, token_source)
        return
    from .gateway import Gateway  # imported lazily: the gateway pulls in the recognisers

    async with Gateway(recognizer=recognizer) as gw:
        if notice is not None:
            name = _RECOGNIZER_NAMES.get(gw.recognizer.name, gw.recognizer.name)
            notice(
                "no NLS credentials configured; using the embedded local gateway "
                f"({name}) at {gw.url}"
            )
        yield Endpoint(gw.url, key or gw.appkey, gw.token)
