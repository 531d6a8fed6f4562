"""Training on OpenFaaS CE's queue semantics (emulated by the local gateway): every async call
is delivered at least once, a queue-worker runs one call at a time.

- A run whose every emnist-train call is delivered twice (the second while the first still
  runs: ack_wait far below a call's length) ends with the same parameters, results and
  result lines as a run whose calls are delivered once, for execution types 3 and 2.
- With one queue-worker the workers run one after another: the run completes correctly,
  `emnist train` says why its workers wait, and the watcher never invokes a worker that is
  only queued (a third delivery).

Real gateways running emnist.yml, real memcached, real Fashion-MNIST."""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
from click.testing import CliRunner

from emnist.cli import main
from emnist.runner import watch
from emnist.store import ParameterStore
from emnist.train.config import TrainConfig
from emnist.train.run import setup_run
from emnist.train.state import state_key
from tests.conftest import MEMCACHED_URL
from tests.servers import ROOT, local_gateway, run_to_result

RUN = {"dataset": "fashion-mnist", "number_of_workers": 1, "iterations": 3,
       "target_accuracy": 0.99, "batch_size": 100, "n_fetch": 5, "n_push": 5}
SAME = ("iterations", "accuracy", "samples", "step", "pushes", "fetches", "stop_reason",
        "done", "reached", "invocations")


def _gateway(tmp_path_factory, name: str, **queue: str):
    tmp = tmp_path_factory.mktemp(name)
    (tmp / "data").mkdir()
    env = {"STORE_URL": MEMCACHED_URL, "DATA_LOCATION": str(tmp / "data" / "shards"),
           "DATA_ROOTS": str(tmp / "data"), "TRAIN_REPLICAS": "2", "GRAD_REPLICAS": "1",
           **queue}
    return local_gateway(tmp, env)


@pytest.fixture(scope="module")
def once(tmp_path_factory):
    with _gateway(tmp_path_factory, "once") as gw:
        yield gw


@pytest.fixture(scope="module")
def twice(tmp_path_factory):
    """Every queued call is delivered again 0.3 s after it started, to an idle
    queue-worker, while the first delivery still trains."""
    with _gateway(tmp_path_factory, "twice", EMNIST_GATEWAY_QUEUE_WORKERS="4",
                  EMNIST_GATEWAY_ACK_WAIT="0.3") as gw:
        yield gw


@pytest.fixture(scope="module")
def kv(module_kv):
    return module_kv


def _settled(gw, legit_calls: int) -> None:
    """Wait until the gateway delivered more emnist-train calls than were made (its
    redeliveries), and every extra delivery answered that it had nothing to do."""
    deadline = time.monotonic() + 60
    while True:
        delivered = int(gw.get_function("emnist-train").get("invocationCount", 0))
        repeats = sum("nothing to do for this call" in t for t in _log_texts(gw))
        if delivered > legit_calls and repeats >= delivered - legit_calls:
            return
        assert time.monotonic() < deadline, (delivered, legit_calls, repeats)
        time.sleep(0.1)


def _log_texts(gw) -> list[str]:
    return [m["text"] for m in gw.logs("emnist-train", tail=0)]


def _result_lines(gw, run_id: str) -> int:
    n = 0
    for text in _log_texts(gw):
        if text.startswith('{"emnist_result"'):
            n += json.loads(text)["emnist_result"]["run_id"] == run_id
    return n


def _params(store: ParameterStore) -> np.ndarray:
    out = np.empty(store.num_params, dtype=np.float32)
    store.fetch(out)
    return out


@pytest.mark.parametrize("execution_type", [3, 2])
def test_a_call_delivered_twice_trains_and_reports_as_delivered_once(once, twice, kv,
                                                                     execution_type):
    config = {**RUN, "execution_type": execution_type}
    base_id, base = run_to_result(once, kv, config)
    before = int(twice.get_function("emnist-train").get("invocationCount", 0))
    twin_id, twin = run_to_result(twice, kv, config)
    legit = RUN["iterations"] if execution_type == 2 else 1  # calls setup and passes made
    _settled(twice, before + legit)  # the copies arrived and did nothing
    np.testing.assert_array_equal(_params(twin), _params(base))
    a, b = base.get_doc("result:0"), twin.get_doc("result:0")
    assert {k: a[k] for k in SAME} == {k: b[k] for k in SAME}
    assert [c[1:3] for c in a["curve"]] == [c[1:3] for c in b["curve"]]
    assert b["invocations"] == (RUN["iterations"] if execution_type == 2 else 1)
    state = twin.get_doc(state_key(0))
    assert state["done"] and not state["lease"]
    assert _result_lines(once, base_id) == 1
    assert _result_lines(twice, twin_id) == 1  # the copies printed nothing


def test_a_duplicate_sent_while_the_worker_trains_changes_nothing(once, kv):
    """The same, deterministically: a synchronous copy of worker 0's call, sent while its
    first delivery trains, answers once that one is done, and writes or prints nothing."""
    r = once.invoke("emnist-setup", {**RUN, "iterations": 6, "execution_type": 3},
                    check=False)
    assert r.status_code == 200, r.text
    run_id = r.json()["run_id"]
    store = ParameterStore(kv, run_id)
    deadline = time.monotonic() + 120
    while not (store.get_doc(state_key(0)) or {}).get("lease"):  # the first delivery trains
        assert store.get_doc("result:0") is None, "the run ended before the copy was sent"
        assert time.monotonic() < deadline
        time.sleep(0.02)
    copy = once.invoke("emnist-train", {"run_id": run_id, "worker_id": 0}, check=False)
    assert copy.status_code == 200, copy.text
    result = store.get_doc("result:0")
    assert result is not None and result["iterations"] == 6
    assert result["invocations"] == 1  # the copy never took the worker
    assert _result_lines(once, run_id) == 1
    assert copy.json().get("repeat") and copy.json()["hostname"] == result["hostname"]


def test_one_queue_worker_runs_workers_in_turn_and_says_so(tmp_path_factory, kv):
    """CE's defaults: one queue-worker. Worker 1 waits for worker 0's whole call; with a
    1 s lease the old watcher took it for dead after 3 s and invoked it a third time."""
    with _gateway(tmp_path_factory, "ce", EMNIST_GATEWAY_QUEUE_WORKERS="1") as gw:
        r = CliRunner().invoke(main, [
            "--gateway", gw.url, "train", "--workers", "2", "--dataset", "fashion-mnist",
            "--iterations", "12", "--target-accuracy", "0.99", "--batch-size", "100",
            "--lease-seconds", "1", "--timeout", "300"])
        assert r.exit_code in (0, 1), r.output  # 1: the target (0.99) is not reached
        assert "have not started after" in r.output and "queue-worker" in r.output, r.output
        assert "had no result" not in r.output, r.output
        runs = [json.loads(t)["emnist_result"] for t in _log_texts(gw)
                if t.startswith('{"emnist_result"')]
        assert sorted(x["worker_id"] for x in runs) == [0, 1]
        assert all(x["iterations"] == 12 and x["invocations"] == 1 for x in runs)
        # two calls from setup, none from the watcher
        assert int(gw.get_function("emnist-train")["invocationCount"]) == 2


def test_workers_that_cannot_reach_their_data_end_the_run_with_the_reason(tmp_path):
    """No shared disk: emnist-train's data location is not where setup prepared the set (as
    in separate containers). The workers' failure ends `emnist train` with their reason,
    long before its timeout, and nobody invokes them again."""
    lines = (ROOT / "emnist.yml").read_text().splitlines()
    train_at = lines.index("  emnist-train:")
    at = next(i for i in range(train_at, len(lines)) if "data_location:" in lines[i])
    lines[at] = "      data_location: ${TRAIN_DATA_LOCATION:-}"
    stack = tmp_path / "stack.yml"
    stack.write_text("\n".join(lines) + "\n")
    for name in ("functions", "emnist", "template"):
        (tmp_path / name).symlink_to(ROOT / name)
    (tmp_path / "data").mkdir()
    env = {"STORE_URL": MEMCACHED_URL, "DATA_LOCATION": str(tmp_path / "data" / "setup"),
           "TRAIN_DATA_LOCATION": str(tmp_path / "data" / "train"), "TRAIN_REPLICAS": "2",
           "GRAD_REPLICAS": "1"}
    with local_gateway(tmp_path, env, stack=stack) as gw:
        r = CliRunner().invoke(main, [
            "--gateway", gw.url, "train", "--workers", "2", "--dataset", "fashion-mnist",
            "--lease-seconds", "1", "--timeout", "120"])
        assert r.exit_code == 1, r.output
        assert "failed: run_id: a stored document" in r.output and "data_location" in r.output, \
            r.output
        assert "had no result after" not in r.output
        assert int(gw.get_function("emnist-train")["invocationCount"]) == 2


def test_a_lost_call_is_invoked_again_once_the_started_workers_finished(tmp_path, kv):
    """Worker 1's call never arrives (as if its replica died before the worker saved
    anything). While worker 0 trains it might only be queued; once worker 0 has finished a
    queue would have run it, so the watcher invokes it, and the run completes."""
    (tmp_path / "data").mkdir()
    shards = tmp_path / "data" / "shards"
    env = {"STORE_URL": MEMCACHED_URL, "DATA_LOCATION": str(shards),
           "DATA_ROOTS": str(tmp_path / "data"), "TRAIN_REPLICAS": "2", "GRAD_REPLICAS": "1"}
    with local_gateway(tmp_path, env) as gw:
        cfg = TrainConfig(dataset="synthetic", iterations=2, target_accuracy=1.0,
                          lease_seconds=1.0, store_url=MEMCACHED_URL,
                          data_location=str(shards))
        sent = []

        def start(body: dict) -> None:
            sent.append(body["worker_id"])
            if body["worker_id"] == 0:
                gw.invoke_async("emnist-train", body)

        state = setup_run(cfg, kv, 2, start_worker=start)
        out = watch(gw, state, time.time(), timeout=120)
        assert sent == [0, 1] and sorted(r["worker_id"] for r in out.results) == [0, 1]
        assert any("relaunched never-started worker 1" in r for r in out.recoveries)
        assert int(gw.get_function("emnist-train")["invocationCount"]) == 2
