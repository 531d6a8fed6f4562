"""The functions' handlers called in-process, as the python3-http template calls them: load a
handler module from functions/<name>/handler.py and hand it an Event and a Context."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path
from types import ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[1]


def load_handler(function: str, module_name: str | None = None) -> ModuleType:
    """A fresh module of ``functions/<function>/handler.py`` (its own module name, so two
    test files never share one module's state)."""
    name = module_name or f"handler_{function.replace('-', '_')}"
    spec = importlib.util.spec_from_file_location(name, ROOT / "functions" / function /
                                                  "handler.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Event:
    """What the python3-http template hands a handler (a dict body is sent as JSON)."""

    def __init__(self, body: Any = b"", method: str = "POST", query: dict | None = None):
        self.body = json.dumps(body).encode() if isinstance(body, dict) else body
        self.method, self.query = method, query or {}
        self.headers, self.path = {}, "/"


class Context:
    hostname = "emnist-test-0"


def call(handler, body=None, method: str = "POST", query: dict | None = None):
    if body is None:
        data = b""
    else:
        data = body if isinstance(body, bytes) else \
            body.encode() if isinstance(body, str) else json.dumps(body).encode()
    resp = handler.handle(Event(data, method, query), Context())
    if isinstance(resp, tuple):  # a binary answer: (bytes, status, headers)
        return resp[1], resp[0]
    return resp["statusCode"], resp["body"]


def error_of(handler, body=None, method="POST", query=None) -> tuple[int, str]:
    status, body = call(handler, body, method, query)
    assert isinstance(body, dict) and set(body) == {"error"}, body
    return status, body["error"]


def project_copy(dest: Path) -> Path:
    """The stack file and what it builds from, in a directory of the test's own (a build
    writes build/ and stages wheels in template/: never in the checkout others may use)."""
    ignore = shutil.ignore_patterns("__pycache__", "*.whl")
    for name in ("functions", "template", "emnist"):
        shutil.copytree(ROOT / name, dest / name, ignore=ignore)
    shutil.copy2(ROOT / "emnist.yml", dest / "emnist.yml")
    return dest / "emnist.yml"
