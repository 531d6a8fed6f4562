"""Talk to an OpenFaaS gateway (the local one or a real cluster) over its REST API.

The deploy request is built from a stack :class:`FunctionSpec` exactly as ``faas-cli deploy``
builds it, so deploying through this client and through faas-cli give the same function.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlsplit

import requests

from emnist.secrets import SecretError, read_secret
from emnist.wait import wait_until

from .stack import FunctionSpec

__all__ = ["DEFAULT_URL", "GatewayClient", "GatewayError", "auth_from_env", "deploy_request"]

DEFAULT_URL = "http://127.0.0.1:8080"
NAMESPACE = "openfaas-fn"


class GatewayError(RuntimeError):
    """The gateway answered with a non-2xx status (``status`` 0: it could not be reached)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(f"{status}: {message}" if status else message)
        self.status = status
        self.message = message


def deploy_request(fn: FunctionSpec) -> dict[str, Any]:
    """The JSON body ``faas-cli deploy`` sends for ``fn`` (types.FunctionDeployment)."""
    body: dict[str, Any] = {"service": fn.name, "image": fn.image}
    if fn.namespace:
        body["namespace"] = fn.namespace
    if fn.fprocess:
        body["envProcess"] = fn.fprocess
    optional = {
        "envVars": dict(fn.environment),
        "constraints": list(fn.constraints),
        "secrets": list(fn.secrets),
        "labels": dict(fn.labels),
        "annotations": dict(fn.annotations),
        "limits": {k: v for k, v in fn.limits.items() if v},
        "requests": {k: v for k, v in fn.requests.items() if v},
    }
    body.update({k: v for k, v in optional.items() if v})
    body["readOnlyRootFilesystem"] = bool(fn.readonly_root_filesystem)
    return body


def auth_from_env(env: Mapping[str, str] | None = None) -> tuple[str, str] | None:
    """Gateway credentials: ``$OPENFAAS_USER``/``$OPENFAAS_PASSWORD`` (user default admin),
    else the secrets ``basic-auth-user``/``basic-auth-password`` if mounted (in a function);
    None when neither is there. The one place the project reads gateway credentials."""
    env = os.environ if env is None else env
    password = env.get("OPENFAAS_PASSWORD")
    if password:
        return (env.get("OPENFAAS_USER") or "admin", password)
    try:
        password = read_secret("basic-auth-password", env)
    except SecretError:
        return None
    if not password:
        return None
    try:
        user = read_secret("basic-auth-user", env)
    except SecretError:
        user = ""
    return (user or env.get("OPENFAAS_USER") or "admin", password)


class GatewayClient:
    """A small client for the OpenFaaS gateway API.

    ``url`` defaults to ``$OPENFAAS_URL`` then ``http://127.0.0.1:8080``; ``auth`` defaults to
    :func:`auth_from_env` (the environment, else the mounted basic-auth secrets). ``timeout``
    bounds every ``/system`` call; invocations wait as long as the function runs unless given
    a timeout.
    """

    def __init__(self, url: str | None = None, auth: tuple[str, str] | None = None,
                 timeout: float = 30.0) -> None:
        self.url = (url or os.environ.get("OPENFAAS_URL") or DEFAULT_URL).rstrip("/")
        self.auth = auth if auth is not None else auth_from_env(os.environ)
        self.timeout = timeout
        self.session = requests.Session()
        if urlsplit(self.url).hostname in ("127.0.0.1", "localhost", "::1"):
            self.session.trust_env = False  # a proxy must never sit between us and localhost

    def __repr__(self) -> str:
        return f"GatewayClient({self.url!r})"

    # -- plumbing ----------------------------------------------------------------------------

    def _request(self, method: str, path: str, *, check: bool = True, system: bool = True,
                 timeout: float | tuple[float, float | None] | None = None,
                 **kwargs: Any) -> requests.Response:
        try:
            resp = self.session.request(
                method, self.url + path, auth=self.auth if system else None,
                timeout=self.timeout if timeout is None else timeout, **kwargs,
            )
        except requests.ConnectionError as e:
            raise GatewayError(
                0, f"the gateway at {self.url} is not reachable ({type(e).__name__}); "
                "run `emnist up` to start the local gateway"
            ) from e
        if check and not 200 <= resp.status_code < 300:
            text = resp.text.strip() or resp.reason
            raise GatewayError(resp.status_code, text)
        return resp

    # -- functions ---------------------------------------------------------------------------

    def invoke(self, name: str, body: bytes | str | dict[str, Any] | list[Any] | None = None,
               *, method: str = "POST", query: Mapping[str, Any] | None = None,
               headers: Mapping[str, str] | None = None, timeout: float | None = None,
               check: bool = True) -> requests.Response:
        """Call ``/function/NAME`` synchronously; a dict/list body is sent as JSON."""
        kwargs: dict[str, Any] = {"params": query, "headers": dict(headers or {})}
        if isinstance(body, dict | list):
            kwargs["json"] = body
        elif body is not None:
            kwargs["data"] = body.encode() if isinstance(body, str) else body
        return self._request(method, f"/function/{name}", system=False, check=check,
                             timeout=(10.0, timeout), **kwargs)

    def invoke_async(self, name: str, body: bytes | str | dict[str, Any] | None = None, *,
                     callback_url: str | None = None,
                     headers: Mapping[str, str] | None = None) -> str:
        """Queue a call on ``/async-function/NAME``; returns its ``X-Call-Id``."""
        hdrs = dict(headers or {})
        if callback_url:
            hdrs["X-Callback-Url"] = callback_url
        kwargs: dict[str, Any] = {"headers": hdrs}
        if isinstance(body, dict | list):
            kwargs["json"] = body
        elif body is not None:
            kwargs["data"] = body.encode() if isinstance(body, str) else body
        resp = self._request("POST", f"/async-function/{name}", system=False, **kwargs)
        return resp.headers.get("X-Call-Id", "")

    def list_functions(self) -> list[dict[str, Any]]:
        """``GET /system/functions``."""
        return self._request("GET", "/system/functions").json()

    def get_function(self, name: str) -> dict[str, Any] | None:
        """One function's status, or None if it is not deployed."""
        resp = self._request("GET", f"/system/function/{name}", check=False)
        if resp.status_code == 404:
            return None
        if not resp.ok:
            raise GatewayError(resp.status_code, resp.text.strip() or resp.reason)
        return resp.json()

    def replicas(self, name: str) -> int:
        """Available replicas of ``name`` (0 if it is not deployed)."""
        status = self.get_function(name)
        return int(status.get("availableReplicas", 0)) if status else 0

    def deploy(self, spec: dict[str, Any]) -> None:
        """Create or update a function like faas-cli: PUT, then POST if the PUT gives 404."""
        resp = self._request("PUT", "/system/functions", json=spec, check=False)
        if resp.status_code == 404:
            resp = self._request("POST", "/system/functions", json=spec, check=False)
        if not 200 <= resp.status_code < 300:
            raise GatewayError(resp.status_code, resp.text.strip() or resp.reason)

    def delete(self, name: str) -> None:
        """``DELETE /system/functions``."""
        self._request("DELETE", "/system/functions",
                      json={"functionName": name, "namespace": NAMESPACE})

    def scale(self, name: str, replicas: int) -> None:
        """``POST /system/scale-function/NAME``."""
        self._request("POST", f"/system/scale-function/{name}",
                      json={"serviceName": name, "replicas": int(replicas),
                            "namespace": NAMESPACE})

    def logs(self, name: str, *, tail: int | None = None, since: str | None = None,
             follow: bool = False, instance: str | None = None) -> Iterator[dict[str, Any]]:
        """Log messages of ``name`` (NDJSON from ``/system/logs``; tail <= 0: all lines).

        With ``follow`` the iterator blocks for new lines until the caller stops iterating.
        """
        params: dict[str, Any] = {"name": name, "namespace": NAMESPACE,
                                  "follow": "true" if follow else "false"}
        if tail is not None:
            params["tail"] = tail
        if since:
            params["since"] = since
        if instance:
            params["instance"] = instance
        resp = self._request("GET", "/system/logs", params=params, stream=True,
                             timeout=(self.timeout, None if follow else self.timeout))
        with resp:
            for line in resp.iter_lines(chunk_size=1024):
                if line.strip():
                    yield json.loads(line)

    def info(self) -> dict[str, Any]:
        """``GET /system/info``."""
        return self._request("GET", "/system/info").json()

    def healthy(self) -> bool:
        """True if ``/healthz`` answers 200."""
        try:
            return self._request("GET", "/healthz", system=False, check=False,
                                 timeout=min(self.timeout, 5.0)).status_code == 200
        except GatewayError:
            return False

    def wait_healthy(self, timeout: float = 30.0, interval: float = 0.1) -> None:
        """Poll ``/healthz`` until it answers or raise :class:`GatewayError` after timeout."""
        wait_until(self.healthy, timeout, f"the gateway at {self.url} did not become healthy "
                   f"within {timeout:g}s; run `emnist up` to start it", interval,
                   error=lambda m: GatewayError(0, m))
