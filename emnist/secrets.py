"""OpenFaaS secrets, read by name from the secrets mount (never by a caller-chosen path).

On OpenFaaS a function's secrets are files under ``/var/openfaas/secrets/<name>``; the local
gateway mounts a per-function directory and names it in ``$EMNIST_SECRETS_DIR`` (a provider
setting a deploy cannot change). A name is a Kubernetes secret name, so it can never be a path.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

__all__ = ["DEFAULT_SECRETS_DIR", "SECRETS_DIR_ENV", "SecretError", "read_secret",
           "secrets_dir", "valid_secret_name"]

SECRETS_DIR_ENV = "EMNIST_SECRETS_DIR"
DEFAULT_SECRETS_DIR = "/var/openfaas/secrets"
MAX_SECRET_BYTES = 64 * 1024
# Kubernetes secret names are DNS-1123 subdomains: no '/', no '..', nothing path-like.
_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


class SecretError(ValueError):
    """A secret name that is not a name, or a secret that is not mounted."""


def valid_secret_name(name: object) -> bool:
    return isinstance(name, str) and len(name) <= 253 and bool(_NAME.match(name))


def secrets_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    return Path(env.get(SECRETS_DIR_ENV) or DEFAULT_SECRETS_DIR)


def read_secret(name: str, env: Mapping[str, str] | None = None) -> str:
    """The secret ``name`` (stripped), from the secrets mount; SecretError names only the name."""
    if not valid_secret_name(name):
        raise SecretError(f"{name!r} is not a secret name (lowercase letters, digits, '-', '.')"
                          if isinstance(name, str) and len(name) < 100 else
                          "not a secret name (lowercase letters, digits, '-', '.')")
    path = secrets_dir(env) / name
    try:
        with open(path, "rb") as f:
            data = f.read(MAX_SECRET_BYTES + 1)
    except OSError:
        raise SecretError(f"secret {name} is not mounted in this function") from None
    if len(data) > MAX_SECRET_BYTES:
        raise SecretError(f"secret {name} is larger than {MAX_SECRET_BYTES} bytes")
    return data.decode("utf-8", "replace").strip()
