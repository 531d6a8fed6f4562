"""A local OpenFaaS-compatible gateway: the embedded default for one machine (like faasd).

It serves the OpenFaaS gateway REST API on 127.0.0.1 and runs each function's replicas as OS
processes (see :mod:`.supervisor`) hosting the handler like the python3-http template does, so
``faas-cli`` and :class:`~.client.GatewayClient` work against it unchanged.

Differences from OpenFaaS CE, on purpose: deploy/scale return 202 only once the replicas are
healthy (errors are reported instead of hidden); scale-function accepts any count >= 0 (CE
clamps to 1..5); invoking a function scaled to zero scales it to one first (scale from zero).
"""

from __future__ import annotations

import atexit
import dataclasses
import http.cookiejar
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import click
import requests
import requests.adapters
import urllib3
from flask import Flask, Response

from .client import deploy_request
from .handlers import (
    RESPONSE_SKIP,
    ROUTES,
    BadRequest,
    check_auth,
    namespace_ok,
    split_name,
)
from .stack import FunctionSpec, Stack, StackError, load_stack, parse_duration
from .supervisor import (
    NAMESPACE,
    NoReplicaError,
    ReplicaError,
    ReplicaSet,
    format_timestamp,
)

__all__ = ["Deployment", "Gateway", "create_app", "function_timeout", "load_auth", "serve"]

log = logging.getLogger("emnist.gateway")

DEFAULT_TIMEOUT = 300.0
SCALE_MIN_LABEL = "com.openfaas.scale.min"


def function_timeout(env: Mapping[str, str]) -> float:
    """Upstream timeout for a function: the largest of its exec/write timeouts (default 5m)."""
    values = []
    for key in ("exec_timeout", "write_timeout"):
        if env.get(key):
            try:
                values.append(parse_duration(env[key]))
            except ValueError:
                log.warning("ignoring invalid %s=%r", key, env[key])
    positive = [v for v in values if v > 0]
    return max(positive) + 1.0 if positive else DEFAULT_TIMEOUT


def load_auth(path: str | os.PathLike[str] | None,
              env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """Basic-auth credentials from a secrets dir/file or ``$OPENFAAS_PASSWORD`` (else None).

    A directory holds ``basic-auth-password`` (and optionally ``basic-auth-user``); a file is
    the password itself. The user defaults to ``admin``, as in OpenFaaS.
    """
    env = os.environ if env is None else env
    if path:
        p = Path(path)
        pw_file = p / "basic-auth-password" if p.is_dir() else p
        user_file = pw_file.parent / "basic-auth-user"
        password = pw_file.read_text(encoding="utf-8").strip()
        user = user_file.read_text(encoding="utf-8").strip() if user_file.is_file() else ""
        if not password:
            raise ValueError(f"{pw_file} is empty")
        return (user or "admin", password)
    if env.get("OPENFAAS_PASSWORD"):
        return (env.get("OPENFAAS_USER") or "admin", env["OPENFAAS_PASSWORD"])
    return None


@dataclasses.dataclass
class Upstream:
    """What a replica answered."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    duration: float


@dataclasses.dataclass(eq=False)
class Deployment:
    """A deployed function: the deploy request, the spec it runs and its replicas."""

    name: str
    request: dict[str, Any]
    spec: FunctionSpec
    replicas: ReplicaSet
    created_ns: int
    invocations: int = 0

    @property
    def timeout(self) -> float:
        return function_timeout(self.spec.environment)

    def status(self) -> dict[str, Any]:
        """The function status object, with Go's ``omitempty`` behaviour."""
        req = self.request
        out: dict[str, Any] = {"name": self.name, "image": req["image"], "namespace": NAMESPACE}
        for key in ("envProcess", "envVars", "labels", "annotations", "limits", "requests",
                    "secrets", "constraints"):
            if req.get(key):
                out[key] = req[key]
        if req.get("readOnlyRootFilesystem"):
            out["readOnlyRootFilesystem"] = True
        out["invocationCount"] = self.invocations
        out["replicas"] = self.replicas.desired
        out["availableReplicas"] = self.replicas.available
        out["createdAt"] = format_timestamp(self.created_ns)
        return out


def _str_map(value: Any, field: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{field} must be an object of strings")
    return {str(k): "" if v is None else str(v) for k, v in value.items()}


def _str_list(value: Any, field: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise BadRequest(f"{field} must be a list of strings")
    return [str(v) for v in value]


def parse_deploy(data: dict[str, Any]) -> dict[str, Any]:
    """Validate a deploy request (types.FunctionDeployment) into a normalised dict."""
    for key in ("service", "image"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise BadRequest(f"{key} is required")
    if not namespace_ok(data.get("namespace")):
        raise BadRequest(f"namespace {data['namespace']} is not allowed (only {NAMESPACE})")
    req: dict[str, Any] = {"service": data["service"].strip(), "image": data["image"].strip(),
                           "namespace": NAMESPACE}
    if data.get("envProcess"):
        req["envProcess"] = str(data["envProcess"])
    for key in ("envVars", "labels", "annotations", "limits", "requests"):
        req[key] = _str_map(data.get(key), key)
    for key in ("secrets", "constraints"):
        req[key] = _str_list(data.get(key), key)
    req["readOnlyRootFilesystem"] = bool(data.get("readOnlyRootFilesystem", False))
    return req


class Gateway:
    """State shared by the endpoint handlers: the stack, the deployments, the call queue."""

    def __init__(self, stack: Stack, base_env: Mapping[str, str],
                 auth: tuple[str, str] | None = None, *, queue_workers: int = 64,
                 log_limit: int = 10000, start_timeout: float = 30.0, grace: float = 5.0,
                 echo_logs: bool = False) -> None:
        self.stack = stack
        self.base_env = dict(base_env)
        self.auth = auth
        self.log_limit = log_limit
        self.start_timeout = start_timeout
        self.grace = grace
        self.echo_logs = echo_logs
        self.functions: dict[str, Deployment] = {}
        self.url: str | None = None
        self.closing = threading.Event()
        self.queue = ThreadPoolExecutor(max(1, queue_workers), thread_name_prefix="queue")
        self._deploy_lock = threading.RLock()
        self._count_lock = threading.Lock()
        self._upstream = _upstream_session()
        self._server: Any = None
        self.app = _build_app(self)

    # -- deployments -------------------------------------------------------------------------

    def lookup(self, name: str) -> Deployment | None:
        """The deployment called ``name`` (``name.openfaas-fn`` too), else None."""
        base, ns = split_name(name)
        return self.functions.get(base) if namespace_ok(ns) else None

    def stack_function(self, image: str, service: str) -> FunctionSpec:
        """The stack function whose code serves ``image`` (or, failing that, ``service``)."""
        fns = self.stack.functions
        by_image = [fn for fn in fns.values() if fn.image == image]
        for fn in by_image:
            if fn.name == service:
                return fn
        if by_image:
            return by_image[0]
        if service in fns:
            return fns[service]
        raise BadRequest(f"image {image} is not in the stack {self.stack.path} and no stack "
                         f"function is called {service}: the local gateway can only run "
                         "functions whose handler is in the stack")

    def _spec_for(self, req: dict[str, Any]) -> FunctionSpec:
        fn = self.stack_function(req["image"], req["service"])
        env = {**fn.environment, **req["envVars"]}
        if self.url:
            env["OPENFAAS_URL"] = self.url  # replicas must always reach this gateway
        return dataclasses.replace(
            fn, name=req["service"], image=req["image"], environment=env,
            labels=req["labels"], annotations=req["annotations"], limits=req["limits"],
            requests=req["requests"], secrets=req["secrets"], constraints=req["constraints"],
            readonly_root_filesystem=req["readOnlyRootFilesystem"],
        )

    def deploy(self, data: dict[str, Any], *, create: bool,
               replicas: int | None = None) -> Deployment | None:
        """Create (or update in place) a function; None if ``create`` is False and it's new."""
        req = parse_deploy(data)
        spec = self._spec_for(req)
        scale_min = req["labels"].get(SCALE_MIN_LABEL)
        wanted = replicas
        if wanted is None and scale_min is not None:
            try:
                wanted = max(0, int(scale_min))
            except ValueError as e:
                raise BadRequest(f"label {SCALE_MIN_LABEL} must be an integer") from e
        with self._deploy_lock:
            dep = self.functions.get(req["service"])
            if dep is None:
                if not create:
                    return None
                rs = ReplicaSet(spec, self.base_env, self.log_limit,
                                start_timeout=self.start_timeout, grace=self.grace,
                                echo=sys.stderr if self.echo_logs else None)
                try:
                    rs.scale(1 if wanted is None else wanted)
                except BaseException:
                    rs.stop()
                    raise
                dep = Deployment(req["service"], req, spec, rs, time.time_ns())
                self.functions[dep.name] = dep
                log.info("deployed %s (%d replicas)", dep.name, rs.desired)
                return dep
            dep.replicas.update(spec, self.base_env, replicas=wanted)
            dep.request, dep.spec = req, spec
            log.info("updated %s (%d replicas)", dep.name, dep.replicas.desired)
            return dep

    def remove(self, name: str) -> bool:
        """Stop and forget a function; False if it was not deployed."""
        with self._deploy_lock:
            dep = self.functions.pop(name, None)
        if dep is None:
            return False
        dep.replicas.stop()
        log.info("removed %s", name)
        return True

    def deploy_stack(self, replicas: Mapping[str, int] | None = None) -> None:
        """Deploy every stack function (count: --replicas, else scale.min label, else 1)."""
        replicas = dict(replicas or {})
        unknown = set(replicas) - set(self.stack.functions)
        if unknown:
            raise StackError(f"--replicas names functions not in the stack: {sorted(unknown)}")
        errors: list[BaseException] = []

        def one(fn: FunctionSpec) -> None:
            try:
                self.deploy(deploy_request(fn), create=True, replicas=replicas.get(fn.name))
            except Exception as e:  # noqa: BLE001 - collected and re-raised below
                errors.append(e)

        threads = [threading.Thread(target=one, args=(fn,)) for fn in self.stack.functions.values()]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]

    # -- invocation --------------------------------------------------------------------------

    def _session(self) -> requests.Session:
        """The pooled upstream session (keep-alive, at most 16 idle connections a replica)."""
        return self._upstream

    def call(self, dep: Deployment, method: str, path: str, query: str,
             headers: Mapping[str, str], body: bytes) -> Upstream:
        """Send one call to the least busy replica of ``dep`` and return its answer.

        A call is retried on another replica (twice at most) only when its replica refused
        the connection or turned out to be dead, e.g. killed with a keep-alive connection open.
        """
        with self._count_lock:
            dep.invocations += 1
        rs = dep.replicas
        if rs.desired == 0:
            rs.scale(1)  # scale from zero, like the gateway's default
        url_tail = path + ("?" + query if query else "")
        start = time.perf_counter()
        session = self._session()
        for attempt in range(3):
            with rs.pick() as replica:
                try:
                    resp = session.request(
                        method, replica.url + url_tail, data=body, headers=headers,
                        timeout=(5.0, dep.timeout), stream=True, allow_redirects=False,
                    )
                except requests.ConnectionError as e:
                    # Retry elsewhere only if the call surely did not run: the replica refused
                    # the connection, or it was already dead (a stale keep-alive connection).
                    dead = _dead(replica.process)
                    if attempt < 2 and (dead or _never_connected(e)):
                        log.warning("replica %s of %s unreachable (%s); retrying elsewhere",
                                    replica.hostname, dep.name, type(e).__name__)
                        if dead:
                            rs.mark_dead(replica)  # so the retry waits for its replacement
                        continue
                    raise
                content = _read_raw(resp)  # as sent: no gzip decoding, headers stay true
            out_headers = [(k, v) for k, v in resp.raw.headers.items()
                           if k.lower() not in RESPONSE_SKIP]
            return Upstream(resp.status_code, out_headers, content,
                            time.perf_counter() - start)
        raise NoReplicaError(f"no reachable replica of {dep.name}")

    def call_async(self, name: str, method: str, path: str, query: str,
                   headers: Mapping[str, str], body: bytes, call_id: str,
                   callback_url: str | None) -> None:
        """Queue-worker body: invoke, then POST the result to the callback URL if any."""
        dep = self.lookup(name)
        start = time.perf_counter()
        try:
            if dep is None:
                result = Upstream(404, [], f"function {name} not found".encode(), 0.0)
            else:
                result = self.call(dep, method, path, query, headers, body)
        except Exception as e:  # noqa: BLE001 - reported to the callback
            result = Upstream(502, [], str(e).encode(), time.perf_counter() - start)
        log.info("async call %s to %s: %d in %.3fs", call_id, name, result.status,
                 result.duration)
        if not callback_url:
            return
        cb_headers = {k: v for k, v in result.headers if k.lower() == "content-type"}
        cb_headers.update({
            "X-Function-Status": str(result.status), "X-Function-Name": name,
            "X-Call-Id": call_id, "X-Duration-Seconds": f"{result.duration:f}",
        })
        try:
            self._session().post(callback_url, data=result.body, headers=cb_headers,
                                 timeout=30.0).close()
        except requests.RequestException as e:
            log.error("async call %s: callback to %s failed: %s", call_id, callback_url, e)

    # -- serving -----------------------------------------------------------------------------

    def listen(self, host: str = "127.0.0.1", port: int = 8080, threads: int = 64) -> str:
        """Bind the HTTP server (port 0 picks a free one); returns the gateway URL."""
        from waitress.server import create_server

        self._server = create_server(
            self.app, host=host, port=port, threads=max(32, threads),
            connection_limit=max(100, threads * 4), channel_request_lookahead=4,
            asyncore_use_poll=True, ident="emnist-gateway",
        )
        bound_port = self._server.effective_port
        self.url = f"http://127.0.0.1:{bound_port}" if host in ("127.0.0.1", "0.0.0.0") \
            else f"http://{host}:{bound_port}"
        self.base_env["OPENFAAS_URL"] = self.url
        return self.url

    def run(self) -> None:
        """Serve until SIGTERM/SIGINT (SystemExit/KeyboardInterrupt in the main thread)."""
        if self._server is None:
            raise RuntimeError("call listen() first")
        self._server.run()

    def close(self) -> None:
        """Stop serving and stop every replica. Safe to call more than once."""
        if self.closing.is_set():
            return
        self.closing.set()
        if self._server is not None:
            try:
                self._server.close()
            except Exception:  # noqa: BLE001 - already closed by run()
                pass
        with self._deploy_lock:
            deps = list(self.functions.values())
            self.functions.clear()
        stoppers = [threading.Thread(target=d.replicas.stop) for d in deps]
        for t in stoppers:
            t.start()
        for t in stoppers:
            t.join()
        self.queue.shutdown(wait=False, cancel_futures=True)


def _upstream_session() -> requests.Session:
    """A thread-safe pooled session that adds nothing to what it proxies (no cookies)."""
    session = requests.Session()
    session.trust_env = False  # never route 127.0.0.1 through a proxy
    session.headers.clear()
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    adapter = requests.adapters.HTTPAdapter(pool_connections=64, pool_maxsize=16)
    session.mount("http://", adapter)
    session.mount("https://", adapter)
    return session


def _read_raw(resp: requests.Response) -> bytes:
    """The undecoded body, with urllib3's errors mapped to requests' like ``.content`` does."""
    try:
        return resp.raw.read(decode_content=False)
    except urllib3.exceptions.ReadTimeoutError as e:
        raise requests.ReadTimeout(e) from e
    except urllib3.exceptions.HTTPError as e:
        raise requests.ConnectionError(e) from e
    finally:
        resp.close()


def _dead(proc: subprocess.Popen[bytes], wait: float = 0.5) -> bool:
    try:
        proc.wait(timeout=wait)
        return True
    except subprocess.TimeoutExpired:
        return False


def _never_connected(e: requests.ConnectionError) -> bool:
    """True if the request surely never reached the replica (safe to retry elsewhere)."""
    text = repr(e)
    return "NewConnectionError" in text or "Connection refused" in text


def _build_app(gw: Gateway) -> Flask:
    app = Flask(__name__)
    app.before_request(lambda: check_auth(gw))
    for rule, handler, methods in ROUTES:
        def view(_h: Callable[..., Response] = handler, **kw: Any) -> Response:
            return _h(gw, **kw)

        app.add_url_rule(rule, f"{handler.__name__}:{rule}", view, methods=methods,
                         provide_automatic_options=False, strict_slashes=False)
    return app


def create_app(stack: Stack, *, base_env: Mapping[str, str],
               auth: tuple[str, str] | None = None, **options: Any) -> Gateway:
    """A Gateway for ``stack`` (nothing deployed yet; see :func:`serve`)."""
    return Gateway(stack, base_env, auth, **options)


def serve(gateway: Gateway, *, host: str = "127.0.0.1", port: int = 8080,
          replicas: Mapping[str, int] | None = None,
          ready_file: str | os.PathLike[str] | None = None, threads: int = 64,
          on_ready: Callable[[str], None] | None = None) -> None:
    """Listen, deploy the stack, write the ready file, serve until SIGTERM/SIGINT, clean up."""
    atexit.register(gateway.close)
    previous = signal.signal(signal.SIGTERM, _raise_exit) \
        if threading.current_thread() is threading.main_thread() else None
    ready_path = Path(ready_file) if ready_file else None
    try:
        url = gateway.listen(host, port, threads)
        gateway.deploy_stack(replicas)
        if ready_path is not None:
            tmp = ready_path.with_name(ready_path.name + ".tmp")
            tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}), encoding="utf-8")
            tmp.replace(ready_path)
        log.info("gateway ready on %s (%d functions)", url, len(gateway.functions))
        if on_ready is not None:
            on_ready(url)
        gateway.run()
    finally:
        gateway.close()
        if ready_path is not None:
            ready_path.unlink(missing_ok=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _parse_replicas(values: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in values:
        name, sep, count = item.partition("=")
        if not sep or not count.isdigit():
            raise click.BadParameter(f"{item!r} is not NAME=COUNT", param_hint="--replicas")
        out[name] = int(count)
    return out


@click.command()
@click.option("--stack", "stack_path", required=True, envvar="EMNIST_STACK",
              type=click.Path(exists=True, dir_okay=False), help="OpenFaaS stack file.")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8080, show_default=True, type=int, help="0 picks a free port.")
@click.option("--replicas", "replica_args", multiple=True, metavar="NAME=N",
              help="Initial replicas of a function (repeatable).")
@click.option("--basic-auth-file", type=click.Path(exists=True),
              help="Secrets dir (basic-auth-password) or password file; else $OPENFAAS_PASSWORD.")
@click.option("--ready-file", type=click.Path(dir_okay=False),
              help='Write {"url", "pid"} here once every initial replica is healthy.')
@click.option("--queue-workers", default=64, show_default=True, type=int,
              help="Threads running async calls.")
@click.option("--threads", default=64, show_default=True, type=int, help="HTTP threads (>=32).")
@click.option("--echo-logs", is_flag=True, help="Copy replica output to stderr.")
@click.option("--debug", is_flag=True, help="Verbose logs and tracebacks.")
def main(stack_path: str, host: str, port: int, replica_args: tuple[str, ...],
         basic_auth_file: str | None, ready_file: str | None, queue_workers: int, threads: int,
         echo_logs: bool, debug: bool) -> None:
    """Run the local OpenFaaS-compatible gateway for a stack file."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s gateway %(levelname)s %(message)s")
    logging.getLogger("waitress").setLevel(logging.WARNING)
    try:
        stack = load_stack(stack_path)
        auth = load_auth(basic_auth_file)
        gateway = create_app(stack, base_env={}, auth=auth, queue_workers=queue_workers,
                             echo_logs=echo_logs)
        serve(gateway, host=host, port=port, replicas=_parse_replicas(replica_args),
              ready_file=ready_file, threads=threads)
    except (StackError, ReplicaError, OSError, ValueError) as e:
        if debug:
            raise
        click.echo(f"gateway: error: {e}", err=True)
        sys.exit(1)
    except (KeyboardInterrupt, SystemExit):
        pass


if __name__ == "__main__":
    main()
