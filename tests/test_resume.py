"""Leases, checkpoints and resuming runs, against real servers."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import emnist.train.state as state_mod
from emnist.data import open_shard
from emnist.model import MLP, MLPShape, init_params, to_float
from emnist.store import CorruptValue, MissingState, ParameterStore
from emnist.train.checkpoint import Checkpoints, NoCheckpoint
from emnist.train.config import TrainConfig
from emnist.train.run import UnknownRun, resume_run, setup_run, write_checkpoint
from emnist.train.state import (
    Lease,
    LeaseLost,
    WorkerBusy,
    WorkerState,
    snapshot,
    state_key,
    stored_state,
)
from emnist.train.worker import DropoutSeeds, pass_order
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


@pytest.mark.parametrize("backend", ["memcached", "redis"])
def test_a_push_notes_progress_only_while_the_lease_holds(request, backend, run_id):
    """A push notes the worker's progress. With the lease: both land, and a new invocation
    resumes the noted progress (the state document itself is only written by heartbeats).
    After a takeover the old owner's push is refused (LeaseLost): on Redis inside the push's
    own transaction, so its update does not land either; on memcached (no multi-key
    atomicity) the check comes once the chunks have landed: that one push is the most a
    stalled old owner adds. Its progress is never noted: the new owner's state is untouched."""
    kv = request.getfixturevalue(f"{backend}_kv")
    store = ParameterStore(kv, run_id, chunk_bytes=16)  # 3 chunks
    store.init(np.zeros(12, dtype=np.float32))
    old = Lease(store, 0, seconds=0.3)
    st = old.acquire("a")
    st.step, st.offset, st.pushes = 5, 5, 1
    check, note = old.for_push(snapshot(st))
    store.push(np.ones(12, np.float32), check=check, note=note)
    vec = np.empty(12, dtype=np.float32)
    assert store.fetch(vec)[0] == 1 and np.array_equal(vec, np.ones(12))
    assert store.get_doc(state_key(0))["step"] == 0  # the document: as acquired
    assert (stored_state(store, 0).step, stored_state(store, 0).pushes) == (5, 1)

    new = Lease(store, 0, seconds=0.3)
    taken = new.acquire("b", wait=5)  # once the old owner's heartbeat is stale
    assert (taken.step, taken.offset, taken.pushes) == (5, 5, 1)  # the noted progress
    st.step, st.offset, st.pushes = 10, 10, 2
    check, note = old.for_push(snapshot(st))
    with pytest.raises(LeaseLost):
        store.push(np.ones(12, np.float32), check=check, note=note)
    clock, _ = store.fetch(vec)
    landed = backend == "memcached"
    assert clock == 1 + landed and np.array_equal(vec, np.full(12, 1.0 + landed))
    resumed = stored_state(store, 0)
    assert (resumed.step, resumed.lease) == (5, new.owner)  # the new owner's, untouched


def test_a_takeover_resumes_the_last_owners_note_and_reads_again_if_the_owner_moves(
        memcached_kv, run_id, monkeypatch):
    """A new invocation resumes the document merged with its owner's note. If another
    invocation takes the worker over between reading that note and taking the document, the
    note read belongs to an owner that no longer is: it reads again, for the new owner."""
    store = ParameterStore(memcached_kv, run_id)
    first = Lease(store, 0, seconds=0.0)  # never busy: every acquire takes over at once
    st = first.acquire("a")
    st.step, st.offset, st.pushes = 5, 5, 1
    memcached_kv.set_many(first.for_push(snapshot(st))[1])  # a push noted, no heartbeat since
    assert stored_state(store, 0).step == 5 and store.get_doc(state_key(0))["step"] == 0

    reads: list[str] = []
    real = state_mod._note

    def note(store_, worker_id, owner):
        reads.append(owner)
        if len(reads) == 1:  # someone else takes the worker over right after this read
            doc = store.get_doc(state_key(0))
            store.put_doc(state_key(0), {**doc, "lease": "someone", "step": 3})
        return real(store_, worker_id, owner)

    monkeypatch.setattr(state_mod, "_note", note)
    taken = Lease(store, 0, seconds=0.0).acquire("b")
    assert reads == [first.owner, "someone"]
    assert taken.step == 3  # the new owner's document (it has no note): not the old note


def test_a_state_write_never_goes_back(memcached_kv, run_id):
    """An overlapped exchange saves step 20 (a tier's push, saved after it) while the
    training thread's heartbeat still carries step 10: the stored progress stays at 20, the
    heartbeat is taken."""
    store = ParameterStore(memcached_kv, run_id)
    lease = Lease(store, 0, seconds=60)
    st = lease.acquire("a")
    behind = snapshot(st)
    st.step, st.pushes = 20, 2
    lease.save(st)
    beat = WorkerState.from_dict({**behind, "step": 10, "pushes": 1})
    lease.save(beat)
    doc = store.get_doc(state_key(0))
    assert (doc["step"], doc["pushes"], doc["lease"]) == (20, 2, lease.owner)
    assert doc["heartbeat"] == beat.heartbeat
    st.step = 21  # and going forward still writes
    lease.save(st)
    assert store.get_doc(state_key(0))["step"] == 21


# -- a worker process SIGKILLed at arbitrary points, resumed by new processes ----------------
WORKER = """
import os, signal, sys
from emnist.store import open_kv
from emnist.store.params import ParameterStore
from emnist.train.run import train_worker

die_at = int(sys.argv[4])  # > 0: die between the chunks and the note of this push
if die_at:
    push, count = ParameterStore.push, [0]

    def push_then_die(self, delta, mode="atomic", out=None, chunks=None, check=None,
                      note=None):
        count[0] += 1
        if count[0] < die_at:
            return push(self, delta, mode, out, chunks, check, note)
        push(self, delta, mode, out, chunks)  # the chunks land (memcached writes the note
        os.kill(os.getpid(), signal.SIGKILL)  # after them: a kill can fall in between)

    ParameterStore.push = push_then_die
train_worker(open_kv(sys.argv[1]), sys.argv[2], 0, sys.argv[3])
"""
TOL = 2e-5  # Downpour's bookkeeping (global + pending) against plain SGD: float rounding only


def _worker(url: str, run_id: str, hostname: str, die_at: int = 0) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WORKER, url, run_id, hostname, str(die_at)],
                            stderr=subprocess.PIPE, text=True)


def _kill_after(proc: subprocess.Popen, store: ParameterStore, pushes: int) -> None:
    """SIGKILL ``proc`` once the store has seen ``pushes`` pushes: wherever the worker is then
    (computing, pushing, noting, heartbeating)."""
    deadline = time.monotonic() + 120
    try:
        while store.fetch(np.empty(store.num_params, np.float32))[0] < pushes:
            assert proc.poll() is None, f"worker exited early: {proc.stderr.read()[-2000:]}"
            assert time.monotonic() < deadline, "the worker made no progress"
            time.sleep(0.002)  # a polling interval: leaves the CPU to the worker
        proc.send_signal(signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
    finally:
        _reap(proc)


def _died(proc: subprocess.Popen) -> None:
    """The worker killed itself where it was told to."""
    try:
        assert proc.wait(120) == -signal.SIGKILL, proc.stderr.read()[-2000:]
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
    (1-based: number g is position (g - 1) % steps of pass (g - 1) // steps + 1's order),
    each with the dropout masks the worker draws for it."""
    params, model, bs = params.copy(), MLP(shape, cfg.dropout_percent), cfg.batch_size
    seeds, orders = DropoutSeeds(cfg.seed, 0), {}
    for g in minibatches:
        it, pos = divmod(g - 1, steps)
        if it not in orders:
            orders[it] = pass_order(cfg, 0, it + 1, len(shard.y), steps)
        at = orders[it][pos]
        model.rng = seeds.at(it + 1, pos)
        _, grad = model.loss_and_grad(params, to_float(shard.x[at:at + bs]), shard.y[at:at + bs])
        grad *= -np.float32(cfg.alpha)
        params += grad
    return params


# (backend, how each of two processes ends): a count of pushes after which the test kills it,
# or ("die", n): it kills itself between push n's chunks and its note (memcached only:
# Redis writes both in one transaction, there is no such point)
KILLS = [("memcached", [40, 170]), ("redis", [40, 170]), ("memcached", [40, ("die", 90)])]
# (of 2 passes x 120 pushes: a run is ~0.8 s of training)


@pytest.mark.parametrize("backend, kills", KILLS, ids=["memcached", "redis", "memcached-window"])
def test_a_sigkilled_worker_process_resumes_from_its_last_push(request, backend, kills,
                                                               run_id, tmp_path):
    """A real worker process (train_worker, one worker, dropout 0.2, a real store) is SIGKILLed
    twice, and new processes resume it. Each push notes the worker's progress (never between
    pushes), so what is exact, asserted at every kill and at the end:

    - nothing is lost: the state a new process resumes (``stored_state``: the document and
      its owner's note) is at a push (step a multiple of n_push, counters matching) and every
      minibatch it counts as done is in the store;
    - a push the state does not count (``dup``: store pushes - saved pushes) exists only on
      memcached, at most one per kill, and only when the kill fell between a push's chunks and
      its note (forced by the "window" case); on Redis there is none: exactly once;
    - the store's parameters are plain SGD over exactly the minibatches it received, each with
      the dropout masks the uninterrupted run draws for it (masks come from (seed, worker,
      pass, offset)), so with no dup the result is the uninterrupted run's (to float rounding).
    """
    kv = request.getfixturevalue(f"{backend}_kv")
    url = MEMCACHED_URL if backend == "memcached" else REDIS_URL
    cfg = TrainConfig(dataset="fashion-mnist", number_of_workers=1, batch_size=50,
                      hidden_size=32, iterations=2, target_accuracy=1.0, n_fetch=10,
                      n_push=10, dropout_percent=0.2, lease_seconds=0.5,
                      data_location=str(tmp_path))
    state = setup_run(cfg, kv, 1, run_id=run_id)
    steps, n_push, bs = state["steps_per_pass"], cfg.n_push, cfg.batch_size
    total = cfg.iterations * steps
    assert steps % n_push == 0  # every push carries n_push minibatches; pass ends are pushes
    store = ParameterStore(kv, run_id)
    store.attach()
    shard = open_shard(state["shard_dir"], 0)
    shape = MLPShape(cfg.pixels_per_image, cfg.hidden_size, state["num_classes"])
    init = init_params(shape, cfg.seed)
    vec = np.empty(store.num_params, dtype=np.float32)

    expected, saves, start, clock0, dups = init, [], 0, 0, 0
    for host, kill in zip(("first", "second"), kills):
        if isinstance(kill, tuple):
            _died(_worker(url, run_id, host, die_at=kill[1]))
        else:
            _kill_after(_worker(url, run_id, host), store, kill)
        clock, _ = store.fetch(vec)
        saved = stored_state(store, 0)  # what the next process resumes: state + its note
        assert saved.lease and not saved.done  # killed while it owned the worker, mid-run
        assert saved.step == saved.iteration * steps + saved.offset < total
        # noted at a push, never between: its counters are that push's
        assert saved.step % n_push == 0 and saved.step > start
        assert saved.samples == saved.step * bs and saved.pushes == saved.step // n_push
        # this process pushed n_push minibatches at each push after `start`
        pushed_to = start + (clock - clock0) * n_push
        dup = clock - saved.pushes - dups  # pushes in the store that the state does not count
        assert pushed_to == saved.step + dup * n_push
        if isinstance(kill, tuple):
            assert dup == 1 and saved.pushes == kill[1] - 1 + start // n_push
        elif backend == "redis":
            assert dup == 0
        else:
            assert dup in (0, 1)
        expected = _sgd(cfg, shape, shard, steps, expected, range(start + 1, pushed_to + 1))
        np.testing.assert_allclose(vec, expected, rtol=0, atol=TOL)  # what the store holds
        saves.append(saved)
        start, clock0, dups = saved.step, clock, dups + dup

    last = _worker(url, run_id, "third")
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
        [(s.iteration, s.offset, host) for s, host in zip(saves, ("first", "second"))]
    assert result["iterations"] == cfg.iterations and result["stop_reason"] == "iterations"
    assert result["step"] == total and result["samples"] == total * bs
    assert result["pushes"] == total // n_push
    # the store's: every push once, plus the uncounted ones seen at the kills
    assert final_clock == total // n_push + dups

    # the parameters: plain SGD over the sequence the store actually received
    expected = _sgd(cfg, shape, shard, steps, expected, range(start + 1, total + 1))
    np.testing.assert_allclose(vec, expected, rtol=0, atol=TOL)
    uninterrupted = _sgd(cfg, shape, shard, steps, init, range(1, total + 1))
    assert np.allclose(vec, uninterrupted, rtol=0, atol=TOL) == (dups == 0), \
        (dups, float(np.abs(vec - uninterrupted).max()))
