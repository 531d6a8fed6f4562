"""The node-local tier in virtual time: ``emnist.store.tiered.TieredStore``.

One local server per node (the ``tier`` costs) holds each chunk as rows ``[params,
unsynced]``. A worker's push is the tier's cas loop adding its delta to both rows (and
returning row 0: the push that doubles as a fetch); its fetch reads row 0. Each worker has
a background syncer (a process, as the real thread): every ``sync_interval`` it takes the
unsynced rows (cas: row 1 -> 0), pushes them to the global store with a push that returns
the global vector, and merges it back (row 0 = global + what arrived since the take).
Closing stops the syncer and flushes once more. Documents go to the global store; a push
through the tier carries no progress note, so the worker writes its state document instead
(``Exchange._run`` with a tier).
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import numpy as np

from emnist.sim.engine import Sim, WorkerCtx
from emnist.sim.net import Node
from emnist.sim.store import SimKV, SimParams, Value

G = Generator[Any, Any, Any]


class SimTier:
    """One node's local server and its chunk rows."""

    def __init__(self, sim: Sim, glob: SimParams, node: Node) -> None:
        self.sim, self.g, self.node = sim, glob, node
        self.kv = SimKV(sim.loop, sim.net, sim.costs.tier, 1, f"tier{node.index}:")
        self.keys = [glob.key("tier", i) for i in range(len(glob.bounds))]
        fresh = glob.global_vector()
        for k, (a, b) in zip(self.keys, glob.bounds):
            self.kv.put_now(k, np.stack([fresh[a:b], np.zeros(b - a, np.float32)]))
        self.syncs = 0
        self.bytes_synced = 0

    def for_worker(self, ctx: WorkerCtx) -> TierView:
        return TierView(self, ctx)

    def update(self, node: Node, fn: Any, client_cpu: Any) -> G:
        """``local.update_many(keys, fn)``: gets, then cas per chunk, again on conflicts."""
        pending = list(self.keys)
        retries = 0
        while pending:
            got = yield from self.kv.get_many(node, pending)
            again = []
            for k in pending:
                v: Value = got[k]
                yield client_cpu(v.size)
                ok = yield from self.kv.cas(node, k, lambda cur, k=k: (fn(k, cur), cur.clock, 0),
                                            v.version)
                if ok is None:
                    again.append(k)
            retries += len(again)
            pending = again
        return retries


class TierView:
    """What one worker's ``TieredStore`` shows its training loop (duck-types SimParams)."""

    tiered = True

    def __init__(self, tier: SimTier, ctx: WorkerCtx) -> None:
        self.tier, self.ctx, self.sim = tier, ctx, tier.sim
        self.g = tier.g
        self.bounds, self.kv, self.key = self.g.bounds, self.g.kv, self.g.key
        self.index = {k: i for i, k in enumerate(tier.keys)}
        self._stop = False
        self._busy = False
        self._waiter: Any = None
        interval = self.sim.cfg.sync_interval or self.sim.costs["tier"]["sync_interval"]
        self.interval = interval
        self.started = False

    def put_doc(self, node: Node, name: str, obj: Any, size: int = 200) -> G:
        yield from self.g.put_doc(node, name, obj, size)

    def get_doc(self, node: Node, name: str) -> G:
        return (yield from self.g.get_doc(node, name))

    def _cpu(self, nbytes: int) -> Any:
        return self.sim.cpu(self.ctx.node, self.sim.client(decode=nbytes, encode=nbytes,
                                                           vector=nbytes))

    def fetch(self, node: Node, reader: Any) -> G:
        if not self.started:
            self.started = True
            self.sim.loop.spawn(self._syncer(), f"syncer-{self.ctx.w}")
        got = yield from self.tier.kv.get_many(node, self.tier.keys)
        for k, i in self.index.items():
            reader(i, got[k].data[0], got[k].clock)

    def push(self, node: Node, delta_of: Any, mode: str, reader: Any | None,
             chunks: Any, seen: Any, client_cpu: Any, also: Any = ()) -> G:
        chosen = set(range(len(self.bounds)) if chunks is None else chunks)

        def add(key: str, cur: Value) -> np.ndarray:
            i = self.index[key]
            if i not in chosen:
                return cur.data
            rows = cur.data + delta_of(i)  # both rows: params and unsynced
            if reader is not None:
                reader(i, rows[0], cur.clock + 1)
            return rows
        retries = yield from self.tier.update(node, add, client_cpu)
        if reader is not None:  # chunks not pushed: read back in the same round trip
            for k, i in self.index.items():
                if i not in chosen:
                    reader(i, self.tier.kv.values[k].data[0], self.tier.kv.values[k].clock)
        return retries, 0

    def sync_once(self, node: Node) -> G:
        n = self.g.num_params
        taken = np.zeros(n, dtype=np.float32)
        fresh = np.empty(n, dtype=np.float32)
        tier, bounds = self.tier, self.bounds

        def take(key: str, cur: Value) -> np.ndarray:
            a, b = bounds[self.index[key]]
            taken[a:b] = cur.data[1]
            rows = cur.data.copy()
            rows[1] = 0.0
            return rows
        yield from tier.update(node, take, self._cpu)

        def into(i: int, arr: np.ndarray, clock: int) -> None:
            a, b = bounds[i]
            fresh[a:b] = arr
        yield from self.g.push(node, lambda i: taken[bounds[i][0]:bounds[i][1]], "atomic",
                               into, None, None, self._cpu)

        def merge(key: str, cur: Value) -> np.ndarray:
            a, b = bounds[self.index[key]]
            rows = cur.data.copy()
            rows[0] = fresh[a:b] + rows[1]  # updates that arrived since the take stay local
            return rows
        yield from tier.update(node, merge, self._cpu)
        tier.syncs += 1
        tier.bytes_synced += 2 * taken.nbytes

    def _syncer(self) -> G:
        node = self.ctx.node
        while not self._stop:
            yield self.interval
            if self._stop:
                break
            self._busy = True
            yield from self.sync_once(node)
            self._busy = False
        if self._waiter is not None:
            p, self._waiter = self._waiter, None
            p.resume_at(p.loop.now)

    def close(self, node: Node) -> G:
        """Stop the syncer (waiting for a sync in progress), then flush once."""
        self._stop = True
        if self._busy:
            def wait(p: Any) -> None:
                self._waiter = p
            yield wait
        yield from self.sync_once(node)
