"""The simulator computes what the real code computes: one simulated Downpour worker is the
real ``train_worker`` on real memcached (curve and final parameters, bit for bit), so are two
averaging workers and three p2p peers over real Redis; with no communication cost two
Downpour workers interleave exactly as a hand-written lockstep loop; runs are deterministic."""

from __future__ import annotations

import secrets
import threading

import numpy as np
import pytest
import yaml

from emnist.data import open_shard, open_test, prepare_shards
from emnist.models import build_model
from emnist.p2p.peer import Peer, PeerConfig
from emnist.p2p.split import split
from emnist.sim import downpour as sim_downpour
from emnist.sim.config import SimConfig
from emnist.sim.costs import COSTS_DIR, parse_costs
from emnist.sim.downpour import run_store_algorithm
from emnist.sim.engine import Sim, simulate
from emnist.sim.threads import one_blas_thread
from emnist.store import ParameterStore
from emnist.train.config import TrainConfig
from emnist.train.run import setup_run, train_worker
from emnist.train.worker import pass_order
from tests.conftest import REDIS_BROKER


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    # the real workers below run in this process: with one BLAS thread, as the stack file
    # gives every function (OPENBLAS_NUM_THREADS=1) and the simulator takes; a 2-thread BLAS
    # splits a 100-wide matmul differently and the last bits differ
    one_blas_thread()
    return str(tmp_path_factory.mktemp("sim-data"))


def costs(**changes):
    """The shipped study3 cluster with fields changed (``section__field``; ``nodes__x``
    changes every node kind)."""
    doc = yaml.safe_load((COSTS_DIR / "study3.yml").read_text())
    for key, value in changes.items():
        section, field = key.split("__")
        for part in doc[section] if section == "nodes" else [doc[section]]:
            part[field] = value
    return parse_costs(yaml.safe_dump(doc))


SETTINGS = {"dataset": "fashion-mnist", "hidden_size": 16, "batch_size": 100, "iterations": 2,
            "target_accuracy": 0.99, "n_fetch": 3, "n_push": 7, "dropout_percent": 0.2}


def _real(kv, root, workers, **over):
    cfg = TrainConfig(**{**SETTINGS, **over}, data_location=root, number_of_workers=workers)
    state = setup_run(cfg, kv, workers, run_id="t" + secrets.token_hex(6))
    out = {}

    def go(w):
        out[w] = train_worker(kv, state["run_id"], w, f"real-{w}")[0]
    threads = [threading.Thread(target=go, args=(w,)) for w in range(workers)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    store = ParameterStore(kv, state["run_id"])
    store.attach()
    final = np.empty(store.num_params, dtype=np.float32)
    store.fetch(final)
    return out, final


def _sim(root, workers, algorithm="downpour", cost=None, **over):
    sim = Sim(SimConfig(**{**SETTINGS, **over}, algorithm=algorithm, workers=workers,
                        data_location=root), cost or costs())
    report = run_store_algorithm(sim)
    return report, sim.final_params


def _points(curve):
    return [(c[1], c[2], c[3], c[4]) for c in curve]  # pass, accuracy, val loss, samples


def test_one_simulated_worker_is_the_real_worker(memcached_kv, root):
    """Real memcached, the real train_worker/run_worker: the same accuracy (and validation
    loss and samples) after every pass and the same final parameters, bit for bit; the push
    schedule (n_fetch 3, n_push 7, a pass end with pending updates) and dropout included."""
    real, real_final = _real(memcached_kv, root, 1)
    report, final = _sim(root, 1)
    assert len(real[0].curve) == 2 and real[0].stop_reason == "iterations"
    assert _points(report["worker_curves"][0]) == _points(real[0].curve)
    assert np.array_equal(final, real_final)
    assert report["steps"] == real[0].step and report["pushes"] == real[0].pushes


def test_one_simulated_lenet5_worker_is_the_real_worker(memcached_kv, root):
    pytest.importorskip("torch", reason="lenet5 needs the torch extra")
    over = {"dataset": "synthetic", "model": "lenet5", "dropout_percent": 0.0,
            "batch_size": 64, "iterations": 1}
    real, real_final = _real(memcached_kv, root, 1, **over)
    report, final = _sim(root, 1, **over)
    assert _points(report["worker_curves"][0]) == _points(real[0].curve)
    assert np.array_equal(final, real_final) and report["model"] == "lenet5"


def test_a_diverging_simulated_worker_stops_where_the_real_one_does(memcached_kv, root):
    """lenet5 at alpha 100 overflows: the real worker refuses the non-finite push and stops
    "diverged"; the simulated one stops at the same step with the same (finite) store."""
    over = {"dataset": "synthetic", "model": "lenet5", "dropout_percent": 0.0,
            "batch_size": 64, "iterations": 2, "alpha": 100.0, "n_fetch": 1, "n_push": 1}
    real, real_final = _real(memcached_kv, root, 1, **over)
    report, final = _sim(root, 1, **over)
    assert real[0].stop_reason.startswith("diverged") and np.isfinite(real_final).all()
    assert report["steps"] == real[0].step and np.array_equal(final, real_final)


def test_a_diverging_averaging_worker_stops_where_the_real_one_does(memcached_kv, root):
    """The diverging case above as averaging: the real worker refuses to publish non-finite
    parameters at its round and stops "diverged"; the simulated one stops at the same step,
    and the store keeps the same (finite) vector in both."""
    over = {"dataset": "synthetic", "model": "lenet5", "dropout_percent": 0.0,
            "batch_size": 64, "iterations": 2, "alpha": 100.0, "algorithm": "averaging",
            "average_every": 1}
    real, real_final = _real(memcached_kv, root, 1, **over)
    report, final = _sim(root, 1, **over)
    assert real[0].stop_reason.startswith("diverged") and "average" in real[0].stop_reason
    assert report["stop_reasons"] == [real[0].stop_reason]
    assert report["steps"] == real[0].step < 62
    assert np.isfinite(real_final).all() and np.array_equal(final, real_final)


def test_two_simulated_averaging_workers_are_the_real_ones(memcached_kv, root):
    over = {"algorithm": "averaging", "average_every": 10, "dropout_percent": 0.0,
            "iterations": 1}
    real, real_final = _real(memcached_kv, root, 2, **over)
    report, final = _sim(root, 2, **over)
    for w in (0, 1):
        assert _points(report["worker_curves"][w]) == _points(real[w].curve)
    assert np.array_equal(final, real_final)
    assert report["rounds"] == real[0].averages == 300 // 10  # 30,000 samples a shard


def test_simulated_peers_are_the_real_peers(root):
    """Three real Peer objects over real Redis Streams (QSGD: seeded per peer) and three
    simulated ones: the same parameters after two epochs of three synchronous steps (61
    minibatches each), the same accuracy. (Peers as threads of one process exchange slowly,
    ~0.15 s a step: hence few, large steps.)"""
    data = split("fashion-mnist", None, 3, root, seed=0)
    run = "t" + secrets.token_hex(6)
    results = {}

    def go(rank):
        cfg = PeerConfig(run_id=run, rank=rank, size=3, data=str(data), broker_url=REDIS_BROKER,
                         compression="qsgd", batch_size=100, sync_every=61, epochs=2,
                         target_accuracy=0.0, patience=5, timeout=60)
        peer = Peer(cfg)
        try:
            results[rank] = peer.run()
        finally:
            peer.close()
    threads = [threading.Thread(target=go, args=(r,)) for r in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    report = simulate(SimConfig(algorithm="p2p", workers=3, compression="qsgd", iterations=2,
                                sync_every=61, target_accuracy=0.0, patience=5,
                                data_location=root), costs())
    assert sorted(results) == [0, 1, 2] and results[0]["steps"] == 6
    assert {r["params_crc"] for r in results.values()} == {report["final_params_crc"]}
    assert report["accuracy"] == results[0]["test_accuracy"]
    assert report["steps"] == 3 * results[0]["steps"]


def test_with_no_communication_cost_two_workers_interleave_like_the_hand_loop(root):
    """Zero round trips, infinite bandwidth, no spread: both workers compute their n_push
    minibatches in the same virtual time, worker 0's push lands first (its events were
    scheduled first; in the first round worker 1's cas conflicts and is retried), worker 1's
    second, every round. That is this loop, float operation for float operation."""
    free = costs(nodes__link_bandwidth=1e12, store__rtt=0.0, store__op=0.0, store__bandwidth=1e12,
                 store__write_bandwidth=1e12, store__note_per_push=False,
                 client__decode_per_byte=0.0, client__encode_per_byte=0.0,
                 client__vector_per_byte=0.0, gateway__async=0.0, run__setup=0.0,
                 run__worker_start=0.0)
    over = {"dataset": "synthetic", "hidden_size": 8, "batch_size": 50, "n_fetch": 5,
            "n_push": 5, "iterations": 1, "dropout_percent": 0.0, "spread": False,
            "target_accuracy": 1.0}
    report, final = _sim(root, 2, cost=free, **over)
    cfg = SimConfig(**{**SETTINGS, **over}, workers=2, data_location=root).train_config()
    d = prepare_shards("synthetic", None, 2, root, 0)
    shards = [open_shard(d, w) for w in range(2)]
    model = build_model(cfg.model_spec(shards[0].num_classes), seed=0)
    g = model.init_params(0)
    local = [g.copy(), g.copy()]
    steps = len(shards[0].y) // 50
    orders = [pass_order(cfg, w, 1, len(shards[w].y), steps) for w in range(2)]
    for r in range(steps // 5):
        for w in range(2):  # worker 0's push lands first, then worker 1's
            p, base = local[w], local[w].copy()
            for at in orders[w][5 * r:5 * r + 5]:
                _, grad = model.loss_and_grad(p, shards[w].x[at:at + 50], shards[w].y[at:at + 50])
                grad *= -np.float32(0.2)
                p += grad
            g = np.add(g, np.subtract(p, base))  # the store's add of the handed-over delta
            local[w] = np.add(g, np.subtract(p, p))  # _apply: fresh + nothing pending
    assert np.array_equal(final, g)
    assert report["conflicts"] >= 1 and report["staleness_max"] == 1
    assert report["pushes"] == 2 * (steps // 5)
    tx, ty = open_test(d)
    assert report["accuracy"] == model.evaluate(g, tx, ty)[0]


def test_every_push_is_applied_exactly_once(root, monkeypatch):
    handed = []
    original = sim_downpour.Exchange.delta_of

    def record(self, i):
        d = original(self, i)
        handed.append(d.astype(np.float64))
        return d
    monkeypatch.setattr(sim_downpour.Exchange, "delta_of", record)
    over = {"dataset": "synthetic", "hidden_size": 8, "batch_size": 20, "n_fetch": 2,
            "n_push": 2, "iterations": 2, "target_accuracy": 1.0}
    report, final = _sim(root, 4, cost=costs(gateway__async=0.0), **over)
    init = build_model(SimConfig(**{**SETTINGS, **over}).train_config().model_spec(10),
                       seed=0).init_params(0)
    assert report["conflicts"] > 0 and report["staleness_mean"] > 0  # they did collide
    assert len(handed) == report["pushes"] == sum(
        1 for _ in handed)  # one hand-over per landed push (a single chunk here)
    np.testing.assert_allclose(final, init + np.sum(handed, axis=0), atol=2e-5)
    assert report["lost"] == 0


def test_overwrite_pushes_lose_updates_atomic_ones_do_not(root):
    over = {"dataset": "synthetic", "hidden_size": 8, "batch_size": 20, "n_fetch": 1,
            "n_push": 1, "iterations": 1, "target_accuracy": 1.0}
    lossy, _ = _sim(root, 4, cost=costs(gateway__async=0.0), update="overwrite", **over)
    exact, _ = _sim(root, 4, cost=costs(gateway__async=0.0), **over)
    assert lossy["lost"] > 0 and lossy["conflicts"] == 0
    assert exact["lost"] == 0 and exact["conflicts"] > 0


def test_same_seeds_same_run(root):
    cfg = SimConfig(workers=3, dataset="synthetic", hidden_size=8, batch_size=25, iterations=2,
                    target_accuracy=1.0, data_location=root)
    a, b = simulate(cfg, costs()), simulate(cfg, costs())
    for r in (a, b):
        for key in ("wall_s", "wall_math_s", "bookkeeping_fraction"):
            r.pop(key)
    assert a == b
    c = simulate(SimConfig(**{**cfg.to_dict(), "timing_seed": 1}), costs())
    assert c["seconds"] != a["seconds"]  # only the timing seed changed: other spreads
