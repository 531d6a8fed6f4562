"""``local://NAME``: an in-process KV (a dict under a lock) with the same contract as the
servers, for the node-local tier when no local memcached runs, and for tests of the tier."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from urllib.parse import urlsplit

from emnist.store.kv import Updater

_SPACES: dict[str, tuple[dict[str, bytes], threading.Lock]] = {}
_SPACES_LOCK = threading.Lock()


class LocalKV:
    def __init__(self, url: str) -> None:
        self.url = url
        name = urlsplit(url).netloc or "default"
        with _SPACES_LOCK:
            self.data, self.lock = _SPACES.setdefault(name, ({}, threading.Lock()))

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        with self.lock:
            return {k: self.data[k] for k in keys if k in self.data}

    def set_many(self, values: Mapping[str, bytes]) -> None:
        with self.lock:
            self.data.update(values)

    def add(self, key: str, value: bytes) -> bool:
        with self.lock:
            if key in self.data:
                return False
            self.data[key] = value
            return True

    def update_many(self, keys: Iterable[str], fn: Updater,
                    read: Iterable[str] = ()) -> tuple[int, dict[str, bytes]]:
        with self.lock:  # holding the lock makes every update atomic: no retries
            for k in keys:
                self.data[k] = fn(k, self.data.get(k))
            return 0, {k: self.data[k] for k in read if k in self.data}

    def delete_many(self, keys: Iterable[str]) -> None:
        with self.lock:
            for k in keys:
                self.data.pop(k, None)

    def close(self) -> None:
        pass
