"""The real function images: `emnist build --podman --base-images` runs the real faas-cli over
emnist.yml and the vendored template, and each image runs as OpenFaaS runs it: of-watchdog as
PID 1, a non-root user or an arbitrary UID, a read-only root filesystem with /tmp writable.

Containers run on a podman network this test creates (reached at their bridge addresses, no
port published on the host) and are removed afterwards."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from emnist.cluster.baseimages import BASE_IMAGES, container_env
from tests.openfaas_tools import OPENFAAS_BIN

ROOT = Path(__file__).resolve().parents[1]
FUNCTIONS = ("emnist-setup", "emnist-train", "emnist-grad")
TAG = "emnist-test"


@pytest.fixture(scope="module")
def podman_env(tmp_path_factory):
    env = {**os.environ, "EMNIST_FWATCHDOG": str(OPENFAAS_BIN / "fwatchdog"),
           "PATH": f"{OPENFAAS_BIN}{os.pathsep}{os.environ['PATH']}"}
    return container_env(env, tmp_path_factory.mktemp("shim"))


def podman(env, *args: str, check: bool = True) -> str:
    done = subprocess.run(["podman", *args], env=env, capture_output=True, text=True,
                          timeout=300)
    assert not check or done.returncode == 0, done.stderr[-2000:]
    return done.stdout.strip()


@pytest.fixture(scope="module")
def images(podman_env):
    """Build all three images once for this module (base images from the cache after the
    first run on a machine)."""
    done = subprocess.run([sys.executable, "-m", "emnist.cli", "build", "--podman",
                           "--base-images", "--tag", TAG], env=podman_env, cwd=ROOT,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    names = {fn: f"docker.io/emnist/{fn}:{TAG}" for fn in FUNCTIONS}
    assert f"built {', '.join(names.values())}" in done.stdout
    return names


@pytest.fixture(scope="module")
def network(podman_env):
    name = "emnist-test-" + secrets.token_hex(3)
    podman(podman_env, "network", "create", name)
    yield name
    podman(podman_env, "network", "rm", "-f", name, check=False)


def test_the_base_images_exist_under_the_templates_names(images, podman_env):
    for image in BASE_IMAGES:
        assert subprocess.run(["podman", "image", "exists", image], env=podman_env).returncode \
            == 0, image


def test_images_run_non_root_with_the_app_home(images, podman_env):
    out = podman(podman_env, "run", "--rm", "--entrypoint", "sh", images["emnist-train"],
                 "-c", "id -un; echo $HOME; test -d /home/app && stat -c %U /home/app/function")
    assert out.splitlines() == ["app", "/home/app", "app"]


def _wait_ready(env, name: str, url: str, deadline: float) -> None:
    """of-watchdog's /_/health, then the handler's own server (of-watchdog answers 500 while
    the Python upstream is still importing, as a pod does before its first request)."""
    while True:
        try:
            healthy = requests.get(f"{url}/_/health", timeout=2).status_code == 200
        except requests.ConnectionError:
            healthy = False
        if healthy and subprocess.run(
                ["podman", "exec", name, "python", "-c",
                 "import socket; socket.create_connection(('127.0.0.1', 5000), 1)"],
                env=env, capture_output=True).returncode == 0:
            return
        assert time.monotonic() < deadline, f"{name} never became ready"
        time.sleep(0.2)


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_each_image_serves_as_any_uid_on_a_read_only_root(fn, images, podman_env, network):
    """OpenShift-style random UID, readonly_root_filesystem: the handler still answers (a
    request error is a 4xx JSON message, not the generic 500 of a failed cache write)."""
    name = f"{network}-{fn}"
    podman(podman_env, "run", "-d", "--name", name, "--network", network, "--read-only",
           "--tmpfs", "/tmp", "--user", "4242:0", "-e", "store_url=memcached://nowhere:1",
           images[fn])
    try:
        ip = podman(podman_env, "inspect", name, "--format",
                    "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}")
        url = f"http://{ip}:8080"
        _wait_ready(podman_env, name, url, time.monotonic() + 60)
        pid1 = podman(podman_env, "exec", name, "cat", "/proc/1/comm")
        assert pid1 == "fwatchdog"
        assert podman(podman_env, "exec", name, "id", "-u") == "4242"
        r = requests.post(url, data=json.dumps({"no_such_field": 1}), timeout=30)
        assert 400 <= r.status_code < 500, (r.status_code, r.text)
        assert r.json()["error"].startswith("no_such_field: "), r.text
        wrote = podman(podman_env, "exec", name, "sh", "-c",
                       "touch /home/app/x 2>&1 || echo refused")
        assert "refused" in wrote  # the root filesystem really is read-only
    finally:
        podman(podman_env, "rm", "-f", name, check=False)
