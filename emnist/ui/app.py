"""The dashboard's pages and JSON endpoints as one WSGI app, mounted at ``/ui`` by the local
gateway and by ``emnist dashboard``.

- ``/ui/`` functions and runs; ``/ui/run?source=S&id=ID`` one run; ``/ui/compare?run=S:ID&...``
  several runs on one chart. The pages are static files shipped in this package
  (``static/``); their scripts fetch the JSON below and draw SVG charts with the DOM
  (textContent only), polling with back-off while a run is live.
- ``/ui/api/runs``: every run of every source; ``/ui/api/run?source=store|p2p|bench&id=ID``:
  one run's view (emnist.ui.views). The functions panel uses the gateway's own /system API.

Every answer carries a strict Content-Security-Policy (scripts, styles and fetches from this
origin only; no inline script or style, no frames) and ``nosniff``. The guards in front (the
gateway's browser guard and basic auth) are the caller's: this app assumes them.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from importlib.resources import files
from typing import Any

from flask import Flask, Response, redirect, request

from emnist.gateway.client import GatewayClient
from emnist.ui import views
from emnist.ui.sources import SourceError, Sources, default_bench_files, default_p2p_dir

__all__ = ["CSP", "SECURITY_HEADERS", "create_ui", "gateway_ui"]

log = logging.getLogger("emnist.ui")

CSP = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")
SECURITY_HEADERS = {"Content-Security-Policy": CSP, "X-Content-Type-Options": "nosniff",
                    "X-Frame-Options": "DENY", "Referrer-Policy": "no-referrer",
                    "Cross-Origin-Opener-Policy": "same-origin",
                    "Cross-Origin-Resource-Policy": "same-origin"}
PAGES = {"": "index.html", "run": "run.html", "compare": "compare.html"}
TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
         ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml", ".txt": "text/plain"}
SOURCES = ("store", "p2p", "bench")


def _asset(name: str) -> bytes | None:
    """A file of ``static/`` by its plain name (no directories), or None."""
    if "/" in name or "\\" in name or name.startswith(".") or "." not in name:
        return None
    path = files("emnist.ui").joinpath("static").joinpath(name)
    return path.read_bytes() if path.is_file() else None


def _json(data: Any, status: int = 200) -> Response:
    body = json.dumps(views.clean(data), allow_nan=False, separators=(",", ":"))
    return Response(body, status=status, mimetype="application/json",
                    headers={"Cache-Control": "no-store"})


def _error(status: int, message: str) -> Response:
    return _json({"error": message}, status)


def _runs(sources: Sources) -> Response:
    errors: list[str] = []
    store: list[dict[str, Any]] = []
    try:
        store = sources.store_runs()
    except SourceError as e:
        errors.append(f"Downpour/averaging runs: {e}")
    p2p = []
    for r in sources.p2p_runs():
        try:
            p2p.append({**r, "peers_records": sources.p2p_run(r["run_id"])})
        except (SourceError, OSError):
            errors.append(f"p2p run {r['run_id']}: its metrics could not be read")
    suites = []
    try:
        suites = sources.bench_suites()
    except (SourceError, OSError):
        errors.append("benchmark results could not be read")
    return _json({"runs": views.run_list(store, p2p, suites, time.time()), "errors": errors})


def _run(sources: Sources) -> Response:
    source, run_id = request.args.get("source", ""), request.args.get("id", "")
    if source not in SOURCES:
        return _error(400, "source: one of " + ", ".join(SOURCES))
    if source == "store":
        return _json(views.store_run_view(sources.store_run(run_id)))
    if source == "p2p":
        peers = sources.p2p_run(run_id)
        mtime = max((r["mtime"] for r in sources.p2p_runs() if r["run_id"] == run_id),
                    default=0.0)
        return _json(views.p2p_run_view(run_id, peers, mtime, time.time()))
    return _json(views.bench_suite_view(run_id[:64], sources.bench_suite(run_id)))


def create_ui(sources: Sources) -> Flask:
    """The /ui app reading from ``sources``."""
    app = Flask(__name__, static_folder=None)

    @app.after_request
    def secure(resp: Response) -> Response:
        for k, v in SECURITY_HEADERS.items():
            resp.headers.setdefault(k, v)
        return resp

    @app.get("/ui")
    def root() -> Response:
        return redirect("/ui/", 302)

    @app.get("/ui/")
    @app.get("/ui/<page>")
    def page(page: str = "") -> Response:
        name = PAGES.get(page)
        body = _asset(name) if name else None
        if body is None:
            return Response("404 page not found\n", status=404, mimetype="text/plain")
        return Response(body, mimetype="text/html", headers={"Cache-Control": "no-cache"})

    @app.get("/ui/static/<name>")
    def static_file(name: str) -> Response:
        body = _asset(name)
        if body is None:
            return Response("404 page not found\n", status=404, mimetype="text/plain")
        kind = TYPES.get("." + name.rsplit(".", 1)[-1], "application/octet-stream")
        return Response(body, content_type=kind, headers={"Cache-Control": "no-cache"})

    @app.get("/ui/api/runs")
    def api_runs() -> Response:
        return _runs(sources)

    @app.get("/ui/api/run")
    def api_run() -> Response:
        return _run(sources)

    @app.errorhandler(SourceError)
    def source_error(e: SourceError) -> Response:
        return _error(e.status, str(e))

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
        log.exception("dashboard: internal error")
        return _error(500, "internal error (see the server's log)")

    return app


def gateway_ui(url: Callable[[], str]) -> Callable[..., Any]:
    """The local gateway's /ui: runs read through the gateway itself (its own URL, known once
    it listens), p2p runs and benchmark results from their default places."""
    sources = Sources(lambda: GatewayClient(url()), default_p2p_dir(), default_bench_files())
    return create_ui(sources).wsgi_app
