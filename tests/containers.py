"""Real containers for tests: podman's environment here, the function images built by the
real faas-cli (`emnist build --podman --base-images`, base images from the cache after the first
build on a machine), and `emnist up --runtime container` stacks on their own networks."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from emnist.cluster.baseimages import container_env
from emnist.gateway.client import GatewayClient
from emnist.gateway.podman import STACK_LABEL
from tests.openfaas_tools import OPENFAAS_BIN
from tests.servers import ROOT, free_port

FUNCTIONS = ("emnist-setup", "emnist-train", "emnist-grad")
TAG = "emnist-test"


def podman_env(shim_dir: Path) -> dict[str, str]:
    """The environment podman and faas-cli need here (containers.conf, docker -> podman,
    the real of-watchdog for the base image)."""
    env = {**os.environ, "EMNIST_FWATCHDOG": str(OPENFAAS_BIN / "fwatchdog"),
           "PATH": f"{OPENFAAS_BIN}{os.pathsep}{os.environ['PATH']}"}
    return container_env(env, shim_dir)


def podman(env: Mapping[str, str], *args: str, check: bool = True) -> str:
    done = subprocess.run(["podman", *args], env=dict(env), capture_output=True, text=True,
                          timeout=300)
    assert not check or done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


def build_images(env: Mapping[str, str], tag: str = TAG) -> dict[str, str]:
    """All three images, built by the real faas-cli (layers cached by podman)."""
    done = subprocess.run([sys.executable, "-m", "emnist.cli", "build", "--podman",
                           "--base-images", "--tag", tag], env=dict(env), cwd=ROOT,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    names = {fn: f"docker.io/emnist/{fn}:{tag}" for fn in FUNCTIONS}
    assert f"built {', '.join(names.values())}" in done.stdout, done.stdout[-2000:]
    return names


@dataclass
class ContainerStack:
    url: str
    network: str
    env: dict[str, str]  # what `emnist` commands against this stack run with
    gw: GatewayClient

    def emnist(self, *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "emnist.cli", "--gateway", self.url, *args],
                              env=self.env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)

    def containers(self, function: str | None = None) -> list[dict]:
        """`podman inspect` of this stack's running containers (of one function)."""
        filters = ["--filter", f"label={STACK_LABEL}={self.network}"]
        if function:
            filters += ["--filter", f"label=faas_function={function}"]
        ids = podman(self.env, "ps", "-q", *filters).split()
        return json.loads(podman(self.env, "inspect", *ids)) if ids else []

    def address(self, name: str) -> str:
        """A container's address on the stack's network (reachable from this host)."""
        nets = json.loads(podman(self.env, "inspect", "--format",
                                 "{{json .NetworkSettings.Networks}}", name))
        return nets[self.network]["IPAddress"]

    @property
    def store_url(self) -> str:
        """The stack's memcached, as this host reaches it (its bridge address)."""
        return f"memcached://{self.address(self.network + '-memcached')}:11211"


@contextmanager
def container_stack(base_env: Mapping[str, str], home: Path,
                    *up_args: str, **env: str) -> Iterator[ContainerStack]:
    """`emnist up --runtime container` on a free port with its own EMNIST_HOME; `emnist down`
    after, which must leave none of its containers."""
    port = free_port()
    full = {**base_env, "EMNIST_HOME": str(home), "TAG": TAG, **env}
    full.pop("STORE_URL", None)
    stack = ContainerStack(f"http://127.0.0.1:{port}", f"emnist-{port}", full,
                           GatewayClient(f"http://127.0.0.1:{port}"))
    try:
        up = stack.emnist("up", "--runtime", "container", *up_args)
        assert up.returncode == 0, up.stdout + up.stderr
        yield stack
    finally:
        down = stack.emnist("down")
        left = podman(full, "ps", "-aq", "--filter", f"label={STACK_LABEL}={stack.network}")
        assert down.returncode == 0 and not left, (down.stdout, down.stderr, left)
