"""The small key-value contract every backend meets, and the URL that picks a backend.

Backends move opaque bytes (already carrying the codec header); what the bytes mean is the
parameter store's business. ``update_many`` is the one atomic primitive: a read-modify-write
per key that never loses a concurrent writer's change (memcached gets/cas, Redis WATCH/MULTI);
it also reads the ``read`` keys in its first round trip and returns (retries, their values).

Every backend is thread-safe (one handle serves all of a process's threads: ``shared_kv``),
and none repeats a write whose reply was lost (``emnist.store.outcome``). An updater may run
more than once per key (conflicts, a lost reply), so it must depend only on the old value.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Protocol
from urllib.parse import parse_qs, urlsplit

Updater = Callable[[str, "bytes | None"], bytes]

# The store a function uses when its environment names none (TrainConfig's default, and the
# store a ``store:`` data location falls back to): the local stack's memcached.
DEFAULT_STORE_URL = "memcached://127.0.0.1:11211"


class StoreError(RuntimeError):
    """The store could not be reached or refused an operation."""


class KV(Protocol):
    url: str  # with any password removed: safe to log

    def get_many(self, keys: list[str]) -> dict[str, bytes]: ...
    def set_many(self, values: Mapping[str, bytes]) -> None: ...
    def add(self, key: str, value: bytes) -> bool: ...
    def update_many(self, keys: Iterable[str], fn: Updater,
                    read: Iterable[str] = ()) -> tuple[int, dict[str, bytes]]: ...
    def delete_many(self, keys: Iterable[str]) -> None: ...
    def close(self) -> None: ...


def redact(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    netloc = f"{parts.username or ''}:***@{host}" + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def read_secret(name: str) -> str:
    """A store password from the OpenFaaS secret ``name`` (a name, never a path)."""
    from emnist.secrets import SecretError
    from emnist.secrets import read_secret as read

    try:
        return read(name)
    except SecretError as e:
        raise StoreError(f"password_file: {e}") from None


def options(url: str) -> dict[str, str]:
    return {k: v[-1] for k, v in parse_qs(urlsplit(url).query).items()}


def open_kv(url: str) -> KV:
    """``memcached://h:p[,h:p...]``, ``memcached+binary://...`` (pylibmc) or
    ``redis://[:password@]h:p/db``; options (ttl, timeout, password_file) as a query."""
    scheme = urlsplit(url).scheme
    if scheme == "memcached":
        from emnist.store.memcached import MemcachedKV
        return MemcachedKV(url)
    if scheme == "redis":
        from emnist.store.redis_kv import RedisKV
        return RedisKV(url)
    if scheme == "local":
        from emnist.store.local_kv import LocalKV
        return LocalKV(url)
    if scheme == "memcached+binary":
        from emnist.store.binary_kv import BinaryMemcachedKV
        return BinaryMemcachedKV(url)
    raise StoreError(f"unknown store URL scheme {scheme!r} in {redact(url)!r}: "
                     "use memcached://host:port[,host:port] or redis://[:password@]host:port/db")
