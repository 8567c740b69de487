"""Settings from the environment: gateway URL, appkey and where tokens come from.

Variables (empty values count as unset):

``NLS_URL``
    Gateway URL. Default :data:`DEFAULT_URL`, or ``wss://nls-gateway-<region>.aliyuncs.com/ws/v1``
    when ``NLS_REGION`` names another region (docs/protocol.md §1.1).
``NLS_APPKEY``
    The project appkey sent in every directive.
``NLS_TOKEN``
    A fixed token. Takes precedence over an AccessKey.
``ALIYUN_AK_ID`` / ``ALIYUN_AK_SECRET``
    An AccessKey pair; tokens are then fetched and refreshed automatically. The standard
    Alibaba Cloud names ``ALIBABA_CLOUD_ACCESS_KEY_ID`` / ``ALIBABA_CLOUD_ACCESS_KEY_SECRET``
    are read when the short ones are unset.
``NLS_REGION``
    Region of the token service and default gateway (default ``cn-shanghai``).
"""

from __future__ import annotations

import difflib
import json
import os
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .auth import (
    DEFAULT_REGION,
    AccessKeyTokenProvider,
    StaticTokenProvider,
    TokenProvider,
    TokenSource,
)
from .errors import ConfigurationError
from .realtime.protocol import Namespace

__all__ = [
    "DEFAULT_URL",
    "ConfigurationError",
    "Settings",
    "check_token",
    "gateway_url",
    "start_parameters",
]

#: The gateway every official SDK connects to by default (docs/protocol.md §1.1).
DEFAULT_URL = "wss://nls-gateway.cn-shanghai.aliyuncs.com/ws/v1"


def gateway_url(region: str = DEFAULT_REGION) -> str:
    """The public gateway URL of ``region`` (:data:`DEFAULT_URL` for cn-shanghai)."""
    if region == DEFAULT_REGION:
        return DEFAULT_URL
    return f"wss://nls-gateway-{region}.aliyuncs.com/ws/v1"


def _get(environ: Mapping[str, str], *names: str) -> str | None:
    for name in names:
        value = environ.get(name, "").strip()
        if value:
            return value
    return None


@dataclass(frozen=True)
class Settings:
    """Connection settings; build them with :meth:`from_env` or directly.

    ``token_provider`` is ``None`` when no credentials are configured (fine for a local
    gateway that does not check tokens). ``access_key`` is the AccessKey pair (id,
    secret) when one is configured, whether or not ``NLS_TOKEN`` takes precedence for
    tokens: FileTrans signs its requests with it (never shown by ``repr``).
    """

    url: str = DEFAULT_URL
    appkey: str | None = None
    token_provider: TokenProvider | None = None
    region: str = DEFAULT_REGION
    access_key: tuple[str, str] | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> Settings:
        """Read the variables listed in the module docstring (default: ``os.environ``).

        Raises :class:`ConfigurationError` when only half of an AccessKey pair is set.
        """
        env = os.environ if environ is None else environ
        region = _get(env, "NLS_REGION") or DEFAULT_REGION
        url = _get(env, "NLS_URL") or gateway_url(region)
        if not url.startswith(("ws://", "wss://")):
            raise ConfigurationError(f"NLS_URL must start with ws:// or wss://, got {url!r}")
        ak_id = _get(env, "ALIYUN_AK_ID", "ALIBABA_CLOUD_ACCESS_KEY_ID")
        ak_secret = _get(env, "ALIYUN_AK_SECRET", "ALIBABA_CLOUD_ACCESS_KEY_SECRET")
        if bool(ak_id) != bool(ak_secret):
            missing = "ALIYUN_AK_SECRET" if ak_id else "ALIYUN_AK_ID"
            present = "ALIYUN_AK_ID" if ak_id else "ALIYUN_AK_SECRET"
            raise ConfigurationError(
                f"{present} is set but {missing} is not: set both to fetch tokens with an "
                "AccessKey, or neither (and set NLS_TOKEN instead)"
            )
        token = _get(env, "NLS_TOKEN")
        provider: TokenProvider | None = None
        if token:
            provider = StaticTokenProvider(token)
        elif ak_id and ak_secret:
            provider = AccessKeyTokenProvider(ak_id, ak_secret, region)
        return cls(
            url=url,
            appkey=_get(env, "NLS_APPKEY"),
            token_provider=provider,
            region=region,
            access_key=(ak_id, ak_secret) if ak_id and ak_secret else None,
        )

    @property
    def has_credentials(self) -> bool:
        """Whether a token or an AccessKey is configured."""
        return self.token_provider is not None

    @property
    def cloud_configured(self) -> bool:
        """Whether everything needed for the cloud gateway is set: credentials and appkey."""
        return self.has_credentials and bool(self.appkey)

    def require_cloud(self) -> None:
        """Raise :class:`ConfigurationError` naming what is missing for the cloud gateway."""
        missing = []
        if not self.appkey:
            missing.append("NLS_APPKEY")
        if not self.has_credentials:
            missing.append("NLS_TOKEN or ALIYUN_AK_ID + ALIYUN_AK_SECRET")
        if missing:
            raise ConfigurationError(
                "not configured for the cloud gateway: set " + ", ".join(missing)
            )


# --------------------------------------------------------------------------- session arguments

_HOW_TO_AUTHENTICATE = (
    "pass token='...', or a token provider such as "
    "nlsstream.AccessKeyTokenProvider(ak_id, ak_secret), or take them from the environment "
    "(NLS_TOKEN, or ALIYUN_AK_ID + ALIYUN_AK_SECRET) with "
    "nlsstream.Settings.from_env().token_provider"
)


def check_token(token: object) -> TokenSource:
    """``token`` if a session can use it (a non-empty string or a token provider); else
    :class:`ConfigurationError` (``None``, e.g. an unset ``os.environ.get("NLS_TOKEN")``)
    or TypeError, saying how to give credentials."""
    if token is None or token == "":
        raise ConfigurationError(f"no token given: {_HOW_TO_AUTHENTICATE}")
    if isinstance(token, str) or callable(getattr(token, "get_token", None)):
        return token  # type: ignore[return-value]
    raise TypeError(f"token must be a string or a token provider, not {type(token).__name__}")


#: Parameter names already warned about (once per name and process).
_warned: set[str] = set()


def start_parameters(
    namespace: Namespace,
    owner: str,
    extra: Mapping[str, Any],
    params: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The extra Start parameters of a session of class ``owner``: ``extra`` (its keyword
    arguments) then ``params`` (its explicit ``params={...}``).

    Raises TypeError, naming the parameter, for a value that cannot be sent as JSON (a
    callable is a callback the class does not have). Warns once per name for a keyword
    argument outside ``namespace.parameters`` (most likely a typo); ``params`` is sent
    as given, without a warning.
    """
    merged = {**extra, **(params or {})}
    for name, value in merged.items():
        if callable(value):
            raise TypeError(
                f"{owner}() got an unexpected keyword argument {name!r}: a callable cannot be "
                f"a Start parameter, and {owner} has no such callback"
            )
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise TypeError(
                f"{owner}() parameter {name!r} cannot be sent to the gateway as JSON: {exc}"
            ) from None
    for name in extra:
        if name in namespace.parameters or name in _warned:
            continue
        _warned.add(name)
        close = difflib.get_close_matches(name, namespace.parameters, n=1)
        maybe = f" (did you mean {close[0]!r}?)" if close else ""
        warnings.warn(
            f"{owner}() parameter {name!r} is not a documented {namespace.name} parameter"
            f"{maybe}; it is sent as given. Pass it in params={{...}} to send it without "
            "this warning.",
            UserWarning,
            stacklevel=_user_stacklevel(),
        )
    return merged


def _user_stacklevel() -> int:
    """The ``stacklevel`` that points a warning at the first frame outside nlsstream."""
    package = os.path.dirname(__file__)
    frame = sys._getframe(1)
    level = 1
    while frame.f_back is not None and frame.f_code.co_filename.startswith(package):
        frame = frame.f_back
        level += 1
    return level
