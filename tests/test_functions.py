"""The functions of emnist.yml on the real local gateway, driven over HTTP and through the CLI."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import requests
from click.testing import CliRunner

from emnist.bench.results import parse_results
from emnist.cli import main
from emnist.gateway.client import GatewayClient
from tests.conftest import MEMCACHED_URL
from tests.servers import local_gateway

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """The real stack file on a gateway at a free port, with the test memcached as store."""
    tmp = tmp_path_factory.mktemp("gw")
    env = {"STORE_URL": MEMCACHED_URL, "DATA_LOCATION": str(tmp / "shards"),
           "TRAIN_REPLICAS": "2", "GRAD_REPLICAS": "0"}
    with local_gateway(tmp, env) as gw:
        yield gw


def _call(gw: GatewayClient, name: str, body, method: str = "POST", query=None):
    """faas-cli's path: /function/NAME.openfaas-fn."""
    data = body if isinstance(body, str | bytes) else json.dumps(body)
    return requests.request(method, f"{gw.url}/function/{name}.openfaas-fn", data=data,
                            params=query, timeout=60)


def _cli(gw: GatewayClient, *args: str):
    return CliRunner().invoke(main, ["--gateway", gw.url, *args], catch_exceptions=False)


def test_train_two_workers_reaches_target_on_fashion_mnist(gateway, tmp_path):
    out_json = tmp_path / "results.json"
    r = _cli(gateway, "train", "--workers", "2", "--target-accuracy", "0.84",
             "--store", MEMCACHED_URL, "--json", str(out_json))
    assert r.exit_code == 0, r.output
    assert "reached target accuracy 0.84" in r.output
    rows = json.loads(out_json.read_text())
    assert sorted(row["worker_id"] for row in rows) == [0, 1]
    assert max(row["accuracy"] for row in rows) >= 0.84
    assert any(row["reached"] for row in rows)
    # each worker ran in its own replica process (distinct pod-like hostnames)
    instances = {ln["instance"] for ln in gateway.logs("emnist-train")}
    assert {row["hostname"] for row in rows} <= instances and len({row["hostname"]
                                                                  for row in rows}) == 2
    for row in rows:
        assert row["samples"] > 0 and row["pushes"] > 0 and row["fetches"] > 0
        assert row["curve"][-1][2] == row["accuracy"]

    # the workers' log lines carry the same results: `emnist logs` parses them
    logged = [x for x in parse_results(ln["text"] for ln in gateway.logs("emnist-train"))
              if x.get("run_id") == rows[0]["run_id"]]
    assert sorted((x["worker_id"], x["iterations"]) for x in logged) == \
        sorted((row["worker_id"], row["iterations"]) for row in rows)
    table = _cli(gateway, "logs", "emnist-train", "--json", str(tmp_path / "logs.json"))
    assert table.exit_code == 0 and "| worker |" in table.output
    status = _cli(gateway, "status", rows[0]["run_id"], "--store", MEMCACHED_URL)
    assert status.exit_code == 0 and status.output.count("True") == 2


def test_result_line_has_the_original_shape(gateway):
    lines = [ln["text"] for ln in gateway.logs("emnist-train")]
    pattern = re.compile(r"^Worker ID: \d+ Iterations: \d+ Time: [0-9.]+ Name: emnist-train-\S+$")
    assert any(pattern.match(t) for t in lines), lines[-5:]
    assert any(t.startswith('{"emnist_result": {') for t in lines)


@pytest.mark.parametrize("body, field", [
    ("{not json", "JSON"),
    ("[1, 2]", "object"),
    ({"bogus": 1}, "bogus"),
    ({"batch_size": "64"}, "batch_size"),
    ({"batch_size": 0}, "batch_size"),
    ({"target_accuracy": 2}, "target_accuracy"),
    ({"dataset": "cifar-10"}, "dataset"),
    ({"num_labels": 47, "dataset": "synthetic", "number_of_workers": 1}, "num_labels"),
    ({"run_id": "has spaces", "dataset": "synthetic", "number_of_workers": 1}, "run id"),
    ('{"alpha": NaN}', "NaN"),
    ({"hidden_size": 1_000_000, "number_of_workers": 1}, "max_params"),
    ({"number_of_workers": 100_000}, "max_workers"),
    ({"store_url": "ftp://files:21"}, "store_url"),
    ({"store_url": "memcached://10.9.9.9:11211"}, "allowed_store_urls"),
    ({"dataset_dir": "/etc", "number_of_workers": 1}, "data_roots"),
])
def test_setup_rejects_bad_requests_with_400(gateway, body, field):
    r = _call(gateway, "emnist-setup", body)
    assert r.status_code == 400, r.text
    assert field in r.json()["error"]


def test_status_without_run_id_is_400_and_unknown_run_404(gateway):
    assert _call(gateway, "emnist-setup", "", method="GET").status_code == 400
    r = _call(gateway, "emnist-setup", "", method="GET", query={"run_id": "no-such-run"})
    assert r.status_code == 404 and "unknown run id" in r.json()["error"]


def test_train_rejects_bad_requests(gateway):
    setup = _call(gateway, "emnist-setup", {"dataset": "synthetic", "number_of_workers": 1,
                                            "iterations": 1, "store_url": MEMCACHED_URL})
    assert setup.status_code == 200, setup.text
    run_id = setup.json()["run_id"]
    cases = [
        ({"worker_id": 0}, "run_id"),
        ({"run_id": run_id}, "worker_id"),
        ({"run_id": run_id, "worker_id": "0"}, "worker_id"),
        ({"run_id": run_id, "worker_id": 0, "extra": 1}, "extra"),
        ({"run_id": run_id, "worker_id": 5, "store_url": MEMCACHED_URL}, "worker_id"),
        ({"run_id": run_id, "worker_id": -1, "store_url": MEMCACHED_URL}, "worker_id"),
    ]
    for body, field in cases:
        r = _call(gateway, "emnist-train", body)
        assert r.status_code == 400, (body, r.text)
        assert field in r.json()["error"], (body, r.text)
    r = _call(gateway, "emnist-train", {"run_id": "no-such-run", "worker_id": 0,
                                        "store_url": MEMCACHED_URL})
    assert r.status_code == 404
    assert _call(gateway, "emnist-train", "", method="GET").status_code == 405


def test_cli_invoke_scale_and_errors(gateway):
    r = _cli(gateway, "invoke", "emnist-setup", "--data", '{"bogus": true}')
    assert r.exit_code == 1 and "bogus" in r.output
    r = _cli(gateway, "scale", "emnist-train", "--replicas", "3")
    assert r.exit_code == 0, r.output
    fn = gateway.get_function("emnist-train")
    assert fn["replicas"] == 3 and fn["availableReplicas"] == 3
    assert len({ln.get("instance") for ln in gateway.logs("emnist-train")}) >= 2
    assert _cli(gateway, "scale", "emnist-train", "--replicas", "2").exit_code == 0
    r = CliRunner().invoke(main, ["--gateway", "http://127.0.0.1:9", "invoke", "emnist-setup"])
    assert r.exit_code == 1 and "emnist up" in r.output
