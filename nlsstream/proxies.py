"""Which proxy the system's settings name for a host: the one rule every client follows.

The environment's ``<scheme>_proxy`` variables (either case), ``all_proxy`` as a fallback,
minus ``no_proxy``, as :func:`urllib.request.getproxies` reads them; and, whatever they
say, a loopback address (``127.0.0.0/8``, ``::1``, ``localhost``) is never proxied, as
Go's ``net/http`` does: a proxy cannot reach this machine's loopback, so a local gateway
(``nlsstream serve``, the embedded one, the pytest fixture) would otherwise be
unreachable wherever a company or CI sets ``http_proxy``.
"""

from __future__ import annotations

import ipaddress
import urllib.request

__all__ = ["is_loopback", "redact_proxy", "system_proxy"]


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or an address, IPv6 with or without brackets) is this
    machine's loopback: ``localhost`` (and its subdomains), ``127.0.0.0/8``, ``::1``."""
    name = host.strip("[]").rstrip(".").lower()
    if name == "localhost" or name.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(name.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def system_proxy(scheme: str, host: str) -> str | None:
    """The proxy URL the system's settings name for ``host`` reached by ``scheme``
    (``ws``/``wss`` fall back to ``http_proxy``/``https_proxy``, everything to
    ``all_proxy``), or ``None``: none set, ``no_proxy`` matches, or a loopback host."""
    if is_loopback(host) or urllib.request.proxy_bypass(host):
        return None
    proxies = urllib.request.getproxies()
    fallback = {"ws": "http", "wss": "https"}.get(scheme, scheme)
    return proxies.get(scheme) or proxies.get(fallback) or proxies.get("all")


def redact_proxy(url: str) -> str:
    """A URL (a proxy's, a gateway's) without its password (``scheme://user:***@host``)."""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    user_info, _, host = rest.rpartition("@")
    user = user_info.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
