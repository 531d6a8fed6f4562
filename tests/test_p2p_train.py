"""P2P training end to end: 3 peer processes on Fashion-MNIST over real Redis and RabbitMQ,
without and with serverless gradients (the real local gateway and emnist-grad), compression,
identical parameters after every step, a killed peer, and the emnist-grad function itself."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import redis
import requests
from click.testing import CliRunner

from emnist.cli import main
from emnist.model import MLP, MLPShape, init_params, to_float
from emnist.p2p.metrics import read_run
from emnist.p2p.report import summarize
from emnist.p2p.split import Location, batch_name, split
from emnist.store import codec, open_kv
from tests.conftest import AMQP_BROKER, MEMCACHED_URL, REDIS_BROKER, need_rabbitmq
from tests.servers import local_gateway

ROOT = Path(__file__).resolve().parents[1]
TARGET = "0.84"
# fast to 0.84: a 784-100-10 tanh MLP, one minibatch of 100 per peer per synchronous step
FAST = ["--lr", "0.3", "--batch-size", "100", "--sync-every", "1", "--epochs", "10",
        "--target-accuracy", TARGET, "--timeout", "30", "--run-timeout", "300"]


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    return split("fashion-mnist", None, 3, tmp_path_factory.mktemp("split"), seed=0)


def p2p_run(tmp_path, split_dir, *args, gateway=None):
    out = tmp_path / "runs"
    argv = (["--gateway", gateway] if gateway else []) + [
        "p2p", "run", "--size", "3", "--data", str(split_dir), "--out", str(out),
        "--run-id", f"t{os.getpid()}-{time.monotonic_ns() % 10**9}",
        "--json", str(tmp_path / "summary.json"), *FAST, *args]
    r = CliRunner().invoke(main, argv, catch_exceptions=False)
    summary = json.loads((tmp_path / "summary.json").read_text()) \
        if (tmp_path / "summary.json").exists() else None
    return r, summary, out / summary["run_id"] if summary else None


def assert_identical_peers(run_dir: Path, peers: int = 3) -> None:
    """Every peer holds the same parameters after every synchronous step, and at the end."""
    runs = read_run(run_dir)
    assert sorted(runs) == list(range(peers))
    crcs = [[r["params_crc"] for r in runs[k] if r["kind"] == "step"] for k in range(peers)]
    assert len(crcs[0]) > 100 and all(c == crcs[0] for c in crcs)
    params = [codec.decode("p", (run_dir / f"params-{k}.emns").read_bytes()).array
              for k in range(peers)]
    for p in params[1:]:
        assert np.array_equal(p, params[0])


def assert_reached(r, summary, run_dir):
    assert r.exit_code == 0, r.output + "".join(
        p.read_text()[-2000:] for p in sorted(run_dir.glob("*.log"))) if run_dir else r.output
    assert "reached 0.84" in r.output
    assert summary["accuracy"] >= 0.84 and summary["time_to_target"] > 0
    assert summary["exit_codes"] == [0, 0, 0]
    for recs in read_run(run_dir).values():
        res = [x for x in recs if x["kind"] == "result"][0]
        assert res["reached"] and res["test_accuracy"] >= 0.84 and res["refused"] == 0
        assert_epochs_add_up(recs, res)


def _total(values) -> float:
    total = 0.0
    for v in values:  # the peer's own order of additions: the same bits
        total += v
    return total


def assert_epochs_add_up(recs: list[dict], result: dict) -> None:
    """Each epoch record is the sum of its step records (the metrics' own accounting), the
    phases are disjoint parts of the wall time, and the last epoch is the result."""
    epochs = [x for x in recs if x["kind"] == "epoch"]
    assert [e["epoch"] for e in epochs] == list(range(1, result["epochs"] + 1))
    done, phases = 0, 0.0
    for e in epochs:
        steps = [x for x in recs if x["kind"] == "step" and x["epoch"] == e["epoch"]]
        done += len(steps)
        assert steps and e["steps"] == done
        assert e["bytes_sent"] == sum(x["bytes_sent"] for x in steps) > 0
        for phase in ("compute_s", "send_s", "recv_s", "update_s"):
            assert e[phase] == _total(x[phase] for x in steps), phase
        assert e["loss"] == _total(x["loss"] for x in steps) / len(steps)
        assert e["compute_s"] > 0 and e["val_s"] > 0 and e["peak_rss_mb"] > 0
        phases += _total(e[k] for k in ("compute_s", "send_s", "recv_s", "update_s", "val_s",
                                          "barrier_s"))
        assert phases <= e["t"]  # disjoint intervals of the time since the peer started
    assert result["steps"] == done and epochs[-1]["test_accuracy"] == result["test_accuracy"]


def test_three_peers_on_redis_reach_target_with_identical_parameters(tmp_path, split_dir):
    r, summary, run_dir = p2p_run(tmp_path, split_dir, "--broker", REDIS_BROKER)
    assert_reached(r, summary, run_dir)
    assert summary["variant"] == "p2p" and summary["broker"] == "redis"
    assert_identical_peers(run_dir)
    # the run's streams are gone
    assert redis.Redis.from_url(REDIS_BROKER).keys(f"emnist:p2p:{summary['run_id']}:*") == []
    # and the report turns the run into a table
    rep = CliRunner().invoke(main, ["p2p", "report", str(run_dir)], catch_exceptions=False)
    assert rep.exit_code == 0 and "| p2p " in rep.output and "s to target" in rep.output


def test_three_peers_on_rabbitmq_with_qsgd(tmp_path, split_dir):
    need_rabbitmq()
    r, summary, run_dir = p2p_run(tmp_path, split_dir, "--broker", AMQP_BROKER,
                                  "--compression", "qsgd")
    assert_reached(r, summary, run_dir)
    assert summary["broker"] == "amqp" and summary["compression"] == "qsgd"
    assert_identical_peers(run_dir)
    # int8 levels: a quarter of the float32 gradient's bytes (plus headers and norms)
    step = [x for x in read_run(run_dir)[0] if x["kind"] == "step"][0]
    assert step["bytes_sent"] < 2 * (79510 * 4) * 0.3


def test_three_peers_with_topk(tmp_path, split_dir):
    r, summary, run_dir = p2p_run(tmp_path, split_dir, "--broker", REDIS_BROKER,
                                  "--compression", "topk", "--topk-ratio", "0.01")
    assert_reached(r, summary, run_dir)
    assert_identical_peers(run_dir)
    step = [x for x in read_run(run_dir)[1] if x["kind"] == "step"][0]
    assert step["bytes_sent"] < 79510 * 4 * 0.03


# -- serverless ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """The real stack file (with emnist-grad) on a gateway at a free port."""
    env = {"STORE_URL": MEMCACHED_URL, "GRAD_REPLICAS": "3", "TRAIN_REPLICAS": "1",
           "DATA_ROOTS": str(tmp_path_factory.getbasetemp())}  # where the splits are
    with local_gateway(tmp_path_factory.mktemp("gw"), env) as gw:
        yield gw


def test_three_serverless_peers_reach_target(tmp_path, split_dir, gateway):
    assert gateway.replicas("emnist-grad") == 3
    calls_before = gateway.get_function("emnist-grad")["invocationCount"]
    r, summary, run_dir = p2p_run(tmp_path, split_dir, "--serverless", "--store",
                                  MEMCACHED_URL, "--broker", REDIS_BROKER, "--batch-size", "50",
                                  "--sync-every", "2", gateway=gateway.url)
    assert_reached(r, summary, run_dir)
    assert summary["variant"] == "serverless"
    assert_identical_peers(run_dir)
    # the gradients were computed by the function's replicas, not by the peers: one call per
    # minibatch, two minibatches per step (a retried call counts twice)
    steps = sum(x["kind"] == "step" for recs in read_run(run_dir).values() for x in recs)
    calls = gateway.get_function("emnist-grad")["invocationCount"] - calls_before
    assert calls >= 2 * steps > 0
    assert (split_dir / "batches-50" / "manifest.json").exists()


def _grad_request(split_dir, **over):
    body = {"inputs": 784, "hidden": 100, "classes": 10, "data": str(split_dir),
            "batch": batch_name(50, 0, 3), "store_url": MEMCACHED_URL}
    body.update(over)
    return {k: v for k, v in body.items() if v is not None}


def test_grad_function_computes_the_batch_gradient(split_dir, gateway, run_id):
    from emnist.p2p.split import write_batches
    write_batches(split_dir, 50)
    shape = MLPShape(784, 100, 10)
    params = init_params(shape, 5)
    kv = open_kv(MEMCACHED_URL)
    key = f"emnist:{run_id}:p2p:params:0:0"
    kv.set_many({key: codec.encode(params)})
    try:
        r = gateway.invoke("emnist-grad", _grad_request(split_dir, params_key=key), timeout=30)
        assert r.headers["Content-Type"] == "application/octet-stream"
        got = codec.decode("grad", r.content, dtype=np.float32, shape=(shape.num_params,)).array
        xy = Location(str(split_dir)).array(batch_name(50, 0, 3))
        loss, want = MLP(shape).loss_and_grad(params, to_float(xy[:, :-1]), xy[:, -1])
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)
        assert abs(float(r.headers["X-Loss"]) - loss) < 1e-6
        # parameters and a small batch may also travel inline
        inline = _grad_request(split_dir, batch=None, data=None,
                               params=base64.b64encode(codec.encode(params)).decode(),
                               batch_data=base64.b64encode(codec.encode(xy)).decode())
        r2 = gateway.invoke("emnist-grad", inline, timeout=30)
        np.testing.assert_allclose(codec.decode("g", r2.content).array, want, rtol=1e-5,
                                   atol=1e-7)
    finally:
        kv.delete_many([key])
        kv.close()


@pytest.mark.parametrize("over, status, word", [
    ({"params_key": None}, 400, "params_key or params"),
    ({"params_key": "k", "inputs": None}, 400, "inputs"),
    ({"params_key": "k", "hidden": "100"}, 400, "hidden"),
    ({"params_key": "k", "bogus": 1}, 400, "bogus"),
    ({"params_key": "k", "batch": "../../etc/passwd"}, 400, "batch"),
    ({"params_key": "k", "batch": "batches-50/peer-0/99999"}, 404, "missing"),
    ({"params": "not base64!"}, 400, "base64"),
    ({"params": base64.b64encode(codec.encode(np.zeros(5, np.float32))).decode()}, 400,
     "shape"),
    ({"params_key": "emnist:no-such-run:p2p:params:0:0"}, 404, "not found"),
])
def test_grad_function_rejects_bad_requests(split_dir, gateway, over, status, word):
    r = requests.post(f"{gateway.url}/function/emnist-grad",
                      json=_grad_request(split_dir, **over), timeout=30)
    assert r.status_code == status, r.text
    assert word in r.json()["error"]


# -- failures ----------------------------------------------------------------------------------
def _start_peers(tmp_path, split_dir, run_id, *extra):
    env = {**os.environ, "OPENBLAS_NUM_THREADS": "1"}
    procs = []
    for rank in range(3):
        procs.append(subprocess.Popen(
            [sys.executable, "-m", "emnist.cli", "p2p", "peer", "--rank", str(rank), "--size", "3",
             "--run-id", run_id, "--data", str(split_dir), "--metrics-dir", str(tmp_path),
             "--broker", REDIS_BROKER, "--timeout", "3", "--lr", "0.3", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=ROOT))
    return procs


def _wait_for_steps(path: Path, n: int, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_text().count('"kind":"step"') >= n:
            return
        time.sleep(0.05)
    raise AssertionError(f"{path}: fewer than {n} steps after {timeout}s")


def test_a_killed_peer_makes_the_others_time_out_not_hang(tmp_path, split_dir, run_id):
    procs = _start_peers(tmp_path, split_dir, run_id, "--epochs", "5")
    try:
        _wait_for_steps(tmp_path / "peer-2.jsonl", 5)
        procs[2].kill()
        for p in procs[:2]:  # they end (communicate's timeout guards a hang) with an error
            out, err = p.communicate(timeout=60)
            assert p.returncode == 1, err.decode()[-2000:]
            assert "timed out after 3s" in err.decode() and "peer(s) 2" in err.decode()
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()
        redis.Redis.from_url(REDIS_BROKER).delete(
            *redis.Redis.from_url(REDIS_BROKER).keys(f"emnist:p2p:{run_id}:*") or ["-"])


def test_allow_missing_goes_on_with_the_peers_present(tmp_path, split_dir, run_id):
    procs = _start_peers(tmp_path, split_dir, run_id, "--epochs", "1", "--allow-missing",
                         "--target-accuracy", "0")
    try:
        _wait_for_steps(tmp_path / "peer-2.jsonl", 5)
        procs[2].kill()
        for p in procs[:2]:
            out, err = p.communicate(timeout=90)
            assert p.returncode == 0, err.decode()[-2000:]
            result = json.loads(out.decode().strip().splitlines()[-1])["p2p_result"]
            assert result["missing"] == [2] and result["epochs"] == 1
            assert "going on without them" in err.decode()
        runs = read_run(tmp_path)
        crc = [[r["params_crc"] for r in runs[k] if r["kind"] == "step"] for k in (0, 1)]
        assert crc[0] == crc[1]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.communicate()


def test_report_plots_or_names_the_plot_extra(tmp_path, split_dir, monkeypatch):
    r, summary, run_dir = p2p_run(tmp_path, split_dir, "--broker", REDIS_BROKER,
                                  "--epochs", "1", "--target-accuracy", "0")
    assert r.exit_code == 0, r.output
    assert summarize(run_dir)["epochs"] == 1
    png = tmp_path / "p2p.png"
    # matplotlib is in the dev extra `make test` installs: no silent skip of the plot
    rep = CliRunner().invoke(main, ["p2p", "report", str(run_dir), "--plot", str(png)])
    assert rep.exit_code == 0, rep.output
    assert png.read_bytes()[:4] == b"\x89PNG"
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    rep = CliRunner().invoke(main, ["p2p", "report", str(run_dir), "--plot", str(png)])
    assert rep.exit_code == 1 and "plot` extra" in rep.output
