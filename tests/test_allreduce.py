"""All-reduce SGD (``algorithm=allreduce``) against a real memcached (and Redis): W workers
are one process doing momentum SGD on the W minibatches together, every worker holds the same
bits after every round, a straggler's late contribution is never applied, a dead worker's
partition is taken over by exactly one survivor, and a lost reply doubles or loses nothing."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

import emnist.train.worker as worker_mod
from emnist.cli.train import TRAIN_OPTIONS
from emnist.data import load_dataset
from emnist.model import MLP, MLPShape, init_params, to_float
from emnist.store import ParameterStore, codec, open_kv
from emnist.train.allreduce import AllReduce, learning_rate, partitions
from emnist.train.config import ConfigError, TrainConfig
from emnist.train.run import load_run, setup_run, train_worker
from emnist.train.state import WorkerState
from emnist.train.worker import pass_order, run_worker
from tests.conftest import MEMCACHED_URL, REDIS_URL
from tests.dropproxy import DropProxy

DATA = load_dataset("synthetic")
SHAPE = MLPShape(784, 15, DATA.num_classes)  # 11,935 parameters: odd, and 1 mod 3, 3 mod 4
PER_WORKER = 250  # samples in each worker's shard: 10 minibatches of 25 per pass
BASE = dict(dataset="synthetic", batch_size=25, alpha=0.05, iterations=2, target_accuracy=1.0,
            algorithm="allreduce", momentum=0.9, warmup_steps=5, chunk_bytes=4096,
            barrier_timeout=30.0)
# test labels no model can predict: keeps the workers from stopping at their target
NOISE_Y = np.random.default_rng(9).integers(0, DATA.num_classes, len(DATA.test_y)).astype(np.uint8)


def _shard(w: int) -> tuple[np.ndarray, np.ndarray]:
    lo = w * PER_WORKER
    return DATA.train_x[lo:lo + PER_WORKER], DATA.train_y[lo:lo + PER_WORKER]


class Recorder:
    """What each worker's AllReduce saw: per round its gradient (as contributed), the round's
    members and the momentum it continued with (the reduced partitions, gathered), and its
    parameters at every pass end."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[int, np.ndarray]] = {}
        self.members: dict[int, dict[int, list[int]]] = {}
        self.reduced: dict[int, dict[int, np.ndarray]] = {}
        self.params: dict[int, list[np.ndarray]] = {}
        self.takeovers: dict[int, list[tuple[int, int, int]]] = {}
        self.lock = threading.Lock()

    def cls(self, hooks: dict | None = None) -> type[AllReduce]:
        rec, hooks = self, hooks or {}

        class Recorded(AllReduce):
            def _contribute(self, r: int, grad: np.ndarray) -> None:
                if "contribute" in hooks:
                    hooks["contribute"](self, r)
                rec.grads.setdefault(self.me, {})[r] = grad.copy()
                super()._contribute(r, grad)

            def _gather(self, params, grad, r, members) -> None:
                if "gather" in hooks:
                    hooks["gather"](self, r)
                rec.members.setdefault(self.me, {})[r] = list(members)
                super()._gather(params, grad, r, members)
                rec.reduced.setdefault(self.me, {})[r] = self.v.copy()

            def _reduce(self, params, grad, r, p, members, lr, gen):
                if "reduce" in hooks:
                    hooks["reduce"](self, r, p)
                return super()._reduce(params, grad, r, p, members, lr, gen)

            def end_iteration(self, params) -> None:
                rec.params.setdefault(self.me, []).append(params.copy())
                rec.takeovers[self.me] = list(self.takeovers)
                super().end_iteration(params)

        return Recorded


def _store(url: str, run_id: str) -> ParameterStore:
    ps = ParameterStore(open_kv(url), run_id)
    ps.attach()
    return ps


def _run(cfg: TrainConfig, run_id: str, workers: int, urls: dict[int, str] | None = None,
         dies: tuple[int, ...] = (), test_y: np.ndarray = NOISE_Y
         ) -> list[WorkerState | BaseException]:
    """Every worker on its own thread with its own store handle (``urls``: per worker); a
    worker in ``dies`` may end with an exception, which is returned instead of raised."""
    def work(w: int) -> WorkerState | BaseException:
        x, y = _shard(w)
        st = WorkerState(w, hostname=f"w{w}")
        try:
            return run_worker(cfg, _store((urls or {}).get(w, MEMCACHED_URL), run_id),
                              (x, y, DATA.test_x, test_y), SHAPE, st, workers=workers,
                              steps_per_pass=PER_WORKER // cfg.batch_size,
                              run_started=time.time(), save=lambda s: None)
        except Exception as e:
            if w in dies:
                return e
            raise

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(work, range(workers)))


def _init(kv, run_id: str, chunk_bytes: int = 4096) -> np.ndarray:
    init = init_params(SHAPE, 0)
    ParameterStore(kv, run_id, chunk_bytes=chunk_bytes).init(init)
    return init


def _mean(grads: list[np.ndarray]) -> np.ndarray:
    """The reducers' arithmetic: a float32 sum in worker order, divided by the count."""
    total = np.zeros_like(grads[0])
    for g in grads:
        total += g
    total /= np.float32(len(grads))
    return total


def _reference(cfg: TrainConfig, workers: int) -> np.ndarray:
    """One process: momentum SGD on the global batch (the W workers' minibatches of each round
    concatenated, mean loss), with the linear scaling rule and its warm-up."""
    params, v = init_params(SHAPE, cfg.seed), np.zeros(SHAPE.num_params, dtype=np.float32)
    model = MLP(SHAPE, 0.0)
    steps = PER_WORKER // cfg.batch_size
    bs, r = cfg.batch_size, 0
    for it in range(1, cfg.iterations + 1):
        orders = [pass_order(cfg, w, it, PER_WORKER, steps) for w in range(workers)]
        for pos in range(steps):
            r += 1
            xs = [_shard(w)[0][orders[w][pos]:orders[w][pos] + bs] for w in range(workers)]
            ys = [_shard(w)[1][orders[w][pos]:orders[w][pos] + bs] for w in range(workers)]
            _, g = model.loss_and_grad(params, to_float(np.concatenate(xs)), np.concatenate(ys))
            ramp = min(1.0, (r - 1) / cfg.warmup_steps)
            lr = np.float32(cfg.alpha * (1 + (workers - 1) * ramp))
            v = np.float32(cfg.momentum) * v + g
            params = params - lr * v
    return params


@pytest.mark.parametrize("workers", [1, 2, 3, 4])
def test_allreduce_is_momentum_sgd_on_the_global_batch(memcached_kv, run_id, monkeypatch,
                                                        workers):
    """Uneven partitions (11,935 parameters), each in several 1,024-value chunks."""
    assert len({b - a for a, b in partitions(SHAPE.num_params, workers)}) == min(workers, 2)
    rec = Recorder()
    monkeypatch.setattr(worker_mod, "AllReduce", rec.cls())
    cfg = TrainConfig(**BASE)
    _init(memcached_kv, run_id)
    states = _run(cfg, run_id, workers)
    rounds = cfg.iterations * PER_WORKER // cfg.batch_size
    assert [s.stop_reason for s in states] == ["iterations"] * workers
    assert [s.averages for s in states] == [rounds] * workers
    assert all(s.barrier_timeouts == [] for s in states)
    expected = _reference(cfg, workers)
    final = rec.params[0][-1]
    np.testing.assert_allclose(final, expected, rtol=0, atol=1e-6)
    assert np.abs(final - init_params(SHAPE, 0)).max() > 1e-2  # it trained
    for w in range(workers):  # every worker holds the very same bits
        assert np.array_equal(rec.params[w][-1], final)
        assert all(rec.members[w][r] == list(range(workers)) for r in range(1, rounds + 1))
    stored = np.empty_like(final)
    _store(MEMCACHED_URL, run_id).fetch(stored)
    assert np.array_equal(stored, final)  # the run's global vector is the result


def test_workers_hold_identical_bits_every_round_learn_and_clean_up(memcached_kv, run_id,
                                                                    monkeypatch):
    rec = Recorder()
    monkeypatch.setattr(worker_mod, "AllReduce", rec.cls())
    cfg = TrainConfig(**{**BASE, "iterations": 5, "warmup_steps": None,  # half a pass
                         "alpha": 0.002, "target_accuracy": 0.95})
    _init(memcached_kv, run_id)
    states = _run(cfg, run_id, 3, test_y=DATA.test_y)
    rounds = states[0].step
    assert rounds % (PER_WORKER // cfg.batch_size) == 0 and rounds >= 10
    for r in range(1, rounds + 1):  # the momentum each worker continued from, every round
        assert np.array_equal(rec.reduced[0][r], rec.reduced[1][r])
        assert np.array_equal(rec.reduced[0][r], rec.reduced[2][r])
        assert np.array_equal(rec.reduced[0][r], _mean([rec.grads[w][r] for w in (0, 1, 2)])
                              + np.float32(0.9) * (rec.reduced[0][r - 1] if r > 1 else 0))
    for p in range(len(rec.params[0])):  # and the parameters at every pass end
        assert np.array_equal(rec.params[0][p], rec.params[1][p])
        assert np.array_equal(rec.params[0][p], rec.params[2][p])
    # the same model, so the same curve, and all three stop together at the target
    curves = [[c[1:] for c in s.curve] for s in states]
    assert curves[1] == curves[0] and curves[2] == curves[0]
    its, accs, losses, samples = zip(*curves[0])
    assert its == tuple(range(1, len(its) + 1))
    assert samples == tuple(250 * i for i in its)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]
    assert accs[-1] >= 0.95 and max(accs[:-1], default=0) < 0.95
    assert [s.stop_reason for s in states] == ["target"] * 3
    assert all(s.averages == rounds and s.bytes_pushed > 0 and s.bytes_fetched > 0
               for s in states)
    # old rounds' keys are gone, the newest round (a rejoining worker's snapshot) is there
    ps = _store(MEMCACHED_URL, run_id)
    old = [ps.key("ar", 1, "g", w, p, 0) for w in range(3) for p in range(3)] + [
        ps.key("ar", 1, kind, p, 0) for kind in ("v", "w") for p in range(3)] + [
        ps.key("ar", 1, "done", 0), ps.key("ar", 1, "members"), ps.key("ar", 1, "in", 0)]
    assert memcached_kv.get_many(old) == {}
    last = [ps.key("ar", rounds, kind, p, 0) for kind in ("v", "w") for p in range(3)]
    assert len(memcached_kv.get_many(last)) == len(last)


def test_a_straggler_is_left_out_and_its_late_contribution_never_applied(memcached_kv, run_id,
                                                                         monkeypatch):
    """Worker 2 sleeps past barrier_timeout before contributing to round 4. Momentum 0: the
    momentum each worker continues from is the round's reduced gradient itself."""
    late: list[tuple[int, float]] = []

    def straggle(ar: AllReduce, r: int) -> None:
        if ar.me == 2 and r == 4:
            time.sleep(3 * ar.timeout)  # a straggler on purpose
            late.append((r, time.monotonic()))

    rec = Recorder()
    monkeypatch.setattr(worker_mod, "AllReduce", rec.cls({"contribute": straggle}))
    cfg = TrainConfig(**{**BASE, "momentum": 0.0, "barrier_timeout": 1.0, "iterations": 3})
    _init(memcached_kv, run_id)
    states = _run(cfg, run_id, 3)
    rounds = 3 * PER_WORKER // cfg.batch_size
    assert late and 4 in rec.grads[2]  # its round-4 gradient was contributed, late
    assert rec.members[0][4] == [0, 1]
    assert states[0].barrier_timeouts[0] == {"round": 4, "after_s": 1.0, "missing": "2"}
    for r in range(1, rounds + 1):  # every round: exactly its members' own round-r gradients
        members = rec.members[0][r]
        assert all(rec.members[w][r] == members for w in (0, 1) if r in rec.members[w])
        assert np.array_equal(rec.reduced[0][r], _mean([rec.grads[w][r] for w in members]))
    # round 5 (and any after) never took the round-4 gradient it came late with
    g_late = rec.grads[2][4]
    for r in range(5, rounds + 1):
        wrong = _mean([rec.grads[w][r] for w in rec.members[0][r]] + [g_late])
        assert not np.allclose(rec.reduced[0][r], wrong, atol=1e-6)
    assert [s.stop_reason for s in states] == ["iterations"] * 3
    assert [s.step for s in states] == [rounds] * 3
    assert np.array_equal(rec.params[0][-1], rec.params[2][-1])  # it rejoined: same bits
    assert np.array_equal(rec.params[0][-1], rec.params[1][-1])


class Killed(Exception):
    """A worker thread dies here (its process would be killed)."""


@pytest.mark.parametrize("where", ["after its contribution", "holding its partition's claim"])
def test_a_dead_workers_partition_is_taken_over_by_exactly_one_survivor(
        memcached_kv, run_id, monkeypatch, where):
    """Worker 2 dies in round 6 after its marker is in: the round closes with it (its
    contribution counts), its partition is reduced after the deadline by one survivor (at the
    claim's generation 0, or 1 when the dead worker held generation 0), and every later round
    closes at one deadline without it, its partition claimed at once by one survivor."""
    def die(ar: AllReduce, r: int, p: int | None = None) -> None:
        if ar.me == 2 and r == 6:
            raise Killed(where)

    hook = "gather" if where == "after its contribution" else "reduce"
    rec = Recorder()
    monkeypatch.setattr(worker_mod, "AllReduce", rec.cls({hook: die}))
    cfg = TrainConfig(**{**BASE, "barrier_timeout": 1.0})
    _init(memcached_kv, run_id)
    states = _run(cfg, run_id, 3, dies=(2,))
    rounds = 2 * PER_WORKER // cfg.batch_size
    assert isinstance(states[2], Killed)
    assert rec.members[0][6] == [0, 1, 2]
    for r in range(7, rounds + 1):
        assert rec.members[0][r] == rec.members[1][r] == [0, 1]
    gen = 0 if where == "after its contribution" else 1
    taken = sorted(t for w in (0, 1) for t in rec.takeovers[w])
    assert taken == [(6, 2, gen)] + [(r, 2, 0) for r in range(7, rounds + 1)]
    # round 6 is the three contributions' mean (the dead worker's included), once
    ps = _store(MEMCACHED_URL, run_id)
    mu = np.float32(0.9)
    assert np.array_equal(rec.reduced[0][6], mu * rec.reduced[0][5]
                          + _mean([rec.grads[w][6] for w in (0, 1, 2)]))
    assert np.array_equal(rec.reduced[0][7], mu * rec.reduced[0][6]
                          + _mean([rec.grads[w][7] for w in (0, 1)]))
    done = codec.decode_doc("d", memcached_kv.get_many([ps.key("ar", rounds, "done", 2)])
                            [ps.key("ar", rounds, "done", 2)])
    assert done["by"] in (0, 1) and done["members"] == [0, 1]
    for s in states[:2]:
        assert s.stop_reason == "iterations" and s.step == rounds
        assert s.barrier_timeouts == [{"round": 7, "after_s": 1.0, "missing": "2"}]
    assert np.array_equal(rec.params[0][-1], rec.params[1][-1])


REDIS_12 = REDIS_URL  # the environment's Redis test database (EMNIST_TEST_REDIS)
PROXIED = {
    "memcached": (11211, "text", "memcached://127.0.0.1:{}", MEMCACHED_URL,
                  lambda c, part: c[0] == b"add" and part in c[1]),
    "redis": (6379, "resp", "redis://127.0.0.1:{}/" + REDIS_12.rsplit("/", 1)[-1], REDIS_12,
              lambda c, part: c[0] == b"SET" and part in c[1]
              and b"NX" in {w.upper() for w in c}),
}


@pytest.mark.parametrize("backend, when, part", [
    ("memcached", "after", b":ar:3:g:1:0:0"), ("memcached", "before", b":ar:3:g:1:0:0"),
    ("memcached", "after", b":ar:3:in:1"), ("memcached", "after", b":ar:3:v:1:0"),
    ("redis", "after", b":ar:3:g:1:0:0"), ("redis", "before", b":ar:3:v:1:0"),
])
def test_a_lost_reply_neither_doubles_nor_loses_a_contribution(run_id, monkeypatch, backend,
                                                               when, part):
    """Worker 1's store connection loses one reply of round 3 (a write the server executed,
    or one that never reached it): the run ends bit for bit where a clean run does."""
    port, protocol, url, direct, trigger = PROXIED[backend]
    kv = open_kv(direct)
    cfg = TrainConfig(**{**BASE, "iterations": 1})
    rec = Recorder()
    monkeypatch.setattr(worker_mod, "AllReduce", rec.cls())
    _init(kv, run_id + "c")
    _run(cfg, run_id + "c", 2, urls={0: direct, 1: direct})
    clean = rec.params[0][-1]
    clean_v3 = rec.reduced[0][3]

    proxy = DropProxy(port, protocol, lambda c: trigger(c, part), when)
    try:
        rec = Recorder()
        monkeypatch.setattr(worker_mod, "AllReduce", rec.cls())
        _init(kv, run_id)
        states = _run(cfg, run_id, 2, urls={0: direct, 1: url.format(proxy.port)})
    finally:
        proxy.close()
    assert proxy.fired == 1
    assert np.array_equal(rec.reduced[0][3], clean_v3)  # the round's mean, once
    assert np.array_equal(rec.reduced[1][3], clean_v3)
    assert np.array_equal(rec.params[0][-1], clean) and np.array_equal(rec.params[1][-1], clean)
    assert all(s.barrier_timeouts == [] for s in states)


# -- the run's paths: execution types 3 and 2, time slices -------------------------------
def _train_all(kv, run_id: str, workers: int, sliced: bool = False) -> list[dict]:
    """Each worker on a thread, as the platform would call it: again for every pass (type 2)
    or time slice it asks for."""
    def work(w: int) -> dict:
        pending, calls = [None], 0
        record: dict = {}
        while pending:
            at = pending.pop()
            calls += 1
            assert calls < 200
            _, record = train_worker(open_kv(MEMCACHED_URL), run_id, w, f"w{w}",
                                     next_pass=lambda n, s: pending.append((n, s)),
                                     for_pass=None if at is None else at[0],
                                     for_step=None if at is None else at[1])
        return {**record, "calls": calls}

    with ThreadPoolExecutor(workers) as pool:
        return list(pool.map(work, range(workers)))


def _final(kv, run_id: str) -> np.ndarray:
    store, _ = load_run(kv, run_id)
    out = np.empty(store.num_params, dtype=np.float32)
    store.fetch(out)
    return out


def test_execution_types_3_and_2_and_time_slices_end_on_the_same_bits(memcached_kv,
                                                                     tmp_path: Path):
    base = {**BASE, "iterations": 2, "data_location": str(tmp_path / "shards"),
            "hidden_size": 15, "store_url": MEMCACHED_URL, "batch_size": 50, "alpha": 0.0002}
    finals, records = [], []
    for extra in ({"execution_type": 3}, {"execution_type": 2},
                  {"execution_type": 3, "slice_seconds": 0.05}):
        cfg = TrainConfig(**{**base, **extra})
        run = setup_run(cfg, memcached_kv, 2)["run_id"]
        recs = _train_all(memcached_kv, run, 2)
        assert all(r["done"] and r["step"] == 80 for r in recs)  # 2 passes of 40
        assert all(r["barrier_timeouts"] == [] for r in recs)
        finals.append(_final(memcached_kv, run))
        records.append(recs)
    assert [r["calls"] for r in records[0]] == [1, 1]
    assert [r["calls"] for r in records[1]] == [2, 2]  # one call per pass
    assert min(r["calls"] for r in records[2]) > 2  # slices ended mid-pass and resumed
    assert np.array_equal(finals[0], finals[1]) and np.array_equal(finals[0], finals[2])
    assert len({(r["accuracy"], r["stop_reason"]) for rs in records for r in rs}) == 1


def test_the_config_the_cli_and_the_schedule():
    cfg = TrainConfig(algorithm="allreduce")
    assert (cfg.momentum, cfg.warmup_steps, cfg.scale_lr) == (0.9, None, True)
    for bad, field in (({"momentum": 1.0}, "momentum"), ({"momentum": -0.1}, "momentum"),
                       ({"warmup_steps": -1}, "warmup_steps"),
                       ({"local_store_url": "local://x"}, "local_store_url"),
                       ({"algorithm": "allgather"}, "algorithm")):
        with pytest.raises(ConfigError) as e:
            TrainConfig(**{"algorithm": "allreduce", **bad})
        assert e.value.field == field
    env = TrainConfig.from_sources({"algorithm": "allreduce", "momentum": "0.5",
                                    "warmup_steps": "7", "scale_lr": "false"})
    assert (env.momentum, env.warmup_steps, env.scale_lr) == (0.5, 7, False)
    choice = {flag: typ for flag, _, typ, _ in TRAIN_OPTIONS}["--algorithm"]
    assert "allreduce" in choice.choices
    assert {"--momentum", "--warmup-steps", "--scale-lr"} <= {f for f, *_ in TRAIN_OPTIONS}
    # alpha, then linearly up to alpha x members over the warm-up, then flat
    lrs = [float(learning_rate(0.1, r, 4, 4, True)) for r in (1, 2, 3, 5, 50)]
    np.testing.assert_allclose(lrs, [0.1, 0.175, 0.25, 0.4, 0.4], rtol=1e-6)
    assert float(learning_rate(0.1, 50, 4, 4, False)) == pytest.approx(0.1)
    assert partitions(10, 4) == [(0, 3), (3, 6), (6, 8), (8, 10)]
