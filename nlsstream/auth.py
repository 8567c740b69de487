"""Token providers: where a session gets the token it sends as ``X-NLS-Token``."""

from __future__ import annotations

from typing import Protocol, runtime_checkable

__all__ = ["StaticTokenProvider", "TokenProvider", "TokenSource", "as_provider"]


@runtime_checkable
class TokenProvider(Protocol):
    """Anything that can hand out a currently valid token.

    Sessions call :meth:`get_token` before every connection, so a provider that caches
    and refreshes (see ``AccessKeyTokenProvider``) keeps long-running programs working.
    """

    async def get_token(self) -> str:
        """Return a token that is valid now."""
        ...


class StaticTokenProvider:
    """A fixed token, e.g. one copied from the console."""

    def __init__(self, token: str) -> None:
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
