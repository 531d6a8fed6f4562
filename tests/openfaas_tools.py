"""The real OpenFaaS tools for tests: run faas-cli 0.18.12 (built from its public source, in
../shared/openfaas/bin) with a private config directory, and get (rc, stdout, stderr) back.

A missing binary fails the test loudly (CI has it beside the checkout); set ``EMNIST_FAAS_CLI``
to use another one.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OPENFAAS_BIN = ROOT.parent / "shared" / "openfaas" / "bin"
# faas-cli reads these; a test must never inherit the developer's gateway or login.
_CLEARED = ("OPENFAAS_URL", "OPENFAAS_PASSWORD", "OPENFAAS_USER", "OPENFAAS_CONFIG",
            "OPENFAAS_TEMPLATE_URL", "OPENFAAS_PREFIX", "STORE_URL")


def faas_cli_path() -> Path:
    """The faas-cli binary (fails the test when it is not there)."""
    path = Path(os.environ.get("EMNIST_FAAS_CLI") or OPENFAAS_BIN / "faas-cli")
    if not os.access(path, os.X_OK):
        pytest.fail(f"faas-cli not found at {path}: the real OpenFaaS tools are expected in "
                    "../shared/openfaas/bin (see its README.md), or set EMNIST_FAAS_CLI")
    return path


def faas_cli(*args: str, config_dir: Path, gateway: str | None = None,
             env: Mapping[str, str] | None = None, stdin: str | None = None,
             cwd: Path = ROOT, timeout: float = 120) -> tuple[int, str, str]:
    """Run ``faas-cli ARGS`` (``--gateway`` added when given) with ``OPENFAAS_CONFIG`` in
    ``config_dir``; returns (exit code, stdout, stderr)."""
    full_env = {k: v for k, v in os.environ.items() if k not in _CLEARED}
    full_env["OPENFAAS_CONFIG"] = str(config_dir)
    full_env.update(env or {})
    argv = [str(faas_cli_path()), *args]
    if gateway is not None:
        argv += ["--gateway", gateway]
    proc = subprocess.run(argv, cwd=cwd, env=full_env, input=stdin, capture_output=True,
                          text=True, timeout=timeout)
    return proc.returncode, proc.stdout, proc.stderr


def faas_login(config_dir: Path, gateway: str, password: str, user: str = "admin") -> None:
    """``faas-cli login`` (the password on stdin), asserting it succeeded."""
    rc, out, err = faas_cli("login", "--username", user, "--password-stdin",
                            config_dir=config_dir, gateway=gateway, stdin=password)
    assert rc == 0, f"faas-cli login failed: {out}{err}"
