"""memcached over the binary protocol through pylibmc (libmemcached, C): the `binary` extra.

Values are opaque bytes; the serializer refuses anything else, so nothing is ever pickled.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from emnist.store.kv import StoreError, Updater, options
from emnist.store.memcached import MAX_RETRIES, parse_servers

try:
    import pylibmc
except ImportError as e:  # the optional extra
    raise StoreError("memcached+binary:// needs pylibmc: pip install 'emnist[binary]'") from e


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
        self.client = _BytesOnly(servers, binary=True, behaviors={
            "cas": True, "tcp_nodelay": True, "ketama": True, "connect_timeout": timeout_ms,
            "receive_timeout": timeout_ms * 1000, "send_timeout": timeout_ms * 1000})

    def _call(self, op, *args, **kw):
        try:
            return op(*args, **kw)
        except pylibmc.Error as e:
            raise StoreError(f"memcached at {self.url}: {e}") from None

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        return self._call(self.client.get_multi, keys)

    def set_many(self, values: Mapping[str, bytes]) -> None:
        failed = self._call(self.client.set_multi, dict(values), time=self.ttl)
        if failed:
            raise StoreError(f"memcached refused to store {sorted(failed)[:5]}")

    def add(self, key: str, value: bytes) -> bool:
        return bool(self._call(self.client.add, key, value, time=self.ttl))

    def update_many(self, keys: Iterable[str], fn: Updater,
                    read: Iterable[str] = ()) -> tuple[int, dict[str, bytes]]:
        """gets + cas per key (pylibmc has no multi-gets); ``read`` in one get_multi."""
        read = list(read)
        first = self._call(self.client.get_multi, read) if read else {}
        retries = 0
        for key in keys:
            while True:
                value, token = self._call(self.client.gets, key)
                new = fn(key, value)
                if token is None:
                    ok = self._call(self.client.add, key, new, time=self.ttl)
                else:
                    ok = self._call(self.client.cas, key, new, token, time=self.ttl)
                if ok:
                    break
                retries += 1
                if retries > MAX_RETRIES:
                    raise StoreError(f"gave up after {retries} cas conflicts on {key}")
        return retries, first

    def delete_many(self, keys: Iterable[str]) -> None:
        self._call(self.client.delete_multi, list(keys))

    def close(self) -> None:
        self.client.disconnect_all()
