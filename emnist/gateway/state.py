"""The local provider's state: deployed functions, their replicas, secrets and the async queue.

:class:`Gateway` is what every endpoint handler is given. Deploying checks the request
(:mod:`.validate`), finds the stack function whose handler serves the image, and starts its
replicas with the provider's settings: ``OPENFAAS_URL``, ``EMNIST_HOST_ALIASES`` (cluster
service names -> local addresses) and ``EMNIST_SECRETS_DIR`` (this function's secrets only).
"""

from __future__ import annotations

import dataclasses
import http.client
import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml

from emnist.hostaliases import ALIASES_ENV, format_aliases
from emnist.secrets import SECRETS_DIR_ENV

from .callbacks import CallbackPolicy, CallbackRefused
from .client import deploy_request
from .logs import NAMESPACE, format_timestamp
from .proxy import GatewayTimeout, Payload, Upstream, UpstreamError, UpstreamTimeout, forward
from .queue import QUEUE_ANNOTATION, Queues, QueueSettings
from .secretstore import BUILTIN_AUTH, SecretStore
from .spool import Body, Spool
from .stack import FunctionSpec, Stack, StackError, parse_duration
from .supervisor import NoReplicaError, ReplicaError, ReplicaSet
from .validate import (
    BadRequest,
    check_env,
    check_process,
    check_secrets,
    parse_deploy,
    scale_min,
)

__all__ = ["AUTH_ANNOTATION", "CALLBACK_TIMEOUT", "DEFAULT_ALIASES", "DEFAULT_MAX_REPLICAS",
           "DEFAULT_UPSTREAM_TIMEOUT", "Deployment", "Gateway", "function_timeout",
           "store_alias"]

log = logging.getLogger("emnist.gateway")

DEFAULT_TIMEOUT = 300.0
DEFAULT_UPSTREAM_TIMEOUT = 60.0  # the faas-netes chart's gateway.upstreamTimeout
CALLBACK_TIMEOUT = 30.0
DEFAULT_MAX_REPLICAS = 64  # the most replicas of one function (--max-replicas)
_PROJECT_ROOT = Path(__file__).resolve().parents[2]
# A function with this annotation gets the gateway's credentials as the secrets basic-auth-user
# and basic-auth-password (as if it listed them), e.g. emnist-setup for its replica-count lookup.
AUTH_ANNOTATION = "emnist/gateway-auth"
GATEWAY_SERVICE = "gateway.openfaas:8080"
DEFAULT_ALIASES = {"memcached.openfaas-fn:11211": "127.0.0.1:11211",
                   "redis.openfaas-fn:6379": "127.0.0.1:6379"}
_STORE_SERVICE = {"memcached": "memcached.openfaas-fn:11211",
                  "memcached+binary": "memcached.openfaas-fn:11211",
                  "redis": "redis.openfaas-fn:6379"}
_DEFAULT_PORT = {"memcached": 11211, "memcached+binary": 11211, "redis": 6379}


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


def store_alias(store_url: str) -> dict[str, str]:
    """The alias that sends the stack's store service name to ``store_url``'s first server."""
    parts = urlsplit(store_url)
    service = _STORE_SERVICE.get(parts.scheme)
    if service is None or not parts.netloc:
        return {}
    first = parts.netloc.rpartition("@")[2].split(",")[0]
    if ":" not in first.rsplit("]", 1)[-1]:
        first = f"{first}:{_DEFAULT_PORT[parts.scheme]}"
    return {service: first}


@dataclasses.dataclass(eq=False)
class Deployment:
    """A deployed function: the deploy request, the spec it runs and its replicas."""

    name: str
    request: dict[str, Any]
    spec: FunctionSpec
    replicas: ReplicaSet
    created_ns: int
    invocations: int = 0
    _timeout: tuple[dict[str, str], float] | None = None

    @property
    def timeout(self) -> float:
        env = self.spec.environment
        if self._timeout is None or self._timeout[0] is not env:
            self._timeout = (env, function_timeout(env))
        return self._timeout[1]

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


class Gateway:
    """State shared by the endpoint handlers: the stack, the deployments, the call queue."""

    def __init__(self, stack: Stack, base_env: Mapping[str, str],
                 auth: tuple[str, str] | None = None, *,
                 queues: QueueSettings | None = None,
                 upstream_timeout: float = DEFAULT_UPSTREAM_TIMEOUT, queue_max: int = 1024,
                 queue_max_bytes: int = 256 << 20,
                 log_limit: int = 10000, start_timeout: float = 30.0, grace: float = 5.0,
                 echo_logs: bool = False, max_replicas: int = DEFAULT_MAX_REPLICAS,
                 max_functions: int = 64,
                 max_body: int = 16 << 20, max_follows: int = 16,
                 state_dir: str | os.PathLike[str] | None = None,
                 aliases: Mapping[str, str] | None = None, store_url: str | None = None,
                 allowed_hosts: tuple[str, ...] = (),
                 allowed_origins: tuple[str, ...] = (),
                 callback_hosts: tuple[str, ...] = (), body_memory: int = 4 << 20,
                 runtime: Any = None) -> None:
        self.stack = stack
        self.runtime = runtime  # None: replicas as processes (supervisor.ProcessRuntime)
        self.base_env = dict(base_env)
        self.auth = auth
        self.log_limit = log_limit
        self.start_timeout = start_timeout
        self.grace = grace
        self.echo_logs = echo_logs
        self.max_replicas = max_replicas
        self.max_functions = max_functions
        self.max_body = max_body
        self.max_follows = max_follows
        self.upstream_timeout = upstream_timeout
        self.allowed_hosts = allowed_hosts
        self.allowed_origins = allowed_origins
        self.functions: dict[str, Deployment] = {}
        self.url: str | None = None
        self.port = 0
        self.closing = threading.Event()
        self.follows = threading.BoundedSemaphore(max(1, max_follows))
        self.aliases = {**DEFAULT_ALIASES, **store_alias(store_url or ""), **dict(aliases or {})}
        builtins = dict(zip(BUILTIN_AUTH, auth, strict=True)) if auth else {}
        root = Path(state_dir) if state_dir else _default_state_dir()
        self.secrets = SecretStore(root / "secrets", builtins)
        self.callbacks = CallbackPolicy(callback_hosts)
        self.spool = Spool(root / "queue", body_memory)
        self.queue = Queues(self._run_async, queues or QueueSettings(), queue_max,
                            queue_max_bytes, release=self._release_async)
        self._deploy_lock = threading.RLock()
        self._count_lock = threading.Lock()
        self._templates: dict[str, str] = {}
        self._server: Any = None

    # -- provider settings -------------------------------------------------------------------

    def set_url(self, url: str, port: int) -> None:
        """Record where this gateway listens (replicas reach it there, and by its alias)."""
        self.url, self.port = url, port
        self.aliases.setdefault(GATEWAY_SERVICE, urlsplit(url).netloc)
        self.base_env["OPENFAAS_URL"] = url

    def provider_env(self, secrets_dir: Path) -> dict[str, str]:
        """What the provider sets in every replica of a function (a deploy cannot change it)."""
        env = dict(self.base_env)
        env[ALIASES_ENV] = format_aliases(self.aliases)
        env[SECRETS_DIR_ENV] = str(secrets_dir)
        return env

    def template_fprocess(self, lang: str) -> str:
        """``fprocess`` of ``template/<lang>/template.yml`` ("" if none): beside the stack, in
        the working directory (where faas-cli reads it) or in this project's checkout."""
        if lang not in self._templates:
            value = ""
            for base in (self.stack.path.parent, Path.cwd(), _PROJECT_ROOT):
                try:
                    path = base / "template" / lang / "template.yml"
                    data = yaml.safe_load(path.read_text(encoding="utf-8"))
                except (OSError, yaml.YAMLError):
                    continue
                if isinstance(data, dict) and isinstance(data.get("fprocess"), str):
                    value = data["fprocess"]
                    break
            self._templates[lang] = value
        return self._templates[lang]

    # -- deployments -------------------------------------------------------------------------

    def lookup(self, name: str) -> Deployment | None:
        """The deployment called ``name`` (``name.openfaas-fn`` too), else None."""
        base, _, ns = name.partition(".")
        return self.functions.get(base) if ns in ("", NAMESPACE) else None

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
        raise BadRequest(f"image {image[:200]} is not in the gateway's stack and no stack "
                         f"function is called {service}: the local gateway can only run "
                         "functions whose handler is in the stack")

    def _mounted_secrets(self, req: dict[str, Any]) -> list[str]:
        names = list(req["secrets"])
        if req["annotations"].get(AUTH_ANNOTATION, "").lower() in ("1", "true", "yes"):
            names += [n for n in BUILTIN_AUTH if n not in names]
        return names

    def _spec_for(self, req: dict[str, Any], fn: FunctionSpec) -> FunctionSpec:
        # the stack's image, not the request's: a deploy picks a stack function, never the
        # code that runs (the container runtime starts spec.image)
        return dataclasses.replace(
            fn, name=req["service"], image=fn.image,
            environment={**fn.environment, **req["envVars"]}, labels=req["labels"],
            annotations=req["annotations"], limits=req["limits"], requests=req["requests"],
            secrets=req["secrets"], constraints=req["constraints"],
            readonly_root_filesystem=req["readOnlyRootFilesystem"],
        )

    def check_replicas(self, n: int) -> None:
        if n > self.max_replicas:
            raise BadRequest(f"replicas: at most {self.max_replicas} on this gateway "
                             "(emnist up --max-replicas)")

    def deploy(self, data: dict[str, Any], *, create: bool,
               replicas: int | None = None) -> Deployment | None:
        """Create (or update in place) a function; None if ``create`` is False and it's new."""
        req = parse_deploy(data)
        fn = self.stack_function(req["image"], req["service"])
        check_env(fn.environment, fn)  # the stack itself may not name provider settings
        check_env(req["envVars"], fn)
        check_process(req["envProcess"], fn, self.template_fprocess(fn.lang))
        check_secrets(req["secrets"], self.secrets.exists)
        wanted = replicas if replicas is not None else scale_min(req["labels"], self.max_replicas)
        if wanted is not None:
            self.check_replicas(wanted)
        spec = self._spec_for(req, fn)
        name = req["service"]
        with self._deploy_lock:
            dep = self.functions.get(name)
            if dep is None and not create:
                return None
            if dep is None and len(self.functions) >= self.max_functions:
                raise BadRequest(f"unable to create function, maximum: {self.max_functions}")
            env = self.provider_env(self.secrets.mount(name, self._mounted_secrets(req)))
            if dep is None:
                rs = ReplicaSet(spec, env, self.log_limit, start_timeout=self.start_timeout,
                                grace=self.grace, echo=sys.stderr if self.echo_logs else None,
                                runtime=self.runtime)
                try:
                    rs.scale(1 if wanted is None else wanted)
                except BaseException:
                    rs.stop()
                    self.secrets.unmount(name)
                    raise
                dep = Deployment(name, req, spec, rs, time.time_ns())
                self.functions[name] = dep
                log.info("deployed %s (%d replicas)", name, rs.desired)
                return dep
            try:
                dep.replicas.update(spec, env, replicas=wanted)
            except BaseException:  # the old replicas keep running: give back their secrets
                self.secrets.mount(name, self._mounted_secrets(dep.request))
                raise
            dep.request, dep.spec = req, spec
            log.info("updated %s (%d replicas)", name, dep.replicas.desired)
            return dep

    def remove(self, name: str) -> bool:
        """Stop and forget a function; False if it was not deployed."""
        with self._deploy_lock:
            dep = self.functions.pop(name, None)
        if dep is None:
            return False
        dep.replicas.stop()
        self.secrets.unmount(name)
        log.info("removed %s", name)
        return True

    def scale(self, dep: Deployment, replicas: int) -> None:
        self.check_replicas(replicas)
        dep.replicas.scale(replicas)

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
            except BadRequest as e:
                errors.append(StackError(f"function {fn.name}: {e}"))
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

    def call(self, dep: Deployment, method: str, target: str,
             headers: list[tuple[str, str]], body: Payload) -> Upstream:
        """Send one call to the least busy replica of ``dep`` (scaling from zero first).

        The gateway's upstream timeout cuts it with :class:`GatewayTimeout` (502) when it
        comes before the function's own timeout (the watchdog's 504)."""
        with self._count_lock:
            dep.invocations += 1
        rs = dep.replicas
        if rs.desired == 0:
            rs.scale(1)  # scale from zero, like the gateway's default
        if self.upstream_timeout >= dep.timeout:
            return forward(rs, method, target, headers, body, dep.timeout)
        try:
            return forward(rs, method, target, headers, body, self.upstream_timeout)
        except UpstreamTimeout as e:
            raise GatewayTimeout(f"no answer within the gateway's upstream timeout "
                                 f"({self.upstream_timeout:g}s)") from e

    def queue_of(self, dep: Deployment) -> str:
        """The queue ``dep``'s async calls go to: its ``com.openfaas.queue`` annotation."""
        return dep.spec.annotations.get(QUEUE_ANNOTATION, "")

    def _run_async(self, name: str, method: str, target: str, headers: list[tuple[str, str]],
                   body: Body, call_id: str, callback_url: str | None, delivery: int) -> None:
        """A queue-worker's handler for one delivery: invoke, log a failure in the function's
        logs, call back (every delivery does, as CE's queue-worker)."""
        result, dep = self._invoke_async(name, method, target, headers, body, call_id, delivery)
        if dep is not None and result.status >= 400:
            text = result.body[:300].decode("utf-8", "replace").replace("\n", " ").strip()
            dep.replicas.logbuf.write(
                name, result.instance or "gateway",
                f"async call {call_id} failed: {result.status} {text}".rstrip(), "stderr")
        if callback_url:
            self._call_back(callback_url, name, call_id, result)

    def _release_async(self, name: str, method: str, target: str,
                       headers: list[tuple[str, str]], body: Body, *rest: Any) -> None:
        """A call nothing will deliver again (done, or dropped at shutdown): its body goes."""
        body.close()

    def _invoke_async(self, name: str, method: str, target: str,
                      headers: list[tuple[str, str]], body: Body, call_id: str,
                      delivery: int = 1) -> tuple[Upstream, Deployment | None]:
        dep = self.lookup(name)
        start = time.perf_counter()
        if dep is None:
            result = Upstream(404, [], f"function {name} not found".encode(), 0.0)
        else:
            try:
                result = self.call(dep, method, target, headers, body.payload())
            except UpstreamTimeout:
                result = Upstream(504, [], b"", time.perf_counter() - start)
            except GatewayTimeout as e:  # the function goes on: only the gateway gave up
                log.warning("async call %s to %s: %s", call_id, name, e)
                result = Upstream(502, [], f"function {name}: {e}".encode(),
                                  time.perf_counter() - start)
            except (UpstreamError, NoReplicaError, ReplicaError) as e:
                log.error("async call %s to %s failed: %s", call_id, name, e)
                result = Upstream(502, [], f"error calling function {name}".encode(),
                                  time.perf_counter() - start)
        log.info("async call %s to %s (delivery %d): %d in %.3fs", call_id, name, delivery,
                 result.status, result.duration)
        return result, dep

    def _call_back(self, url: str, name: str, call_id: str, result: Upstream) -> None:
        """POST the result to X-Callback-Url: the function's answer, no gateway credentials."""
        headers = {k: v for k, v in result.headers if k.lower() == "content-type"}
        headers.update({
            "X-Function-Status": str(result.status), "X-Function-Name": name,
            "X-Call-Id": call_id, "X-Duration-Seconds": f"{result.duration:f}",
        })
        try:
            self.callbacks.post(url, result.body, headers, timeout=CALLBACK_TIMEOUT)
        except CallbackRefused as e:  # the name resolves elsewhere than when it was queued
            log.error("async call %s: callback refused: %s", call_id, e)
        except (OSError, http.client.HTTPException) as e:
            log.error("async call %s: callback failed: %s", call_id, type(e).__name__)

    # -- shutdown ----------------------------------------------------------------------------

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
        self.queue.close()
        self.secrets.close()


def _default_state_dir() -> Path:
    """``$EMNIST_HOME/gateway`` (default ``~/.cache/emnist/gateway``), as `emnist up` uses."""
    home = os.environ.get("EMNIST_HOME") or str(Path.home() / ".cache" / "emnist")
    return Path(home) / "gateway"
