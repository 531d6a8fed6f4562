"""Redis through redis-py: MGET for fetches, WATCH/MULTI transactions for atomic updates.

Thread-safe: redis-py's client takes a pooled connection per command, and each transaction
holds one connection of its own. redis-py's own retries are off (its default changed between
versions: 0 from ``from_url``, 10 from ``Redis()`` in 8.x, and a connection error during EXEC
becomes a WatchError, so a transaction loop would run the push again). Here reads, sets and
deletes are retried once on a fresh connection; an add or EXEC whose reply was lost is settled
by reading the keys back (``emnist.store.outcome``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from emnist.store import outcome
from emnist.store.kv import StoreError, Updater, options, read_secret, redact
from emnist.store.outcome import Lost, OutcomeUnknown, Pending, add_once, unknown

MAX_RETRIES = outcome.MAX_CONFLICTS
_BROKEN = (redis.ConnectionError, redis.TimeoutError)


class RedisKV:
    atomic_many = True  # update_many is one WATCH/MULTI transaction over all its keys

    def __init__(self, url: str) -> None:
        self.url = redact(url)
        opts = options(url)
        self.ttl = int(opts.pop("ttl", 7 * 24 * 3600))
        kw = {}
        if "password_file" in opts:
            kw["password"] = read_secret(opts.pop("password_file"))
        base = url.split("?", 1)[0]
        timeout = float(opts.get("timeout", 10))
        self.r = redis.Redis.from_url(base, socket_timeout=timeout,
                                      socket_connect_timeout=timeout,
                                      retry=Retry(NoBackoff(), 0), **kw)

    def _idempotent(self, op, *args, **kw):
        for attempt in (1, 2):
            try:
                return op(*args, **kw)
            except redis.AuthenticationError as e:
                raise StoreError(f"redis at {self.url}: {e}") from None
            except _BROKEN as e:
                if attempt == 2:
                    raise StoreError(f"redis at {self.url} unreachable: {e}") from None
            except redis.RedisError as e:
                raise StoreError(f"redis at {self.url}: {e}") from None

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        values = self._idempotent(self.r.mget, keys)
        return {k: v for k, v in zip(keys, values, strict=True) if v is not None}

    def set_many(self, values: Mapping[str, bytes]) -> None:
        def send() -> None:
            pipe = self.r.pipeline(transaction=False)
            for k, v in values.items():
                pipe.set(k, v, ex=self.ttl)
            pipe.execute()
        self._idempotent(send)

    def add(self, key: str, value: bytes) -> bool:
        def attempt() -> bool:
            try:
                return bool(self.r.set(key, value, nx=True, ex=self.ttl))
            except _BROKEN:
                raise Lost from None
            except redis.RedisError as e:
                raise StoreError(f"redis at {self.url}: {e}") from None
        return add_once(key, value, self.url, attempt, lambda: self._idempotent(self.r.get, key))

    def update_many(self, keys: Iterable[str], fn: Updater,
                    read: Iterable[str] = ()) -> tuple[int, dict[str, bytes]]:
        """One transaction for all keys (WATCH and MGET in one round trip, then MULTI/SET/EXEC
        in another): run again whole when a watched key changed."""
        keys, read = list(keys), list(read)
        retries, broken = 0, 0
        unsure: list[Pending] | None = None  # the keys of a transaction whose EXEC reply was lost
        pool = self.r.connection_pool
        while True:
            conn = None
            try:
                conn = pool.get_connection()
                conn.send_packed_command(conn.pack_commands([("WATCH", *keys),
                                                             ("MGET", *keys, *read)]))
                conn.read_response()
                values = conn.read_response()
            except _BROKEN as e:
                if conn is not None:
                    conn.disconnect()
                    pool.release(conn)
                if unsure is not None:
                    raise OutcomeUnknown(unknown(keys, self.url, f"cannot be read back: {e}")
                                         ) from None
                broken += 1
                if broken == 2:
                    raise StoreError(f"redis at {self.url} unreachable: {e}") from None
                continue
            except redis.RedisError as e:
                if conn is not None:
                    conn.disconnect()
                    pool.release(conn)
                raise StoreError(f"redis at {self.url}: {e}") from None
            old, others = values[:len(keys)], values[len(keys):]
            got = {k: v for k, v in zip(read, others) if v is not None}
            try:
                if unsure is not None:  # one transaction: all keys ours, or all unchanged
                    states = {p.settle(v) for p, v in zip(unsure, old)}
                    if states == {"ours"}:  # our lost transaction did run: not repeated
                        self._unwatch(conn)
                        return retries, got
                    if states != {"again"}:
                        raise OutcomeUnknown(unknown(keys, self.url))
                new = [fn(k, v) for k, v in zip(keys, old, strict=True)]
            except BaseException:
                self._unwatch(conn)
                raise
            try:
                conn.send_packed_command(conn.pack_commands(
                    [("MULTI",), *(("SET", k, v, "EX", self.ttl) for k, v in zip(keys, new)),
                     ("EXEC",)]))
                for _ in range(len(keys) + 1):  # +OK, +QUEUED...
                    conn.read_response()
                result = conn.read_response()
            except _BROKEN:
                conn.disconnect()
                pool.release(conn)
                if unsure is None:
                    unsure = [Pending(v) for v in old]
                for p, v in zip(unsure, new):
                    p.written.append(v)
                if len(unsure[0].written) >= outcome.LOST_ATTEMPTS:
                    why = f"so were {outcome.LOST_ATTEMPTS - 1} more in a row"
                    raise OutcomeUnknown(unknown(keys, self.url, why)) from None
                continue
            except redis.RedisError as e:
                conn.disconnect()
                pool.release(conn)
                raise StoreError(f"redis at {self.url}: {e}") from None
            pool.release(conn)
            if result is not None:
                return retries, got
            retries += 1  # a watched key changed: EXEC did nothing
            if retries > MAX_RETRIES:
                raise StoreError(f"gave up after {retries} conflicts")

    def _unwatch(self, conn: Any) -> None:
        """Release a connection that is still watching keys (WATCH would carry over)."""
        try:
            conn.send_command("UNWATCH")
            conn.read_response()
        except redis.RedisError:
            conn.disconnect()
        self.r.connection_pool.release(conn)

    def delete_many(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if keys:
            self._idempotent(self.r.delete, *keys)

    def close(self) -> None:
        """Close idle connections; the handle stays usable (threads may still share it)."""
        self.r.connection_pool.disconnect(inuse_connections=False)
