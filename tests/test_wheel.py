"""The package as a user installs it: `pip wheel .`, then the wheel into a fresh virtualenv that
cannot see this checkout, and the CLI run from a directory holding only the stack file and the
handlers (what a user keeps beside emnist.yml): `emnist --help`, `emnist sim run` (its cost
files are package data) and a one-worker `emnist train` on the local stack it starts."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.servers import ROOT, free_port


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("wheel")
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                            str(tmp / "dist"), str(ROOT)], capture_output=True, text=True,
                           timeout=600)
    assert built.returncode == 0, built.stderr[-2000:]
    (wheel,) = (tmp / "dist").glob("emnist-*.whl")
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True, timeout=300)
    pip = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", str(wheel)],
                         capture_output=True, text=True, timeout=900)
    assert pip.returncode == 0, pip.stderr[-2000:]
    return venv


def _emnist(venv: Path, cwd: Path, *args: str, env: dict | None = None,
            timeout: float = 300) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items()
             if k not in ("PYTHONPATH", "VIRTUAL_ENV", "STORE_URL", "OPENFAAS_URL")}
    clean["PATH"] = f"{venv / 'bin'}{os.pathsep}{clean['PATH']}"
    return subprocess.run([str(venv / "bin" / "emnist"), *args], cwd=cwd,
                          env={**clean, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout)


def test_the_installed_package_runs_without_the_checkout(installed, tmp_path):
    where = subprocess.run([str(installed / "bin" / "python"), "-c",
                            "import emnist, sys; print(emnist.__file__)"], cwd=tmp_path,
                           capture_output=True, text=True, check=True).stdout
    assert str(installed) in where and str(ROOT) not in where
    r = _emnist(installed, tmp_path, "--help")
    assert r.returncode == 0 and "Usage:" in r.stdout, r.stderr
    r = _emnist(installed, tmp_path, "sim", "run", "--workers", "2", "--dataset", "synthetic",
                "--iterations", "1")
    assert r.returncode == 0, r.stdout + r.stderr


def test_a_one_worker_run_from_the_installed_package(installed, tmp_path):
    """Only the stack file and the handlers beside it, as a user keeps them; the replicas
    import the installed package."""
    shutil.copy2(ROOT / "emnist.yml", tmp_path / "emnist.yml")
    shutil.copytree(ROOT / "functions", tmp_path / "functions")
    home = tmp_path / "home"
    gateway = f"http://127.0.0.1:{free_port()}"
    env = {"EMNIST_HOME": str(home), "TRAIN_REPLICAS": "1", "GRAD_REPLICAS": "1"}
    try:
        r = _emnist(installed, tmp_path, "--gateway", gateway, "train", "--workers", "1",
                    "--dataset", "synthetic", "--iterations", "2", "--target-accuracy", "0.5",
                    "--timeout", "240", env=env)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "reached target accuracy 0.5" in r.stdout, r.stdout
    finally:
        _emnist(installed, tmp_path, "--gateway", gateway, "down", env=env)
