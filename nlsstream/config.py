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

import os
from collections.abc import Mapping
from dataclasses import dataclass

from .auth import DEFAULT_REGION, AccessKeyTokenProvider, StaticTokenProvider, TokenProvider
from .errors import NlsError

__all__ = ["DEFAULT_URL", "ConfigurationError", "Settings", "gateway_url"]

#: The gateway every official SDK connects to by default (docs/protocol.md §1.1).
DEFAULT_URL = "wss://nls-gateway.cn-shanghai.aliyuncs.com/ws/v1"


class ConfigurationError(NlsError, ValueError):
    """The environment is incomplete or contradictory (e.g. an AccessKey id without secret)."""


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
    gateway that does not check tokens).
    """

    url: str = DEFAULT_URL
    appkey: str | None = None
    token_provider: TokenProvider | None = None
    region: str = DEFAULT_REGION

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
        return cls(url=url, appkey=_get(env, "NLS_APPKEY"), token_provider=provider, region=region)

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
