"""memcached over the binary protocol through pylibmc (libmemcached, C): the `binary` extra.

Values are opaque bytes; the serializer refuses anything else, so nothing is ever pickled.
pylibmc clients are not thread-safe: each command borrows one from a pool. Retries follow the
text backend: reads, sets and deletes once more on a fresh connection; cas and add never
(``emnist.store.outcome``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from emnist.store.iostats import IOStats, nbytes
from emnist.store.kv import StoreError, Updater, options
from emnist.store.memcached import parse_servers
from emnist.store.outcome import Lost, add_once, cas_loop
from emnist.store.pool import Pool

try:
    import pylibmc
except ImportError as e:  # the optional extra
    raise StoreError("memcached+binary:// needs pylibmc: pip install 'emnist[binary]'") from e

# the command was refused (sending it again gives the same answer); any other error may be a
# broken connection after the server executed it
_REFUSED = (pylibmc.TooBig, pylibmc.BadKeyProvided, pylibmc.NotSupportedError, pylibmc.NotFound,
            pylibmc.DataExists)


class _BytesOnly(pylibmc.Client):
    def serialize(self, value):
        if not isinstance(value, bytes):
            raise TypeError(f"only bytes are stored, not {type(value).__name__}")
        return value, 0

    def deserialize(self, data, flags):
        if flags != 0:
            raise StoreError(f"value with flags {flags} was not written by emnist")
        return data


class BinaryMemcachedKV:
    def __init__(self, url: str) -> None:
        self.url = url
        opts = options(url)
        self.ttl = int(opts.get("ttl", 7 * 24 * 3600))
        timeout_ms = int(float(opts.get("timeout", 10)) * 1000)
        servers = [f"{h}:{p}" for h, p in parse_servers(url)]
        behaviors = {"cas": True, "tcp_nodelay": True, "ketama": True,
                     "connect_timeout": timeout_ms, "receive_timeout": timeout_ms * 1000,
                     "send_timeout": timeout_ms * 1000}
        self._pool: Pool[Any] = Pool(lambda: _BytesOnly(servers, binary=True, behaviors=behaviors),
                                     lambda c: c.disconnect_all())
        self.io = IOStats()

    def _run(self, name: str, args: tuple, kw: dict) -> Any:
        c = self._pool.take()
        try:
            out = getattr(c, name)(*args, **kw)
        except _REFUSED:
            self._pool.give(c)
            raise
        except pylibmc.Error:
            self._pool.drop(c, broken=True)
            raise
        except BaseException:
            self._pool.drop(c)
            raise
        self._pool.give(c)
        return out

    def _idempotent(self, name: str, *args: Any, **kw: Any) -> Any:
        for attempt in (1, 2):
            try:
                return self._run(name, args, kw)
            except _REFUSED as e:
                raise StoreError(f"memcached at {self.url}: {e}") from None
            except pylibmc.Error as e:
                if attempt == 2:
                    raise StoreError(f"memcached at {self.url}: {e}") from None

    def _once(self, name: str, *args: Any, **kw: Any) -> Any:
        try:
            try:
                return self._run(name, args, kw)
            except pylibmc.ServerDown:  # refused before sending: this client saw a failure
                return self._run(name, args, kw)  # a fresh one (the pool dropped it)
        except pylibmc.NotFound:  # a cas on a key deleted meanwhile: a conflict
            return False
        except _REFUSED as e:
            raise StoreError(f"memcached at {self.url}: {e}") from None
        except pylibmc.Error:
            raise Lost from None

    def _read(self, keys: list[str]) -> dict[str, bytes]:
        """get_multi, asking again for misses: pylibmc reports a connection that broke
        mid-read as misses (no error), and that client then fails loudly, so the second ask
        reaches a fresh one. A real miss costs one more round trip."""
        got = self._idempotent("get_multi", keys)
        if len(got) < len(keys):
            got.update(self._idempotent("get_multi", [k for k in keys if k not in got]))
        self.io.trip(len(keys), received=nbytes(got))
        return got

    def _gets(self, key: str) -> tuple[bytes | None, Any]:
        """A bytes key: pylibmc 1.6's gets frees a str key's encoding before using it, so
        under threads it may read another key (measured: ~10% wrong values, 3 threads)."""
        raw = key.encode()
        got = self._idempotent("gets", raw)
        self.io.trip(1, received=len(got[0] or b""))
        return got if got[0] is not None else self._idempotent("gets", raw)

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        return self._read(keys)

    def set_many(self, values: Mapping[str, bytes]) -> None:
        failed = self._idempotent("set_multi", dict(values), time=self.ttl)
        self.io.trip(len(values), sent=nbytes(values))
        if failed:
            raise StoreError(f"memcached refused to store {sorted(failed)[:5]}")

    def add(self, key: str, value: bytes) -> bool:
        return add_once(key, value, self.url,
                        lambda: bool(self._once("add", key, value, time=self.ttl)),
                        lambda: self._read([key]).get(key))

    def update_many(self, keys: Iterable[str], fn: Updater,
                    read: Iterable[str] = ()) -> tuple[int, dict[str, bytes]]:
        """gets + cas per key (pylibmc has no multi-gets); ``read`` in one get_multi."""
        def gets(pending: list[str], extra: list[str]) -> tuple[dict, dict]:
            others = self._read(extra) if extra else {}
            return {k: self._gets(k) for k in pending}, others

        def write(key: str, new: bytes, token: Any) -> bool:
            self.io.trip(1, sent=len(new))
            if token is None:
                return bool(self._once("add", key, new, time=self.ttl))
            return bool(self._once("cas", key, new, token, time=self.ttl))

        return cas_loop(keys, fn, read, self.url, gets, write)

    def delete_many(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self._idempotent("delete_multi", keys)
        self.io.trip(0)

    def close(self) -> None:
        """Close idle connections; the handle stays usable (threads may still share it)."""
        self._pool.clear()
