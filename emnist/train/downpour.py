"""Downpour SGD for one worker: train on the local shard, fetch every n_fetch minibatches, push
the accumulated update every n_push minibatches (Dean et al., 2012).

The worker keeps a local copy of the parameters and ``pending``, what it learned since its last
push. After any fetch the local copy is ``global + pending``: nothing the worker learned is
dropped, and nothing is counted twice. A push that falls on a fetch step is also the fetch: the
store returns the sum it wrote.

With ``overlap``, each exchange runs on a background thread while the next minibatches
compute, as Downpour's own fetch/push threads did; its result is applied at the next exchange
step, so the local copy lags the store by one exchange interval at most. It is off by default:
on loopback the exchange is CPU (GIL) bound, and with as many workers as cores the thread
only contends (measured: 2 workers fell from ~135k to ~80k samples/s each). It is meant for
stores across a real network, where an exchange mostly waits.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from emnist.model import MLP, MLPShape, to_float
from emnist.store import ParameterStore
from emnist.train.config import TrainConfig

Report = Callable[[dict[str, Any]], None]
STOP_CHECK_EVERY = 5  # exchanges between reads of the run's stop flag


@dataclass
class WorkerResult:
    worker_id: int
    iterations: int
    seconds: float
    hostname: str
    accuracy: float
    reached: bool
    stop_reason: str
    samples: int = 0
    train_seconds: float = 0.0  # time inside the minibatch loop (compute + fetch + push)
    samples_per_s: float = 0.0
    fetches: int = 0
    pushes: int = 0
    bytes_fetched: int = 0
    bytes_pushed: int = 0
    bytes_skipped: int = 0  # delta bytes a sparse push kept back (pushed later)
    push_retries: int = 0
    curve: list[list[float]] = field(default_factory=list)  # [seconds, iteration, accuracy]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary_line(self) -> str:
        """The original's result line; existing log greps depend on its exact shape."""
        return (f"Worker ID: {self.worker_id} Iterations: {self.iterations} "
                f"Time: {self.seconds:.3f} Name: {self.hostname}")


def batch_order(n: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Minibatch start offsets in a fresh random order each pass; the shard itself is already
    a random permutation, so contiguous slices keep reads sequential and cheap."""
    return rng.permutation(np.arange(0, n - batch + 1, batch)) if n >= batch else np.zeros(1, int)


class Exchange:
    """The worker's traffic with the store: at most one exchange in flight.

    Only this object touches the store while training runs, so a client that is not
    thread-safe is never used from two threads at once.
    """

    def __init__(self, store: ParameterStore, cfg: TrainConfig, res: WorkerResult,
                 num_params: int, overlap: bool) -> None:
        self.store, self.mode, self.res = store, cfg.update, res
        self.threshold, self.top_k = cfg.push_threshold, cfg.push_top_k
        self.pending = np.zeros(num_params, dtype=np.float32)
        self._spare = np.zeros(num_params, dtype=np.float32)
        self._fresh = np.empty(num_params, dtype=np.float32)
        self._pool = ThreadPoolExecutor(1, "exchange") if overlap else None
        self._job: Future | None = None
        self._count = 0
        self.stop: dict[str, Any] | None = None

    def _select(self) -> list[int] | None:
        """Sparse pushes: the chunks worth sending now (None: all of them)."""
        if not (self.threshold or self.top_k):
            return None
        p = self.pending
        rms = [float(np.sqrt(np.dot(p[a:b], p[a:b]) / (b - a))) for a, b in self.store.bounds]
        chosen = [i for i, r in enumerate(rms) if r >= self.threshold]
        if self.top_k:
            chosen = sorted(chosen, key=lambda i: -rms[i])[: self.top_k]
        return chosen

    def _hand_over(self, chunks: list[int] | None) -> np.ndarray:
        """Swap the pending buffer out for sending; chunks not sent stay pending."""
        sent, self.pending, self._spare = self.pending, self._spare, self.pending
        self.pending[:] = 0.0
        if chunks is not None:
            for i in set(range(len(self.store.bounds))) - set(chunks):
                a, b = self.store.bounds[i]
                self.pending[a:b] = sent[a:b]
        return sent

    def _run(self, push: np.ndarray | None, fetch: bool, check_stop: bool,
             chunks: list[int] | None = None) -> None:
        nbytes = self._fresh.nbytes
        if push is not None:
            stats = self.store.push(push, self.mode, out=self._fresh if fetch else None,
                                    chunks=chunks)
            self.res.pushes += 1
            self.res.bytes_pushed += stats.bytes_sent
            self.res.bytes_skipped += stats.bytes_skipped
            self.res.push_retries += stats.retries
        elif fetch:
            self.store.fetch(self._fresh)
        if fetch:
            self.res.fetches += 1
            self.res.bytes_fetched += nbytes
        if check_stop:
            self.stop = self.store.get_doc("stop")

    def settle(self, params: np.ndarray) -> None:
        """Wait for the exchange in flight; make the local copy ``fetched global + pending``."""
        if self._job is None:
            return
        job, self._job = self._job, None
        if job.result():  # re-raises the exchange's error here, on the training thread
            np.add(self._fresh, self.pending, out=params)

    def start(self, params: np.ndarray, push: bool, fetch: bool) -> None:
        self.settle(params)
        sent, chunks = None, None
        if push:  # hand the accumulated update over and keep accumulating in the spare
            chunks = self._select()
            if chunks is None or chunks:
                sent = self._hand_over(chunks)
        if sent is None and not fetch:
            return
        self._count += 1
        check = self._count % STOP_CHECK_EVERY == 0

        def job() -> bool:
            self._run(sent, fetch, check, chunks)
            return fetch

        if self._pool is None:
            job()
            self._job = _done(fetch)
            self.settle(params)
        else:
            self._job = self._pool.submit(job)

    def flush(self, params: np.ndarray) -> None:
        """Settle, then push what is pending and fetch, synchronously (iteration end)."""
        self.settle(params)
        sent = self._hand_over(None) if self.pending.any() else None
        self._run(sent, True, True)
        params[:] = self._fresh

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True)


def _done(value: Any) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f


def run_worker(cfg: TrainConfig, store: ParameterStore, shard_x: np.ndarray, shard_y: np.ndarray,
               test_x: np.ndarray, test_y: np.ndarray, shape: MLPShape, *, worker_id: int,
               hostname: str, report: Report | None = None) -> WorkerResult:
    """Train until the target accuracy, the iteration limit, or another worker's stop signal."""
    start = time.perf_counter()
    model = MLP(shape, cfg.dropout_percent, seed=cfg.seed + 1 + worker_id)
    rng = np.random.default_rng(cfg.seed + 1 + worker_id)
    res = WorkerResult(worker_id, 0, 0.0, hostname, 0.0, False, "iterations")
    params = np.empty(shape.num_params, dtype=np.float32)
    store.fetch(params)
    res.fetches, res.bytes_fetched = 1, params.nbytes
    ex = Exchange(store, cfg, res, shape.num_params, cfg.overlap)
    alpha, step, bs = np.float32(cfg.alpha), 0, cfg.batch_size
    try:
        for iteration in range(1, cfg.iterations + 1):
            t0 = time.perf_counter()
            for at in batch_order(len(shard_y), bs, rng):
                _, grad = model.loss_and_grad(params, to_float(shard_x[at:at + bs]),
                                              shard_y[at:at + bs])
                grad *= -alpha
                params += grad
                ex.pending += grad
                step += 1
                res.samples += bs
                push, fetch = step % cfg.n_push == 0, step % cfg.n_fetch == 0
                if push or fetch:
                    ex.start(params, push, fetch)
                if ex.stop:
                    break
            ex.flush(params)
            res.train_seconds += time.perf_counter() - t0
            res.iterations = iteration
            res.accuracy = model.accuracy(params, test_x, test_y)
            now = time.perf_counter() - start
            res.curve.append([round(now, 4), iteration, res.accuracy])
            if report:
                report({"worker_id": worker_id, "iteration": iteration,
                        "accuracy": res.accuracy, "seconds": now, "hostname": hostname,
                        "done": False})
            if res.accuracy >= cfg.target_accuracy:
                res.reached, res.stop_reason = True, "target"
                store.put_doc("stop", {"worker_id": worker_id, "iteration": iteration,
                                       "accuracy": res.accuracy, "reason": "target"})
                break
            if ex.stop:
                res.stop_reason = (f"stopped by worker {ex.stop.get('worker_id')} "
                                   f"({ex.stop.get('reason')})")
                break
    finally:
        ex.close()
    res.seconds = time.perf_counter() - start
    res.samples_per_s = res.samples / res.train_seconds if res.train_seconds else 0.0
    return res
