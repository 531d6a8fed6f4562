"""Downpour SGD for one worker: train on the local shard, fetch every n_fetch minibatches, push
the accumulated update every n_push minibatches (Dean et al., 2012).

The worker keeps a local copy of the parameters; between fetches it applies its own updates to
that copy and accumulates them, so a push sends exactly what the worker learned since the
last push and nothing is counted twice.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from emnist.model import MLP, MLPShape, to_float
from emnist.store import ParameterStore
from emnist.train.config import TrainConfig


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
    push_retries: int = 0
    curve: list[list[float]] = field(default_factory=list)  # [seconds, iteration, accuracy]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary_line(self) -> str:
        """The original's result line; existing log greps depend on its exact shape."""
        return (f"Worker ID: {self.worker_id} Iterations: {self.iterations} "
                f"Time: {self.seconds:.3f} Name: {self.hostname}")


Report = Callable[[dict[str, Any]], None]
STOP_CHECK_EVERY = 5  # fetches between reads of the run's stop flag


def batch_order(n: int, batch: int, rng: np.random.Generator) -> np.ndarray:
    """Minibatch start offsets in a fresh random order each pass; the shard itself is already
    a random permutation, so contiguous slices keep reads sequential and cheap."""
    return rng.permutation(np.arange(0, n - batch + 1, batch)) if n >= batch else np.zeros(1, int)


def run_worker(cfg: TrainConfig, store: ParameterStore, shard_x: np.ndarray, shard_y: np.ndarray,
               test_x: np.ndarray, test_y: np.ndarray, shape: MLPShape, *, worker_id: int,
               hostname: str, report: Report | None = None) -> WorkerResult:
    """Train until the target accuracy, the iteration limit, or another worker's stop signal."""
    start = time.perf_counter()
    model = MLP(shape, cfg.dropout_percent, seed=cfg.seed + 1 + worker_id)
    rng = np.random.default_rng(cfg.seed + 1 + worker_id)
    params = np.empty(shape.num_params, dtype=np.float32)
    pending = np.zeros_like(params)  # updates not pushed yet
    nbytes = params.nbytes
    res = WorkerResult(worker_id, 0, 0.0, hostname, 0.0, False, "iterations")
    store.fetch(params)
    res.fetches, res.bytes_fetched = 1, nbytes
    step, unpushed, stop = 0, 0, None
    alpha = np.float32(cfg.alpha)

    def push(fetch: bool) -> None:
        """Push pending updates; when a fetch is due too, the push's result is the fetch."""
        nonlocal unpushed
        stats = store.push(pending, cfg.update, out=params if fetch else None)
        pending[:] = 0.0
        res.pushes += 1
        res.bytes_pushed += stats.bytes_sent
        res.push_retries += stats.retries
        unpushed = 0
        if fetch:
            res.fetches += 1
            res.bytes_fetched += nbytes

    def fetch() -> None:
        store.fetch(params)
        np.add(params, pending, out=params)  # keep what this worker learned since its push
        res.fetches += 1
        res.bytes_fetched += nbytes

    for iteration in range(1, cfg.iterations + 1):
        t0 = time.perf_counter()
        for at in batch_order(len(shard_y), cfg.batch_size, rng):
            x = to_float(shard_x[at : at + cfg.batch_size])
            y = shard_y[at : at + cfg.batch_size]
            _, grad = model.loss_and_grad(params, x, y)
            grad *= -alpha
            params += grad
            pending += grad
            step, unpushed = step + 1, unpushed + 1
            res.samples += len(y)
            due_push, due_fetch = step % cfg.n_push == 0, step % cfg.n_fetch == 0
            if due_push:
                push(fetch=due_fetch)
            elif due_fetch:
                fetch()
            if due_fetch and step % (cfg.n_fetch * STOP_CHECK_EVERY) == 0:
                stop = store.get_doc("stop")
            if stop:
                break
        if unpushed:
            push(fetch=True)
        else:
            fetch()
        stop = stop or store.get_doc("stop")
        res.train_seconds += time.perf_counter() - t0
        res.iterations = iteration
        res.accuracy = model.accuracy(params, test_x, test_y)
        now = time.perf_counter() - start
        res.curve.append([round(now, 4), iteration, res.accuracy])
        if report:
            report({"worker_id": worker_id, "iteration": iteration, "accuracy": res.accuracy,
                    "seconds": now, "hostname": hostname, "done": False})
        if res.accuracy >= cfg.target_accuracy:
            res.reached, res.stop_reason = True, "target"
            store.put_doc("stop", {"worker_id": worker_id, "iteration": iteration,
                                   "accuracy": res.accuracy, "reason": "target"})
            break
        if stop:
            res.stop_reason = f"stopped by worker {stop.get('worker_id')} ({stop.get('reason')})"
            break
    res.seconds = time.perf_counter() - start
    res.samples_per_s = res.samples / res.train_seconds if res.train_seconds else 0.0
    return res
