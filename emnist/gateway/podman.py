"""Replicas as containers of the functions' real images (podman), as OpenFaaS runs them.

Each replica is ``podman run`` of the image the *gateway's* stack file names for the function
(a deploy request's ``image`` only picks which stack function it is, never what runs), under
the runtime contract faas-netes gives a pod: of-watchdog as PID 1 on port 8080, the image's
non-root user (or an arbitrary UID, as OpenShift assigns), a read-only root filesystem with a
writable /tmp when the function asks for it, its secrets as files under
/var/openfaas/secrets, the stack's environment and nothing of the gateway's, its memory limit,
and no disk shared with anything. Replicas sit on one podman network where the cluster's
service names (``gateway.openfaas``, ``memcached.openfaas-fn``) resolve by network alias (the
stack starts those: :mod:`emnist.cluster.containerstack`); no port is published on the host:
the gateway reaches each replica at its address on that network.

The attached ``podman run`` is the replica's child process, so the supervisor's logs, restart
and scale logic is the process runtime's.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from emnist.hostaliases import ALIASES_ENV
from emnist.secrets import DEFAULT_SECRETS_DIR, SECRETS_DIR_ENV

from .stack import FunctionSpec
from .supervisor import Replica, healthy
from .validate import memory_bytes

__all__ = ["CONTAINER_PORT", "GATEWAY_URL", "ContainerRuntime", "ContainerSettings"]

CONTAINER_PORT = 8080  # of-watchdog's port
UPSTREAM_PORT = 5000  # the python3-http template's server behind the watchdog
GATEWAY_URL = "http://gateway.openfaas:8080"  # the gateway's service name on a cluster
STACK_LABEL = "io.emnist.stack"
FUNCTION_LABEL = "faas_function"  # the label faas-netes puts on a function's pods
# provider settings of the process runtime that have no meaning in a container
_PROCESS_ONLY = (ALIASES_ENV, SECRETS_DIR_ENV)
_USER = re.compile(r"^[0-9]{1,10}(:[0-9]{1,10})?$")
_NAME = re.compile(r"^[a-zA-Z0-9][a-zA-Z0-9_.-]{0,100}$")
_UPSTREAM_PROBE = ("import socket; socket.create_connection(('127.0.0.1', "
                   f"{UPSTREAM_PORT}), 1).close()")


@dataclass(frozen=True)
class ContainerSettings:
    """What the operator chose for every replica (never a deploy request)."""

    network: str  # the podman network (the stack's; the service names are aliases on it)
    stack: str  # label value naming this stack's containers (cleanup after a crash)
    user: str = ""  # "" : the image's USER (app); "4242" or "4242:0": an arbitrary UID
    env: Mapping[str, str] = field(default_factory=dict)  # podman's (CONTAINERS_CONF, PATH)

    def __post_init__(self) -> None:
        if not _NAME.match(self.network) or not _NAME.match(self.stack):
            raise ValueError("network and stack: letters, digits, '_', '.', '-'")
        if self.user and not _USER.match(self.user):
            raise ValueError(f"user {self.user!r}: a numeric UID or UID:GID")


class ContainerRuntime:
    """Replicas as podman containers; see the module docstring."""

    kind = "container"

    def __init__(self, settings: ContainerSettings) -> None:
        self.settings = settings
        self._env = dict(settings.env or os.environ)

    # -- the container ----------------------------------------------------------------------

    def environment(self, spec: FunctionSpec, base_env: Mapping[str, str]) -> dict[str, str]:
        """The stack's environment for the function, then the provider's settings that mean
        something in a container (the gateway at its service name); nothing of the gateway's
        own environment."""
        env = dict(spec.environment)
        env.update({k: v for k, v in base_env.items() if k not in _PROCESS_ONLY})
        env["OPENFAAS_URL"] = GATEWAY_URL
        return env

    def command(self, spec: FunctionSpec, base_env: Mapping[str, str], hostname: str,
                name: str) -> list[str]:
        """The ``podman run`` of one replica (attached: its output is the replica's log)."""
        s = self.settings
        cmd = ["podman", "run", "--rm", "--name", name, "--hostname", hostname,
               "--network", s.network, "--network-alias", f"{spec.name}.openfaas-fn",
               "--pull", "never", "--label", f"{STACK_LABEL}={s.stack}",
               "--label", f"{FUNCTION_LABEL}={spec.name}", "--stop-timeout", "5"]
        if s.user:
            cmd += ["--user", s.user]
        if spec.readonly_root_filesystem:  # faas-netes: an emptyDir at /tmp stays writable
            cmd += ["--read-only", "--read-only-tmpfs=false", "--tmpfs", "/tmp:rw,mode=1777"]
        memory = spec.limits.get("memory")
        if memory:
            cmd += ["--memory", f"{memory_bytes(memory)}b"]
        secrets_dir = base_env.get(SECRETS_DIR_ENV)
        if secrets_dir:  # the function's own secrets only, read-only, owned by its user
            cmd += ["--volume", f"{Path(secrets_dir).resolve()}:{DEFAULT_SECRETS_DIR}:ro,U"]
        for key, value in sorted(self.environment(spec, base_env).items()):
            cmd += ["--env", f"{key}={value}"]
        cmd.append(spec.image)
        return cmd

    # -- the runtime interface (see supervisor.ProcessRuntime) -------------------------------

    def spawn(self, spec: FunctionSpec, base_env: Mapping[str, str],
              hostname: str) -> Replica:
        name = f"{self.settings.stack}-{hostname}"
        proc = subprocess.Popen(
            self.command(spec, base_env, hostname, name), env=self._env,
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True)
        return Replica(name=spec.name, hostname=hostname, port=CONTAINER_PORT, process=proc,
                       host="", container=name)

    def ready(self, replica: Replica) -> bool:
        """Its address is known, of-watchdog answers /_/health, and the handler's server
        behind it accepts connections (the watchdog is healthy before its upstream is up)."""
        if not replica.host:
            replica.host = self.address(replica.container)
            if not replica.host:
                return False
        if not healthy(replica.host, replica.port):
            return False
        return self._podman("exec", replica.container, "python", "-c", _UPSTREAM_PROBE,
                            timeout=10).returncode == 0

    def retry_start(self, stderr_tail: str) -> bool:
        return False

    def signal(self, replica: Replica, sig: int) -> None:
        """SIGTERM: the container's PID 1 (of-watchdog drains, then exits); SIGKILL: the
        container and the attached client."""
        if replica.process.poll() is not None and sig == signal.SIGKILL:
            return
        name = "KILL" if sig == signal.SIGKILL else signal.Signals(sig).name.removeprefix("SIG")
        self._podman("kill", "--signal", name, replica.container, timeout=15)
        if sig == signal.SIGKILL:
            try:
                os.killpg(replica.process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    # -- helpers -----------------------------------------------------------------------------

    def address(self, container: str) -> str:
        """The container's address on the stack's network ("" while it is not running)."""
        done = self._podman("inspect", "--format", "{{json .NetworkSettings.Networks}}",
                            container, timeout=10)
        if done.returncode:
            return ""
        try:
            networks = json.loads(done.stdout or "null") or {}
            return str((networks.get(self.settings.network) or {}).get("IPAddress") or "")
        except (ValueError, AttributeError):
            return ""

    def _podman(self, *args: str, timeout: float) -> subprocess.CompletedProcess[str]:
        try:
            return subprocess.run(["podman", *args], env=self._env, capture_output=True,
                                  text=True, stdin=subprocess.DEVNULL, timeout=timeout)
        except subprocess.TimeoutExpired:
            return subprocess.CompletedProcess(["podman", *args], 124, "", "timeout")
