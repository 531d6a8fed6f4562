"""A run's life cannot be hijacked by a caller or a forged worker state: a run is created once
(a type-1 emnist-train call naming an existing run joins it, never rewrites it), and no worker
invokes itself again without progress (an endless emnist-train chain from one call).

Everything goes through the real local gateway running emnist.yml against real memcached; the
forged worker states are written as any process that reaches memcached could write them."""

from __future__ import annotations

import time

import numpy as np
import pytest

from emnist.store import ParameterStore, codec
from emnist.train.state import MAX_PASS_CALLS, state_key
from tests.conftest import MEMCACHED_URL
from tests.servers import local_gateway, run_to_result

RUN = {"dataset": "synthetic", "number_of_workers": 1, "iterations": 2,
       "target_accuracy": 1.0, "batch_size": 50}


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lifegw")
    (tmp / "data").mkdir()
    env = {"STORE_URL": MEMCACHED_URL, "DATA_LOCATION": str(tmp / "data" / "shards"),
           "DATA_ROOTS": str(tmp / "data"), "TRAIN_REPLICAS": "1", "GRAD_REPLICAS": "1"}
    with local_gateway(tmp, env) as gw:
        yield gw


@pytest.fixture(scope="module")
def kv(module_kv):
    return module_kv


def _finished_run(gw, kv) -> tuple[str, ParameterStore]:
    """A 1-worker run set up by emnist-setup and trained to its iteration limit."""
    return run_to_result(gw, kv, RUN, timeout=120)


def _calls(gw) -> int:
    fn = gw.get_function("emnist-train")
    return int(fn.get("invocationCount", 0))


def _params(store: ParameterStore) -> np.ndarray:
    out = np.empty(store.num_params, dtype=np.float32)
    store.fetch(out)
    return out


def _forge_worker(store: ParameterStore, **changes) -> None:
    """Rewrite worker 0's state document and drop its result, as a store writer could."""
    key = store.key(state_key(0))
    doc = codec.decode_doc(key, store.kv.get_many([key])[key])
    doc.update(lease="", **changes)
    store.kv.set_many({key: codec.encode_doc(doc)})
    store.kv.delete_many([store.key("result:0")])


def _no_more_calls(gw, expected: int, seconds: float = 2.0) -> None:
    """The gateway's emnist-train count stays at ``expected``: an async next pass, had one
    been asked for, is queued within milliseconds of the answer."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert _calls(gw) == expected
        time.sleep(0.1)


def test_a_type1_call_naming_an_existing_run_joins_it_and_rewrites_nothing(gateway, kv):
    run_id, store = _finished_run(gateway, kv)
    before_doc, before = store.get_doc("run"), _params(store)
    hostile = {"execution_type": 1, "number_of_workers": 1, "dataset": "synthetic",
               "hidden_size": 7, "iterations": 1, "alpha": 0.9, "seed": 99}
    r = gateway.invoke("emnist-train", {"run_id": run_id, "worker_id": 0, "config": hostile},
                       check=False)
    assert r.status_code == 200, r.text
    assert r.json()["done"], r.text
    assert store.get_doc("run") == before_doc  # the victim's configuration is untouched
    after = ParameterStore(kv, run_id)
    after.attach()
    assert after.num_params == store.num_params
    np.testing.assert_array_equal(_params(after), before)


def test_setup_refuses_a_run_id_a_type1_worker_created(gateway, kv):
    run_id = "t1claim" + str(time.time_ns())[-8:]
    cfg = {"execution_type": 1, "number_of_workers": 1, **RUN}
    r = gateway.invoke("emnist-train", {"run_id": run_id, "worker_id": 0, "config": cfg},
                       check=False)
    assert r.status_code == 200, r.text
    doc = ParameterStore(kv, run_id).get_doc("run")
    assert doc is not None and doc["config"]["execution_type"] == 1
    r = gateway.invoke("emnist-setup", {**RUN, "run_id": run_id}, check=False)
    assert r.status_code in (400, 409) and r.json()["error"].startswith("run_id: "), r.text
    assert ParameterStore(kv, run_id).get_doc("run") == doc


def test_a_worker_past_its_iterations_ends_instead_of_invoking_itself(gateway, kv):
    run_id, store = _finished_run(gateway, kv)
    _forge_worker(store, done=False, reached=False, stop_reason="",
                  iteration=RUN["iterations"] + 5)
    calls = _calls(gateway)
    r = gateway.invoke("emnist-train", {"run_id": run_id, "worker_id": 0}, check=False)
    assert r.status_code == 200, r.text
    assert r.json()["done"] and r.json()["stop_reason"] == "iterations"
    assert store.get_doc("result:0")["stop_reason"] == "iterations"
    _no_more_calls(gateway, calls + 1)


def test_a_pass_that_took_too_many_invocations_stops_the_worker(gateway, kv):
    run_id, store = _finished_run(gateway, kv)
    _forge_worker(store, done=False, reached=False, stop_reason="", iteration=1, offset=0,
                  pass_calls=MAX_PASS_CALLS)
    step = store.get_doc(state_key(0))["step"]
    calls = _calls(gateway)
    r = gateway.invoke("emnist-train", {"run_id": run_id, "worker_id": 0}, check=False)
    assert r.status_code == 200, r.text
    assert r.json()["done"] and r.json()["stop_reason"].startswith("invocations: ")
    assert store.get_doc(state_key(0))["step"] == step  # nothing trained on the way out
    _no_more_calls(gateway, calls + 1)


@pytest.mark.parametrize("forged", [[1, 2, 3], "stop", {"worker_id": "x" * 5000, "reason": 7}])
def test_a_malformed_stop_signal_stops_the_worker_cleanly(gateway, kv, forged):
    """A stop document a store writer forged (not an object, hostile fields) ends the worker
    with a short reason, never a crash of every train call."""
    run_id = "tstop" + str(time.time_ns())[-9:]
    store = ParameterStore(kv, run_id)
    store.put_doc("stop", forged)
    r = gateway.invoke("emnist-setup", {**RUN, "run_id": run_id, "iterations": 5,
                                        "dataset": "fashion-mnist", "target_accuracy": 0.99},
                       check=False)
    assert r.status_code == 200, r.text
    deadline = time.monotonic() + 120
    while store.get_doc("result:0") is None:
        assert time.monotonic() < deadline, "the worker never finished"
        time.sleep(0.05)
    reason = store.get_doc("result:0")["stop_reason"]
    assert reason.startswith("stopped by worker ") and len(reason) < 120, reason


@pytest.mark.parametrize("bad", [0, -1, 10**30, "2", 1.5, True])
def test_a_pass_outside_the_iteration_range_is_refused_before_anything(gateway, kv, bad):
    """``pass`` (which pass a type-2 call is for) is a number a caller chooses: bounded like
    ``iterations``, typed, refused with a 400 naming it before the store is touched."""
    run_id = "tpass" + str(time.time_ns())[-9:]
    r = gateway.invoke("emnist-train", {"run_id": run_id, "worker_id": 0, "pass": bad},
                       check=False)
    assert r.status_code == 400 and r.json()["error"].startswith("pass: "), r.text
    assert ParameterStore(kv, run_id).get_docs(["run", "error:0", state_key(0)]) == {}


@pytest.mark.parametrize("bad", [-1, 2**53 + 1, 10**30, "2", 1.5, True])
def test_a_continuations_step_outside_its_range_is_refused_before_anything(gateway, kv, bad):
    """``step`` (where a time-sliced worker stood when it handed on) is a number a caller
    chooses too: typed, bounded, refused with a 400 naming it before the store is touched."""
    run_id = "tstep" + str(time.time_ns())[-9:]
    r = gateway.invoke("emnist-train", {"run_id": run_id, "worker_id": 0, "pass": 1,
                                        "step": bad}, check=False)
    assert r.status_code == 400 and r.json()["error"].startswith("step: "), r.text
    assert ParameterStore(kv, run_id).get_docs(["run", "error:0", state_key(0)]) == {}


def test_forged_error_documents_are_bounded_or_ignored_in_the_status(gateway, kv):
    """The failure notes the watcher reads (``error:{worker}``) are store values too: a
    forged one that is not a note is ignored, a long one is cut, and the status answers."""
    run_id, store = _finished_run(gateway, kv)
    store.kv.delete_many([store.key("result:0")])
    store.put_doc("error:0", {"error": "x" * 100_000, "at": 1e300, "retry": "yes",
                              "hostname": ["h"] * 1000})
    r = gateway.invoke("emnist-setup", None, method="GET", query={"run_id": run_id},
                       check=False)
    assert r.status_code == 200, r.text
    [note] = r.json()["errors"]
    assert len(note["error"]) == 300 and note["retry"] is False and len(note["hostname"]) <= 64
    store.put_doc("error:0", ["not", "a", "note"])
    r = gateway.invoke("emnist-setup", None, method="GET", query={"run_id": run_id},
                       check=False)
    assert r.status_code == 200 and r.json()["errors"] == [None], r.text
