"""``nls.token.getToken``: a token from an AccessKey pair (CreateToken), blocking."""

from __future__ import annotations

from ...auth import create_token
from ...errors import TokenError
from ...sync import CALL_MARGIN, loop_thread
from .exception import GetTokenFailed

__all__ = ["getToken"]

TIMEOUT = 10.0


def getToken(
    akid: str | None,
    aksecret: str | None,
    domain: str = "cn-shanghai",
    version: str = "2019-02-28",
    url: str = "nls-meta.cn-shanghai.aliyuncs.com",
) -> str:
    """Return a new token for the AccessKey pair (POST CreateToken to ``url``, a host
    or a full URL, in region ``domain``). Raises :class:`GetTokenFailed`; its message
    never contains the secret."""
    if akid is None or aksecret is None:
        raise GetTokenFailed("No akid or aksecret")
    endpoint = url if "://" in url else f"https://{url}/"

    async def fetch() -> str:
        token = await create_token(
            akid, aksecret, domain, endpoint, timeout=TIMEOUT, method="POST", version=version
        )
        return token.value

    try:
        return loop_thread().run(fetch, TIMEOUT + CALL_MARGIN)
    except TokenError as exc:
        raise GetTokenFailed(str(exc)) from None
