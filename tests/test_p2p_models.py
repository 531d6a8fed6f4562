"""P2P with the model interface: torch models in peers and in emnist-grad.

emnist-grad's gradient of a lenet5 (and a cnn with dropout) minibatch is bit-identical to the
local model's; the request's model is validated and capped before anything is built; 3 lenet5
peers on a 12,000-sample Fashion-MNIST split reach 0.75 with and without serverless gradients,
and the two runs hold the same parameters after every step (the serverless one also sends
its gradients in frames); batch-norm statistics come from the peer's own partition; the
seed's CLI spellings work.
"""

from __future__ import annotations

import base64
import json
import os
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from emnist.cli import main
from emnist.models import ModelSpec, build_model
from emnist.p2p.metrics import read_run
from emnist.p2p.peer import Peer, PeerConfig, dropout_key, model_spec
from emnist.p2p.serverless import params_store
from emnist.p2p.split import Location, batch_name, split, write_batches
from emnist.store import ParameterStore, codec, open_kv
from tests.conftest import REDIS_BROKER
from tests.handlers import Event, load_handler
from tests.servers import free_port, local_gateway, start_memcached

ROOT = Path(__file__).resolve().parents[1]
TARGET = "0.75"
LENET = ["--model", "lenet5", "--lr", "0.1", "--batch-size", "50", "--sync-every", "2",
         "--epochs", "15", "--target-accuracy", TARGET, "--timeout", "60",
         "--run-timeout", "300", "--broker", REDIS_BROKER]


GRAD = load_handler("emnist-grad", "grad_handler_models")


def call(body: dict) -> tuple[int, object]:
    out = GRAD.handle(Event(body), None)
    if isinstance(out, tuple):
        return out[1], out[0]
    return out["statusCode"], out["body"]


@pytest.fixture(scope="module")
def split_dir(tmp_path_factory):
    d = split("fashion-mnist", None, 3, tmp_path_factory.mktemp("msplit"), seed=0,
              train_samples=12_000, test_samples=3000)
    write_batches(d, 50)
    return d


@pytest.fixture(scope="module")
def store_url():
    """A memcached of this module's own: the shared one may be full of other tests' values
    of other sizes (memcached then evicts within a size class that has few pages)."""
    port = free_port()
    proc = start_memcached(port, memory_mb=64)
    yield f"memcached://127.0.0.1:{port}"
    proc.terminate()
    proc.wait(10)


@pytest.fixture(scope="module")
def gateway(tmp_path_factory, store_url):
    env = {"STORE_URL": store_url, "GRAD_REPLICAS": "3", "TRAIN_REPLICAS": "1",
           "DATA_ROOTS": str(tmp_path_factory.getbasetemp())}
    with local_gateway(tmp_path_factory.mktemp("mgw"), env) as gw:
        yield gw


def lenet(split_dir) -> ModelSpec:
    man = Location(str(split_dir)).manifest()
    return model_spec(PeerConfig(run_id="x", rank=0, size=3, data=str(split_dir),
                                 model="lenet5"), man)


# -- emnist-grad --------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["lenet5", "cnn"])
def test_grad_function_is_bit_identical_to_the_local_model(split_dir, gateway, store_url,
                                                           run_id, name):
    spec = ModelSpec.for_dataset(name, "fashion-mnist", classes=10)
    local = build_model(spec, threads=1)
    params = local.init_params(7)
    kv = open_kv(store_url)
    store = params_store(kv, run_id, 0, 4)
    if name == "cnn":  # several chunks: read back in batches by the function
        store = ParameterStore(kv, run_id, prefix=("p2p", "params", 0, 4), chunk_bytes=16384)
    store.init(params)
    xy = Location(str(split_dir)).array(batch_name(50, 0, 3))
    seed = dropout_key(0, 0, 4, 3)
    try:
        r = gateway.invoke("emnist-grad", {
            "params_key": store.base, "store_url": store_url, "data": str(split_dir),
            "batch": batch_name(50, 0, 3), "model": spec.to_dict(), "step": 4,
            "dropout_seed": seed}, timeout=60)
        got = codec.decode("grad", r.content, dtype=np.float32, shape=(local.num_params,))
        local.rng = np.random.default_rng(seed)
        loss, want = local.loss_and_grad(params, xy[:, :-1], xy[:, -1])
        assert np.array_equal(got.array, want) and got.clock == 4
        assert float(r.headers["X-Loss"]) == loss
        assert len(store.keys) == (6 if name == "cnn" else 1)
    finally:
        store.delete(["layout"])


def test_grad_function_refuses_bad_models_before_building_them(monkeypatch, tmp_path):
    batch = base64.b64encode(codec.encode(np.zeros((2, 785), np.uint8))).decode()
    params = base64.b64encode(codec.encode(np.zeros(10, np.float32))).decode()
    base = {"params": params, "batch_data": batch}
    lenet5 = ModelSpec.for_dataset("lenet5", "fashion-mnist", classes=10).to_dict()
    for model, word in [({"name": "resnet50"}, "unknown model"),
                        ({**lenet5, "channels": 2}, "channels"),
                        ({**lenet5, "dropout": 0.5}, "dropout"),
                        ({**lenet5, "extra": 1}, "unknown model spec field"),
                        ({**lenet5, "mean": [float("1e308") * 10]}, "body")]:
        status, body = call({**base, "model": model})
        assert status == 400, body
        assert word in body["error"], body
    status, body = call({**base, "model": lenet5, "hidden": 100})
    assert status == 400 and "not both" in body["error"]
    status, body = call({**base, "model": lenet5, "dropout_seed": [-1]})
    assert status == 400 and body["error"].startswith("dropout_seed: ")
    status, body = call({**base, "model": lenet5})  # 10 parameters where lenet5 has 61,706
    assert status == 400 and body["error"].startswith("params: ")
    # a VGG11 over the operator's cap is refused from its count: nothing of its size allocated
    monkeypatch.setenv("max_params", "1000000")
    vgg = ModelSpec.for_dataset("vgg11", "fashion-mnist", classes=10).to_dict()
    tracemalloc.start()
    try:
        status, body = call({**base, "model": vgg})
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert status == 400 and "max_params" in body["error"] and "128806154" in body["error"]
    assert peak < 32 << 20


def test_grad_function_caches_a_bounded_number_of_models_per_thread(split_dir, monkeypatch):
    monkeypatch.setenv("data_roots", str(split_dir.parent))
    xy = Location(str(split_dir)).array(batch_name(50, 0, 0))
    GRAD._local.models = None
    for name in ("lenet5", "cnn", "lenet5", "mlp"):
        spec = ModelSpec.for_dataset(name, "fashion-mnist", classes=10)
        params = build_model(spec).init_params(1)
        status, body = call({"params": base64.b64encode(codec.encode(params)).decode(),
                             "batch_data": base64.b64encode(codec.encode(xy)).decode(),
                             "model": spec.to_dict()})
        assert status == 200, body
    assert [k.name for k in GRAD._local.models] == ["lenet5", "mlp"]


# -- peers ---------------------------------------------------------------------------------------
def p2p_run(tmp_path, split_dir, *args, gateway=None):
    out = tmp_path / "runs"
    summary_file = tmp_path / f"summary-{time.monotonic_ns()}.json"
    argv = (["--gateway", gateway] if gateway else []) + [
        "p2p", "run", "--size", "3", "--data", str(split_dir), "--out", str(out),
        "--run-id", f"m{os.getpid()}-{time.monotonic_ns() % 10**9}",
        "--json", str(summary_file), *LENET, *args]
    r = CliRunner().invoke(main, argv, catch_exceptions=False)
    summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
    run_dir = out / summary["run_id"] if summary else None
    logs = "".join(p.read_text()[-2000:] for p in sorted(run_dir.glob("*.log"))) if run_dir \
        else ""
    assert r.exit_code == 0, r.output + logs
    assert f"reached {TARGET}" in r.output and summary["exit_codes"] == [0, 0, 0]
    return summary, run_dir


def step_crcs(run_dir: Path) -> list[int]:
    """The parameters' checksum after every step, the same on every peer."""
    runs = read_run(run_dir)
    crcs = [[x["params_crc"] for x in runs[k] if x["kind"] == "step"] for k in range(3)]
    assert len(crcs[0]) > 50 and crcs[0] == crcs[1] == crcs[2]
    return crcs[0]


def test_lenet5_peers_with_and_without_serverless_are_bit_identical(tmp_path, split_dir,
                                                                    gateway, store_url):
    t0 = time.monotonic()
    plain, plain_dir = p2p_run(tmp_path, split_dir)
    t1 = time.monotonic()
    before = gateway.get_function("emnist-grad")["invocationCount"]
    sls, sls_dir = p2p_run(tmp_path, split_dir, "--serverless", "--store", store_url,
                           "--frame-mb", "0.05", gateway=gateway.url)
    t2 = time.monotonic()
    print(f"\nlenet5 p2p {t1 - t0:.1f}s ({plain['epochs']} epochs), serverless {t2 - t1:.1f}s")
    assert plain["variant"] == "p2p" and sls["variant"] == "serverless"
    assert plain["accuracy"] >= float(TARGET) and sls["accuracy"] == plain["accuracy"]
    # the same parameters after every step, whoever computed the gradients
    assert step_crcs(plain_dir) == step_crcs(sls_dir)
    steps = sum(x["kind"] == "step" for recs in read_run(sls_dir).values() for x in recs)
    assert gateway.get_function("emnist-grad")["invocationCount"] - before >= 2 * steps
    # a lenet5 gradient (61,706 float32: 247 KB) went in 5 frames of at most 50 KiB each
    step = next(x for x in read_run(sls_dir)[0] if x["kind"] == "step")
    assert 247_000 < step["bytes_sent"] < 247_000 + 5 * 600
    start = next(x for x in read_run(plain_dir)[0] if x["kind"] == "start")
    assert start["model"]["name"] == "lenet5" and start["params"] == 61_706


def test_batch_norm_statistics_come_from_the_peers_own_partition(tmp_path):
    d = split("fashion-mnist", None, 2, tmp_path, seed=0, train_samples=1200, test_samples=300)
    cfg = PeerConfig(run_id="bn", rank=1, size=2, data=str(d), model="mobilenet v3 small",
                     batch_size=50)

    class NoBroker:
        def close(self) -> None:
            pass

    peer = Peer(cfg, broker=NoBroker())
    assert cfg.model == "mobilenet_v3_small" and peer.model.needs_calibration
    stats = peer.validate()
    part = peer.part
    acc, val_loss = build_model(peer.spec).evaluate(peer.params, part.val_x, part.val_y,
                                                    calib=part.train_x[:2048])
    assert stats["val_n"] == len(part.val_y) and np.isfinite(stats["val_sum"])
    assert stats["val_sum"] / stats["val_n"] == pytest.approx(val_loss, rel=1e-5)
    tacc, _ = build_model(peer.spec).evaluate(peer.params, part.test_x[peer.test],
                                              part.test_y[peer.test], calib=part.train_x[:2048])
    assert stats["correct"] == round(tacc * stats["test_n"])
    peer.close()


def test_the_seeds_cli_spellings_are_accepted():
    from emnist.cli.p2p import run

    for argv, want in [(["--model_str", "squeezenet1.1"], "squeezenet1_1"),
                       (["--model-str=vgg11"], "vgg11"),
                       (["--model_str=mobilenet v3 small", "--batch_size", "64"],
                        "mobilenet_v3_small")]:
        ctx = run.make_context("run", ["--size", "3", *argv])
        assert ctx.params["model"] == want
    assert ctx.params["batch_size"] == 64
    r = CliRunner().invoke(main, ["p2p", "run", "--size", "3", "--model", "resnet50"])
    assert r.exit_code == 2 and "unknown model" in r.output
