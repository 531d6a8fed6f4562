"""``emnist dashboard``: the /ui pages served from the user's machine for a gateway elsewhere.

The pages are the gateway's own (:mod:`.app`); runs are read through the gateway
(:class:`~.sources.Sources`), never from the cluster's store. The functions panel's calls go
through a relay that forwards only what the pages use (the function list and status, scale,
logs without follow, info, and invocations) to the gateway, with the browser's own
``Authorization`` header: the relay adds no credentials, so it can do nothing the user could
not. The server applies the gateway's guards to itself: the browser guard (no other origin, no
rebound Host), and, when a gateway password is configured here (``$OPENFAAS_PASSWORD``), the
same basic auth on every path; off loopback it refuses to start without one.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, quote, urlencode, urlsplit

import requests

from emnist.gateway.auth import BrowserGuard, check_basic, is_loopback
from emnist.gateway.client import GatewayClient
from emnist.ui.app import SECURITY_HEADERS, create_ui
from emnist.ui.sources import Sources

__all__ = ["MAX_BODY", "Dashboard", "make_server", "relay_target", "serve"]

log = logging.getLogger("emnist.ui")

MAX_BODY = 4 << 20  # request bodies the relay forwards
MAX_ANSWER = 32 << 20  # answer bytes the relay passes back
FORWARD = ("Authorization", "Content-Type", "Accept")
ANSWER = ("Content-Type", "WWW-Authenticate", "X-Call-Id", "X-Duration-Seconds")
SYSTEM_GET = ("/system/functions", "/system/info", "/system/logs")
INVOKE_METHODS = ("GET", "POST", "PUT", "DELETE")
WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _name_ok(name: str) -> bool:
    return 0 < len(name) <= 127 and all(c.isalnum() or c in "-_." for c in name)


def relay_target(method: str, path: str, query: str) -> str | None:
    """The gateway path (with query) a relayed request goes to, or None if the relay refuses
    it: only what the pages use. ``/system/logs`` never follows (the page polls)."""
    if method == "GET" and path in SYSTEM_GET:
        if path == "/system/logs":
            pairs = [(k, v) for k, v in parse_qsl(query, keep_blank_values=True)
                     if k != "follow"] + [("follow", "false")]
            query = urlencode(pairs)
        return path + ("?" + query if query else "")
    parts = path.split("/")
    if len(parts) == 4 and parts[:2] == ["", "system"] and _name_ok(parts[3]):
        if (method, parts[2]) in (("GET", "function"), ("POST", "scale-function")):
            return path + ("?" + query if query else "")
    if len(parts) >= 3 and parts[:2] == ["", "function"] and _name_ok(parts[2]) \
            and method in INVOKE_METHODS and ".." not in parts:
        return quote(path) + ("?" + query if query else "")
    return None


def _plain(start_response: Callable[..., Any], code: int, text: str,
           extra: Sequence[tuple[str, str]] = ()) -> list[bytes]:
    body = text.encode()
    reason = {401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 413: "Too Large",
              502: "Bad Gateway", 302: "Found"}.get(code, "Error")
    start_response(f"{code} {reason}", [("Content-Type", "text/plain; charset=utf-8"),
                                        ("Content-Length", str(len(body))),
                                        *SECURITY_HEADERS.items(), *extra])
    return [body]


class Dashboard:
    """The dashboard's WSGI app for the gateway at ``gateway_url``; :meth:`set_port` once
    bound (the browser guard checks Origin ports against it)."""

    def __init__(self, gateway_url: str, *, auth: tuple[str, str] | None = None,
                 p2p_dir: str | Path | None = None, bench_files: Sequence[str | Path] = (),
                 hosts: Sequence[str] = ()) -> None:
        self.gateway_url = gateway_url.rstrip("/")
        self.auth, self.hosts = auth, list(hosts)
        self.ui = create_ui(Sources(GatewayClient(self.gateway_url, auth=auth), p2p_dir,
                                    bench_files)).wsgi_app
        self.session = requests.Session()
        if is_loopback(urlsplit(self.gateway_url).hostname or ""):
            self.session.trust_env = False
        self.guard = BrowserGuard(0, self.hosts)

    def set_port(self, port: int) -> None:
        self.guard = BrowserGuard(port, self.hosts)

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]
                 ) -> Iterable[bytes]:
        refusal = self.guard.refusal(environ)
        if refusal:
            return _plain(start_response, 403, refusal)
        if self.auth is not None and not check_basic(environ.get("HTTP_AUTHORIZATION"),
                                                     self.auth):
            return _plain(start_response, 401, "invalid credentials",
                          [("WWW-Authenticate", 'Basic realm="Restricted"')])
        path = environ.get("PATH_INFO", "")
        if path == "/ui" or path.startswith("/ui/"):
            return self.ui(environ, start_response)
        if path == "/":
            return _plain(start_response, 302, "see /ui/", [("Location", "/ui/")])
        target = relay_target(environ["REQUEST_METHOD"], path, environ.get("QUERY_STRING", ""))
        if target is None:
            return _plain(start_response, 404, "404 page not found")
        return self._relay(environ, start_response, target)

    def _relay(self, environ: dict[str, Any], start_response: Callable[..., Any],
               target: str) -> list[bytes]:
        length = int(environ.get("CONTENT_LENGTH") or 0)
        if length > MAX_BODY:
            return _plain(start_response, 413, f"request bodies are at most {MAX_BODY} bytes")
        body = environ["wsgi.input"].read(length) if length else None
        headers = {h: environ[k] for h in FORWARD
                   if (k := "HTTP_" + h.upper().replace("-", "_")) in environ}
        if environ.get("CONTENT_TYPE"):
            headers["Content-Type"] = environ["CONTENT_TYPE"]
        system = target.startswith("/system/")
        try:
            with self.session.request(environ["REQUEST_METHOD"], self.gateway_url + target,
                                      data=body, headers=headers, stream=True,
                                      allow_redirects=False,
                                      timeout=(10, 30 if system else 600)) as resp:
                answer = resp.raw.read(MAX_ANSWER + 1, decode_content=True)
                status, reason = resp.status_code, resp.reason or "OK"
                out = [(h, resp.headers[h]) for h in ANSWER if h in resp.headers]
        except requests.RequestException as e:
            log.warning("relay to %s failed: %s", self.gateway_url, e)
            return _plain(start_response, 502, f"the gateway at {self.gateway_url} did not "
                          "answer")
        if len(answer) > MAX_ANSWER:
            return _plain(start_response, 502, "the gateway's answer is too large to relay")
        start_response(f"{status} {reason}", out + [("Content-Length", str(len(answer))),
                                                    *SECURITY_HEADERS.items()])
        return [answer]


def make_server(app: Dashboard, host: str, port: int) -> tuple[Any, str]:
    """Bind (port 0: a free one); returns the waitress server and the dashboard's URL."""
    from waitress.server import create_server

    if not is_loopback(host) and app.auth is None:
        raise ValueError(f"--host {host} would show the dashboard (and relay scale calls) to "
                         "the network without a password: set OPENFAAS_PASSWORD")
    # poll, not select: close() from another thread then marks the socket POLLNVAL instead of
    # making the loop's select() raise EBADF (seen as an unhandled thread exception in tests)
    server = create_server(app, host=host, port=port, threads=16, ident="emnist-dashboard",
                           max_request_body_size=MAX_BODY, asyncore_use_poll=True)
    bound = int(server.effective_port)
    app.set_port(bound)
    shown = "127.0.0.1" if host in ("0.0.0.0", "::", "") else host
    return server, f"http://{shown}:{bound}"


def serve(app: Dashboard, host: str, port: int,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Listen and serve until interrupted."""
    server, url = make_server(app, host, port)
    if on_ready is not None:
        on_ready(url)
    try:
        server.run()
    finally:
        server.close()
