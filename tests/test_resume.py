"""Leases, checkpoints and resuming runs, against real servers."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from emnist.data import open_shard
from emnist.model import MLP, MLPShape, init_params, to_float
from emnist.store import CorruptValue, MissingState, ParameterStore
from emnist.train.checkpoint import Checkpoints, NoCheckpoint
from emnist.train.config import TrainConfig
from emnist.train.run import UnknownRun, resume_run, setup_run, write_checkpoint
from emnist.train.state import Lease, LeaseLost, WorkerBusy, WorkerState, state_key
from emnist.train.worker import pass_order
from tests.conftest import MEMCACHED_URL, REDIS_URL


def test_lease_is_exclusive_until_the_heartbeat_is_stale(memcached_kv, run_id):
    store = ParameterStore(memcached_kv, run_id)
    first = Lease(store, 0, seconds=0.5)
    st = first.acquire("a")
    assert st.invocations == 1 and st.resumes == []
    st.iteration, st.offset = 3, 7
    first.save(st)
    with pytest.raises(WorkerBusy):
        Lease(store, 0, seconds=0.5).acquire("b", wait=0.1)
    refused: list[float] = []

    def sleep(s: float) -> None:  # acquire sleeps only after a refusal (a live heartbeat)
        refused.append(time.time())
        time.sleep(s)

    second = Lease(store, 0, seconds=0.5)
    taken = second.acquire("b", wait=2, sleep=sleep)  # waits for a stale heartbeat
    assert refused, "the live owner's lease was taken without waiting"
    # taken only once the first owner's last heartbeat was older than the lease
    assert taken.resumes[0]["at"] - st.heartbeat >= 0.5
    assert taken.iteration == 3 and taken.offset == 7 and taken.invocations == 2
    assert taken.resumes[0]["iteration"] == 3 and taken.resumes[0]["from"] == "a"
    with pytest.raises(LeaseLost):
        first.save(st)  # the old owner may not write any more


def test_checkpoints_round_trip_and_refuse_damage(tmp_path, redis_kv, run_id):
    params = np.arange(1000, dtype=np.float32)
    for url in (str(tmp_path), f"file://{tmp_path}", REDIS_URL):
        ck = Checkpoints(url)
        ck.write(run_id, {"run": {"a": 1}}, params)
        docs, back = ck.read(run_id)
        assert docs == {"run": {"a": 1}} and np.array_equal(back, params)
    with pytest.raises(NoCheckpoint):
        Checkpoints(str(tmp_path)).read("other-run")
    path = tmp_path / f"{run_id}.ckpt"
    blob = bytearray(path.read_bytes())
    blob[-3] ^= 0xFF
    path.write_bytes(bytes(blob))
    with pytest.raises(CorruptValue, match="checksum"):
        Checkpoints(str(tmp_path)).read(run_id)


def test_resume_unknown_run_is_a_clear_error(memcached_kv, tmp_path):
    with pytest.raises(UnknownRun, match="unknown run id 'nope'.*no checkpoint_url"):
        resume_run(memcached_kv, "nope")
    with pytest.raises(UnknownRun, match="no checkpoint of run 'nope'"):
        resume_run(memcached_kv, "nope", str(tmp_path))


def test_a_lost_run_is_restored_from_its_checkpoint(memcached_kv, run_id, tmp_path):
    cfg = TrainConfig(dataset="synthetic", number_of_workers=2, checkpoint_url=str(tmp_path),
                      data_location=str(tmp_path / "shards"))
    state = setup_run(cfg, memcached_kv, 2, run_id=run_id)
    store = ParameterStore(memcached_kv, run_id)
    store.attach()
    store.put_docs({state_key(0): {"worker_id": 0, "iteration": 4, "lease": "x"},
                    "result:1": {"worker_id": 1, "done": True}})
    params = np.empty(store.num_params, dtype=np.float32)
    store.fetch(params)
    write_checkpoint(store, state, str(tmp_path))
    # the store forgets everything (a memcached restart)
    store.delete(["run", "layout", state_key(0), "result:1"])
    launched = []
    out = resume_run(memcached_kv, run_id, str(tmp_path), launched.append)
    assert out["restored_from_checkpoint"] and out["resumed_workers"] == [0]
    assert [b["worker_id"] for b in launched] == [0]  # the finished worker is not relaunched
    back = ParameterStore(memcached_kv, run_id)
    back.attach()
    again = np.empty_like(params)
    back.fetch(again)
    assert np.array_equal(again, params)
    doc = back.get_doc(state_key(0))
    assert doc["iteration"] == 4 and doc["lease"] == ""  # resumable by a new invocation


def test_saving_a_state_the_store_lost_is_an_error(memcached_kv, run_id):
    store = ParameterStore(memcached_kv, run_id)
    lease = Lease(store, 0, seconds=5)
    st = lease.acquire("a")
    memcached_kv.delete_many([store.key(state_key(0))])  # a restarted memcached
    with pytest.raises(MissingState, match="vanished"):
        lease.save(st)


# -- a worker process SIGKILLed at arbitrary points, resumed by new processes ----------------
WORKER = """
import sys
from emnist.store import open_kv
from emnist.train.run import train_worker
train_worker(open_kv(sys.argv[1]), sys.argv[2], 0, sys.argv[3])
"""
TOL = 2e-5  # Downpour's bookkeeping (global + pending) against plain SGD: float rounding only


def _worker(run_id: str, hostname: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, MEMCACHED_URL, run_id, hostname],
                            stderr=subprocess.PIPE, text=True)


def _kill_after_a_mid_pass_save(proc: subprocess.Popen, store: ParameterStore, after: int,
                                extra_pushes: int) -> None:
    """SIGKILL ``proc`` once it has saved a mid-pass state past step ``after`` and the store
    has seen ``extra_pushes`` more pushes: wherever the worker is then."""
    vec = np.empty(store.num_params, dtype=np.float32)
    deadline = time.monotonic() + 120
    target = None
    try:
        while True:
            assert proc.poll() is None, f"worker exited early: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "the worker made no progress"
            clock, docs = store.fetch(vec, (state_key(0),))
            doc = docs.get(state_key(0), {})  # none until the process holds the lease
            if target is None and doc.get("offset", 0) > 0 and doc["step"] > after:
                target = clock + extra_pushes
            if target is not None and clock >= target:
                break
            time.sleep(0.002)  # a polling interval: leaves the CPU to the worker
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        _reap(proc)


def _reap(proc: subprocess.Popen) -> None:
    """A worker this test started never outlives it."""
    if proc.poll() is None:
        proc.kill()
    proc.wait(30)
    proc.stderr.close()


def _sgd(cfg: TrainConfig, shape: MLPShape, shard, steps: int, params: np.ndarray,
         minibatches) -> np.ndarray:
    """Plain SGD from a copy of ``params`` over the worker's global minibatch numbers
    (1-based: number g is position (g - 1) % steps of pass (g - 1) // steps + 1's order)."""
    params, model, bs = params.copy(), MLP(shape), cfg.batch_size
    orders: dict[int, np.ndarray] = {}
    for g in minibatches:
        it, pos = divmod(g - 1, steps)
        if it not in orders:
            orders[it] = pass_order(cfg, 0, it + 1, len(shard.y), steps)
        at = orders[it][pos]
        _, grad = model.loss_and_grad(params, to_float(shard.x[at:at + bs]), shard.y[at:at + bs])
        grad *= -np.float32(cfg.alpha)
        params += grad
    return params


def test_a_sigkilled_worker_process_resumes_from_its_last_saved_state(memcached_kv, run_id,
                                                                      tmp_path):
    """A real worker process (train_worker, one worker, real memcached) is SIGKILLed twice at
    arbitrary points (after a mid-pass save, when the store has seen a few more pushes:
    between saves and between pushes), and new processes resume it. What is exact, asserted:

    - each new process resumes exactly the state saved last (pass, offset, counters), so the
      worker's own accounting is the uninterrupted one: every minibatch counted once;
    - the store keeps every push applied before a kill, including those made after the last
      save (the state is saved every 0.25 s; pushes go every n_push minibatches);
    - so if a process started at saved step S0, its last push reached step P and it was killed
      with step S saved, the store has minibatches S0+1..P from it and the next process redoes
      S+1..: minibatches between S and P are applied twice (P > S) or never (P < S). The final
      parameters are plain SGD over exactly that sequence (to float tolerance). They equal the
      uninterrupted run's only if P == S at every kill, and then to tolerance, not bit for bit.
    Dropout is 0: a pass's dropout masks come from one random stream per pass, so a pass
    resumed mid-way draws other masks than the uninterrupted pass would.
    """
    cfg = TrainConfig(dataset="fashion-mnist", number_of_workers=1, batch_size=50,
                      hidden_size=32, iterations=3, target_accuracy=1.0, n_fetch=10,
                      n_push=10, lease_seconds=0.5, data_location=str(tmp_path))
    state = setup_run(cfg, memcached_kv, 1, run_id=run_id)
    steps, n_push = state["steps_per_pass"], cfg.n_push
    total = cfg.iterations * steps
    assert steps % n_push == 0  # every push carries exactly n_push minibatches
    store = ParameterStore(memcached_kv, run_id)
    store.attach()
    shard = open_shard(state["shard_dir"], 0)
    shape = MLPShape(cfg.pixels_per_image, cfg.hidden_size, state["num_classes"])
    init = init_params(shape, cfg.seed)
    vec = np.empty(store.num_params, dtype=np.float32)

    expected, saves, start, clock0 = init, [], 0, 0
    for host, extra_pushes in (("first", 3), ("second", 0)):
        _kill_after_a_mid_pass_save(_worker(run_id, host), store, start, extra_pushes)
        clock, _ = store.fetch(vec)
        saved = WorkerState.from_dict(store.get_doc(state_key(0)))
        assert saved.lease and not saved.done  # killed while it owned the worker, mid-run
        assert saved.step == saved.iteration * steps + saved.offset < total
        assert saved.offset > 0 and saved.pushes == saved.step // n_push
        # this process pushed at its steps that are multiples of n_push after `start`
        pushed_to = (start // n_push + clock - clock0) * n_push
        expected = _sgd(cfg, shape, shard, steps, expected, range(start + 1, pushed_to + 1))
        np.testing.assert_allclose(vec, expected, rtol=0, atol=TOL)  # what the store holds
        saves.append((saved, pushed_to))
        start, clock0 = saved.step, clock

    last = _worker(run_id, "third")
    try:
        _, err = last.communicate(timeout=120)
        assert last.returncode == 0, err[-2000:]
    finally:
        _reap(last)
    result = store.get_doc("result:0")
    final_clock, _ = store.fetch(vec)

    # the worker's accounting: resumed from each saved state, every minibatch counted once
    assert result["invocations"] == 3 and result["hostname"] == "third"
    assert [(r["iteration"], r["offset"], r["from"]) for r in result["resumes"]] == \
        [(s.iteration, s.offset, host) for (s, _), host in zip(saves, ("first", "second"))]
    assert result["iterations"] == cfg.iterations and result["stop_reason"] == "iterations"
    assert result["step"] == total and result["samples"] == total * cfg.batch_size
    assert result["pushes"] == total // n_push
    # the store's: every push was applied, those made after a save and redone included
    assert final_clock == clock0 + total // n_push - saves[-1][0].pushes

    # the parameters: plain SGD over the sequence the store actually received
    expected = _sgd(cfg, shape, shard, steps, expected, range(start + 1, total + 1))
    np.testing.assert_allclose(vec, expected, rtol=0, atol=TOL)
    uninterrupted = _sgd(cfg, shape, shard, steps, init, range(1, total + 1))
    exact = all(pushed_to == s.step for s, pushed_to in saves)
    assert np.allclose(vec, uninterrupted, rtol=0, atol=TOL) == exact, \
        ([(s.step, p) for s, p in saves], float(np.abs(vec - uninterrupted).max()))
