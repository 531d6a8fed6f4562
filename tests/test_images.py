"""The real function images: `emnist build --podman --base-images` runs the real faas-cli over
emnist.yml and the vendored template, and each image runs as OpenFaaS runs it: of-watchdog as
PID 1, a non-root user or an arbitrary UID, a read-only root filesystem with /tmp writable.

Containers run on a podman network this test creates (reached at their bridge addresses, no
port published on the host) and are removed afterwards.

emnist-setup carries the default data set (dataset-fashion-mnist, emnist.yml's build_args), and
extra wheels reach an image through the template's wheels/ folder and ADDITIONAL_PIP (checked
with a small wheel; `emnist build --torch` is the same path with torch's 190 MB CPU wheel, a
manual check: see the checks on TORCH_WHEEL below)."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import secrets
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from emnist.cli import main
from emnist.cluster.baseimages import BASE_IMAGES, container_env
from emnist.cluster.build import TORCH_WHEEL, WHEELS_DIR
from tests.handlers import project_copy
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


# -- the default data set in emnist-setup --------------------------------------------------------
FASHION_FILES = {"train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz",
                 "t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"}
# the package's default roots, as the handler imports it (index.py's site dir, function/)
LOAD_DEFAULT = ("import site, sys; site.addsitedir('/home/app/python'); "
                "sys.path.insert(0, '/home/app/function'); "
                "from emnist.data.datasets import load_dataset; d = load_dataset('fashion-mnist'); "
                "print(len(d.train_y), len(d.test_y), d.num_classes)")


def test_setup_image_holds_the_default_dataset_and_loads_it_by_default(images, podman_env):
    """`faas-cli invoke emnist-setup <<< '{}'` needs no data location: the default data set is
    where the code looks by default, readable by an arbitrary UID on a read-only root."""
    ls = podman(podman_env, "run", "--rm", "--entrypoint", "ls", images["emnist-setup"],
                "/usr/share/datasets/fashion-mnist")
    assert set(ls.split()) == FASHION_FILES
    out = podman(podman_env, "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--user", "4242:0",
                 "--entrypoint", "python", images["emnist-setup"], "-c", LOAD_DEFAULT)
    assert out.splitlines()[-1] == "60000 10000 10"
    # the apt step left no package lists, .deb files or apt caches in the layer
    left = podman(podman_env, "run", "--rm", "--entrypoint", "sh", images["emnist-setup"], "-c",
                  "ls /var/lib/apt/lists /var/cache/apt/archives /var/cache/apt | grep -v "
                  "-e '^lock$' -e '^partial$' -e '^archives$' -e ':$' -e '^$' || true")
    assert left == "", left


@pytest.mark.parametrize("fn", ["emnist-train", "emnist-grad"])
def test_only_setup_carries_the_dataset(fn, images, podman_env):
    done = subprocess.run(["podman", "run", "--rm", "--entrypoint", "ls", images[fn],
                           "/usr/share/datasets"], env=podman_env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode != 0 and "No such file" in done.stderr, done.stdout


# -- extra wheels (emnist build --wheel / --torch) ---------------------------------------------
PROBE = "emnist_probe"
PROBE_VERSION = "1.0+emnisttest"  # a local version: no index can serve it, only wheels/


def _make_wheel(folder: Path) -> Path:
    """A real (pure-Python) wheel, written without a build backend or an index."""
    dist = f"{PROBE}-{PROBE_VERSION}"
    files = {f"{PROBE}.py": f"VERSION = {PROBE_VERSION!r}\n",
             f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {PROBE}\n"
                                           f"Version: {PROBE_VERSION}\n",
             f"{dist}.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: tests\n"
                                        "Root-Is-Purelib: true\nTag: py3-none-any\n"}

    def digest(text: str) -> str:
        raw = hashlib.sha256(text.encode()).digest()
        return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()

    record = "".join(f"{name},sha256={digest(text)},{len(text.encode())}\n"
                     for name, text in files.items()) + f"{dist}.dist-info/RECORD,,\n"
    wheel = folder / f"{dist}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:  # fixed times: the same bytes every run, so the
        for name, text in {**files, f"{dist}.dist-info/RECORD": record}.items():  # layer caches
            z.writestr(zipfile.ZipInfo(name, date_time=(2020, 1, 1, 0, 0, 0)), text)
    return wheel


def test_shrinkwrap_puts_a_wheel_in_every_context_and_names_the_build_args(tmp_path):
    stack = project_copy(tmp_path / "project")
    wheel = _make_wheel(tmp_path)
    r = CliRunner().invoke(main, ["build", "--shrinkwrap", "-f", str(stack), "--wheel",
                                  str(wheel)])
    assert r.exit_code == 0, r.output
    arg = f"--build-arg ADDITIONAL_PIP=/tmp/wheels/{wheel.name}"
    for fn in FUNCTIONS:
        staged = stack.parent / "build" / fn / WHEELS_DIR / wheel.name
        assert staged.read_bytes() == wheel.read_bytes()
        line = next(x for x in r.output.splitlines() if x.startswith(f"{fn}: "))
        assert arg in line, line
        assert ("--build-arg ADDITIONAL_PACKAGE=dataset-fashion-mnist" in line) \
            == (fn == "emnist-setup"), line
    # a file that is not a wheel is refused before anything is built
    r = CliRunner().invoke(main, ["build", "--shrinkwrap", "-f", str(stack), "--wheel",
                                  str(stack)])
    assert r.exit_code == 1 and "not a wheel file" in r.output


def test_a_wheel_reaches_the_image_as_a_package_never_as_a_file(images, podman_env, tmp_path):
    """`emnist build --wheel` (what --torch does with torch's CPU wheel): the real faas-cli
    and podman install it from the template's wheels/ folder through ADDITIONAL_PIP; the image
    holds the package but no wheel, and the template folder is left as it was."""
    stack = project_copy(tmp_path / "project")
    wheels = stack.parent / "template" / "python3-http" / WHEELS_DIR
    before = sorted(p.name for p in wheels.iterdir())
    wheel = _make_wheel(tmp_path)
    tag = f"{TAG}-wheel"
    done = subprocess.run([sys.executable, "-m", "emnist.cli", "build", "-f", str(stack),
                           "--podman", "--filter", "emnist-grad", "--wheel", str(wheel),
                           "--tag", tag], env=podman_env, cwd=stack.parent,
                          capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert f"--build-arg ADDITIONAL_PIP=/tmp/wheels/{wheel.name}" in done.stderr
    assert sorted(p.name for p in wheels.iterdir()) == before
    image = f"docker.io/emnist/emnist-grad:{tag}"
    try:
        out = podman(podman_env, "run", "--rm", "--read-only", "--user", "4242:0",
                     "--entrypoint", "python", image, "-c",
                     f"import site; site.addsitedir('/home/app/python'); import {PROBE}; "
                     f"print({PROBE}.VERSION, {PROBE}.__file__)")
        assert out == f"{PROBE_VERSION} /home/app/python/{PROBE}.py"
        found = podman(podman_env, "run", "--rm", "--user", "0", "--entrypoint", "sh", image,
                       "-c",
                       f"find / -xdev -name '{PROBE}*.whl' -o -name '{WHEELS_DIR}' -path "
                       "'/tmp/*'")
        assert found == ""
    finally:
        podman(podman_env, "rmi", "-f", image, check=False)


def test_the_torch_wheel_fits_the_images_python(images, podman_env):
    """`emnist build --torch` installs TORCH_WHEEL (cp311, manylinux_2_28, x86_64): the
    image's pip must accept its tags (a base image on another Python or an older libc would
    fail the torch build, not this cheap check's absence)."""
    tag = "-".join(TORCH_WHEEL.removesuffix(".whl").split("-")[2:])
    out = podman(podman_env, "run", "--rm", "--entrypoint", "python", images["emnist-train"],
                 "-c", "from pip._vendor.packaging.tags import sys_tags; "
                       "print('\\n'.join(map(str, sys_tags())))")
    assert tag in out.splitlines(), tag
