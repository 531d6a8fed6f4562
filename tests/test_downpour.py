"""The Downpour loop against a real store: one worker must be plain SGD, exactly."""

import threading

import numpy as np
import pytest

from emnist.data import load_dataset
from emnist.model import MLP, MLPShape, init_params, to_float
from emnist.store import ParameterStore, open_kv
from emnist.train.config import TrainConfig
from emnist.train.downpour import batch_order, run_worker
from tests.conftest import MEMCACHED_URL

DATA = load_dataset("synthetic")
SHAPE = MLPShape(784, 16, DATA.num_classes)
# test labels no model can predict: keeps the workers from stopping at their target
NOISE_Y = np.random.default_rng(9).integers(0, DATA.num_classes, len(DATA.test_y)).astype(np.uint8)


def _plain_sgd(cfg: TrainConfig, iterations: int) -> np.ndarray:
    params = init_params(SHAPE, cfg.seed)
    model, rng = MLP(SHAPE, cfg.dropout_percent, seed=cfg.seed + 1), np.random.default_rng(
        cfg.seed + 1)
    for _ in range(iterations):
        for at in batch_order(len(DATA.train_y), cfg.batch_size, rng):
            _, g = model.loss_and_grad(params, to_float(DATA.train_x[at:at + cfg.batch_size]),
                                       DATA.train_y[at:at + cfg.batch_size])
            params -= np.float32(cfg.alpha) * g
    return params


@pytest.mark.parametrize("n_fetch, n_push, overlap", [
    (1, 1, False), (10, 10, False), (3, 7, False), (7, 3, False), (10, 10, True), (3, 7, True),
])
def test_one_worker_downpour_is_plain_sgd(memcached_kv, run_id, n_fetch, n_push, overlap):
    cfg = TrainConfig(dataset="synthetic", batch_size=50, alpha=0.1, iterations=2,
                      target_accuracy=1.0, n_fetch=n_fetch, n_push=n_push, overlap=overlap,
                      dropout_percent=0.2)
    store = ParameterStore(memcached_kv, run_id, chunk_bytes=8192)
    store.init(init_params(SHAPE, cfg.seed))
    res = run_worker(cfg, store, DATA.train_x, DATA.train_y, DATA.test_x, NOISE_Y, SHAPE,
                     worker_id=0, hostname="test")
    final = np.empty(SHAPE.num_params, dtype=np.float32)
    store.fetch(final)
    assert res.iterations == 2 and res.stop_reason == "iterations"
    np.testing.assert_allclose(final, _plain_sgd(cfg, 2), atol=2e-5)
    steps = res.iterations * (len(DATA.train_y) // 50)
    assert res.samples == steps * 50
    assert steps // n_push <= res.pushes <= steps // n_push + res.iterations
    assert res.bytes_pushed == res.pushes * SHAPE.num_params * 4


def test_two_concurrent_workers_lose_no_update(memcached_kv, run_id):
    """Two workers that never fetch: the store must end at init + both workers' updates."""
    cfg = TrainConfig(dataset="synthetic", batch_size=50, alpha=0.1, iterations=1,
                      target_accuracy=1.0, n_fetch=10_000, n_push=2)
    init = init_params(SHAPE, 0)
    store = ParameterStore(memcached_kv, run_id, chunk_bytes=8192)
    store.init(init)
    half = len(DATA.train_y) // 2
    shards = [(DATA.train_x[:half], DATA.train_y[:half]), (DATA.train_x[half:],
                                                            DATA.train_y[half:])]
    results = {}
    started = threading.Barrier(2)

    class StartTogether(ParameterStore):
        """Both workers' first fetch sees the initial vector, so each trajectory is known."""

        first = True

        def fetch(self, out, docs=()):
            got = super().fetch(out, docs)
            if self.first:
                self.first = False
                started.wait(10)
            return got

    def work(w: int) -> None:
        ps = StartTogether(open_kv(MEMCACHED_URL), run_id)
        ps.attach()
        results[w] = run_worker(cfg, ps, *shards[w], DATA.test_x, NOISE_Y, SHAPE,
                                worker_id=w, hostname=f"w{w}")

    threads = [threading.Thread(target=work, args=(w,)) for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert [results[w].stop_reason for w in (0, 1)] == ["iterations"] * 2
    # without fetches each worker's trajectory is plain SGD from init on its own shard
    expected = init.copy()
    for w, (x, y) in enumerate(shards):
        params = init.copy()
        model = MLP(SHAPE, 0.0, seed=cfg.seed + 1 + w)
        rng = np.random.default_rng(cfg.seed + 1 + w)
        for at in batch_order(len(y), 50, rng):
            _, g = model.loss_and_grad(params, to_float(x[at:at + 50]), y[at:at + 50])
            params -= np.float32(0.1) * g
        expected += params - init
    final = np.empty_like(init)
    store.fetch(final)
    np.testing.assert_allclose(final, expected, atol=5e-5)


def test_stop_flag_from_another_worker_ends_the_loop(memcached_kv, run_id):
    cfg = TrainConfig(dataset="synthetic", batch_size=10, alpha=0.1, iterations=50,
                      target_accuracy=1.0, n_fetch=1, n_push=1)
    store = ParameterStore(memcached_kv, run_id, chunk_bytes=8192)
    store.init(init_params(SHAPE, 0))
    store.put_doc("stop", {"worker_id": 7, "reason": "target"})
    res = run_worker(cfg, store, DATA.train_x, DATA.train_y, DATA.test_x, DATA.test_y, SHAPE,
                     worker_id=0, hostname="t")
    assert res.iterations == 1 and res.stop_reason == "stopped by worker 7 (target)"
    assert res.samples < len(DATA.train_y)


def test_target_accuracy_stops_and_signals(memcached_kv, run_id):
    cfg = TrainConfig(dataset="synthetic", batch_size=50, alpha=0.2, iterations=30,
                      target_accuracy=0.9)
    store = ParameterStore(memcached_kv, run_id, chunk_bytes=8192)
    store.init(init_params(SHAPE, 0))
    res = run_worker(cfg, store, DATA.train_x, DATA.train_y, DATA.test_x, DATA.test_y, SHAPE,
                     worker_id=3, hostname="t")
    assert res.reached and res.accuracy >= 0.9 and res.iterations < 30
    assert store.get_doc("stop")["worker_id"] == 3
    assert [c[1] for c in res.curve] == list(range(1, res.iterations + 1))


@pytest.mark.parametrize("threshold, top_k, overlap", [(0.0, 1, False), (0.0, 2, True),
                                                        (1e-3, 0, False), (1e9, 0, False)])
def test_sparse_pushes_never_lose_the_skipped_delta(memcached_kv, run_id, threshold, top_k,
                                                    overlap):
    """Pushing only some chunks: the rest stays pending, so one worker is still plain SGD."""
    cfg = TrainConfig(dataset="synthetic", batch_size=50, alpha=0.1, iterations=2,
                      target_accuracy=1.0, n_fetch=4, n_push=4, push_threshold=threshold,
                      push_top_k=top_k, overlap=overlap)
    store = ParameterStore(memcached_kv, run_id, chunk_bytes=8192)  # 7 chunks
    store.init(init_params(SHAPE, cfg.seed))
    res = run_worker(cfg, store, DATA.train_x, DATA.train_y, DATA.test_x, NOISE_Y, SHAPE,
                     worker_id=0, hostname="test")
    final = np.empty(SHAPE.num_params, dtype=np.float32)
    store.fetch(final)
    np.testing.assert_allclose(final, _plain_sgd(cfg, 2), atol=2e-5)
    if threshold > 1:  # nothing qualifies mid-pass: only the end-of-pass flushes push
        assert res.pushes == 2 and res.bytes_pushed == 2 * SHAPE.num_params * 4
    else:  # some chunks were held back at some pushes, and went later
        assert res.bytes_skipped > 0
        assert res.bytes_pushed < res.pushes * SHAPE.num_params * 4


def test_sparse_push_keeps_unsent_chunks_in_store_untouched(memcached_kv, run_id):
    ps = ParameterStore(memcached_kv, run_id, chunk_bytes=16)  # 4 floats per chunk
    ps.init(np.zeros(12, dtype=np.float32))
    out = np.empty(12, dtype=np.float32)
    stats = ps.push(np.arange(12, dtype=np.float32), chunks=[2], out=out)
    assert stats.bytes_sent == 16 and stats.bytes_skipped == 32
    assert np.array_equal(out, np.r_[np.zeros(8), np.arange(8, 12)].astype(np.float32))
