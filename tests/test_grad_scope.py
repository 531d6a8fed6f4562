"""emnist-grad serves only p2p peers' step parameters (issue 19, item 7): asked for a training
run's keys it refuses before reading the store, so no caller can compute losses on (probe)
another run's parameters, while a serverless peer's own keys still work. A real Downpour run
in real memcached, the real function behind the real local gateway; nothing is mocked."""

from __future__ import annotations

import base64

import numpy as np
import pytest
import requests

from emnist.model import MLP, MLPShape, init_params, to_float
from emnist.p2p.serverless import params_store
from emnist.store import ParameterStore, codec, open_kv
from emnist.train.config import TrainConfig
from emnist.train.run import setup_run
from tests.conftest import MEMCACHED_URL
from tests.servers import local_gateway

SHAPE = MLPShape(784, 100, 10)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gradgw")
    env = {"STORE_URL": MEMCACHED_URL, "DATA_LOCATION": str(tmp / "shards"),
           "TRAIN_REPLICAS": "1", "GRAD_REPLICAS": "1"}
    with local_gateway(tmp, env) as gw:
        yield gw


@pytest.fixture
def kv():
    kv = open_kv(MEMCACHED_URL)
    yield kv
    kv.close()


def _batch() -> tuple[np.ndarray, str]:
    rng = np.random.default_rng(3)
    xy = np.concatenate([rng.integers(0, 256, (8, 784)), rng.integers(0, 10, (8, 1))],
                        axis=1).astype(np.uint8)
    return xy, base64.b64encode(codec.encode(xy)).decode()


def _grad(gw, body: dict) -> requests.Response:
    return requests.post(f"{gw.url}/function/emnist-grad",
                         json={"inputs": 784, "hidden": 100, "classes": 10, **body}, timeout=60)


def test_only_a_serverless_peers_step_parameters_are_served(gateway, kv, run_id, tmp_path):
    cfg = TrainConfig(dataset="synthetic", number_of_workers=1, iterations=1,
                      data_location=str(tmp_path / "shards"))
    setup_run(cfg, kv, 1, run_id=run_id)  # a Downpour run: its parameters are in the store
    store = ParameterStore(kv, run_id)
    store.attach()
    assert store.num_params == SHAPE.num_params
    xy, batch = _batch()
    keys = [store.base, store.keys[0], f"{store.base}:run", f"{store.base}:p2p:params:0",
            f"{store.base}:p2p:params:0:01", f"{store.base}:p2p:params:0:1:layout"]
    for key in keys:
        r = _grad(gateway, {"params_key": key, "batch_data": batch})
        assert r.status_code == 400, (key, r.status_code, r.headers.get("X-Loss"))
        assert r.json() == {"error": r.json()["error"]} and \
            r.json()["error"].startswith("params_key: "), (key, r.text)
        assert "X-Loss" not in r.headers
    # a p2p key names its own run and step only
    for body in ({"params_key": f"emnist:{run_id}:p2p:params:0:1", "run_id": "another"},
                 {"params_key": f"emnist:{run_id}:p2p:params:0:1", "step": 2}):
        r = _grad(gateway, {**body, "batch_data": batch})
        assert r.status_code == 400 and r.json()["error"].startswith("params_key: "), r.text
    # what emnist.p2p.serverless writes and asks for is still served
    params = init_params(SHAPE, 4)
    peer = params_store(kv, run_id, 1, 7)
    peer.init(params, {"step": 7})
    try:
        r = _grad(gateway, {"params_key": peer.base, "run_id": run_id, "step": 7,
                            "batch_data": batch})
        assert r.status_code == 200, r.text
        got = codec.decode("grad", r.content, dtype=np.float32, shape=(SHAPE.num_params,))
        loss, want = MLP(SHAPE).loss_and_grad(params, to_float(xy[:, :-1]), xy[:, -1])
        # float32 sums in another order (the replica's one BLAS thread): ~1e-7 apart
        np.testing.assert_allclose(got.array, want, rtol=1e-5, atol=1e-6)
        assert abs(float(r.headers["X-Loss"]) - loss) < 1e-6 and got.clock == 7
    finally:
        peer.delete(["layout"])
