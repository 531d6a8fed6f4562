"""The gateway's WSGI front: guards on every request, a fast path for ``/function/*``, and the
Flask app (:mod:`.handlers`) for the rest.

Order per request: refuse browser-origin requests (403), require basic auth on ``/system/*``
and on the dashboard ``/ui`` (401), then route. ``/function/<name>[/path]`` is proxied here in
plain WSGI (no Flask routing, ``http.client`` upstream), because it is the path whose latency
matters. Bodies larger than the limit are refused with 413 by waitress before they are read.
Errors never carry exception text or a server path.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Iterable
from typing import Any
from urllib.parse import quote

from flask import Flask, Response

from emnist.ui.app import gateway_ui

from .auth import BrowserGuard, check_basic
from .handlers import PROXY_METHODS, ROUTES
from .httpstatus import go_status_middleware, status_line
from .logs import NAMESPACE
from .proxy import HOP_BY_HOP, RESPONSE_SKIP, GatewayTimeout, UpstreamError, UpstreamTimeout
from .state import Gateway
from .supervisor import NoReplicaError, ReplicaError

__all__ = ["build_app"]

log = logging.getLogger("emnist.gateway")

WSGIApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]
_PREFIX = "/function/"


def _plain(start_response: Callable[..., Any], code: int, text: str,
           extra: list[tuple[str, str]] | None = None) -> list[bytes]:
    body = text.encode()
    headers = [("Content-Type", "text/plain; charset=utf-8"), ("Content-Length", str(len(body)))]
    start_response(status_line(code), headers + (extra or []))
    return [body]


def _request_headers(environ: dict[str, Any]) -> list[tuple[str, str]]:
    """The client's headers minus hop-by-hop ones, named as werkzeug names them."""
    out = []
    for key, value in environ.items():
        if key.startswith("HTTP_") and key != "HTTP_X_CALL_ID":
            name = key[5:].replace("_", "-").title()
            if name.lower() not in HOP_BY_HOP:
                out.append((name, value))
    content_type = environ.get("CONTENT_TYPE")
    if content_type:
        out.append(("Content-Type", content_type))
    return out


def _function_call(gw: Gateway, environ: dict[str, Any],
                   start_response: Callable[..., Any]) -> list[bytes]:
    """``/function/<name>[.<ns>][/<path>]``: proxy the call to one replica."""
    raw = environ.get("REQUEST_URI") or ""
    if not raw.startswith(_PREFIX):  # absolute-form or missing: rebuild from the decoded path
        query = environ.get("QUERY_STRING", "")
        raw = quote(environ.get("PATH_INFO", "")) + ("?" + query if query else "")
    if any(c in raw for c in " \r\n\x00"):
        return _plain(start_response, 400, "malformed request target")
    path, _, query = raw.partition("?")
    name, _, rest = path[len(_PREFIX):].partition("/")
    dep = gw.lookup(name)
    if dep is None:
        base, _, ns = name.partition(".")
        return _plain(start_response, 404,
                      f"error finding function {base[:63]}.{(ns or NAMESPACE)[:63]}: not found")
    method = environ["REQUEST_METHOD"]
    if method not in PROXY_METHODS:
        return _plain(start_response, 405, "method not allowed")
    call_id = str(uuid.uuid4())
    length = environ.get("CONTENT_LENGTH")
    body = environ["wsgi.input"].read(int(length)) if length and length != "0" else b""
    headers = _request_headers(environ)
    headers.append(("X-Call-Id", call_id))
    if "HTTP_X_FORWARDED_HOST" not in environ and environ.get("HTTP_HOST"):
        headers.append(("X-Forwarded-Host", environ["HTTP_HOST"]))
    if "HTTP_X_FORWARDED_FOR" not in environ and environ.get("REMOTE_ADDR"):
        headers.append(("X-Forwarded-For", environ["REMOTE_ADDR"]))
    target = "/" + rest + ("?" + query if query else "")
    start = time.perf_counter()
    try:
        up = gw.call(dep, method, target, headers, body)
    except UpstreamTimeout:
        return _plain(start_response, 504, f"function {dep.name} timed out after "
                      f"{dep.timeout:g}s", [("X-Call-Id", call_id)])
    except GatewayTimeout as e:  # as the OpenFaaS gateway: 502, the function runs on
        log.warning("call %s to %s: %s", call_id, dep.name, e)
        return _plain(start_response, 502, f"function {dep.name}: {e}", [("X-Call-Id", call_id)])
    except (UpstreamError, NoReplicaError, ReplicaError) as e:
        log.error("call %s to %s failed: %s", call_id, dep.name, e)
        return _plain(start_response, 502, f"error calling function {dep.name}",
                      [("X-Call-Id", call_id)])
    out = [(k, v) for k, v in up.headers if k.lower() not in RESPONSE_SKIP]
    out += [("Content-Length", str(len(up.body))), ("X-Call-Id", call_id),
            ("X-Duration-Seconds", f"{time.perf_counter() - start:f}")]
    start_response(status_line(up.status), out)
    return [up.body] if method != "HEAD" else []


def _flask_app(gw: Gateway) -> Flask:
    app = Flask(__name__)
    for rule, handler, methods in ROUTES:
        def view(_h: Callable[..., Response] = handler, **kw: Any) -> Response:
            return _h(gw, **kw)

        app.add_url_rule(rule, f"{handler.__name__}:{rule}", view, methods=methods,
                         provide_automatic_options=False, strict_slashes=False)

    @app.errorhandler(404)
    def not_found(_e: Exception) -> Response:
        return Response("404 page not found\n", status=404, mimetype="text/plain")

    @app.errorhandler(405)
    def not_allowed(_e: Exception) -> Response:
        return Response("method not allowed\n", status=405, mimetype="text/plain")

    @app.errorhandler(Exception)
    def crashed(e: Exception) -> Response:
        code = getattr(e, "code", None)
        if isinstance(code, int) and 400 <= code < 500:
            return Response(f"{code} {getattr(e, 'name', 'error')}\n", status=code,
                            mimetype="text/plain")
        log.exception("internal error")
        return Response("internal error\n", status=500, mimetype="text/plain")

    return app


def build_app(gw: Gateway) -> WSGIApp:
    """The whole gateway as one WSGI app (guards, fast path, Flask for the rest)."""
    flask_app = go_status_middleware(_flask_app(gw).wsgi_app)
    guard = BrowserGuard(gw.port, [*gw.allowed_hosts, *_alias_hosts(gw)], gw.allowed_origins)
    unauthorized = [("WWW-Authenticate", 'Basic realm="Restricted"')]
    ui = gateway_ui(lambda: gw.url or "")  # the dashboard (emnist.ui), same guards as /system

    def app(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        refusal = guard.refusal(environ)
        if refusal:
            return _plain(start_response, 403, refusal)
        path = environ.get("PATH_INFO", "")
        if path.startswith(_PREFIX):
            return _function_call(gw, environ, start_response)
        is_ui = path == "/ui" or path.startswith("/ui/")
        if (gw.auth is not None and (is_ui or path.startswith("/system/"))
                and not check_basic(environ.get("HTTP_AUTHORIZATION"), gw.auth)):
            return _plain(start_response, 401, "invalid credentials", unauthorized)
        if is_ui:
            return ui(environ, start_response)
        return flask_app(environ, start_response)

    return app


def _alias_hosts(gw: Gateway) -> list[str]:
    """Service names aliased to this gateway (e.g. gateway.openfaas) are its names too."""
    own = {f"127.0.0.1:{gw.port}", f"localhost:{gw.port}"}
    return [src.rpartition(":")[0] for src, dst in gw.aliases.items() if dst in own]
