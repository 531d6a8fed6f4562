"""The cluster around container replicas (`emnist up --runtime container`): what Kubernetes and
the OpenFaaS chart would give the functions, on one podman network.

- the network itself, created for the stack and removed with it (no port published on the host);
- memcached and Redis containers answering as ``memcached.openfaas-fn`` and
  ``redis.openfaas-fn`` (network aliases, as the Services in deploy/k8s);
- ``gateway.openfaas:8080``: a relay container that forwards to the local gateway's unix
  socket (mounted into it), so replicas call the gateway by its cluster name while the gateway
  itself still listens on loopback only.

The images come from Debian's packages (:data:`INFRA_RECIPE`, built once and cached like the
base images). Everything carries the label ``io.emnist.stack=<network>``, so `emnist down`
(and a crashed gateway's next start) removes exactly this stack's containers.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from pathlib import Path

from emnist.gateway.podman import STACK_LABEL

from .baseimages import BaseImageError, Recipe, _run, ensure_base_images

__all__ = ["INFRA_IMAGE", "ContainerStackError", "infra_up", "missing_images", "network_name",
           "remove_stack", "socket_path"]

INFRA_IMAGE = "localhost/emnist-infra:bookworm"
INFRA_PACKAGES = ("memcached", "redis-server", "socat", "ca-certificates")
SOCKET_MOUNT = "/run/emnist"
SOCKET_NAME = "gateway.sock"


class ContainerStackError(RuntimeError):
    pass


def _make_infra(tmp: Path, env: Mapping[str, str]) -> None:
    if shutil.which("mmdebstrap", path=env.get("PATH")) is None:
        raise BaseImageError("mmdebstrap is not installed (`apt-get install mmdebstrap`)")
    mirror = env.get("EMNIST_DEBIAN_MIRROR", "http://deb.debian.org/debian")
    rootfs = tmp / "rootfs.tar"
    _run(["mmdebstrap", "--variant=minbase", "--include=" + ",".join(INFRA_PACKAGES),
          '--customize-hook=rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*',
          "bookworm", str(rootfs), f"deb {mirror} bookworm main"], env,
         "mmdebstrap of the infra image")
    _run(["podman", "import", "--change", "ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin",
          str(rootfs), INFRA_IMAGE], env, "podman import")


INFRA_RECIPE = Recipe(INFRA_IMAGE, "emnist-infra-bookworm.tar", _make_infra)


def network_name(port: int) -> str:
    """The stack's network (and label): one per gateway port, so two stacks never mix."""
    return f"emnist-{port}"


def _podman(env: Mapping[str, str], *args: str, check: bool = True,
            timeout: float = 120) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(["podman", *args], env=dict(env), capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, timeout=timeout)
    if check and done.returncode:
        tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
        raise ContainerStackError(f"podman {args[0]} failed: " + " | ".join(tail))
    return done


def missing_images(images: list[str], env: Mapping[str, str]) -> list[str]:
    """The function images that are not in podman's store (build them first)."""
    return [i for i in images
            if _podman(env, "image", "exists", i, check=False).returncode != 0]


def remove_stack(network: str, env: Mapping[str, str]) -> list[str]:
    """Remove every container labelled with this stack, then its network; what it removed."""
    done = []
    ids = _podman(env, "ps", "-aq", "--filter", f"label={STACK_LABEL}={network}",
                  check=False).stdout.split()
    if ids:
        _podman(env, "rm", "-f", "-t", "2", *ids, check=False)
        done.append(f"removed {len(ids)} containers of {network}")
    if _podman(env, "network", "exists", network, check=False).returncode == 0:
        _podman(env, "network", "rm", "-f", network, check=False)
        done.append(f"removed network {network}")
    return done


def infra_up(network: str, socket_dir: Path, env: Mapping[str, str], *,
             memcached_mb: int = 256, echo: Callable[[str], None] = print) -> list[str]:
    """Create the network and start memcached, Redis and the gateway relay on it (after
    removing what a previous stack of this name left). Returns what it did."""
    done = ensure_base_images(env, echo, (INFRA_RECIPE,))
    remove_stack(network, env)
    _podman(env, "network", "create", "--label", f"{STACK_LABEL}={network}", network)
    base = ["run", "-d", "--rm", "--network", network, "--label", f"{STACK_LABEL}={network}",
            "--pull", "never"]
    _podman(env, *base, "--name", f"{network}-memcached", "--network-alias",
            "memcached.openfaas-fn", INFRA_IMAGE, "memcached", "-u", "nobody", "-m",
            str(memcached_mb), "-p", "11211", "-I", "1m")
    _podman(env, *base, "--name", f"{network}-redis", "--network-alias", "redis.openfaas-fn",
            INFRA_IMAGE, "redis-server", "--bind", "0.0.0.0", "--protected-mode", "no",
            "--save", "", "--appendonly", "no")
    _podman(env, *base, "--name", f"{network}-gateway", "--network-alias", "gateway.openfaas",
            "--volume", f"{socket_dir.resolve()}:{SOCKET_MOUNT}", INFRA_IMAGE, "socat",
            "TCP-LISTEN:8080,fork,reuseaddr", f"UNIX-CONNECT:{SOCKET_MOUNT}/{SOCKET_NAME}")
    return [*done, f"network {network}: memcached.openfaas-fn, redis.openfaas-fn, "
            "gateway.openfaas (relay)"]


def socket_path(state_dir: Path, network: str) -> Path:
    """Where the gateway listens for the relay: a 0700 directory of its own (the relay
    mounts the directory, nothing else of the state)."""
    d = state_dir / f"{network}.sock.d"
    d.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(d, 0o700)
    return d / SOCKET_NAME
