"""One Downpour worker on the synthetic dataset, and plain SGD over the same minibatches (same
order, same dropout masks): what the training-loop tests compare."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from emnist.data import load_dataset
from emnist.model import MLP, MLPShape, init_params, to_float
from emnist.train.config import TrainConfig
from emnist.train.state import WorkerState
from emnist.train.worker import DropoutSeeds, pass_order, run_worker

DATA = load_dataset("synthetic")
SHAPE = MLPShape(784, 16, DATA.num_classes)
# test labels no model can predict: keeps the workers from stopping at their target
NOISE_Y = np.random.default_rng(9).integers(0, DATA.num_classes, len(DATA.test_y)).astype(np.uint8)


def steps_of(n: int, cfg: TrainConfig) -> int:
    return n // cfg.batch_size


def sgd(cfg: TrainConfig, iterations: int, x, y, worker: int = 0, params=None) -> np.ndarray:
    """Plain SGD visiting the minibatches a worker visits (same order, same dropout)."""
    params = init_params(SHAPE, cfg.seed) if params is None else params.copy()
    model, seeds = MLP(SHAPE, cfg.dropout_percent), DropoutSeeds(cfg.seed, worker)
    for it in range(1, iterations + 1):
        for pos, at in enumerate(pass_order(cfg, worker, it, len(y), steps_of(len(y), cfg))):
            model.rng = seeds.at(it, pos)
            _, g = model.loss_and_grad(params, to_float(x[at:at + cfg.batch_size]),
                                       y[at:at + cfg.batch_size])
            params -= np.float32(cfg.alpha) * g
    return params


def plain_sgd(cfg: TrainConfig, iterations: int) -> np.ndarray:
    return sgd(cfg, iterations, DATA.train_x, DATA.train_y)


def in_threads(fn, args) -> list:
    """fn(arg) for each arg, each on its own thread; joined, and the first error re-raised
    here (a thread's exception is otherwise only printed, and the test would go on)."""
    with ThreadPoolExecutor(len(args)) as pool:
        return list(pool.map(fn, args))


def run(cfg, store, x=None, y=None, test_y=None, worker_id=0, workers=1, saves=None):
    """One worker from a fresh state, like train_worker does (no lease here)."""
    x = DATA.train_x if x is None else x
    y = DATA.train_y if y is None else y
    st = WorkerState(worker_id, hostname=f"w{worker_id}")
    return run_worker(cfg, store, (x, y, DATA.test_x, NOISE_Y if test_y is None else test_y),
                      SHAPE, st, workers=workers, steps_per_pass=steps_of(len(y), cfg),
                      run_started=time.time(),
                      save=(saves.append if saves is not None else lambda s: None))
