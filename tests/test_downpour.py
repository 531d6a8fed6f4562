"""The Downpour loop against a real store: one worker must be plain SGD, exactly."""

import threading
import time

import numpy as np
import pytest

import emnist.train.worker as worker_mod
from emnist.model import MLP, init_params, to_float
from emnist.store import ParameterStore, StoreError, open_kv
from emnist.train.averaging import Averaging
from emnist.train.config import TrainConfig
from emnist.train.state import Lease, WorkerState, state_key, stored_state
from emnist.train.worker import pass_order, run_worker
from tests.conftest import MEMCACHED_URL
from tests.downpour_tools import (
    DATA,
    NOISE_Y,
    SHAPE,
    in_threads,
    plain_sgd,
    run,
    sgd,
    steps_of,
)


@pytest.mark.parametrize("n_fetch, n_push, overlap", [
    (1, 1, False), (10, 10, False), (3, 7, False), (7, 3, False), (10, 10, True), (3, 7, True),
])
def test_one_worker_downpour_is_plain_sgd(memcached_kv, run_id, n_fetch, n_push, overlap):
    cfg = TrainConfig(dataset="synthetic", batch_size=50, alpha=0.1, iterations=2,
                      target_accuracy=1.0, n_fetch=n_fetch, n_push=n_push, overlap=overlap,
                      dropout_percent=0.2)
    store = ParameterStore(memcached_kv, run_id, chunk_bytes=8192)
    store.init(init_params(SHAPE, cfg.seed))
    res = run(cfg, store)
    final = np.empty(SHAPE.num_params, dtype=np.float32)
    store.fetch(final)
    assert res.iterations == 2 and res.stop_reason == "iterations"
    np.testing.assert_allclose(final, plain_sgd(cfg, 2), atol=2e-5)
    steps = res.iterations * (len(DATA.train_y) // 50)
    assert res.samples == steps * 50
    assert steps // n_push <= res.pushes <= steps // n_push + res.iterations
    assert res.bytes_pushed == res.pushes * SHAPE.num_params * 4
    assert res.clock == res.pushes  # one worker: every push advanced every chunk once


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

    def work(w: int) -> WorkerState:
        ps = StartTogether(open_kv(MEMCACHED_URL), run_id)
        ps.attach()
        return run(cfg, ps, *shards[w], worker_id=w, workers=2)

    results = in_threads(work, [0, 1])
    assert [results[w].stop_reason for w in (0, 1)] == ["iterations"] * 2
    # without fetches each worker's trajectory is plain SGD from init on its own shard
    expected = init.copy()
    for w, (x, y) in enumerate(shards):
        expected += sgd(cfg, 1, x, y, worker=w, params=init) - init
    final = np.empty_like(init)
    store.fetch(final)
    np.testing.assert_allclose(final, expected, atol=5e-5)


def test_stop_flag_from_another_worker_ends_the_loop(memcached_kv, run_id):
    cfg = TrainConfig(dataset="synthetic", batch_size=10, alpha=0.1, iterations=50,
                      target_accuracy=1.0, n_fetch=1, n_push=1)
    store = ParameterStore(memcached_kv, run_id, chunk_bytes=8192)
    store.init(init_params(SHAPE, 0))
    store.put_doc("stop", {"worker_id": 7, "reason": "target"})
    res = run(cfg, store, test_y=DATA.test_y)
    assert res.iterations == 0 and res.stop_reason == "stopped by worker 7 (target)"
    assert res.samples < len(DATA.train_y)


def test_target_accuracy_stops_and_signals(memcached_kv, run_id):
    cfg = TrainConfig(dataset="synthetic", batch_size=50, alpha=0.2, iterations=30,
                      target_accuracy=0.9)
    store = ParameterStore(memcached_kv, run_id, chunk_bytes=8192)
    store.init(init_params(SHAPE, 0))
    res = run(cfg, store, test_y=DATA.test_y, worker_id=3, workers=4)
    assert res.reached and res.accuracy >= 0.9 and res.iterations < 30
    assert store.get_doc("stop")["worker_id"] == 3
    assert [c[1] for c in res.curve] == list(range(1, res.iterations + 1))


@pytest.mark.parametrize("threshold, top_k, overlap", [(0.0, 1, False), (0.0, 2, True),
                                                        (1e-3, 0, False), (1e6, 0, False)])
def test_sparse_pushes_never_lose_the_skipped_delta(memcached_kv, run_id, threshold, top_k,
                                                    overlap):
    """Pushing only some chunks: the rest stays pending, so one worker is still plain SGD."""
    cfg = TrainConfig(dataset="synthetic", batch_size=50, alpha=0.1, iterations=2,
                      target_accuracy=1.0, n_fetch=4, n_push=4, push_threshold=threshold,
                      push_top_k=top_k, overlap=overlap)
    store = ParameterStore(memcached_kv, run_id, chunk_bytes=8192)  # 7 chunks
    store.init(init_params(SHAPE, cfg.seed))
    res = run(cfg, store)
    final = np.empty(SHAPE.num_params, dtype=np.float32)
    store.fetch(final)
    np.testing.assert_allclose(final, plain_sgd(cfg, 2), atol=2e-5)
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


def test_a_state_saved_mid_pass_resumes_at_its_offset(memcached_kv, run_id):
    """A worker started from a state saved at minibatch k of pass 1, with the store holding
    exactly the parameters after those k minibatches, visits the pass's other minibatches and
    then pass 2: the uninterrupted run's result, to float tolerance. This is the consistent
    case only; a worker killed at an arbitrary point is test_resume.py's SIGKILL test."""
    cfg = TrainConfig(dataset="synthetic", batch_size=50, alpha=0.1, iterations=2,
                      target_accuracy=1.0, n_fetch=10, n_push=10)
    steps, k = steps_of(len(DATA.train_y), cfg), 37  # not a push boundary
    params, model = init_params(SHAPE, cfg.seed), MLP(SHAPE)
    for at in pass_order(cfg, 0, 1, len(DATA.train_y), steps)[:k]:
        _, g = model.loss_and_grad(params, to_float(DATA.train_x[at:at + 50]),
                                   DATA.train_y[at:at + 50])
        params -= np.float32(cfg.alpha) * g
    store = ParameterStore(memcached_kv, run_id, chunk_bytes=8192)
    store.init(params)
    st = WorkerState(0, iteration=0, offset=k, step=k, samples=50 * k)
    res = run_worker(cfg, store, (DATA.train_x, DATA.train_y, DATA.test_x, NOISE_Y), SHAPE, st,
                     workers=1, steps_per_pass=steps, run_started=time.time(),
                     save=lambda s: None)
    final = np.empty(SHAPE.num_params, dtype=np.float32)
    store.fetch(final)
    np.testing.assert_allclose(final, plain_sgd(cfg, 2), rtol=0, atol=2e-5)
    assert res.iteration == 2 and res.step == 2 * steps and res.samples == 2 * steps * 50
    # pushes at the worker's steps 40, 50, ..., 2 * steps; nothing else was pending
    assert res.pushes == 2 * steps // 10 - k // 10


class FailsAtPush(ParameterStore):
    """The ``fail_at``-th push raises before it reaches the server: a worker that breaks
    between pushes, in process."""

    def __init__(self, kv, run_id: str, fail_at: int) -> None:
        super().__init__(kv, run_id, chunk_bytes=8192)  # 7 chunks
        self.fail_at, self.count = fail_at, 0

    def push(self, *args, **kw):
        self.count += 1
        if self.count == self.fail_at:
            raise StoreError("injected failure")
        return super().push(*args, **kw)


def _data(test_y=NOISE_Y):
    return DATA.train_x, DATA.train_y, DATA.test_x, test_y


@pytest.mark.parametrize("overlap", [False, True])
@pytest.mark.parametrize("backend", ["memcached", "redis"])
def test_a_pass_broken_mid_way_resumes_with_the_same_minibatches_and_masks(
        request, backend, overlap, run_id, monkeypatch):
    """Dropout 0.2. The worker's 13th push fails mid-pass (with overlap on the exchange
    thread, surfacing one exchange later); a new invocation takes the worker over. The state
    it resumes is the one of push 12 (nothing the store lacks is counted as done, the
    minibatches since are redone), and the final parameters are a kill-free run's, to float
    rounding: the resumed pass visits the same minibatches with the same dropout masks."""
    monkeypatch.setattr(worker_mod, "SAVE_SECONDS", 0.0)  # a heartbeat after every minibatch
    kv = request.getfixturevalue(f"{backend}_kv")
    cfg = TrainConfig(dataset="synthetic", batch_size=50, alpha=0.1, iterations=2,
                      target_accuracy=1.0, n_fetch=4, n_push=4, overlap=overlap,
                      dropout_percent=0.2, lease_seconds=0.3)
    steps = steps_of(len(DATA.train_y), cfg)
    kw = dict(workers=1, steps_per_pass=steps, run_started=time.time())
    init = init_params(SHAPE, cfg.seed)
    free = ParameterStore(kv, run_id + "f", chunk_bytes=8192)  # the kill-free run
    free.init(init)
    run(cfg, free)
    reference = np.empty_like(init)
    free.fetch(reference)

    broken = FailsAtPush(kv, run_id, fail_at=13)
    broken.init(init)
    lease = Lease(broken, 0, cfg.lease_seconds)  # as train_worker holds the worker
    st = lease.acquire("first")
    with pytest.raises(StoreError, match="injected"):
        run_worker(cfg, broken, _data(), SHAPE, st, save=lease.save, **kw)
    saved = stored_state(broken, 0)  # what a new invocation resumes
    assert (saved.iteration, saved.offset, saved.step) == (0, 48, 48)
    assert saved.pushes == 12 and saved.samples == 48 * 50
    assert st.step > 48  # the live state had gone on: not what was saved

    store = ParameterStore(kv, run_id)
    store.attach()
    again = Lease(store, 0, cfg.lease_seconds)
    st = again.acquire("second", wait=5)  # once the first owner's heartbeat is stale
    assert (st.iteration, st.offset, st.step, st.pushes) == (0, 48, 48, 12)
    res = run_worker(cfg, store, _data(), SHAPE, st, save=again.save, **kw)
    final = np.empty_like(init)
    clock, _ = store.fetch(final)
    assert res.step == 2 * steps and res.samples == 2 * steps * 50 and res.iterations == 2
    assert res.pushes == clock == 2 * steps // 4  # every push once: none lost, none twice
    np.testing.assert_allclose(final, reference, rtol=0, atol=2e-5)
    np.testing.assert_allclose(final, plain_sgd(cfg, 2), rtol=0, atol=2e-5)


@pytest.mark.parametrize("backend", ["memcached", "redis"])
def test_a_heartbeat_between_pushes_writes_the_last_push_state(request, backend, run_id,
                                                               monkeypatch):
    """Heartbeats (every SAVE_SECONDS; 0 here: after every minibatch) renew the lease with
    the state as of the last push, never the live one (pushes only note their progress: the
    document is written by the heartbeats and the pass end). n_push 7, and the pass end's
    flush pushes at step 80; each write has a fresh heartbeat."""
    monkeypatch.setattr(worker_mod, "SAVE_SECONDS", 0.0)
    kv = request.getfixturevalue(f"{backend}_kv")
    cfg = TrainConfig(dataset="synthetic", batch_size=50, alpha=0.1, iterations=1,
                      target_accuracy=1.0, n_fetch=7, n_push=7)
    steps = steps_of(len(DATA.train_y), cfg)
    store = ParameterStore(kv, run_id, chunk_bytes=8192)
    store.init(init_params(SHAPE, cfg.seed))
    lease = Lease(store, 0, 60)
    st = lease.acquire("w")
    writes: list[tuple[int, dict]] = []

    def save(s: WorkerState) -> None:
        lease.save(s)
        writes.append((st.step, store.get_doc(state_key(0))))  # (live step, what is stored)

    run_worker(cfg, store, _data(), SHAPE, st, save=save, workers=1, steps_per_pass=steps,
               run_started=time.time())
    assert st.step == steps == 80
    *mid, (_, end) = writes
    assert (end["step"], end["iteration"], end["offset"]) == (steps, 1, 0)  # the pass, whole
    assert len({live for live, _ in mid if live % 7}) > 40  # between pushes, all pass long
    for live, doc in mid:
        pushed = live - live % 7  # the last push at or before the live step...
        # ...or, at the pass's last minibatch, the flush's push (a heartbeat may come first)
        assert doc["step"] in ({pushed, steps} if live == steps else {pushed}), live
        assert doc["samples"] == 50 * doc["step"] and doc["pushes"] == -(-doc["step"] // 7)
        assert doc["lease"] == lease.owner
    beats = [d["heartbeat"] for _, d in writes]
    assert beats == sorted(beats) and len(set(beats)) == len(beats)  # each one fresh


def test_averaging_workers_continue_from_the_mean_of_the_published_vectors(
        memcached_kv, run_id, monkeypatch):
    """Two workers averaging every 5 minibatches: after every round both hold bit-identical
    parameters, equal to the mean (computed here) of the vectors the two published."""
    cfg = TrainConfig(dataset="synthetic", batch_size=50, alpha=0.1, iterations=2,
                      target_accuracy=1.0, algorithm="averaging", average_every=5)
    store = ParameterStore(memcached_kv, run_id, chunk_bytes=8192)
    store.init(init_params(SHAPE, 0))
    half = len(DATA.train_y) // 2
    shards = [(DATA.train_x[:half], DATA.train_y[:half]), (DATA.train_x[half:],
                                                            DATA.train_y[half:])]
    rounds: dict[int, dict[int, tuple[np.ndarray, np.ndarray]]] = {0: {}, 1: {}}

    class Recorded(Averaging):
        """The real round; records what this worker published and what it continued from."""

        def average(self, params: np.ndarray, r: int) -> None:
            published = params.copy()
            super().average(params, r)
            rounds[self.me][r] = (published, params.copy())

    monkeypatch.setattr(worker_mod, "Averaging", Recorded)

    def work(w: int) -> WorkerState:
        ps = ParameterStore(open_kv(MEMCACHED_URL), run_id)
        ps.attach()
        return run(cfg, ps, *shards[w], worker_id=w, workers=2)

    a, b = in_threads(work, [0, 1])
    n_rounds = 2 * (half // 50) // 5
    assert a.averages == b.averages == n_rounds
    assert a.barrier_timeouts == b.barrier_timeouts == []
    assert sorted(rounds[0]) == sorted(rounds[1]) == list(range(1, n_rounds + 1))
    for r in range(1, n_rounds + 1):
        (pub0, avg0), (pub1, avg1) = rounds[0][r], rounds[1][r]
        assert not np.array_equal(pub0, pub1)  # they trained apart since the last round
        assert np.array_equal(avg0, avg1), f"round {r}: the workers' parameters differ"
        mean = ((pub0.astype(np.float64) + pub1) / 2).astype(np.float32)
        np.testing.assert_array_max_ulp(avg0, mean, maxulp=1)
    # and both then evaluated the very same parameters
    assert a.accuracy == b.accuracy and a.val_loss == b.val_loss


def test_a_sparse_push_that_leaves_chunks_pending_notes_nothing(memcached_kv, run_id,
                                                                monkeypatch):
    """push_top_k 1 of 7 chunks: no push mid-pass sends everything, so nothing mid-pass is
    counted as done (the held-back chunks are not in the store): every heartbeat writes the
    pass's starting state; the pass end's flush leaves nothing pending and is noted."""
    monkeypatch.setattr(worker_mod, "SAVE_SECONDS", 0.0)  # a heartbeat after every minibatch
    cfg = TrainConfig(dataset="synthetic", batch_size=50, alpha=0.1, iterations=1,
                      target_accuracy=1.0, n_fetch=4, n_push=4, push_top_k=1)
    steps = steps_of(len(DATA.train_y), cfg)
    store = ParameterStore(memcached_kv, run_id, chunk_bytes=8192)  # 7 chunks
    store.init(init_params(SHAPE, cfg.seed))
    lease = Lease(store, 0, 60)
    st = lease.acquire("w")
    resumable: list[tuple[int, int]] = []

    def save(s: WorkerState) -> None:
        lease.save(s)
        resumable.append((st.step, stored_state(store, 0).step))  # (live, what resumes)

    res = run_worker(cfg, store, _data(), SHAPE, st, save=save, workers=1,
                     steps_per_pass=steps, run_started=time.time())
    assert res.pushes > steps // 4 and res.bytes_skipped > 0  # sparse pushes went out
    *mid, end = resumable
    assert len(mid) >= steps - 1 and {done for _, done in mid} == {0}
    assert end == (steps, steps)


def test_an_averaging_worker_broken_mid_pass_resumes_at_its_last_round(memcached_kv, run_id,
                                                                        monkeypatch):
    """One averaging worker (dropout 0.2), every 5 minibatches a round; its 7th round fails
    before it publishes anything. A new invocation resumes the progress noted at round 6,
    takes round 6's vector again and redoes the minibatches since, with the same masks: the
    final parameters are bit for bit the kill-free run's."""
    cfg = TrainConfig(dataset="synthetic", batch_size=50, alpha=0.1, iterations=2,
                      target_accuracy=1.0, algorithm="averaging", average_every=5,
                      dropout_percent=0.2, lease_seconds=0.3)
    steps = steps_of(len(DATA.train_y), cfg)
    kw = dict(workers=1, steps_per_pass=steps, run_started=time.time())
    init = init_params(SHAPE, cfg.seed)
    free = ParameterStore(memcached_kv, run_id + "f", chunk_bytes=8192)  # the kill-free run
    free.init(init)
    run(cfg, free)
    reference = np.empty_like(init)
    free.fetch(reference)

    average = Averaging.average

    def fails_at_round_7(self, params, r):
        if r == 7:
            raise StoreError("injected failure")
        average(self, params, r)

    monkeypatch.setattr(Averaging, "average", fails_at_round_7)
    store = ParameterStore(memcached_kv, run_id, chunk_bytes=8192)
    store.init(init)
    lease = Lease(store, 0, cfg.lease_seconds)
    with pytest.raises(StoreError, match="injected"):
        run_worker(cfg, store, _data(), SHAPE, lease.acquire("first"), save=lease.save, **kw)
    monkeypatch.setattr(Averaging, "average", average)
    assert (stored_state(store, 0).step, stored_state(store, 0).averages) == (30, 6)

    again = Lease(store, 0, cfg.lease_seconds)
    st = again.acquire("second", wait=5)
    res = run_worker(cfg, store, _data(), SHAPE, st, save=again.save, **kw)
    final = np.empty_like(init)
    store.fetch(final)
    assert res.step == 2 * steps and res.averages == 2 * steps // 5
    assert np.array_equal(final, reference)


def test_averaging_barrier_with_a_dead_worker_times_out_and_proceeds(memcached_kv, run_id):
    cfg = TrainConfig(dataset="synthetic", batch_size=50, alpha=0.1, iterations=1,
                      target_accuracy=1.0, algorithm="averaging", average_every=10,
                      barrier_timeout=0.3)
    store = ParameterStore(memcached_kv, run_id, chunk_bytes=8192)
    store.init(init_params(SHAPE, 0))
    res = run(cfg, store, worker_id=0, workers=2)  # worker 1 never comes
    assert res.iteration == 1 and res.averages == len(DATA.train_y) // 50 // 10
    # one timeout, on the first round: every later round that waited for the dead worker
    # would have timed out too and been recorded here
    assert res.barrier_timeouts == [{"round": 1, "missing": [1], "after_s": 0.3}]
