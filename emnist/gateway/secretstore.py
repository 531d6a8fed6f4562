"""The local provider's secrets: a directory of files (0600) and a per-function mount of them.

``/system/secrets`` stores each secret as one file under the gateway's state directory. A
replica sees only the secrets its function lists: they are copied into a private directory per
function, named to the replica by ``$EMNIST_SECRETS_DIR`` (what ``/var/openfaas/secrets`` is on
OpenFaaS), and kept up to date when a secret changes. The gateway's own credentials are the
built-in secrets ``basic-auth-user``/``basic-auth-password``: never stored, never listed, given
only to functions that ask for them.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

from emnist.secrets import valid_secret_name

__all__ = ["BUILTIN_AUTH", "MAX_VALUE", "SecretStore", "SecretStoreError", "ensure_secret"]

BUILTIN_AUTH = ("basic-auth-user", "basic-auth-password")
MAX_VALUE = 64 * 1024  # what emnist.secrets.read_secret reads at most


class SecretStoreError(ValueError):
    """A refused secrets operation; ``status`` is the HTTP answer (400, 404, 409)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


def _write_private(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically, readable by the owner only."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.chmod(tmp, 0o600)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def ensure_secret(root: str | os.PathLike[str], name: str, make: Callable[[], bytes]) -> bool:
    """Store the secret ``name`` in ``root`` (a gateway's secrets directory) with the value
    ``make()`` unless it exists; True when created. Never overwrites (a key that sealed
    stored documents must outlive restarts), never leaves a partial file."""
    if not valid_secret_name(name) or name in BUILTIN_AUTH:
        raise SecretStoreError(400, "name: not a secret name a stack may create")
    path = Path(root) / name
    if path.is_file():
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    os.chmod(path.parent, 0o700)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(make())
        os.link(tmp, path)  # fails if another process created it first: theirs is kept
        return True
    except FileExistsError:
        return False
    finally:
        Path(tmp).unlink(missing_ok=True)


class SecretStore:
    """Secrets in ``root`` (created 0700); mounts in a private temporary directory."""

    def __init__(self, root: str | os.PathLike[str],
                 builtins: Mapping[str, str] | None = None) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root, 0o700)
        self.builtins = {k: v.encode() for k, v in (builtins or {}).items()}
        self._mounts_root = Path(tempfile.mkdtemp(prefix="emnist-gw-secrets-"))
        self._mounts: dict[str, tuple[Path, list[str]]] = {}
        self._lock = threading.RLock()

    # -- the API's operations ----------------------------------------------------------------

    def names(self) -> list[str]:
        """Stored secret names, sorted (built-ins are not listed, as on OpenFaaS)."""
        with self._lock:
            return sorted(p.name for p in self.root.iterdir()
                          if p.is_file() and valid_secret_name(p.name))

    def exists(self, name: str) -> bool:
        """True for a stored secret and for the built-in names (a deploy may list those)."""
        return name in BUILTIN_AUTH or (valid_secret_name(name) and (self.root / name).is_file())

    def create(self, name: str, value: bytes) -> None:
        self._check(name, value)
        with self._lock:
            if (self.root / name).exists():
                raise SecretStoreError(409, f"secret {name} already exists")
            _write_private(self.root / name, value)
            self._refresh(name)

    def replace(self, name: str, value: bytes) -> None:
        self._check(name, value)
        with self._lock:
            if not (self.root / name).is_file():
                raise SecretStoreError(404, f"secret {name} not found")
            _write_private(self.root / name, value)
            self._refresh(name)

    def delete(self, name: str) -> None:
        if not valid_secret_name(name) or name in BUILTIN_AUTH:
            raise SecretStoreError(404, "secret not found")
        with self._lock:
            try:
                (self.root / name).unlink()
            except FileNotFoundError:
                raise SecretStoreError(404, f"secret {name} not found") from None
            self._refresh(name)

    # -- mounts ------------------------------------------------------------------------------

    def mount(self, function: str, names: Iterable[str]) -> Path:
        """A directory holding exactly ``names`` (those that exist) for ``function``'s replicas."""
        wanted = sorted(set(names))
        with self._lock:
            path = self._mounts_root / function
            path.mkdir(mode=0o700, exist_ok=True)
            self._mounts[function] = (path, wanted)
            for old in path.iterdir():
                if old.name not in wanted:
                    old.unlink(missing_ok=True)
            for name in wanted:
                self._copy(name, path)
            return path

    def unmount(self, function: str) -> None:
        with self._lock:
            entry = self._mounts.pop(function, None)
            if entry is not None:
                shutil.rmtree(entry[0], ignore_errors=True)

    def close(self) -> None:
        """Remove every mount (the stored secrets stay)."""
        with self._lock:
            self._mounts.clear()
            shutil.rmtree(self._mounts_root, ignore_errors=True)

    # -- internals ---------------------------------------------------------------------------

    def _check(self, name: str, value: bytes) -> None:
        if not valid_secret_name(name):
            raise SecretStoreError(400, "name: a secret name is lowercase letters, digits, '-' "
                                        "and '.' (at most 253)")
        if name in BUILTIN_AUTH:
            raise SecretStoreError(400, f"name: {name} is provided by the gateway (its own "
                                        "credentials) and cannot be set")
        if len(value) > MAX_VALUE:
            raise SecretStoreError(400, f"value: larger than {MAX_VALUE} bytes")

    def _value(self, name: str) -> bytes | None:
        if name in BUILTIN_AUTH:
            return self.builtins.get(name)
        try:
            return (self.root / name).read_bytes()
        except OSError:
            return None

    def _copy(self, name: str, mount: Path) -> None:
        value = self._value(name)
        if value is None:
            (mount / name).unlink(missing_ok=True)
        else:
            _write_private(mount / name, value)

    def _refresh(self, name: str) -> None:
        for path, names in self._mounts.values():
            if name in names:
                self._copy(name, path)
