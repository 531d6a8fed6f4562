"""Leases, checkpoints and resuming runs, against real servers."""

from __future__ import annotations

import time

import numpy as np
import pytest

from emnist.store import CorruptValue, MissingState, ParameterStore
from emnist.train.checkpoint import Checkpoints, NoCheckpoint
from emnist.train.config import TrainConfig
from emnist.train.run import UnknownRun, resume_run, setup_run, write_checkpoint
from emnist.train.state import Lease, LeaseLost, WorkerBusy, state_key
from tests.conftest import REDIS_URL


def test_lease_is_exclusive_until_the_heartbeat_is_stale(memcached_kv, run_id):
    store = ParameterStore(memcached_kv, run_id)
    first = Lease(store, 0, seconds=0.5)
    st = first.acquire("a")
    assert st.invocations == 1 and st.resumes == []
    st.iteration, st.offset = 3, 7
    first.save(st)
    with pytest.raises(WorkerBusy):
        Lease(store, 0, seconds=0.5).acquire("b", wait=0.1)
    t0 = time.monotonic()
    second = Lease(store, 0, seconds=0.5)
    taken = second.acquire("b", wait=2)  # waits until the first's heartbeat is stale
    assert time.monotonic() - t0 >= 0.3
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
