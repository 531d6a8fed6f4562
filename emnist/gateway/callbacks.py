"""Where an async call's answer may be POSTed: ``X-Callback-Url`` hosts the operator allowed.

OpenFaaS POSTs to any callback URL; here a request never chooses hosts (the security model), so
a callback must resolve only to addresses of the operator's allow-list (``--callback-host
HOST[:PORT]``, ``$EMNIST_CALLBACK_HOSTS``; empty by default: no callbacks). The name is
resolved and EVERY address it resolves to must be allowed, compared as addresses (so
``2130706433``, ``0x7f000001``, ``127.1`` or ``[::ffff:127.0.0.1]`` are the loopback address
they spell), and the POST then connects to the address that was checked, never resolving the
name again (DNS rebinding). The check runs when the call is queued (400) and again before the
POST, since names may resolve differently by then.
"""

from __future__ import annotations

import http.client
import ipaddress
import socket
import ssl
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = ["ENV", "MAX_CALLBACK_URL", "CallbackPolicy", "CallbackRefused", "Target",
           "parse_hosts"]

ENV = "EMNIST_CALLBACK_HOSTS"
MAX_CALLBACK_URL = 2048
_DEFAULT_PORTS = {"http": 80, "https": 443}

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Resolver = Callable[..., list[tuple[Any, ...]]]


class CallbackRefused(ValueError):
    """The callback URL is malformed or names a host that is not allowed (400)."""


@dataclass(frozen=True)
class Target:
    """A checked callback: where to connect (a checked address) and what to send as Host."""

    scheme: str
    hostname: str
    netloc: str
    port: int
    address: IPAddress
    path: str


def canonical(text: str) -> IPAddress:
    """An address from getaddrinfo, without zone, IPv4-mapped IPv6 as the IPv4 it maps."""
    addr = ipaddress.ip_address(text.split("%", 1)[0])
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def parse_hosts(values: Iterable[str]) -> list[tuple[str, int | None]]:
    """``HOST[:PORT]`` items (each value may hold several, comma or space separated; IPv6 in
    brackets when a port follows) -> (host, port or None for any port)."""
    out: list[tuple[str, int | None]] = []
    for value in values:
        for item in value.replace(",", " ").split():
            host, port = item, ""
            if item.startswith("["):
                host, sep, rest = item[1:].partition("]")
                if not sep or (rest and not rest.startswith(":")):
                    raise ValueError(f"callback host {item!r} is not HOST[:PORT]")
                port = rest[1:]
            elif item.count(":") == 1:
                host, _, port = item.partition(":")
            if not host or (port and not (port.isdigit() and 0 < int(port) < 65536)) \
                    or (item.endswith(":") and not port):
                raise ValueError(f"callback host {item!r} is not HOST[:PORT]")
            out.append((host.lower().rstrip("."), int(port) if port else None))
    return out


def _resolve(resolver: Resolver, host: str, port: int) -> set[IPAddress]:
    infos = resolver(host, port, type=socket.SOCK_STREAM)
    return {canonical(str(info[4][0])) for info in infos}


class CallbackPolicy:
    """The operator's callback allow-list, resolved once at start-up."""

    def __init__(self, hosts: Iterable[str] = (),
                 resolver: Resolver = socket.getaddrinfo) -> None:
        self._resolver = resolver
        self.entries = parse_hosts(hosts)
        self._allowed: dict[IPAddress, set[int | None]] = {}
        for host, port in self.entries:
            try:
                addresses = _resolve(resolver, host, port or 80)
            except (OSError, UnicodeError, ValueError):
                raise ValueError(f"callback host {host!r} does not resolve") from None
            for addr in addresses:
                self._allowed.setdefault(addr, set()).add(port)

    def allows(self, address: IPAddress, port: int) -> bool:
        ports = self._allowed.get(canonical(str(address)), set())
        return None in ports or port in ports

    def check(self, url: str) -> Target:
        """The checked target of ``url``; :class:`CallbackRefused` says why it is not."""
        if len(url) > MAX_CALLBACK_URL:
            raise CallbackRefused(f"X-Callback-Url: longer than {MAX_CALLBACK_URL} characters")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError:
            raise CallbackRefused("X-Callback-Url: not a URL") from None
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise CallbackRefused("X-Callback-Url: only http:// and https:// URLs with a host "
                                  "are allowed")
        if parts.username is not None or parts.password is not None:
            raise CallbackRefused("X-Callback-Url: credentials in the URL are not allowed")
        if not self._allowed:  # nothing to resolve for: no lookup of a name a request chose
            raise CallbackRefused("X-Callback-Url: host not allowed (this gateway allows no "
                                  "callback hosts: see --callback-host)")
        port = port or _DEFAULT_PORTS[parts.scheme]
        host = parts.hostname.rstrip(".")
        try:
            addresses = _resolve(self._resolver, host, port)
        except (OSError, UnicodeError, ValueError):
            raise CallbackRefused("X-Callback-Url: host does not resolve") from None
        if not addresses or not all(self.allows(a, port) for a in addresses):
            raise CallbackRefused(f"X-Callback-Url: host not allowed ({host[:100]}:{port} is "
                                  "not a --callback-host of this gateway)")
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return Target(parts.scheme, host, parts.netloc, port, sorted(addresses, key=str)[0],
                      path)

    def post(self, url: str, body: bytes, headers: Mapping[str, str],
             timeout: float = 30.0) -> int:
        """Check ``url`` again, then POST to the checked address; the answer's status."""
        target = self.check(url)
        conn = _connect(target, timeout)
        try:
            conn.request("POST", target.path, body=body,
                         headers={"Host": target.netloc, **headers})
            return conn.getresponse().status
        finally:
            conn.close()


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS to a checked address, verifying the certificate for the URL's host name."""

    def __init__(self, target: Target, timeout: float) -> None:
        super().__init__(str(target.address), target.port, timeout=timeout,
                         context=ssl.create_default_context())
        self._server_name = target.hostname

    def connect(self) -> None:
        http.client.HTTPConnection.connect(self)
        self.sock = self._context.wrap_socket(self.sock, server_hostname=self._server_name)


def _connect(target: Target, timeout: float) -> http.client.HTTPConnection:
    if target.scheme == "https":
        return _PinnedHTTPS(target, timeout)
    return http.client.HTTPConnection(str(target.address), target.port, timeout=timeout)
