"""The gateway's REST endpoints: one small handler per endpoint, each given the Gateway,
wired to paths in one table (``ROUTES``), with the OpenFaaS gateway's response shapes."""

from __future__ import annotations

import hmac
import json
import logging
import platform
import uuid
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import requests
from flask import Response, request

from .supervisor import NAMESPACE, NoReplicaError, ReplicaError, parse_timestamp

if TYPE_CHECKING:
    from .server import Gateway

log = logging.getLogger("emnist.gateway")

HOP_BY_HOP = {"connection", "keep-alive", "proxy-authenticate", "proxy-authorization", "te",
              "trailer", "trailers", "transfer-encoding", "upgrade", "host", "content-length"}
RESPONSE_SKIP = HOP_BY_HOP | {"date", "server"}
PROXY_METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]


def _version() -> str:
    try:
        from importlib.metadata import version

        return version("emnist")
    except Exception:  # noqa: BLE001 - running from a source tree
        return "dev"


class BadRequest(ValueError):
    """A request body the API rejects with 400."""


def _text(body: str, status: int, headers: Mapping[str, str] | None = None) -> Response:
    return Response(body, status=status, mimetype="text/plain", headers=dict(headers or {}))


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status=status, mimetype="application/json")


def _body_json() -> dict[str, Any]:
    try:
        data = json.loads(request.get_data() or b"null")
    except ValueError as e:
        raise BadRequest(f"invalid JSON body: {e}") from e
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object")
    return data


def namespace_ok(ns: str | None) -> bool:
    return ns in (None, "", NAMESPACE)


def split_name(name: str) -> tuple[str, str]:
    base, _, ns = name.partition(".")
    return base, ns


def _proxy_headers(call_id: str) -> dict[str, str]:
    headers: dict[str, str] = {}
    for k, v in request.headers.items():
        if k.lower() not in HOP_BY_HOP:
            headers[k] = f"{headers[k]}, {v}" if k in headers else v
    headers["X-Call-Id"] = call_id
    headers["X-Forwarded-Host"] = request.host
    if request.remote_addr:
        headers["X-Forwarded-For"] = request.remote_addr
    return headers


def _raw_rest(prefix: str, name: str) -> str:
    """The path after ``/<prefix>/<name>``, still percent-encoded as the client sent it."""
    raw = request.environ.get("REQUEST_URI") or quote(request.path)
    raw = raw.split("?", 1)[0]
    head = f"/{prefix}/{name}"
    rest = raw[len(head):] if raw.startswith(head) else quote(request.path[len(head):])
    return rest if rest.startswith("/") else "/" + rest


def _not_found(name: str) -> Response:
    base, ns = split_name(name)
    return _text(f"error finding function {base}.{ns or NAMESPACE}: not found", 404)


# -- endpoint handlers: one per endpoint, each given the Gateway --------------------------------


def proxy_function(gw: Gateway, name: str, rest: str = "") -> Response:
    """``/function/<name>[.<ns>][/<path>]``: proxy the call to one replica."""
    dep = gw.lookup(name)
    if dep is None:
        return _not_found(name)
    call_id = str(uuid.uuid4())
    try:
        up = gw.call(dep, request.method, _raw_rest("function", name),
                     request.query_string.decode("latin-1"), _proxy_headers(call_id),
                     request.get_data())
    except requests.Timeout:
        return _text(f"function {dep.name} timed out after {dep.timeout:g}s", 504,
                     {"X-Call-Id": call_id})
    except (requests.RequestException, NoReplicaError, ReplicaError) as e:
        log.error("call %s to %s failed: %s", call_id, dep.name, e)
        return _text(f"error calling function {dep.name}: {e}", 502, {"X-Call-Id": call_id})
    resp = Response(up.body, status=up.status, headers=up.headers)
    if not any(k.lower() == "content-type" for k, _ in up.headers):
        del resp.headers["Content-Type"]
    resp.headers["X-Call-Id"] = call_id
    resp.headers["X-Duration-Seconds"] = f"{up.duration:f}"
    return resp


def async_function(gw: Gateway, name: str, rest: str = "") -> Response:
    """``POST /async-function/<name>``: 202 now, run on the queue, POST the callback later."""
    dep = gw.lookup(name)
    if dep is None:
        return _not_found(name)
    call_id = str(uuid.uuid4())
    gw.queue.submit(
        gw.call_async, dep.name, request.method, _raw_rest("async-function", name),
        request.query_string.decode("latin-1"), _proxy_headers(call_id), request.get_data(),
        call_id, request.headers.get("X-Callback-Url"),
    )
    return Response(b"", status=202, headers={"X-Call-Id": call_id})


def list_functions(gw: Gateway) -> Response:
    """``GET /system/functions``."""
    if not namespace_ok(request.args.get("namespace")):
        return _json([])
    return _json([dep.status() for dep in list(gw.functions.values())])


def deploy_function(gw: Gateway) -> Response:
    """``POST`` (create, or update in place) and ``PUT`` (update) ``/system/functions``."""
    try:
        dep = gw.deploy(_body_json(), create=request.method == "POST")
    except BadRequest as e:
        return _text(str(e), 400)
    except ReplicaError as e:
        return _text(str(e), 500)
    if dep is None:
        return _text("function not found", 404)
    return _text("", 202)


def delete_function(gw: Gateway) -> Response:
    """``DELETE /system/functions`` with ``{"functionName", "namespace"}``."""
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
    """``POST /system/scale-function/<name>`` (no 1..5 clamp here; 0 is allowed)."""
    try:
        data = _body_json()
    except BadRequest as e:
        return _text(str(e), 400)
    replicas = data.get("replicas")
    if isinstance(replicas, bool) or not isinstance(replicas, int) or replicas < 0:
        return _text("replicas must be an integer >= 0", 400)
    dep = gw.lookup(name) if namespace_ok(data.get("namespace")) else None
    if dep is None:
        return _not_found(name)
    try:
        dep.replicas.scale(replicas)
    except ReplicaError as e:
        return _text(str(e), 500)
    return _text("", 202)


def function_logs(gw: Gateway) -> Response:
    """``GET /system/logs``: NDJSON log messages; ``follow=true`` streams until disconnect."""
    args = request.args
    name = args.get("name")
    if not name:
        return _text("name is required", 400)
    dep = gw.lookup(name) if namespace_ok(args.get("namespace")) else None
    if dep is None:
        return _not_found(name)
    try:
        tail = int(args["tail"]) if args.get("tail") else None
        since = parse_timestamp(args["since"]) if args.get("since") else None
    except ValueError as e:
        return _text(f"invalid tail or since: {e}", 400)
    follow = args.get("follow", "").lower() in ("1", "true", "yes")
    instance = args.get("instance") or None
    buf = dep.replicas.logbuf
    cursor = buf.cursor
    backlog = [ln for ln in buf.lines(since, tail if tail and tail > 0 else None, instance)
               if ln.seq <= cursor]  # tail <= 0 means unlimited, as in faas-provider
    disconnected = request.environ.get("waitress.client_disconnected")

    def generate() -> Any:
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

    return Response(generate(), status=200, mimetype="application/x-ndjson")


def system_info(gw: Gateway) -> Response:
    """``GET /system/info``."""
    version = {"sha": "local", "release": _version()}
    return _json({"provider": {"provider": "emnist-local", "orchestration": "process",
                               "version": version},
                  "version": version, "arch": platform.machine()})


def namespaces(gw: Gateway) -> Response:
    """``GET /system/namespaces``."""
    return _json([NAMESPACE])


def healthz(gw: Gateway) -> Response:
    """``GET /healthz``."""
    return _text("OK", 200)


def check_auth(gw: Gateway) -> Response | None:
    """Basic auth on ``/system/*`` only (never on /function, /async-function, /healthz)."""
    if gw.auth is None or not request.path.startswith("/system/"):
        return None
    auth = request.authorization
    if auth is not None and auth.type == "basic":
        user_ok = hmac.compare_digest((auth.username or "").encode(), gw.auth[0].encode())
        pw_ok = hmac.compare_digest((auth.password or "").encode(), gw.auth[1].encode())
        if user_ok and pw_ok:
            return None
    return _text("Unauthorized", 401, {"WWW-Authenticate": 'Basic realm="Restricted"'})


ROUTES: list[tuple[str, Callable[..., Response], list[str]]] = [
    ("/function/<name>", proxy_function, PROXY_METHODS),
    ("/function/<name>/", proxy_function, PROXY_METHODS),
    ("/function/<name>/<path:rest>", proxy_function, PROXY_METHODS),
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
    ("/healthz", healthz, ["GET"]),
]
