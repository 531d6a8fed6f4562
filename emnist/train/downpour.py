"""Downpour SGD for one worker: train on the local shard, fetch every n_fetch minibatches, push
the accumulated update every n_push minibatches (Dean et al., 2012).

The worker keeps a local copy of the parameters; ``pending`` is what it learned since its last
push. After any fetch the local copy is ``global + pending``: nothing the worker learned is
dropped, and nothing is counted twice. A push that falls on a fetch step is also the fetch: the
store returns the sum it wrote.

With ``overlap``, each exchange runs on a background thread while the next minibatches
compute, as Downpour's own fetch/push threads did; its result is applied at the next exchange
step, so the local copy lags the store by one exchange interval at most. It is off by default:
on loopback the exchange is CPU (GIL) bound, and with as many workers as cores the thread
only contends (measured: 2 workers fell from ~135k to ~80k samples/s each). It is meant for
stores across a real network, where an exchange mostly waits.

Progress (``emnist.train.state.Progress``): a push that leaves nothing pending carries a
snapshot of the worker's state taken when its delta was handed over, and notes its progress
with it (``Lease.for_push``): in the push's own transaction on Redis (exactly once), right
after its chunks elsewhere (memcached has no multi-key atomicity: a kill in between repeats
that one push). A sparse push that leaves chunks pending notes nothing (those minibatches are
not all in the store yet); the pass end's flush leaves nothing pending. Through a node-local
tier a push only reaches the node, and its progress is saved by the next heartbeat (no global
round trip per push: what the tier is for).
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import numpy as np

from emnist.store import ParameterStore
from emnist.train.config import TrainConfig
from emnist.train.state import Progress, WorkerState, require_finite, stop_signal

STOP_CHECK_EVERY = 5  # exchanges between reads of the run's stop flag


def batch_order(n: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Minibatch start offsets in a fresh random order each pass; the shard itself is already
    a random permutation, so contiguous slices keep reads sequential and cheap."""
    return rng.permutation(np.arange(0, n - batch + 1, batch)) if n >= batch else np.zeros(1, int)


class Exchange:
    """The worker's traffic with the store: at most one exchange in flight.

    ``pending`` is never accumulated step by step: it is ``params - base``, where ``base`` is
    what the store already has of the local copy (the last fetched global vector, plus the
    chunks pushed since). That costs a few vector operations per exchange instead of one per
    minibatch. With ``overlap`` the exchange thread shares the store handle with the training
    thread (lease saves, checkpoints) and any tier syncer: every store backend is thread-safe.
    """

    def __init__(self, store: ParameterStore, cfg: TrainConfig, res: WorkerState,
                 params: np.ndarray, overlap: bool, progress: Progress | None = None) -> None:
        self.store, self.mode, self.res, self.progress = store, cfg.update, res, progress
        self.threshold, self.top_k = cfg.push_threshold, cfg.push_top_k
        self.n_push, self.n_fetch = cfg.n_push, cfg.n_fetch
        self.base = params.copy()  # params was just fetched: nothing pending
        self._sent = np.empty_like(params)  # the delta of the push in flight
        self._fresh = np.empty_like(params)  # the global vector an exchange brings back
        self._tmp = np.empty_like(params)
        self._pool = ThreadPoolExecutor(1, "exchange") if overlap else None
        self._job: Future | None = None
        self._count = 0
        self.stop: dict[str, Any] | None = None

    def pending(self, params: np.ndarray) -> np.ndarray:
        """What this worker learned that the store does not have yet (a scratch buffer)."""
        return np.subtract(params, self.base, out=self._tmp)

    def _select(self, params: np.ndarray) -> list[int] | None:
        """Sparse pushes: the chunks worth sending now (None: all of them)."""
        if not (self.threshold or self.top_k):
            return None
        p = self.pending(params)
        rms = [float(np.sqrt(np.dot(p[a:b], p[a:b]) / (b - a))) for a, b in self.store.bounds]
        chosen = [i for i, r in enumerate(rms) if r >= self.threshold]
        if self.top_k:
            chosen = sorted(chosen, key=lambda i: -rms[i])[: self.top_k]
        return chosen

    def _hand_over(self, params: np.ndarray, chunks: list[int] | None) -> np.ndarray:
        """The delta to send; the sent chunks count as the store's from now on, the others
        stay pending."""
        np.subtract(params, self.base, out=self._sent)
        require_finite(self._sent, "the update to push is")  # before base moves: none sent
        if chunks is None:
            self.base[:] = params
        else:
            for i in chunks:
                a, b = self.store.bounds[i]
                self.base[a:b] = params[a:b]
        return self._sent

    def _snapshot(self, fetch: bool) -> dict[str, Any] | None:
        """The state as of a push that sends everything (its own counts included; its
        retries and clock are only known after it, and wait for the next snapshot)."""
        if self.progress is None:
            return None
        doc = self.progress.take()
        nbytes = self._fresh.nbytes
        doc["pushes"] += 1
        doc["bytes_pushed"] += nbytes
        if fetch:
            doc["fetches"] += 1
            doc["bytes_fetched"] += nbytes
        return doc

    def _run(self, push: np.ndarray | None, fetch: bool, check_stop: bool,
             chunks: list[int] | None = None, doc: dict[str, Any] | None = None) -> None:
        nbytes = self._fresh.nbytes
        if push is not None:
            out = self._fresh if fetch else None
            plain = isinstance(self.store, ParameterStore)  # not a node-local tier
            noted = self.progress.for_push(doc) if doc is not None and plain else None
            if noted is not None:
                stats = self.store.push(push, self.mode, out=out, chunks=chunks,
                                        check=noted[0], note=noted[1])
                self.progress.landed(doc)
            else:
                stats = self.store.push(push, self.mode, out=out, chunks=chunks)
                if doc is not None and plain:  # no lease to note it with: saved now
                    self.progress.write(doc)
                elif doc is not None:  # a tier: no global round trip per push, the next
                    self.progress.landed(doc)  # heartbeat saves it
            self.res.pushes += 1
            self.res.bytes_pushed += stats.bytes_sent
            self.res.bytes_skipped += stats.bytes_skipped
            self.res.push_retries += stats.retries
            self.res.clock = max(self.res.clock, stats.clock)
        elif fetch:
            clock, _ = self.store.fetch(self._fresh)
            self.res.clock = max(self.res.clock, clock)
        if fetch:
            self.res.fetches += 1
            self.res.bytes_fetched += nbytes
        if check_stop:
            self.stop = stop_signal(self.store.get_doc("stop"))

    def settle(self, params: np.ndarray) -> None:
        """Wait for the exchange in flight; make the local copy ``fetched global + pending``."""
        if self._job is None:
            return
        job, self._job = self._job, None
        if job.result():  # re-raises the exchange's error here, on the training thread
            self._apply(params)

    def _apply(self, params: np.ndarray) -> None:
        """The fetched global vector arrived: params = fresh + what is still pending."""
        np.add(self._fresh, self.pending(params), out=params)
        self.base, self._fresh = self._fresh, self.base

    def start(self, params: np.ndarray, push: bool, fetch: bool) -> None:
        self.settle(params)
        sent, chunks, doc = None, None, None
        if push:
            chunks = self._select(params)
            if chunks is None or chunks:
                sent = self._hand_over(params, chunks)
                if chunks is None or len(chunks) == len(self.store.bounds):
                    doc = self._snapshot(fetch)  # nothing left pending: a progress point
        if sent is None and not fetch:
            return
        self._count += 1
        check = self._count % STOP_CHECK_EVERY == 0

        def job() -> bool:
            self._run(sent, fetch, check, chunks, doc)
            return fetch

        if self._pool is None:
            if job():
                self._apply(params)
        else:
            self._job = self._pool.submit(job)

    def flush(self, params: np.ndarray) -> None:
        """Settle, then push what is pending and fetch, synchronously (iteration end)."""
        self.settle(params)
        sent = None if np.array_equal(params, self.base) else self._hand_over(params, None)
        self._run(sent, True, True, None, None if sent is None else self._snapshot(True))
        params[:] = self._fresh
        self.base, self._fresh = self._fresh, self.base

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)

    # -- the worker loop's interface ------------------------------------------------------
    def after_step(self, params: np.ndarray, step: int, offset: int) -> None:
        push, fetch = step % self.n_push == 0, step % self.n_fetch == 0
        if push or fetch:
            self.start(params, push, fetch)

    def end_iteration(self, params: np.ndarray) -> None:
        self.flush(params)

    def in_sync(self, step: int) -> bool:
        """After ``after_step(step)``: may a time slice end here and the next call resume
        exactly as this one would have gone on? True where this step pushed everything and
        fetched synchronously (the local copy is then the store's, bit for bit); anywhere
        when nothing is exact anyway (overlapped or sparse exchanges)."""
        if self._pool is not None or self.threshold or self.top_k:
            return True
        return step % self.n_push == 0 and step % self.n_fetch == 0

    @property
    def synced(self) -> bool:
        """After ``end_iteration``: everything this worker learned is in the store."""
        return True

