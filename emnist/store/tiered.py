"""A node-local tier in front of the global store, synchronised in the background.

The training loop fetches from and pushes to the local tier at loopback (or in-process) speed;
a thread pushes the tier's unsynchronised updates to the global store every ``sync_interval``
seconds and pulls the global vector back (the original's "local with synchronisation in the
background"). Several workers on one node may share one local memcached.

Each local chunk is one value holding two rows, ``[params, unsynced]``, so a worker's push
(both rows += delta) and the syncer's take (unsynced -> 0) are each one atomic update: nothing
is lost or sent twice, whichever worker's syncer runs. After a sync the local params are
``global + unsynced``. ``close()`` stops the thread and flushes: nothing pending is lost when
a worker ends normally; updates taken by a syncer that dies mid-push are lost (one interval).
"""

from __future__ import annotations

import threading
from collections.abc import Iterable
from typing import Any

import numpy as np

from emnist.store import codec
from emnist.store.kv import KV, StoreError
from emnist.store.params import MODES, MissingState, ParameterStore, PushStats


class TieredStore:
    """Duck-types ``ParameterStore`` for the training loop (fetch, push, documents)."""

    def __init__(self, global_kv: KV, local_kv: KV, run_id: str,
                 sync_interval: float = 0.05) -> None:
        self.g = ParameterStore(global_kv, run_id)  # both KVs are thread-safe: the syncer
        self.local = local_kv  # and the training thread use them directly
        self.interval = sync_interval
        self.run_id = run_id
        self.syncs, self.bytes_synced = 0, 0
        self._error: BaseException | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- what the training loop sees ------------------------------------------------------
    @property
    def bounds(self) -> list[tuple[int, int]]:
        return self.g.bounds

    @property
    def num_params(self) -> int | None:
        return self.g.num_params

    def attach(self) -> dict[str, Any]:
        layout = self.g.attach()
        self.keys = [self.g.key("tier", i) for i in range(len(self.g.keys))]
        fresh = np.empty(self.g.num_params, dtype=np.float32)
        self.g.fetch(fresh)
        for k, (a, b) in zip(self.keys, self.bounds):  # first worker on the node seeds it
            self.local.add(k, codec.encode(np.stack([fresh[a:b], np.zeros(b - a, np.float32)])))
        self._thread = threading.Thread(target=self._loop, name="tier-sync", daemon=True)
        self._thread.start()
        return layout

    def fetch(self, out: np.ndarray, docs: tuple[str, ...] = ()) -> tuple[int, dict[str, Any]]:
        self._check()
        got = self.local.get_many(self.keys)
        clock = self._rows_into(out, got, range(len(self.keys)))
        return clock, (self.g.get_docs(list(docs)) if docs else {})

    def push(self, delta: np.ndarray, mode: str = "atomic", out: np.ndarray | None = None,
             chunks: Iterable[int] | None = None) -> PushStats:
        self._check()
        if mode not in MODES:
            raise ValueError(f"update mode must be one of {MODES}, got {mode!r}")
        chosen = sorted(set(range(len(self.keys)) if chunks is None else chunks))
        others = [i for i in range(len(self.keys)) if i not in set(chosen)]
        index = {self.keys[i]: self.bounds[i] for i in chosen}

        def add(key: str, old: bytes | None) -> bytes:
            a, b = index[key]
            d = self._decode(key, old, b - a)
            rows = d.array + delta[a:b]  # both rows: params and unsynced
            if out is not None:
                out[a:b] = rows[0]
            return codec.encode(rows, d.clock + 1)

        read = [self.keys[i] for i in others] if out is not None else []
        retries, got = self.local.update_many(list(index), add, read=read)
        if read:
            self._rows_into(out, got, others)
        sent = 4 * sum(b - a for a, b in index.values())
        return PushStats(bytes_sent=sent, bytes_skipped=4 * self.g.num_params - sent,
                         retries=retries)

    def put_doc(self, name: str, obj: Any) -> None:
        self.g.put_doc(name, obj)

    def put_docs(self, docs: dict[str, Any]) -> None:
        self.g.put_docs(docs)

    def get_doc(self, name: str) -> Any | None:
        return self.g.get_doc(name)

    def get_docs(self, names: list[str]) -> dict[str, Any]:
        return self.g.get_docs(names)

    def close(self) -> None:
        """Stop the syncer and flush what is still unsynchronised to the global store."""
        if self._thread is None:
            return
        self._stop.set()
        self._thread.join()
        self._thread = None
        self._check()
        self.sync_once()

    # -- the syncer -----------------------------------------------------------------------
    def sync_once(self) -> None:
        """Take the tier's unsynced updates, add them to the global store, pull it back."""
        local, glob = self.local, self.g
        n = glob.num_params
        taken = np.zeros(n, dtype=np.float32)
        index = dict(zip(self.keys, self.bounds))

        def take(key: str, old: bytes | None) -> bytes:
            a, b = index[key]
            d = self._decode(key, old, b - a)
            taken[a:b] = d.array[1]
            rows = d.array.copy()
            rows[1] = 0.0
            return codec.encode(rows, d.clock)

        local.update_many(self.keys, take)
        fresh = np.empty(n, dtype=np.float32)
        glob.push(taken, out=fresh)  # an all-zero push still returns the global vector

        def merge(key: str, old: bytes | None) -> bytes:
            a, b = index[key]
            d = self._decode(key, old, b - a)
            rows = d.array.copy()
            rows[0] = fresh[a:b] + rows[1]  # updates that arrived since the take stay local
            return codec.encode(rows, d.clock)

        local.update_many(self.keys, merge)
        self.syncs += 1
        self.bytes_synced += 2 * taken.nbytes

    def _loop(self) -> None:
        try:
            while not self._stop.wait(self.interval):
                self.sync_once()
        except BaseException as e:  # surfaced on the training thread by _check()
            self._error = e

    def _check(self) -> None:
        if self._error is not None:
            raise StoreError(f"tier sync failed: {self._error}") from self._error

    def _decode(self, key: str, value: bytes | None, n: int) -> codec.Decoded:
        if value is None:
            raise MissingState(f"local tier chunk {key} missing from {self.local.url}")
        return codec.decode(key, value, dtype=np.float32, shape=(2, n))

    def _rows_into(self, out: np.ndarray, got: dict[str, bytes], chunks: Iterable[int]) -> int:
        clock = None
        for i in chunks:
            (a, b), k = self.bounds[i], self.keys[i]
            d = self._decode(k, got.get(k), b - a)
            out[a:b] = d.array[0]
            clock = d.clock if clock is None else min(clock, d.clock)
        return int(clock or 0)
