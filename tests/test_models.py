"""The model interface: specs, names, the registry, the numpy MLP adapter, normalisation."""

import json
import subprocess
import sys

import numpy as np
import pytest

from emnist.data import load_dataset
from emnist.data.normalize import Normalizer, compute_stats, stats_for
from emnist.model import MLP, MLPShape, init_params, to_float
from emnist.models import MODEL_NAMES, ModelSpec, build_model, canonical_name, param_count
from emnist.models.mlp import MLPModel
from tests.servers import ROOT


@pytest.mark.parametrize("given,want", [
    ("squeezenet1.1", "squeezenet1_1"), ("SqueezeNet1_1", "squeezenet1_1"),
    ("vgg11", "vgg11"), ("VGG11", "vgg11"),
    ("mobilenet v3 small", "mobilenet_v3_small"), ("MobileNet V3 Small", "mobilenet_v3_small"),
    ("mobilenet_v3_small", "mobilenet_v3_small"), ("mobilenet-v3-small", "mobilenet_v3_small"),
    ("LeNet-5", "lenet5"), ("lenet5", "lenet5"), (" MLP ", "mlp"), ("cnn", "cnn"),
])
def test_names_and_the_p2p_seed_aliases(given, want):
    assert canonical_name(given) == want
    assert ModelSpec(name=given).name == want


def test_unknown_model_names_the_choices():
    with pytest.raises(ValueError, match="unknown model 'resnet50'; known: mlp, lenet5, cnn"):
        canonical_name("resnet50")
    assert MODEL_NAMES == ("mlp", "lenet5", "cnn", "mobilenet_v3_small", "squeezenet1_1",
                           "vgg11")


@pytest.mark.parametrize("fields,message", [
    ({"channels": 2}, "channels must be 1 or 3"),
    ({"channels": 4}, r"channels must be an integer in \[1, 3\]"),
    ({"classes": True}, "classes must be an integer"),
    ({"classes": 1}, "classes must be an integer"),
    ({"height": 10_000}, "height must be an integer"),
    ({"width": 3.5}, "width must be an integer"),
    ({"name": "vgg11", "hidden": 64}, "hidden applies to mlp only"),
    ({"hidden": 0}, "hidden must be an integer"),
    ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
    ({"dropout": float("nan")}, r"dropout must be in \[0, 1\)"),
    ({"name": "lenet5", "dropout": 0.5}, "lenet5 has no dropout layer"),
    ({"mean": [0.5], "std": None}, "mean and std go together"),
    ({"mean": [0.5, 0.5], "std": [1, 1]}, "mean must be a list of 1 numbers"),
    ({"mean": [float("inf")], "std": [1.0]}, "finite numbers"),
    ({"mean": [0.1], "std": [0.0]}, "std values must be > 0"),
    ({"mean": "0.5", "std": [1.0]}, "mean must be a list"),
])
def test_spec_validation_names_the_field(fields, message):
    with pytest.raises(ValueError, match=message):
        ModelSpec(**fields)


def test_spec_round_trips_through_json_and_refuses_unknown_fields():
    spec = ModelSpec.for_dataset("SqueezeNet1.1", "cifar-10", classes=10, dropout=0.25)
    doc = json.loads(json.dumps(spec.to_dict()))
    assert doc["name"] == "squeezenet1_1" and doc["mean"] == [0.4914, 0.4822, 0.4465]
    assert ModelSpec.from_dict(doc) == spec
    assert ModelSpec("cnn", mean=np.float32([0.5]), std=np.array([0.25])).mean == (0.5,)
    with pytest.raises(ValueError, match="unknown model spec field"):
        ModelSpec.from_dict({**doc, "path": "/etc/passwd"})
    with pytest.raises(ValueError, match="must be an object"):
        ModelSpec.from_dict(["mlp"])  # type: ignore[arg-type]


def test_for_dataset_shapes_and_constants():
    lenet = ModelSpec.for_dataset("lenet5", "cifar10", classes=10)
    assert (lenet.channels, lenet.height, lenet.width) == (3, 32, 32)
    assert lenet.std == (0.2470, 0.2435, 0.2616)
    fm = ModelSpec.for_dataset("mobilenet v3 small", "fashion-mnist", classes=10)
    assert (fm.channels, fm.height, fm.mean, fm.std) == (1, 28, (0.2860,), (0.3530,))
    mlp = ModelSpec.for_dataset("mlp", "emnist-bymerge", classes=47, hidden=100)
    assert mlp.mean is None and mlp.std is None and mlp.inputs == 784  # the MLP keeps x / 255
    assert stats_for("emnist-letters") == stats_for("emnist") and stats_for("synthetic") is None


def _mlp_pair(dropout: float) -> tuple[MLPModel, MLP]:
    spec = ModelSpec("mlp", classes=47, dropout=dropout)
    return build_model(spec, seed=3), MLP(MLPShape(784, 100, 47), dropout, seed=3)


def test_mlp_adapter_is_todays_mlp_exactly():
    model, ref = _mlp_pair(0.3)
    assert isinstance(model, MLPModel) and model.num_params == param_count("mlp") == 83_247
    params = model.init_params(11)
    assert np.array_equal(params, init_params(MLPShape(784, 100, 47), 11))
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (64, 784), dtype=np.uint8)
    y = rng.integers(0, 47, 64).astype(np.uint8)
    for it in range(3):  # the per-pass dropout hook, as the worker sets it
        model.rng = np.random.default_rng([5, 0, it, 1])
        ref.rng = np.random.default_rng([5, 0, it, 1])
        loss, grad = model.loss_and_grad(params, x, y)  # uint8 in: converted inside
        ref_loss, ref_grad = ref.loss_and_grad(params, to_float(x), y)
        assert loss == ref_loss and np.array_equal(grad, ref_grad)
        assert grad is model.grad  # the one reused buffer
        params -= 0.1 * grad
    assert np.array_equal(model.prepare(x), to_float(x))
    acc, val = model.evaluate(params, x, y, batch=10, calib=x)
    assert acc == ref.accuracy(params, x, y, batch=10) and val == ref.loss(params, x, y, batch=10)
    assert not model.needs_calibration


def test_mlp_with_normalisation_constants_uses_them():
    spec = ModelSpec("mlp", classes=10, mean=(0.5,), std=(0.25,))
    model = build_model(spec)
    x = np.array([[0, 255, 128] + [0] * 781], dtype=np.uint8)
    np.testing.assert_allclose(model.prepare(x)[0, :3], [-2.0, 2.0, (128 / 255 - 0.5) / 0.25],
                               atol=1e-6)


def test_mlp_refuses_float64_and_other_names():
    with pytest.raises(ValueError, match="float32 only"):
        build_model("mlp", dtype=np.float64)
    with pytest.raises(ValueError, match="MLPModel builds mlp"):
        MLPModel(ModelSpec("cnn"))


def test_normalizer_per_channel_and_padding():
    mean, std = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
    rng = np.random.default_rng(2)
    x = rng.integers(0, 256, (5, 3 * 28 * 28), dtype=np.uint8)
    out = Normalizer(3, 28, 28, mean, std, pad=2)(x)
    assert out.shape == (5, 3, 32, 32) and out.dtype == np.float32
    want = (x.reshape(5, 3, 28, 28) / 255.0 - np.array(mean)[:, None, None]) / np.array(
        std)[:, None, None]
    np.testing.assert_allclose(out[:, :, 2:30, 2:30], want, rtol=1e-5, atol=1e-5)
    for c in range(3):  # the border is pixel 0 (the MNIST family's background), normalised
        np.testing.assert_allclose(out[:, c, :2, :], -mean[c] / std[c], rtol=1e-6)
        np.testing.assert_allclose(out[:, c, :, -2:], -mean[c] / std[c], rtol=1e-6)
    plain = Normalizer(1, 28, 28)(x[:, :784])
    assert np.array_equal(plain.reshape(5, 784), to_float(x[:, :784]))
    with pytest.raises(ValueError, match="both mean and std"):
        Normalizer(1, 28, 28, mean=(0.1,))


def test_compute_stats_on_known_data():
    x = np.zeros((4, 3 * 4), dtype=np.uint8)
    x[:, 4:8] = 255  # channel 1 all white; channel 2 half white
    x[:2, 8:12] = 255
    mean, std = compute_stats(x, channels=3, batch=3)
    np.testing.assert_allclose(mean, (0.0, 1.0, 0.5))
    np.testing.assert_allclose(std, (0.0, 0.0, 0.5))


def test_fashion_mnist_constants_match_the_data():
    ds = load_dataset("fashion-mnist")
    mean, std = compute_stats(ds.train_x, channels=1)
    st = stats_for("fashion-mnist")
    assert abs(mean[0] - st.mean[0]) < 1e-4 and abs(std[0] - st.std[0]) < 1e-4


def test_torch_missing_gives_the_install_hint():
    """A real failed import (torch blocked in sys.modules), in a fresh interpreter."""
    code = ("import sys\nsys.modules['torch'] = None\n"
            "from emnist.models import build_model, TorchMissing, param_count\n"
            "m = build_model('mlp')\n"
            "try:\n    build_model('lenet5')\nexcept TorchMissing as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, check=True).stdout
    assert "model 'lenet5' needs torch" in out
    assert "pip install 'emnist[torch]'" in out and "torch==2.13.0" in out and "CPU" in out


@pytest.mark.parametrize("name,loads", [("lenet5", True), ("mobilenet v3 small", True),
                                        ("mlp", False), ("", False), ("no-such-net", False)])
def test_preload_imports_torch_only_for_a_torch_model(name, loads):
    """emnist-train preloads its stack's model: torch is imported at replica start for a torch
    model, never for the MLP (whose replicas stay light), and a bad name does not raise."""
    code = ("import sys; from emnist.models import preload; "
            f"r = preload({name!r}); print(r, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout.split()
    assert out == [str(loads), str(loads)]
