"""Host aliases: how the local provider resolves a cluster's service names (like hostAliases).

A stack written for Kubernetes names its store ``memcached.openfaas-fn:11211``; faas-cli
expands that into the deploy request. On one machine no DNS knows that name, so the local
gateway gives each replica ``$EMNIST_HOST_ALIASES`` (a provider setting no deploy can change)
mapping such ``host:port`` pairs to loopback addresses, and functions resolve the URLs they
open through it. A URL whose host:port is not aliased is returned unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping
from urllib.parse import urlsplit, urlunsplit

__all__ = ["ALIASES_ENV", "format_aliases", "parse_aliases", "resolve_url"]

ALIASES_ENV = "EMNIST_HOST_ALIASES"
_DEFAULT_PORTS = {"memcached": 11211, "memcached+binary": 11211, "redis": 6379, "http": 80,
                  "https": 443}


def parse_aliases(text: str) -> dict[str, str]:
    """``"a:1=b:2,c:3=d:4"`` -> ``{"a:1": "b:2", "c:3": "d:4"}`` (malformed items ignored)."""
    out: dict[str, str] = {}
    for item in (text or "").split(","):
        src, sep, dst = item.strip().partition("=")
        if sep and src and dst:
            out[src.strip().lower()] = dst.strip()
    return out


def format_aliases(aliases: Mapping[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in aliases.items())


def _resolve_netloc(scheme: str, netloc: str, aliases: Mapping[str, str]) -> str:
    userinfo, at, hosts = netloc.rpartition("@")
    out = []
    for part in hosts.split(","):  # memcached://h1:p1,h2:p2
        host, colon, port = part.rpartition(":")
        if not colon or not port.isdigit():
            host, port = part, str(_DEFAULT_PORTS.get(scheme, ""))
        out.append(aliases.get(f"{host.lower()}:{port}", part))
    return f"{userinfo}{at}{','.join(out)}"


def resolve_url(url: str, aliases: Mapping[str, str]) -> str:
    """``url`` with every aliased ``host:port`` replaced (user info, path and query kept)."""
    if not aliases or not url:
        return url
    parts = urlsplit(url)
    if not parts.netloc:
        return url
    netloc = _resolve_netloc(parts.scheme, parts.netloc, aliases)
    return urlunsplit(parts._replace(netloc=netloc))
