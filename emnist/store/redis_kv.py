"""Redis through redis-py: MGET for fetches, WATCH/MULTI transactions for atomic updates.

Thread-safe: redis-py's client takes a pooled connection per command, and each transaction
holds one connection of its own. redis-py's own retries are off (its default changed between
versions: 0 from ``from_url``, 10 from ``Redis()`` in 8.x, and a connection error during EXEC
becomes a WatchError, so a transaction loop would run the push again). Here reads, sets and
deletes are retried once on a fresh connection; an add or EXEC whose reply was lost is settled
by reading the keys back (``emnist.store.outcome``).

Big vectors (``update_batched``): still ONE transaction, moved in bounded round trips (WATCH
everything, MGET batch by batch, then MULTI, the SETs batch by batch, EXEC), so a push of
hundreds of MB keeps the all-or-nothing of a small one with bounded client memory; Redis
holds the queued SETs (one more copy of the vector, server side) until EXEC.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import redis
from crc32c import crc32c
from redis.backoff import NoBackoff
from redis.retry import Retry

from emnist.store import outcome
from emnist.store.iostats import IOStats, nbytes
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
        self.io = IOStats()

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
        self.io.trip(len(keys), received=nbytes(values))
        return {k: v for k, v in zip(keys, values, strict=True) if v is not None}

    def set_many(self, values: Mapping[str, bytes]) -> None:
        def send() -> None:
            pipe = self.r.pipeline(transaction=False)
            for k, v in values.items():
                pipe.set(k, v, ex=self.ttl)
            pipe.execute()
        self._idempotent(send)
        self.io.trip(len(values), sent=nbytes(values))

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
                self.io.trip(len(keys) + len(read), received=nbytes(values))
            except _BROKEN as e:
                broken = self._read_broke(conn, e, keys, unsure is not None, broken)
                continue
            except redis.RedisError as e:
                raise self._failed(conn, e) from None
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
                self.io.trip(len(keys), sent=nbytes(new))
            except _BROKEN:
                self._drop(conn)
                if unsure is None:
                    unsure = [Pending(v) for v in old]
                for p, v in zip(unsure, new):
                    p.written.append(v)
                self._lost_reply(keys, len(unsure[0].written))
                continue
            except redis.RedisError as e:
                raise self._failed(conn, e) from None
            pool.release(conn)
            if result is not None:
                return retries, got
            retries += 1  # a watched key changed: EXEC did nothing
            if retries > MAX_RETRIES:
                raise StoreError(f"gave up after {retries} conflicts")

    def _drop(self, conn: Any) -> None:
        """A connection in an unknown state (broken, or mid-transaction): closed, returned."""
        if conn is not None:
            conn.disconnect()
            self.r.connection_pool.release(conn)

    def _failed(self, conn: Any, e: Exception) -> StoreError:
        self._drop(conn)
        return StoreError(f"redis at {self.url}: {e}")

    def _read_broke(self, conn: Any, e: Exception, keys: list[str], settling: bool,
                    broken: int) -> int:
        """The connection broke before a transaction's writes: once is retried (a new
        connection), twice is unreachable; while settling a lost EXEC the outcome stays
        unknown (it cannot be read back). Returns the count of breaks."""
        self._drop(conn)
        if settling:
            raise OutcomeUnknown(unknown(keys, self.url, f"cannot be read back: {e}")) from None
        if broken + 1 == 2:
            raise StoreError(f"redis at {self.url} unreachable: {e}") from None
        return broken + 1

    def _lost_reply(self, keys: list[str], attempts: int) -> None:
        """EXEC's reply lost ``attempts`` times in a row: past the limit, unknown."""
        if attempts >= outcome.LOST_ATTEMPTS:
            why = f"so were {outcome.LOST_ATTEMPTS - 1} more in a row"
            raise OutcomeUnknown(unknown(keys, self.url, why)) from None

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
            self.io.trip(0)

    def update_batched(self, batches: list[list[str]], see: Callable[[str, bytes | None], None],
                       make: Callable[[str], bytes], read: Iterable[list[str]] = (),
                       see_read: Callable[[str, bytes | None], None] | None = None) -> int:
        """One WATCH/MULTI/EXEC transaction over every key of ``batches``, in bounded round
        trips; returns the retries.

        WATCH all keys, then MGET one batch at a time, each old value handed to ``see`` (the
        ``read`` batches' values to ``see_read``) and dropped; then MULTI, each batch's SETs
        (new values from ``make(key)``, asked for batch by batch after every ``see``) and
        EXEC. A watched key changed meanwhile: all of it again, so ``see`` must depend only
        on the old value. A lost reply after MULTI is settled like ``update_many``'s, by
        reading every key back and comparing checksums (crc32c: values carry a clock and
        their own checksum) with the old and the written values: all written (it ran, once:
        done), all old (it did not: again), anything else ``OutcomeUnknown``, not repeated.
        """
        keys = [k for b in batches for k in b]
        read = [list(b) for b in read]
        retries, broken, lost = 0, 0, 0
        written: list[set[int]] | None = None  # per key, once a reply after MULTI was lost
        old_crc: list[int | None] = []
        pool = self.r.connection_pool

        def mget(conn: Any, batch: list[str]) -> list[bytes | None]:
            conn.send_packed_command(conn.pack_commands([("MGET", *batch)]))
            values = conn.read_response()
            self.io.trip(len(batch), received=nbytes(values))
            return values

        while True:
            conn = pool.get_connection()
            try:
                conn.send_packed_command(conn.pack_commands([("WATCH", *keys)]))
                conn.read_response()
                self.io.trip(0)
                if written is not None:  # settle the lost one first
                    states, at = set(), 0
                    for batch in batches:
                        for v in mget(conn, batch):
                            crc = None if v is None else crc32c(v)
                            states.add("ours" if crc in written[at] else
                                       "again" if crc == old_crc[at] else "unknown")
                            at += 1
                    if states == {"ours"}:  # our lost transaction did run: not repeated
                        self._unwatch(conn)
                        return retries
                    if states != {"again"}:
                        raise OutcomeUnknown(unknown(keys, self.url))
                crcs: list[int | None] = []
                for batch in batches:
                    for k, v in zip(batch, mget(conn, batch), strict=True):
                        crcs.append(None if v is None else crc32c(v))
                        see(k, v)
                for batch in read:
                    for k, v in zip(batch, mget(conn, batch), strict=True):
                        see_read(k, v)
            except _BROKEN as e:
                broken = self._read_broke(conn, e, keys, written is not None, broken)
                continue
            except redis.RedisError as e:
                raise self._failed(conn, e) from None
            except BaseException:
                self._unwatch(conn)
                raise
            made: list[int | None] = [None] * len(keys)
            try:
                conn.send_packed_command(conn.pack_commands([("MULTI",)]))
                conn.read_response()
                at = 0
                for batch in batches:
                    sets, sent = [], 0
                    for k in batch:
                        v = make(k)
                        made[at] = crc32c(v)
                        sets.append(("SET", k, v, "EX", self.ttl))
                        sent += len(v)
                        at += 1
                    conn.send_packed_command(conn.pack_commands(sets))
                    del sets
                    for _ in batch:
                        conn.read_response()  # +QUEUED
                    self.io.trip(len(batch), sent=sent)
                conn.send_packed_command(conn.pack_commands([("EXEC",)]))
                result = conn.read_response()
                self.io.trip(0)
            except _BROKEN:
                self._drop(conn)
                if written is None:
                    written, old_crc = [set() for _ in keys], crcs
                for w, c in zip(written, made):
                    if c is not None:
                        w.add(c)
                lost += 1
                self._lost_reply(keys, lost)
                continue  # settled by reading back on the next pass
            except redis.RedisError as e:
                raise self._failed(conn, e) from None
            except BaseException:
                self._drop(conn)  # drops the MULTI and the WATCH
                raise
            pool.release(conn)
            if result is not None:
                return retries
            retries += 1  # a watched key changed: EXEC did nothing
            if retries > MAX_RETRIES:
                raise StoreError(f"gave up after {retries} conflicts")

    def close(self) -> None:
        """Close idle connections; the handle stays usable (threads may still share it)."""
        self.r.connection_pool.disconnect(inuse_connections=False)
