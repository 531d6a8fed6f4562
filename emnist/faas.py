"""What the function handlers share: request parsing, responses, and per-process clients.

Handlers stay thin: parse and validate, build a config, call the core, answer. Clients are
built lazily from the request's config, once per process and thread (pymemcache connections
are not thread-safe and waitress serves requests on several threads).
"""

from __future__ import annotations

import json
import os
import threading
from typing import Any

from emnist.store import KV, open_kv

_local = threading.local()


class BadRequest(ValueError):
    pass


def json_body(event: Any) -> dict[str, Any]:
    """The request body as a JSON object; empty means {}."""
    body = event.body or b""
    if isinstance(body, bytes | bytearray):
        body = body.decode("utf-8", "replace")
    if not body.strip():
        return {}
    try:
        data = json.loads(body)
    except ValueError as e:
        raise BadRequest(f"body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest(f"body must be a JSON object, got {type(data).__name__}")
    return data


def typed_body(event: Any, fields: dict[str, type], required: tuple[str, ...] = ()
               ) -> dict[str, Any]:
    """The JSON body, with only ``fields`` (name -> JSON type) and the ``required`` ones."""
    request = json_body(event)
    for name, value in request.items():
        if name not in fields:
            raise BadRequest(f"{name}: unknown field; known: {', '.join(fields)}")
        if not isinstance(value, fields[name]) or isinstance(value, bool):
            raise BadRequest(f"{name}: must be of type {fields[name].__name__}, got {value!r}")
    for name in required:
        if name not in request:
            raise BadRequest(f"{name}: required")
    return request


def respond(status: int, body: Any) -> dict[str, Any]:
    return {"statusCode": status, "body": body, "headers": {"Content-Type": "application/json"}}


def error(status: int, message: str) -> dict[str, Any]:
    return respond(status, {"error": message})


def kv_for(url: str) -> KV:
    cache = getattr(_local, "kv", None)
    if cache is None:
        cache = _local.kv = {}
    if url not in cache:
        cache[url] = open_kv(url)
    return cache[url]


def environment() -> dict[str, str]:
    return dict(os.environ)
