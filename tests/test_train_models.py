"""Torch models on the training path (Downpour, averaging, execution types 1 and 2), against a
real memcached: the run document's ModelSpec is what every worker builds, one Downpour worker
is the plain torch loop step for step, two lenet5 workers reach 0.85 on Fashion-MNIST,
CIFAR-10 shards keep their channels, BN models calibrate on the worker's own shard, and
max_params holds for every model."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import emnist.train.worker as worker_mod
from emnist.bench.plain import torch_net
from emnist.cli.train import train_config
from emnist.data import load_manifest, open_shard, open_test
from emnist.data.cifar import TEST_FILE, TRAIN_FILES
from emnist.models import ModelSpec, build_model, calibration_images
from emnist.store import ParameterStore, open_kv
from emnist.train.averaging import Averaging
from emnist.train.config import ConfigError, TrainConfig
from emnist.train.run import (
    ensure_run,
    load_run,
    run_status,
    setup_run,
    train_worker,
    write_checkpoint,
)
from emnist.train.state import Lease, Progress, WorkerState
from emnist.train.worker import DropoutSeeds, pass_order, run_worker
from tests.conftest import MEMCACHED_URL
from tests.handlers import error_of, load_handler


def _cfg(tmp_path: Path, **kw) -> TrainConfig:
    base = {"dataset": "synthetic", "batch_size": 50, "alpha": 0.05, "iterations": 1,
            "target_accuracy": 1.0, "data_location": str(tmp_path / "shards")}
    return TrainConfig(**{**base, **kw})


def _final(kv, run_id: str) -> np.ndarray:
    store, _ = load_run(kv, run_id)
    out = np.empty(store.num_params, dtype=np.float32)
    store.fetch(out)
    return out


def test_model_names_aliases_and_the_run_document(memcached_kv, tmp_path):
    assert TrainConfig(model="LeNet-5").model == "lenet5"
    assert TrainConfig(model="squeezenet1.1").model == "squeezenet1_1"
    assert train_config({"model": "mobilenet v3 small"}, "http://127.0.0.1:8080") == {
        "model": "mobilenet_v3_small"}
    cfg = _cfg(tmp_path, model="cnn", model_dropout=0.25, seed=3)
    state = setup_run(cfg, memcached_kv, 2)
    spec = ModelSpec.from_dict(state["model"])
    assert spec == ModelSpec(name="cnn", channels=1, height=28, width=28, classes=10,
                             dropout=0.25)  # synthetic has no normalisation constants
    assert state["num_params"] == build_model(spec).num_params == 21840
    # the stored initial vector is the spec's seeded init
    np.testing.assert_array_equal(_final(memcached_kv, state["run_id"]),
                                  build_model(spec).init_params(3))
    # the mlp stays the default and its document keeps its old shape
    mlp = setup_run(_cfg(tmp_path), memcached_kv, 1)
    assert mlp["model"]["name"] == "mlp" and mlp["model"]["hidden"] == 100
    assert mlp["num_params"] == TrainConfig().num_params == 785 * 100 + 101 * 10


@pytest.mark.parametrize("n_fetch, n_push, passes", [(3, 7, 1), (1, 1, 2)])
def test_one_downpour_worker_is_the_plain_torch_loop(memcached_kv, tmp_path, n_fetch, n_push,
                                                     passes):
    """cnn (with dropout): train_worker against an ordinary torch module and an SGD step
    over the same minibatches with the same masks. (Over two passes with n_push > 1 this
    cnn on the synthetic set drifts to ~1e-3: Downpour's global + pending rounding (1e-8)
    flips a ReLU or max-pool choice once, and that event is then amplified; with n_push 1
    nothing is rounded and the second pass stays exact.)"""
    cfg = _cfg(tmp_path, model="cnn", n_fetch=n_fetch, n_push=n_push, iterations=passes)
    state = setup_run(cfg, memcached_kv, 1)
    st, record = train_worker(memcached_kv, state["run_id"], 0, "h")
    assert st.iteration == passes and record["model"] == "cnn" and record["threads"] == 1

    spec = ModelSpec.from_dict(state["model"])
    net, model = torch_net(spec, cfg.seed)
    gen = net.drop.gen  # the plain net's dropout generator (both dropout layers share it)
    shard = open_shard(state["shard_dir"], 0)
    seeds, bs = DropoutSeeds(cfg.seed, 0), cfg.batch_size
    net.train()
    for it in range(1, passes + 1):
        for pos, at in enumerate(pass_order(cfg, 0, it, len(shard.y), state["steps_per_pass"])):
            gen.manual_seed(int(seeds.at(it, pos).integers(0, 2**63 - 1)))  # the model's hook
            net.zero_grad()
            x = torch.from_numpy(model.prepare(shard.x[at:at + bs]))
            y = torch.from_numpy(shard.y[at:at + bs].astype(np.int64))
            torch.nn.functional.cross_entropy(net(x), y).backward()
            with torch.no_grad():  # SGD as the worker rounds it: -lr * grad, then the add
                for p in net.parameters():
                    p.add_(p.grad * -cfg.alpha)
    want = torch.nn.utils.parameters_to_vector(net.parameters()).detach().numpy()
    np.testing.assert_allclose(_final(memcached_kv, state["run_id"]), want, rtol=0, atol=1e-6)


WORKER = """
import json, sys
from emnist.store import open_kv
from emnist.train.run import train_worker
st, rec = train_worker(open_kv(sys.argv[1]), sys.argv[2], int(sys.argv[3]), "w" + sys.argv[3])
print(json.dumps(rec))
"""


def test_two_downpour_lenet5_workers_reach_085_on_fashion_mnist(memcached_kv, tmp_path):
    """Two worker processes (one core each), as replicas run them; ~9 s here."""
    cfg = TrainConfig(model="lenet5", dataset="fashion-mnist", batch_size=64, alpha=0.1,
                      iterations=4, target_accuracy=0.85, data_location=str(tmp_path))
    state = setup_run(cfg, memcached_kv, 2)
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, MEMCACHED_URL, state["run_id"],
                               str(w)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True) for w in (0, 1)]
    try:
        outs = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outs]
    records = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert any(r["reached"] for r in records), [r["accuracy"] for r in records]
    assert max(r["accuracy"] for r in records) >= 0.85
    assert all(r["model"] == "lenet5" and r["threads"] == 1 for r in records)
    assert all(r["pushes"] > 0 and r["fetches"] > 0 for r in records)


def test_averaging_torch_workers_hold_identical_parameters_after_each_round(
        memcached_kv, tmp_path, run_id, monkeypatch):
    cfg = _cfg(tmp_path, model="cnn", algorithm="averaging", average_every=4)
    spec = cfg.model_spec(10)
    store = ParameterStore(memcached_kv, run_id, chunk_bytes=8192)
    store.init(build_model(spec).init_params(0))
    x, y = np.random.default_rng(1).integers(0, 256, (800, 784), dtype=np.uint8), \
        np.random.default_rng(2).integers(0, 10, 800).astype(np.uint8)
    after: dict[int, dict[int, np.ndarray]] = {0: {}, 1: {}}

    class Recorded(Averaging):
        def average(self, params: np.ndarray, r: int) -> None:
            super().average(params, r)
            after[self.me][r] = params.copy()

    monkeypatch.setattr(worker_mod, "Averaging", Recorded)

    def work(w: int) -> WorkerState:
        ps = ParameterStore(open_kv(MEMCACHED_URL), run_id)
        ps.attach()
        part = slice(400 * w, 400 * (w + 1))
        return run_worker(cfg, ps, (x[part], y[part], x[:200], y[:200]), spec, WorkerState(w),
                          workers=2, steps_per_pass=8, run_started=time.time(),
                          save=lambda s: None)

    results: list = [None, None]
    threads = [threading.Thread(target=lambda w=w: results.__setitem__(w, work(w)))
               for w in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert [r.averages for r in results] == [2, 2], results
    assert sorted(after[0]) == sorted(after[1]) == [1, 2]
    for r in (1, 2):
        assert np.array_equal(after[0][r], after[1][r]), f"round {r}: parameters differ"
    assert not np.array_equal(after[0][1], after[0][2])
    assert results[0].accuracy == results[1].accuracy  # the same model evaluated


def test_execution_types_1_and_2_with_a_torch_model(memcached_kv, tmp_path, run_id):
    # type 1: every worker's invocation carries the config; the first initialises the run
    cfg = _cfg(tmp_path, model="lenet5", execution_type=1, number_of_workers=2)
    states = []
    threads = [threading.Thread(target=lambda: states.append(
        ensure_run(cfg, open_kv(MEMCACHED_URL), 2, run_id))) for _ in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(states) == 2 and states[0]["model"] == states[1]["model"]
    assert states[0]["model"]["name"] == "lenet5"
    recs = [train_worker(memcached_kv, run_id, w, f"w{w}")[1] for w in (0, 1)]
    assert all(r["done"] and r["model"] == "lenet5" and r["iterations"] == 1 for r in recs)
    # type 2: one pass per invocation, each asking for the next
    cfg2 = _cfg(tmp_path, model="lenet5", execution_type=2, iterations=3, alpha=0.001)
    run2 = setup_run(cfg2, memcached_kv, 1)["run_id"]
    invocations, pending = 0, [True]
    while pending:
        pending.pop()
        invocations += 1
        st, rec = train_worker(memcached_kv, run2, 0, "h",
                               next_pass=lambda n, step: pending.append(n))
        assert st.iteration == invocations
    assert invocations == 3 and rec["done"] and rec["invocations"] == 3


def _write_cifar(root: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The binary release's exact layout (10000 records of 1 label byte + R, G, B planes of
    32x32 row-major bytes per file), written as whole records at once."""
    root.mkdir(parents=True)
    written = {}
    for i, name in enumerate((*TRAIN_FILES, TEST_FILE)):
        rng = np.random.default_rng(i)
        labels = rng.integers(0, 10, 10000, dtype=np.uint8)
        images = rng.integers(0, 256, (10000, 3, 32, 32), dtype=np.uint8)
        images[np.arange(10000), labels % 3, :8, :8] = (255 * (labels % 2))[:, None, None]
        np.concatenate([labels[:, None], images.reshape(10000, 3072)], axis=1).tofile(root / name)
        written[name] = (images, labels)
    (root / "batches.meta.txt").write_text("\n".join(
        ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
         "truck"]) + "\n")
    return written


def test_cifar10_shards_keep_channels_and_train_the_cnn(memcached_kv, tmp_path):
    written = _write_cifar(tmp_path / "cifar" / "cifar-10-batches-bin")
    cfg = _cfg(tmp_path, model="cnn", dataset="cifar10", dataset_dir=str(tmp_path / "cifar"),
               seed=5)
    state = setup_run(cfg, memcached_kv, 2)
    assert state["image_shape"] == [3, 32, 32]
    assert load_manifest(state["shard_dir"])["image_shape"] == [3, 32, 32]
    spec = ModelSpec.from_dict(state["model"])
    assert (spec.channels, spec.height, spec.width) == (3, 32, 32)
    assert spec.mean == (0.4914, 0.4822, 0.4465)  # CIFAR-10's own constants
    # the shards' rows are the release's images, channel-major, in the seed's permutation
    train = np.concatenate([written[f][0] for f in TRAIN_FILES])
    perm = np.random.default_rng(5).permutation(50000)
    shard = open_shard(state["shard_dir"], 1)
    assert shard.image_shape == (3, 32, 32) and shard.x.shape == (25000, 3072)
    np.testing.assert_array_equal(shard.x[:3].reshape(3, 3, 32, 32), train[perm[25000:25003]])
    np.testing.assert_array_equal(open_test(state["shard_dir"])[0][:2].reshape(2, 3, 32, 32),
                                  written[TEST_FILE][0][:2])
    # a few steps of the cnn on it, through the worker path (a short pass: 6 minibatches)
    store, _ = load_run(memcached_kv, state["run_id"])
    store.put_doc("run", {**state, "steps_per_pass": 6})
    init = _final(memcached_kv, state["run_id"])
    st, rec = train_worker(memcached_kv, state["run_id"], 0, "h")
    assert rec["samples"] == 6 * 50 and st.iteration == 1 and 0 <= rec["accuracy"] <= 1
    assert not np.array_equal(_final(memcached_kv, state["run_id"]), init)


SETUP = load_handler("emnist-setup", "handler_emnist_setup_models")


def test_a_model_beyond_max_params_is_a_400_naming_the_field(fn_env):
    fn_env(max_params="1000000")
    status, msg = error_of(SETUP, {"model": "mobilenet_v3_small", "number_of_workers": 1})
    assert status == 400 and msg.startswith("model: ") and "max_params (1000000)" in msg
    status, msg = error_of(SETUP, {"model": "resnet50", "number_of_workers": 1})
    assert status == 400 and msg.startswith('model: unknown model "resnet50"')
    status, msg = error_of(SETUP, {"model": "cnn", "dropout_percent": 0.5})
    assert status == 400 and msg.startswith("dropout_percent: ")
    with pytest.raises(ConfigError, match="^model: .*max_params"):  # the operator's own too
        TrainConfig.from_request({"max_params": "2000000", "model": "vgg11"})
    assert TrainConfig(model="vgg11").num_params == 128_806_154  # counted, never allocated


def test_a_batch_norm_model_evaluates_with_calibration_on_the_workers_shard(memcached_kv,
                                                                           tmp_path):
    cfg = _cfg(tmp_path, model="mobilenet_v3_small", batch_size=32)
    state = setup_run(cfg, memcached_kv, 2)
    store, _ = load_run(memcached_kv, state["run_id"])
    store.put_doc("run", {**state, "steps_per_pass": 3})  # a tiny run
    st, rec = train_worker(memcached_kv, state["run_id"], 1, "h")
    assert rec["model"] == "mobilenet_v3_small" and st.iteration == 1
    model = build_model(ModelSpec.from_dict(state["model"]))
    assert model.needs_calibration
    params = _final(memcached_kv, state["run_id"])
    test_x, test_y = open_test(state["shard_dir"])
    with pytest.raises(ValueError, match="needs calib"):
        model.evaluate(params, test_x, test_y)
    own = calibration_images(open_shard(state["shard_dir"], 1).x)
    assert len(own) == 2000  # synthetic: 4000 images, 2 shards: all of this worker's
    assert (rec["accuracy"], rec["val_loss"]) == model.evaluate(params, test_x, test_y,
                                                                calib=own)


def test_status_and_checkpoints_read_the_progress_notes(memcached_kv, tmp_path):
    """The state document lags the per-push notes by up to a heartbeat: status pages and
    checkpoints show the merged state a takeover would resume."""
    state = setup_run(_cfg(tmp_path), memcached_kv, 1)
    store, _ = load_run(memcached_kv, state["run_id"])
    lease = Lease(store, 0, 10.0)
    st = lease.acquire("h")  # the document: step 0
    st.step, st.offset, st.samples = 7, 7, 350
    Progress(st, lease.save, lease).note_now()  # a push's note, no heartbeat since
    assert run_status(memcached_kv, state["run_id"])["progress"][0]["offset"] == 7
    detail = run_status(memcached_kv, state["run_id"], detail=True)["progress"][0]
    assert detail["step"] == 7 and detail["samples"] == 350 and "lease" not in detail
    write_checkpoint(store, state, str(tmp_path / "ckpt"))
    from emnist.train.checkpoint import Checkpoints
    docs, _ = Checkpoints(str(tmp_path / "ckpt")).read(state["run_id"])
    assert docs["workers"]["worker:0"]["step"] == 7


@pytest.mark.parametrize("algorithm", ["downpour", "averaging"])
def test_a_diverging_worker_stops_and_never_sends_a_non_finite_update(memcached_kv, tmp_path,
                                                                      algorithm):
    """lenet5 at alpha 100 overflows within a pass: the worker stops with reason "diverged"
    and the store's vector stays finite (a NaN pushed would have become every worker's)."""
    cfg = _cfg(tmp_path, model="lenet5", alpha=100.0, iterations=3, n_push=1, n_fetch=1,
               algorithm=algorithm, average_every=1)
    state = setup_run(cfg, memcached_kv, 1)
    st, record = train_worker(memcached_kv, state["run_id"], 0, "h")
    assert st.done and st.stop_reason.startswith("diverged") and "lower alpha" in st.stop_reason
    assert st.iteration < 3 and np.isfinite(_final(memcached_kv, state["run_id"])).all()
    assert run_status(memcached_kv, state["run_id"])["results"][0]["stop_reason"] \
        .startswith("diverged")
