"""Redis through redis-py: MGET for fetches, WATCH/MULTI transactions for atomic updates."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import redis

from emnist.store.kv import StoreError, Updater, options, read_secret, redact

MAX_RETRIES = 10_000


class RedisKV:
    def __init__(self, url: str) -> None:
        self.url = redact(url)
        opts = options(url)
        self.ttl = int(opts.pop("ttl", 7 * 24 * 3600))
        kw = {}
        if "password_file" in opts:
            kw["password"] = read_secret(opts.pop("password_file"))
        base = url.split("?", 1)[0]
        self.r = redis.Redis.from_url(base, socket_timeout=float(opts.get("timeout", 10)), **kw)

    def _call(self, op, *args, **kw):
        try:
            return op(*args, **kw)
        except redis.RedisError as e:
            raise StoreError(f"redis at {self.url}: {e}") from None

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        values = self._call(self.r.mget, keys)
        return {k: v for k, v in zip(keys, values, strict=True) if v is not None}

    def set_many(self, values: Mapping[str, bytes]) -> None:
        pipe = self.r.pipeline(transaction=False)
        for k, v in values.items():
            pipe.set(k, v, ex=self.ttl)
        self._call(pipe.execute)

    def add(self, key: str, value: bytes) -> bool:
        return bool(self._call(self.r.set, key, value, nx=True, ex=self.ttl))

    def update_many(self, keys: Iterable[str], fn: Updater,
                    read: Iterable[str] = ()) -> tuple[int, dict[str, bytes]]:
        """One transaction for all keys: retried whole when any watched key changed."""
        keys, read, retries = list(keys), list(read), 0
        with self.r.pipeline() as pipe:
            while True:
                try:
                    pipe.watch(*keys)
                    values = pipe.mget(keys + read)
                    old, others = values[:len(keys)], values[len(keys):]
                    new = [fn(k, v) for k, v in zip(keys, old, strict=True)]
                    pipe.multi()
                    for k, v in zip(keys, new, strict=True):
                        pipe.set(k, v, ex=self.ttl)
                    pipe.execute()
                    return retries, {k: v for k, v in zip(read, others) if v is not None}
                except redis.WatchError:
                    retries += 1
                    if retries > MAX_RETRIES:
                        raise StoreError(f"gave up after {retries} conflicts") from None
                except redis.RedisError as e:
                    raise StoreError(f"redis at {self.url}: {e}") from None

    def delete_many(self, keys: Iterable[str]) -> None:
        keys = list(keys)
        if keys:
            self._call(self.r.delete, *keys)

    def close(self) -> None:
        self.r.close()
