"""Replica host: serve one handler folder like the python3-http template's ``index.py``.

``python -m emnist.gateway.watchdog --handler DIR --port PORT`` imports DIR as the package
``function`` and serves ``function.handler.handle(event, context)`` with Flask on waitress, so a
handler behaves the same here as in the OpenFaaS image. It also plays of-watchdog's part:
``/_/health``; ``exec_timeout`` (default 10s, as of-watchdog) answers 504 with an empty body
when the handler takes longer (the handler thread runs on, as the upstream process does under
of-watchdog); a ``write_timeout`` shorter than that is a deadline too (of-watchdog would close
the connection instead); ``read_timeout`` closes connections idle or stalled that long
(waitress's ``channel_timeout``: waitress has no per-request read deadline); ``max_inflight``
answers 429 beyond it; status lines carry Go's reason phrases.
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
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask, Response, jsonify, request

from .httpstatus import go_status_middleware, status_line
from .stack import parse_duration

__all__ = ["Context", "Event", "WatchdogLimits", "create_app", "format_response",
           "load_handler", "main", "watchdog_app"]

DEFAULT_TIMEOUT = 10.0  # of-watchdog's default read/write/exec timeouts

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


def format_response(res: Any) -> Any:
    """Turn the handler's return value into a Flask response exactly as the template's
    ``index.py`` does: a dict's body is JSON if it is a dict, else ``str()`` of it (so bytes
    become their repr: a binary answer must be returned as a ``(bytes, status, headers)``
    tuple or a Response, which pass through untouched), and anything not a dict passes
    through to Flask as it is."""
    if res is None:
        return ("", 200)
    if type(res) is not dict:
        return res
    status = res.get("statusCode", 200)
    if "body" not in res:
        body: Any = ""
    elif type(res["body"]) is dict:
        body = jsonify(res["body"])
    else:
        body = str(res["body"])
    headers = res.get("headers", [])
    if type(headers) is dict:
        headers = list(headers.items())
    return (body, status, headers)


def create_app(handle: Callable[[Event, Context], Any]) -> Flask:
    """A Flask app routing every path and method to ``handle``, plus ``/_/health``."""
    app = Flask(__name__)

    def health() -> Response:
        return Response("OK", status=200, mimetype="text/plain")

    def call_handler(path: str) -> Any:
        try:
            return format_response(handle(Event(), Context()))
        except Exception:  # noqa: BLE001 - a handler error must not kill the replica
            traceback.print_exc(file=sys.stderr)  # into the function's logs, not the answer
            return Response("Internal Server Error", status=500, mimetype="text/plain")

    app.add_url_rule("/_/health", "health", health, methods=["GET"])
    app.add_url_rule("/", "call_handler", call_handler, defaults={"path": ""}, methods=METHODS)
    app.add_url_rule("/<path:path>", "call_handler", call_handler, methods=METHODS)
    return app


def _seconds(env: Mapping[str, str], key: str, default: float) -> float:
    raw = env.get(key)
    if raw is None or raw == "":
        return default
    try:
        return max(0.0, parse_duration(raw))
    except ValueError:
        print(f"watchdog: ignoring invalid {key}={raw!r}", file=sys.stderr)
        return default


@dataclass(frozen=True)
class WatchdogLimits:
    """of-watchdog's settings, read from the function's environment."""

    exec_timeout: float = DEFAULT_TIMEOUT  # 0: none
    read_timeout: float = DEFAULT_TIMEOUT
    write_timeout: float = DEFAULT_TIMEOUT
    max_inflight: int = 0  # 0: no limit

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> WatchdogLimits:
        try:
            inflight = max(0, int(env.get("max_inflight") or 0))
        except ValueError:
            inflight = 0
        return cls(_seconds(env, "exec_timeout", DEFAULT_TIMEOUT),
                   _seconds(env, "read_timeout", DEFAULT_TIMEOUT),
                   _seconds(env, "write_timeout", DEFAULT_TIMEOUT), inflight)

    @property
    def deadline(self) -> float:
        """Seconds a handler may take before the answer is 504 (0: no deadline)."""
        positive = [t for t in (self.exec_timeout, self.write_timeout) if t > 0]
        return min(positive) if positive else 0.0


def watchdog_app(app: Callable[..., Iterable[bytes]], limits: WatchdogLimits,
                 threads: int = 8) -> Callable[..., Iterable[bytes]]:
    """Wrap the handler's WSGI app with of-watchdog's max_inflight and exec_timeout."""
    pool = ThreadPoolExecutor(max(1, threads), thread_name_prefix="handler")
    lock = threading.Lock()
    inflight = [0]
    deadline = limits.deadline

    def run(environ: dict[str, Any]) -> tuple[str, list[tuple[str, str]], bytes]:
        captured: list[Any] = []

        def start_response(status: str, headers: list[tuple[str, str]],
                           exc_info: Any = None) -> Callable[[bytes], None]:
            captured[:] = [status, headers]
            return lambda _data: None

        result = app(environ, start_response)
        try:
            body = b"".join(result)
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
        return captured[0], captured[1], body

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/_/health":
            return app(environ, start_response)
        with lock:
            if limits.max_inflight and inflight[0] >= limits.max_inflight:
                text = ("Concurrent request limit exceeded. Max concurrent requests: "
                        f"{limits.max_inflight}\n").encode()
                start_response(status_line(429), [("Content-Type", "text/plain; charset=utf-8"),
                                                  ("Content-Length", str(len(text)))])
                return [text]
            inflight[0] += 1
        start = time.perf_counter()
        try:
            if not deadline:
                status, headers, body = run(environ)
            else:
                try:
                    status, headers, body = pool.submit(run, environ).result(deadline)
                except FutureTimeout:
                    print(f"Upstream HTTP killed due to exec_timeout: {deadline:g}s",
                          file=sys.stderr, flush=True)
                    start_response(status_line(504), [
                        ("Content-Length", "0"),
                        ("X-Duration-Seconds", f"{time.perf_counter() - start:f}")])
                    return []
            start_response(status, headers)
            return [body]
        finally:
            with lock:
                inflight[0] -= 1

    return go_status_middleware(wrapped)


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

    try:
        threads = min(64, max(1, int(os.environ.get("WAITRESS_THREADS") or 8)))
    except ValueError:
        threads = 8
    limits = WatchdogLimits.from_env(os.environ)
    app = watchdog_app(create_app(handler.handle), limits, threads)
    serve(app, host=args.host, port=args.port, threads=threads, send_bytes=1,
          channel_timeout=limits.read_timeout or 120, ident="emnist-watchdog",
          clear_untrusted_proxy_headers=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
