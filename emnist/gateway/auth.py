"""Who may talk to the local gateway: basic auth on ``/system/*`` and no browser-origin requests.

Basic auth behaves like OpenFaaS's: the credentials are the files ``basic-auth-user`` and
``basic-auth-password`` (or ``$OPENFAAS_USER``/``$OPENFAAS_PASSWORD``; the user defaults to
``admin``), a failure is 401 with ``WWW-Authenticate: Basic realm="Restricted"``.

Browsers are kept out on every path, because ``/system/*`` changes what runs and is open on
loopback when no password is set: a request whose ``Origin`` is not the gateway's own (or one
the operator allowed), whose ``Sec-Fetch-Site`` says another site sent it, or whose ``Host`` is
not a loopback name or one the gateway was told to answer to (DNS rebinding) is refused (403).
"""

from __future__ import annotations

import base64
import binascii
import hmac
import ipaddress
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

__all__ = ["BrowserGuard", "check_basic", "is_loopback", "load_auth", "split_host"]

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


def is_loopback(host: str) -> bool:
    """True for loopback names and addresses (127.0.0.0/8, ::1, localhost)."""
    host = host.strip("[]").rstrip(".").lower()
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host(value: str) -> tuple[str, int | None]:
    """``"host:port"`` / ``"[::1]:port"`` / ``"host"`` -> (lower-case host, port or None)."""
    value = value.strip().lower()
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port = value.partition(":")
    else:
        host, port = value, ""
    return host.rstrip("."), int(port) if port.isdigit() and len(port) <= 5 else None


def load_auth(path: str | os.PathLike[str] | None,
              env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """Basic-auth credentials from a secrets dir/file or ``$OPENFAAS_PASSWORD`` (else None).

    A directory holds ``basic-auth-password`` (and optionally ``basic-auth-user``); a file is
    the password itself. The user defaults to ``$OPENFAAS_USER``, then ``admin``.
    """
    env = os.environ if env is None else env
    if path:
        p = Path(path)
        pw_file = p / "basic-auth-password" if p.is_dir() else p
        user_file = pw_file.parent / "basic-auth-user"
        password = pw_file.read_text(encoding="utf-8").strip()
        user = user_file.read_text(encoding="utf-8").strip() if user_file.is_file() else ""
        if not password:
            raise ValueError(f"{pw_file.name} is empty")
        return (user or env.get("OPENFAAS_USER") or "admin", password)
    if env.get("OPENFAAS_PASSWORD"):
        return (env.get("OPENFAAS_USER") or "admin", env["OPENFAAS_PASSWORD"])
    return None


def check_basic(header: str | None, auth: tuple[str, str]) -> bool:
    """True if an ``Authorization`` header carries exactly these basic-auth credentials."""
    if not header or not header[:6].lower() == "basic ":
        return False
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    user, sep, password = decoded.partition(b":")
    if not sep:
        return False
    user_ok = hmac.compare_digest(user, auth[0].encode())
    pw_ok = hmac.compare_digest(password, auth[1].encode())
    return user_ok and pw_ok


class BrowserGuard:
    """Refuses requests a web page made (cross-origin) or sent to a rebound DNS name."""

    def __init__(self, port: int, hosts: Iterable[str] = (), origins: Iterable[str] = ()) -> None:
        self.port = port
        self.hosts = {split_host(h)[0] for h in hosts if h} - {"0.0.0.0", "::", ""}
        self.origins = {o.rstrip("/").lower() for o in origins if o}
        self._seen: dict[str, bool] = {}

    def host_ok(self, host: str) -> bool:
        known = self._seen.get(host)
        if known is None:
            known = is_loopback(host) or host in self.hosts
            if len(self._seen) < 256:  # bounded: a client can send any Host
                self._seen[host] = known
        return known

    def refusal(self, environ: Mapping[str, str]) -> str | None:
        """Why this WSGI request is refused (None: it may go on)."""
        host_header = environ.get("HTTP_HOST")
        if host_header is not None and not self.host_ok(split_host(host_header)[0]):
            return "Host is not this gateway (use 127.0.0.1, or start it with --allowed-host)"
        origin = environ.get("HTTP_ORIGIN")
        if origin is not None:
            if origin.rstrip("/").lower() in self.origins:
                return None
            parts = urlsplit(origin.strip())
            try:
                port = parts.port or {"http": 80, "https": 443}.get(parts.scheme)
            except ValueError:
                port = None
            if not (parts.scheme in ("http", "https") and parts.hostname
                    and self.host_ok(parts.hostname.rstrip(".")) and port == self.port):
                return "cross-origin requests are refused"
        site = environ.get("HTTP_SEC_FETCH_SITE")
        if site is not None and site.lower() not in ("same-origin", "none"):
            return "cross-site requests are refused"
        return None
