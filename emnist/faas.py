"""What the function handlers share: request parsing, responses, errors and per-process clients.

Handlers stay thin: parse and validate, build a config, call the core, answer. OpenFaaS calls
functions without authentication, so every body and query is untrusted: JSON is parsed strictly
(no NaN/Infinity, bounded size and depth), every location a request names passes the operator's
policy (emnist.policy), and :func:`guarded` turns every failure into a 4xx naming the field or
a generic 5xx, with the details (paths, exception text, tracebacks) only in the function's
stderr log. Store handles are built lazily, one per process and URL, for URLs resolved through
the provider's host aliases.
"""

from __future__ import annotations

import functools
import json
import math
import os
import sys
import traceback
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from emnist.policy import PolicyError, resolve
from emnist.store import KV, StoreError, redact, shared_kv
from emnist.store.signing import SealedKV, sealer_for
from emnist.train.config import ConfigError, TrainConfig, json_kind

MAX_BODY = 8 << 20  # bytes of request body a function reads (emnist-grad's inline data fits)
DEFAULT_GATEWAY = "http://gateway.openfaas:8080"
INTERNAL = "internal error (see the function's logs)"
URL_FIELDS = ("store_url", "local_store_url", "checkpoint_url")


class RequestError(Exception):
    """A request the function refuses; ``status`` is the HTTP answer, the message names the
    field and is safe to show the caller."""

    status = 400


class BadRequest(RequestError, ValueError):
    status = 400


class NotFound(RequestError, LookupError):
    status = 404


class Conflict(RequestError):
    status = 409


class TooLarge(RequestError):
    status = 413


def _no_constant(name: str) -> Any:
    raise BadRequest(f"body: {name} is not a JSON number (use finite numbers only)")


def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise BadRequest("body: a number is too large (numbers must be finite)")
    return value


def json_body(event: Any) -> dict[str, Any]:
    """The request body as a JSON object; empty means {}. NaN, Infinity and numbers that
    overflow to infinity are refused; so are bodies over MAX_BODY bytes."""
    body = event.body or b""
    if len(body) > MAX_BODY:
        raise TooLarge(f"body: larger than {MAX_BODY} bytes")
    if isinstance(body, bytes | bytearray):
        body = body.decode("utf-8", "replace")
    if not body.strip(" \t\r\n"):  # JSON's whitespace only (str.strip also eats \x1c..)
        return {}
    try:
        data = json.loads(body, parse_constant=_no_constant, parse_float=_finite)
    except BadRequest:
        raise
    except json.JSONDecodeError as e:
        raise BadRequest(f"body: not valid JSON ({e.msg} at line {e.lineno} column "
                         f"{e.colno})") from None
    except RecursionError:
        raise BadRequest("body: nested too deeply") from None
    except ValueError:  # e.g. an integer with more digits than Python converts
        raise BadRequest("body: not valid JSON (a number is out of range)") from None
    if not isinstance(data, dict):
        raise BadRequest(f"body: must be a JSON object, got {json_kind(data)}")
    return data


def typed_body(event: Any, fields: dict[str, type], required: tuple[str, ...] = ()
               ) -> dict[str, Any]:
    """The JSON body, with only ``fields`` (name -> JSON type) and the ``required`` ones."""
    request = json_body(event)
    for name, value in request.items():
        if name not in fields:
            raise BadRequest(f"{_name(name)}: unknown field; known: {', '.join(fields)}")
        if not isinstance(value, fields[name]) or isinstance(value, bool):
            raise BadRequest(f"{name}: must be {TYPE_NAMES.get(fields[name], 'a value')}, "
                             f"got {json_kind(value)}")
    for name in required:
        if name not in request:
            raise BadRequest(f"{name}: required")
    return request


def integer(request: Mapping[str, Any], name: str, low: int, high: int,
            default: int | None = None) -> int:
    """``request[name]`` (already typed int) within [low, high], else a 400 naming it."""
    value = request.get(name, default)
    if value is None:
        raise BadRequest(f"{name}: required")
    if not low <= value <= high:
        raise BadRequest(f"{name}: must be between {low} and {high}, got "
                         f"{value if abs(value) < 10**12 else 'a huge number'}")
    return value


TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", dict: "an object",
              list: "an array", bool: "a boolean"}


def _name(name: str) -> str:
    return name if len(name) <= 64 and name.isprintable() else "a field"


def respond(status: int, body: Any) -> dict[str, Any]:
    return {"statusCode": status, "body": body, "headers": {"Content-Type": "application/json"}}


def error(status: int, message: str) -> dict[str, Any]:
    return respond(status, {"error": message})


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def _data_answer(e: Exception, field: str) -> dict[str, Any]:
    field = getattr(e, "field", None) or field
    missing = getattr(e, "missing", False)
    text = getattr(e, "public", None) or ("the data files are not there" if missing else
                                          "the data could not be read or written there")
    log(f"data error ({field}): {e}")
    return error(404 if missing else 400, f"{field}: {text} (details in the function's logs)")


def guarded(data_field: str = "dataset_dir") -> Callable[[Callable], Callable]:
    """Wrap ``handle(event, context)``: expected problems become 4xx naming the field (data
    errors name ``data_field`` unless they know theirs), store and gateway failures a generic
    502, anything else a generic 500; details and tracebacks go to stderr only."""

    def wrap(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def handle(event: Any, context: Any) -> Any:
            try:
                return fn(event, context)
            except Exception as e:  # noqa: BLE001 - the caller sees no exception text
                return answer_for(e, data_field)
        return handle
    return wrap


def answer_for(e: Exception, data_field: str = "dataset_dir") -> dict[str, Any]:
    """The answer :func:`guarded` gives for ``e`` (the details go to stderr only); handlers
    that note a failure elsewhere (a worker's error document) use the same words."""
    from emnist.data import DataError
    from emnist.gateway.client import GatewayError

    if isinstance(e, RequestError):
        return error(e.status, str(e))
    if isinstance(e, ConfigError | PolicyError):
        return error(400, str(e))
    if isinstance(e, DataError):
        return _data_answer(e, data_field)
    if isinstance(e, StoreError):
        log(f"store error: {e}")
        return error(502, "store_url: the store failed or cannot be reached "
                     "(details in the function's logs)")
    if isinstance(e, GatewayError):
        log(f"gateway error: {e}")
        status = f" (HTTP {e.status})" if e.status else ""
        return error(502, f"gateway: the OpenFaaS gateway refused or failed a call"
                     f"{status} (details in the function's logs)")
    log("internal error:\n" + "".join(traceback.format_exception(e)))
    return error(500, INTERNAL)


def kv_for(url: str) -> KV:
    """The process's one thread-safe handle for ``url``, shared by waitress's request threads
    (``emnist.store.shared_kv``: a bounded registry)."""
    return shared_kv(url)


def open_store(url: str, env: Mapping[str, str]) -> KV:
    """The store at ``url`` as this provider reaches it (host aliases applied), cached, through
    a handle that seals and verifies the run documents with the function's store key (none
    configured: unsigned; emnist.store.signing)."""
    return SealedKV(kv_for(resolve(env, url)), sealer_for(env))


def gateway_url(env: Mapping[str, str]) -> str:
    """The gateway functions call (``gateway_url``, else ``OPENFAAS_URL``), alias-resolved."""
    return resolve(env, env.get("gateway_url") or env.get("OPENFAAS_URL") or DEFAULT_GATEWAY)


def resolved_config(cfg: TrainConfig, env: Mapping[str, str]) -> TrainConfig:
    """``cfg`` with its URLs as this provider reaches them: the core opens them as stored, so
    the run document records where the run really lives."""
    return replace(cfg, **{f: resolve(env, getattr(cfg, f)) for f in URL_FIELDS})


SERVER_ONLY = ("shard_dir",)  # where the function keeps things: a server path, never sent back


def redacted(doc: dict[str, Any]) -> dict[str, Any]:
    """A run document for the caller: passwords in its config's URLs replaced by ``***`` and
    server paths left out."""
    doc = {k: v for k, v in doc.items() if k not in SERVER_ONLY}
    config = doc.get("config")
    if not isinstance(config, dict):
        return doc
    return {**doc, "config": {**config, **{f: redact(config[f]) for f in URL_FIELDS
                                           if isinstance(config.get(f), str)}}}


def environment() -> dict[str, str]:
    return dict(os.environ)
