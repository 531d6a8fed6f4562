"""Replica host: serve one handler folder like the python3-http template's ``index.py``.

``python -m emnist.gateway.watchdog --handler DIR --port PORT`` imports DIR as the package
``function`` and serves ``function.handler.handle(event, context)`` with Flask on waitress, so a
handler behaves the same here as in the OpenFaaS image. ``/_/health`` answers like of-watchdog.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import sys
import threading
import time
import traceback
import types
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request

__all__ = ["Context", "Event", "create_app", "format_response", "load_handler", "main"]

METHODS = ["GET", "PUT", "POST", "PATCH", "DELETE"]


class Event:
    """What the template passes as ``event``."""

    def __init__(self) -> None:
        self.body = request.get_data()
        self.headers = request.headers
        self.method = request.method
        self.query = request.args
        self.path = request.path


class Context:
    """What the template passes as ``context``."""

    def __init__(self) -> None:
        self.hostname = os.getenv("HOSTNAME", "localhost")


def load_handler(handler_dir: str | os.PathLike[str]) -> types.ModuleType:
    """Import ``handler_dir`` as the package ``function`` and return ``function.handler``.

    The folder needs no ``__init__.py``: the template copies it to ``/home/app/function`` and
    imports ``function.handler``, so relative imports inside the handler keep working.
    """
    path = Path(handler_dir).resolve()
    init = path / "__init__.py"
    if init.is_file():
        spec = importlib.util.spec_from_file_location(
            "function", init, submodule_search_locations=[str(path)]
        )
        if spec is None or spec.loader is None:
            raise ImportError(f"cannot import {path} as package 'function'")
        package = importlib.util.module_from_spec(spec)
        sys.modules["function"] = package
        spec.loader.exec_module(package)
    else:
        package = types.ModuleType("function")
        package.__path__ = [str(path)]
        package.__file__ = None
        sys.modules["function"] = package
    return importlib.import_module("function.handler")


def _format_body(res: dict[str, Any], content_type: str) -> Any:
    if content_type == "application/octet-stream":
        return res.get("body", b"")
    if "body" not in res or res["body"] is None:
        return ""
    body = res["body"]
    if isinstance(body, dict | list):
        return jsonify(body)
    return str(body)


def format_response(res: Any) -> Any:
    """Turn the handler's return value into a Flask response, as the template does."""
    if res is None:
        return ("", 200)
    if not isinstance(res, dict):
        return (str(res), 200)
    status = res.get("statusCode", 200)
    headers = res.get("headers") or {}
    content_type = ""
    if isinstance(headers, dict):
        for key, value in headers.items():
            if key.lower() == "content-type":
                content_type = str(value)
        headers = list(headers.items())
    return (_format_body(res, content_type), status, headers)


def create_app(handle: Callable[[Event, Context], Any]) -> Flask:
    """A Flask app routing every path and method to ``handle``, plus ``/_/health``."""
    app = Flask(__name__)

    def health() -> Response:
        return Response("OK", status=200, mimetype="text/plain")

    def call_handler(path: str) -> Any:
        try:
            return format_response(handle(Event(), Context()))
        except Exception as e:  # noqa: BLE001 - a handler error must not kill the replica
            traceback.print_exc(file=sys.stderr)
            return Response(f"{type(e).__name__}: {e}", status=500, mimetype="text/plain")

    app.add_url_rule("/_/health", "health", health, methods=["GET"])
    app.add_url_rule("/", "call_handler", call_handler, defaults={"path": ""}, methods=METHODS)
    app.add_url_rule("/<path:path>", "call_handler", call_handler, methods=METHODS)
    return app


def _exit_with_parent(parent_pid: int) -> None:
    """Exit when the gateway that started us is gone, so no replica outlives it."""

    def watch() -> None:
        while True:
            if os.getppid() != parent_pid:
                os._exit(0)
            time.sleep(0.5)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point: serve a handler folder on host:port until killed."""
    parser = argparse.ArgumentParser(prog="python -m emnist.gateway.watchdog")
    parser.add_argument("--handler", required=True, help="the function's handler folder")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument(
        "--parent-pid", type=int, default=0, help="exit when this process stops being our parent"
    )
    args = parser.parse_args(argv)
    for stream in (sys.stdout, sys.stderr):
        if hasattr(stream, "reconfigure"):
            stream.reconfigure(line_buffering=True)
    if args.parent_pid:
        _exit_with_parent(args.parent_pid)
    try:
        handler = load_handler(args.handler)
    except Exception:
        traceback.print_exc(file=sys.stderr)
        print(f"watchdog: cannot import handler from {args.handler}", file=sys.stderr)
        return 1
    if not callable(getattr(handler, "handle", None)):
        print(f"watchdog: {args.handler}/handler.py has no handle(event, context)", file=sys.stderr)
        return 1
    from waitress import serve

    threads = int(os.environ.get("WAITRESS_THREADS", "8"))
    serve(create_app(handler.handle), host=args.host, port=args.port, threads=threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
