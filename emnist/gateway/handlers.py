"""The gateway's REST endpoints: one small handler per endpoint, each given the Gateway,
wired to paths in one table (``ROUTES``), with the OpenFaaS gateway's response shapes.

(``/function/*`` is served by the fast path in :mod:`.wsgi`; everything else is here.)
"""

from __future__ import annotations

import base64
import binascii
import json
import logging
import platform
import uuid
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import quote

from flask import Response, request

from .callbacks import MAX_CALLBACK_URL, CallbackRefused
from .logs import NAMESPACE, parse_timestamp
from .proxy import HOP_BY_HOP
from .queue import QueueFull, UnservedQueue
from .secretstore import SecretStoreError
from .state import Gateway
from .supervisor import ReplicaError
from .validate import BadRequest

__all__ = ["MAX_CALLBACK_URL", "PROXY_METHODS", "ROUTES", "BadRequest", "json_required"]

log = logging.getLogger("emnist.gateway")

PROXY_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
MAX_TAIL = 100_000


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("emnist")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "dev"


def _text(body: str, status: int, headers: Mapping[str, str] | None = None) -> Response:
    return Response(body, status=status, mimetype="text/plain", headers=dict(headers or {}))


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")


# what every browser adds to the requests a page makes (fetch, forms): Origin on any POST,
# Sec-Fetch-* in current browsers
BROWSER_HEADERS = ("Origin", "Sec-Fetch-Site", "Sec-Fetch-Mode", "Sec-Fetch-Dest",
                   "Sec-Fetch-User")


def json_required(*, untyped: bool = False) -> Response | None:
    """415 unless the body is declared ``application/json`` (what faas-cli always sends).

    With ``untyped``, a body with no Content-Type at all is taken too, unless a browser sent
    it: the OpenFaaS gateway's own scale request (scale from zero, /system/alert) declares
    none (gateway/plugin/external.go ``SetReplicas``: ``http.NewRequest`` with a JSON body
    and no header), while a page's cross-site form or fetch carries a form type, Origin or
    Sec-Fetch-*."""
    if request.mimetype == "application/json":
        return None
    if untyped and not request.environ.get("CONTENT_TYPE") \
            and not any(h in request.headers for h in BROWSER_HEADERS):
        return None
    return _text("Content-Type must be application/json", 415)


def _body_json() -> dict[str, Any]:
    try:
        data = json.loads(request.get_data() or b"null",
                          parse_constant=lambda c: _refuse_constant(c))
    except (ValueError, RecursionError) as e:
        raise BadRequest(f"invalid JSON body: {e}" if isinstance(e, json.JSONDecodeError)
                         else "invalid JSON body") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def namespace_ok(ns: str | None) -> bool:
    return ns in (None, "", NAMESPACE)


def _not_found(name: str) -> Response:
    base, _, ns = name.partition(".")
    return _text(f"error finding function {base[:63]}.{(ns or NAMESPACE)[:63]}: not found", 404)


def _proxy_headers(call_id: str) -> list[tuple[str, str]]:
    headers = [(k, v) for k, v in request.headers.items()
               if k.lower() not in HOP_BY_HOP and k.lower() != "x-call-id"]
    headers.append(("X-Call-Id", call_id))
    if "X-Forwarded-Host" not in request.headers:
        headers.append(("X-Forwarded-Host", request.host))
    if "X-Forwarded-For" not in request.headers and request.remote_addr:
        headers.append(("X-Forwarded-For", request.remote_addr))
    return headers


def _raw_rest(prefix: str, name: str) -> str:
    """The path after ``/<prefix>/<name>``, still percent-encoded as the client sent it."""
    raw = (request.environ.get("REQUEST_URI") or quote(request.path)).split("?", 1)[0]
    head = f"/{prefix}/{name}"
    rest = raw[len(head):] if raw.startswith(head) else quote(request.path[len(head):])
    return rest if rest.startswith("/") else "/" + rest


# -- endpoint handlers: one per endpoint, each given the Gateway --------------------------------


def async_function(gw: Gateway, name: str, rest: str = "") -> Response:
    """``POST /async-function/<name>``: 202 now, run on the queue, POST the callback later."""
    dep = gw.lookup(name)
    if dep is None:
        return _not_found(name)
    queue = gw.queue_of(dep)
    if not gw.queue.workers(queue):
        return _text(f"function {dep.name} uses the queue {queue[:253]!r} "
                     "(com.openfaas.queue), which no queue-worker of this gateway serves: "
                     f"start it with --queue {queue[:253]}=N", 500)
    callback = request.headers.get("X-Callback-Url")
    if callback is not None:
        try:
            gw.callbacks.check(callback)
        except CallbackRefused as e:
            return _text(str(e), 400)
    size = request.content_length or 0
    try:
        gw.queue.check_room(size)  # before the body is copied anywhere
    except QueueFull as e:
        return _text(str(e), 429)
    call_id = str(uuid.uuid4())
    # copied in chunks to memory (small, within a budget) or to disk: never whole in memory
    body = gw.spool.store(request.stream, size)
    target = _raw_rest("async-function", name)
    query = request.query_string.decode("latin-1")
    try:
        gw.queue.submit(queue, (dep.name, request.method,
                                target + ("?" + query if query else ""),
                                _proxy_headers(call_id), body, call_id, callback),
                        body.size, label=call_id)
    except QueueFull as e:
        body.close()
        return _text(str(e), 429)
    except UnservedQueue as e:  # the function's annotation changed meanwhile
        body.close()
        return _text(str(e), 500)
    return Response(b"", status=202, headers={"X-Call-Id": call_id})


def list_functions(gw: Gateway) -> Response:
    """``GET /system/functions``."""
    if not namespace_ok(request.args.get("namespace")):
        return _json([])
    return _json([dep.status() for dep in list(gw.functions.values())])


def _replica_failure(name: str, e: ReplicaError) -> Response:
    log.error("%s", e)  # the full story (stderr tail) stays in the gateway's log
    return _text(f"function {name} did not become healthy: see `faas-cli logs {name}`", 500)


def deploy_function(gw: Gateway) -> Response:
    """``POST`` (create, or update in place) and ``PUT`` (update) ``/system/functions``."""
    refused = json_required()
    if refused:
        return refused
    try:
        data = _body_json()
        dep = gw.deploy(data, create=request.method == "POST")
    except BadRequest as e:
        return _text(str(e), 400)
    except ReplicaError as e:
        return _replica_failure(str(data.get("service")), e)
    if dep is None:
        return _text("function not found", 404)
    return _text("", 202)


def delete_function(gw: Gateway) -> Response:
    """``DELETE /system/functions`` with ``{"functionName", "namespace"}``."""
    refused = json_required()
    if refused:
        return refused
    try:
        data = _body_json()
    except BadRequest as e:
        return _text(str(e), 400)
    name = data.get("functionName")
    if not isinstance(name, str) or not name:
        return _text("functionName is required", 400)
    if not namespace_ok(data.get("namespace")) or not gw.remove(name):
        return _not_found(name)
    return _text("", 202)


def get_function(gw: Gateway, name: str) -> Response:
    """``GET /system/function/<name>``."""
    dep = gw.lookup(name) if namespace_ok(request.args.get("namespace")) else None
    return _json(dep.status()) if dep else _not_found(name)


def scale_function(gw: Gateway, name: str) -> Response:
    """``POST /system/scale-function/<name>`` (0..--max-replicas; CE clamps to 1..5), also as
    a real OpenFaaS gateway in front of this provider sends it (no Content-Type)."""
    refused = json_required(untyped=True)
    if refused:
        return refused
    try:
        data = _body_json()
    except BadRequest as e:
        return _text(str(e), 400)
    replicas = data.get("replicas")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        return _text("replicas must be an integer >= 0", 400)
    in_namespace = namespace_ok(data.get("namespace")) \
        and namespace_ok(request.args.get("namespace"))  # the gateway sends ?namespace=
    dep = gw.lookup(name) if in_namespace else None
    if dep is None:
        return _not_found(name)
    try:
        gw.scale(dep, replicas)
    except BadRequest as e:
        return _text(str(e), 400)
    except ReplicaError as e:
        return _replica_failure(dep.name, e)
    return _text("", 202)


def function_logs(gw: Gateway) -> Response:
    """``GET /system/logs``: NDJSON log messages; ``follow=true`` streams until disconnect."""
    args = request.args
    name = args.get("name")
    if not name:
        return _text("name is required", 400)
    if len(name) > 127 or len(args.get("instance", "")) > 253 or len(args.get("since", "")) > 64:
        return _text("name, instance or since is too long", 400)
    dep = gw.lookup(name) if namespace_ok(args.get("namespace")) else None
    if dep is None:
        return _not_found(name)
    try:
        tail = int(args["tail"]) if args.get("tail") else None
        since = parse_timestamp(args["since"]) if args.get("since") else None
    except (ValueError, OverflowError):
        return _text("tail must be an integer and since an RFC3339 time", 400)
    if tail is not None and tail > MAX_TAIL:
        return _text(f"tail: at most {MAX_TAIL}", 400)
    follow = args.get("follow", "").lower() in ("1", "true", "yes")
    instance = args.get("instance") or None
    buf = dep.replicas.logbuf
    cursor = buf.cursor
    backlog = [ln for ln in buf.lines(since, tail if tail and tail > 0 else None, instance)
               if ln.seq <= cursor]  # tail <= 0 means unlimited, as in faas-provider
    if follow and not gw.follows.acquire(blocking=False):
        return _text(f"too many log followers (at most {gw.max_follows})", 429)
    disconnected = request.environ.get("waitress.client_disconnected")

    def generate() -> Any:
        try:
            if follow:
                yield "\n"  # whitespace (fine for NDJSON readers) so the headers go out now
            for ln in backlog:
                yield json.dumps(ln.to_dict()) + "\n"
            after = cursor
            while follow and not gw.closing.is_set() and gw.functions.get(dep.name) is dep:
                if disconnected is not None and disconnected():
                    return
                for ln in buf.wait(after, 0.5):
                    after = ln.seq
                    if instance is None or ln.instance == instance:
                        yield json.dumps(ln.to_dict()) + "\n"
        finally:
            if follow:
                gw.follows.release()

    return Response(generate(), status=200, mimetype="application/x-ndjson")


def system_info(gw: Gateway) -> Response:
    """``GET /system/info``: the gateway's shape to a client, the provider's to a gateway.

    faas-cli reads ``{"provider": {...}, "version": {...}, "arch"}`` (GatewayInfo); a real
    OpenFaaS gateway in front of us (we are then its provider) reads ProviderInfo
    ``{"provider": "<name>", "orchestration", "version"}`` and fails on the other shape. A
    gateway's proxied request carries X-Forwarded-For and X-Forwarded-Host; a client's does not.
    """
    version = {"sha": "local", "release": _version()}
    kind = getattr(gw.runtime, "kind", "process")
    provider = {"provider": "emnist-local", "orchestration": kind, "version": version}
    headers = request.headers
    if headers.get("X-Forwarded-For") and headers.get("X-Forwarded-Host"):
        return _json(provider)
    return _json({"provider": provider, "version": version, "arch": platform.machine()})


def namespaces(gw: Gateway) -> Response:
    """``GET /system/namespaces``."""
    return _json([NAMESPACE])


def _secret_body() -> tuple[str, bytes]:
    data = _body_json()
    name = data.get("name")
    if not isinstance(name, str) or not name.strip():
        raise BadRequest("name: non-empty name is required")
    if not namespace_ok(data.get("namespace")):
        raise BadRequest(f"namespace must be: {NAMESPACE}")
    raw = data.get("rawValue")
    if raw:
        if not isinstance(raw, str):
            raise BadRequest("rawValue must be base64 text")
        try:
            return name, base64.b64decode(raw, validate=True)
        except (binascii.Error, ValueError):
            raise BadRequest("rawValue must be base64 text") from None
    value = data.get("value", "")
    if not isinstance(value, str):
        raise BadRequest("value must be a string")
    return name, value.encode("utf-8")


def secrets(gw: Gateway) -> Response:
    """``/system/secrets``: GET lists names (never values); POST creates, PUT replaces,
    DELETE removes (202, like faas-netes; 409 if it exists, 404 if it does not)."""
    if request.method == "GET":
        if not namespace_ok(request.args.get("namespace")):
            return _text(f"namespace must be: {NAMESPACE}", 400)
        return _json([{"name": n, "namespace": NAMESPACE} for n in gw.secrets.names()])
    refused = json_required()
    if refused:
        return refused
    try:
        if request.method == "DELETE":
            data = _body_json()
            name = data.get("name")
            if not isinstance(name, str) or not name:
                raise BadRequest("name: non-empty name is required")
            gw.secrets.delete(name)
        else:
            name, value = _secret_body()
            (gw.secrets.create if request.method == "POST" else gw.secrets.replace)(name, value)
    except BadRequest as e:
        return _text(str(e), 400)
    except SecretStoreError as e:
        return _text(str(e), e.status)
    return _text("", 202)


def healthz(gw: Gateway) -> Response:
    """``GET /healthz``."""
    return _text("OK", 200)


ROUTES: list[tuple[str, Callable[..., Response], list[str]]] = [
    ("/async-function/<name>", async_function, ["POST"]),
    ("/async-function/<name>/", async_function, ["POST"]),
    ("/async-function/<name>/<path:rest>", async_function, ["POST"]),
    ("/system/functions", list_functions, ["GET"]),
    ("/system/functions", deploy_function, ["POST", "PUT"]),
    ("/system/functions", delete_function, ["DELETE"]),
    ("/system/function/<name>", get_function, ["GET"]),
    ("/system/scale-function/<name>", scale_function, ["POST"]),
    ("/system/logs", function_logs, ["GET"]),
    ("/system/info", system_info, ["GET"]),
    ("/system/namespaces", namespaces, ["GET"]),
    ("/system/secrets", secrets, ["GET", "POST", "PUT", "DELETE"]),
    ("/healthz", healthz, ["GET"]),
]
