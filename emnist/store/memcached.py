"""memcached through pymemcache: one server, or several with rendezvous hashing.

Thread-safe: each command borrows a client from a pool (pymemcache clients are not). Reads,
sets and deletes are retried once on a fresh connection when one broke (a restarted server);
cas and add never are: ``emnist.store.outcome`` settles a lost reply by reading the key back.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

import pymemcache.client.base
from pymemcache.client.base import Client
from pymemcache.client.hash import HashClient
from pymemcache.exceptions import MemcacheError, MemcacheUnexpectedCloseError

from emnist.store.iostats import IOStats, nbytes
from emnist.store.kv import StoreError, Updater, options
from emnist.store.outcome import MAX_CONFLICTS, Lost, add_once, cas_loop
from emnist.store.pool import Pool

MAX_RETRIES = MAX_CONFLICTS
# pymemcache reads values in RECV_SIZE pieces (4 KB): a 256 KB chunk took 64 recv calls and
# their joins. 64 KB pieces halve a full fetch (measured: 0.49 -> 0.30 ms for 333 KB, 4.5 ->
# 2.6 ms for 3.3 MB) and speed pushes up too; larger pieces gained nothing more.
RECV_SIZE = 64 * 1024
_BROKEN = (OSError, MemcacheUnexpectedCloseError)  # the connection, not the command, failed


def parse_servers(url: str) -> list[tuple[str, int]]:
    netloc = urlsplit(url).netloc
    servers = []
    for part in filter(None, netloc.split(",")):
        host, _, port = part.rpartition(":")
        if not host or not port.isdigit():
            raise StoreError(f"bad memcached server {part!r} in {url!r}: want host:port")
        servers.append((host.strip("[]"), int(port)))
    if not servers:
        raise StoreError(f"no memcached servers in {url!r}")
    return servers


class MemcachedKV:
    def __init__(self, url: str) -> None:
        pymemcache.client.base.RECV_SIZE = max(pymemcache.client.base.RECV_SIZE, RECV_SIZE)
        self.url = url
        opts = options(url)
        self.ttl = int(opts.get("ttl", 7 * 24 * 3600))
        timeout = float(opts.get("timeout", 10))
        servers = parse_servers(url)
        kw = dict(connect_timeout=timeout, timeout=timeout, no_delay=True, default_noreply=False)
        if len(servers) == 1:
            def make() -> Any:
                return Client(servers[0], **kw)
        else:  # a failed client is dropped, so HashClient never hides a dead server
            def make() -> Any:
                return HashClient(servers, retry_attempts=1, dead_timeout=1, **kw)
        self._pool: Pool[Any] = Pool(make, lambda c: c.close())
        self.io = IOStats()

    def _run(self, name: str, args: tuple, kw: dict) -> Any:
        c = self._pool.take()
        try:
            out = getattr(c, name)(*args, **kw)
        except _BROKEN:
            self._pool.drop(c, broken=True)
            raise
        except BaseException:
            self._pool.drop(c)
            raise
        self._pool.give(c)
        return out

    def _idempotent(self, name: str, *args: Any, **kw: Any) -> Any:
        """Reads, sets, deletes: safe to send again, once, on a fresh connection."""
        for attempt in (1, 2):
            try:
                return self._run(name, args, kw)
            except _BROKEN as e:
                if attempt == 2:
                    raise StoreError(f"memcached at {self.url} unreachable: {e!r}") from None
            except MemcacheError as e:
                raise StoreError(f"memcached at {self.url}: {e!r}") from None

    def _once(self, name: str, *args: Any, **kw: Any) -> Any:
        """cas and add: sent once; a broken connection is ``Lost`` (maybe executed)."""
        try:
            return self._run(name, args, kw)
        except _BROKEN:
            raise Lost from None
        except MemcacheError as e:
            raise StoreError(f"memcached at {self.url}: {e!r}") from None

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        got = self._idempotent("get_many", keys)
        self.io.trip(len(keys), received=nbytes(got))
        return got

    def set_many(self, values: Mapping[str, bytes]) -> None:
        failed = self._idempotent("set_many", dict(values), expire=self.ttl, noreply=False)
        self.io.trip(len(values), sent=nbytes(values))
        if failed:
            raise StoreError(f"memcached refused to store {sorted(failed)[:5]}")

    def add(self, key: str, value: bytes) -> bool:
        self.io.trip(1, sent=len(value))
        return add_once(key, value, self.url,
                        lambda: bool(self._once("add", key, value, expire=self.ttl,
                                                noreply=False)),
                        lambda: self._idempotent("get", key))

    def update_many(self, keys: Iterable[str], fn: Updater,
                    read: Iterable[str] = ()) -> tuple[int, dict[str, bytes]]:
        """gets + cas per key, retrying only the keys another writer changed meanwhile."""
        def gets(pending: list[str], extra: list[str]) -> tuple[dict, dict]:
            got = self._idempotent("gets_many", pending + extra)
            self.io.trip(len(pending) + len(extra), received=sum(len(v[0]) for v in got.values()))
            return got, {k: got[k][0] for k in extra if k in got}

        def write(key: str, new: bytes, token: Any) -> bool:
            self.io.trip(1, sent=len(new))
            if token is None:
                return bool(self._once("add", key, new, expire=self.ttl, noreply=False))
            return bool(self._once("cas", key, new, token, expire=self.ttl, noreply=False))

        return cas_loop(keys, fn, read, self.url, gets, write)

    def delete_many(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        self._idempotent("delete_many", keys, noreply=False)
        self.io.trip(0)

    def close(self) -> None:
        """Close idle connections; the handle stays usable (threads may still share it)."""
        self._pool.clear()
