"""Torch models behind the flat-vector interface: published parameter counts, gradients
against finite differences (float64), views and in-place gradients, a step equal to a plain
torch loop's, batch-norm calibration, seeded init and dropout."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from emnist.models import ModelSpec, build_model, param_count
from emnist.models.torch_backend import configure_threads
from emnist.models.torch_nets import ARCHITECTURES

# Published counts (torchvision's weights metadata, 3 channels, 1000 classes) and LeNet-5's
# 61,706 (1 channel, 10 classes). Other cases change only the first conv and the last layer:
# -(3 - c) * out * k * k for c channels; -(f + 1) * 1000 + (f + 1) * k for k classes and a
# last layer of f inputs (mobilenet 1024, squeezenet 512 (1x1 conv), vgg 4096, lenet 84).
MNV3, SQZ, VGG, LENET = 2_542_856, 1_235_496, 132_863_336, 61_706
COUNTS = [
    ("mobilenet_v3_small", 3, 1000, MNV3),
    ("mobilenet_v3_small", 3, 10, MNV3 - 1025 * 1000 + 1025 * 10),   # 1,528,106
    ("mobilenet_v3_small", 1, 10, MNV3 - 1025 * 990 - 2 * 16 * 9),  # 1,527,818
    ("mobilenet_v3_small", 1, 1000, MNV3 - 2 * 16 * 9),
    ("squeezenet1_1", 3, 1000, SQZ),
    ("squeezenet1_1", 3, 10, SQZ - 513 * 990),                      # 727,626
    ("squeezenet1_1", 1, 10, SQZ - 513 * 990 - 2 * 64 * 9),         # 726,474
    ("squeezenet1_1", 1, 1000, SQZ - 2 * 64 * 9),
    ("vgg11", 3, 1000, VGG),
    ("vgg11", 3, 10, VGG - 4097 * 990),                             # 128,807,306
    ("vgg11", 1, 10, VGG - 4097 * 990 - 2 * 64 * 9),                # 128,806,154
    ("vgg11", 1, 1000, VGG - 2 * 64 * 9),
    ("lenet5", 1, 10, LENET),
    ("lenet5", 3, 10, LENET + 2 * 6 * 25),
    ("lenet5", 1, 1000, LENET + 85 * 990),
    ("cnn", 1, 10, 21_840),  # pytorch/examples mnist_hogwild Net at 28 px
]


@pytest.mark.parametrize("name,channels,classes,want", COUNTS)
@pytest.mark.parametrize("side", [28, 32])
def test_parameter_counts_match_the_references(name, channels, classes, want, side):
    if name == "cnn" and side == 32:
        want = 21_840 + 20 * (25 - 16) * 50  # its flatten grows from 20x4x4 to 20x5x5
    spec = ModelSpec(name, channels=channels, classes=classes, height=side, width=side)
    assert param_count(spec) == want


def _batch(spec: ModelSpec, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, spec.inputs), dtype=np.uint8),
            rng.integers(0, spec.classes, n).astype(np.uint8))


SMALL = ["lenet5", "cnn", "mobilenet_v3_small", "squeezenet1_1"]


@pytest.mark.parametrize("name", SMALL)
@pytest.mark.parametrize("channels,side", [(1, 28), (1, 32), (3, 28), (3, 32)])
def test_each_model_trains_on_1_or_3_channels_at_28_or_32_px(name, channels, side):
    spec = ModelSpec(name, channels=channels, height=side, width=side, classes=7)
    model = build_model(spec)
    params = model.init_params(0)
    x, y = _batch(spec, 4, seed=side + channels)
    loss, grad = model.loss_and_grad(params, x, y)
    assert np.isfinite(loss) and grad.shape == params.shape and np.any(grad != 0)
    acc, val = model.evaluate(params, x, y, calib=x)
    assert 0.0 <= acc <= 1.0 and np.isfinite(val)
    assert model.logits(params, x).shape == (4, 7)


def test_vgg11_pads_28_px_to_32():
    """Its five 2x2 pools need 32 px: 28 px images get a 2 px border of background."""
    spec = ModelSpec("vgg11", channels=1, height=28, width=28, classes=3,
                     mean=(0.5,), std=(0.25,))
    model = build_model(spec)
    x, _ = _batch(spec, 2, seed=0)
    prepared = model.prepare(x)
    assert prepared.shape == (2, 1, 32, 32)
    np.testing.assert_allclose(prepared[:, :, 2:30, 2:30].reshape(2, 784),
                               (x / 255 - 0.5) / 0.25, rtol=1e-5, atol=1e-5)
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert np.all(prepared[:, 0, border] == -2.0)  # pixel 0, normalised
    # (the real forward and backward at 28 px: the gradient test below)


def _fd_check(spec: ModelSpec, n: int, coords: int, seed: int = 0) -> None:
    """Gradient through the interface vs central differences on chosen coordinates.

    Half the coordinates are random, half the largest analytic gradients among a sample (so
    the comparison is not all near-zero entries). The differences perturb the flat vector in
    place and run the module forward only (the module sees the vector: its weights are
    views), in the mode loss_and_grad left it (batch-norm batch statistics, dropout on),
    with the same masks.
    """
    model = build_model(spec, dtype=np.float64)
    params = model.init_params(seed)
    assert params.dtype == np.float64
    xu, y = _batch(spec, n, seed=seed + 1)
    x = model.prepare(xu)
    model.rng = np.random.default_rng(7)
    model.loss_and_grad(params, x, y)
    analytic = model.grad  # the forward-only probes below leave it alone (no 1 GB copy)
    xt, yt = torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))

    def loss() -> float:
        model.rng = np.random.default_rng(7)
        with torch.no_grad():
            return float(F.cross_entropy(model.net(xt), yt))

    rng = np.random.default_rng(seed + 2)
    pool = rng.choice(params.size, min(params.size, 100_000), replace=False)  # (no full sort)
    largest = pool[np.argsort(-np.abs(analytic[pool]))[: coords // 2]]
    idx = np.unique(np.concatenate([rng.choice(params.size, coords // 2, replace=False),
                                    largest]))
    eps = 1e-6
    numeric = np.empty(len(idx))
    for j, i in enumerate(idx):
        old = params[i]
        params[i] = old + eps
        up = loss()
        params[i] = old - eps
        down = loss()
        params[i] = old
        numeric[j] = (up - down) / (2 * eps)
    scale = max(abs(analytic.max()), abs(analytic.min()))
    np.testing.assert_allclose(analytic[idx], numeric, rtol=1e-5, atol=1e-7 * scale)


@pytest.mark.parametrize("name,channels,side,classes,n", [
    ("lenet5", 1, 28, 5, 3),
    ("cnn", 3, 32, 4, 3),               # with both dropout layers active
    ("mobilenet_v3_small", 3, 32, 3, 4),  # batch norm on batch statistics
    ("squeezenet1_1", 1, 28, 3, 2),
])
def test_gradients_match_finite_differences(name, channels, side, classes, n):
    spec = ModelSpec(name, channels=channels, height=side, width=side, classes=classes,
                     mean=(0.4,) * channels, std=(0.3,) * channels)
    _fd_check(spec, n=n, coords=24)


def test_vgg11_gradient_matches_finite_differences_on_a_subset():
    _fd_check(ModelSpec("vgg11", channels=1, height=28, width=28, classes=3), n=1, coords=8)


def test_parameters_and_gradients_are_views_into_the_flat_vectors():
    spec = ModelSpec("mobilenet_v3_small", classes=10)
    model = build_model(spec)
    params = model.init_params(1)
    x, y = _batch(spec, 4, seed=0)
    model.loss_and_grad(params, x, y)
    grads = {id(p): p.grad for p in model.net.parameters()}
    base_p, base_g = params.ctypes.data, model.grad.ctypes.data
    at = 0
    for p in model.net.parameters():
        assert p.data_ptr() == base_p + 4 * at
        assert p.grad.data_ptr() == base_g + 4 * at  # backward accumulated in place
        at += p.numel()
    assert at == params.size == model.num_params
    _, grad = model.loss_and_grad(params, x[:2], y[:2])
    assert grad is model.grad and grad.ctypes.data == base_g
    assert all(p.grad is grads[id(p)] for p in model.net.parameters())  # .grad not replaced
    assert torch.equal(torch.nn.utils.parameters_to_vector(model.net.parameters()),
                       torch.from_numpy(params))
    last = next(p for p in reversed(list(model.net.parameters())))  # the last layer's bias
    params[-10:] += 1.0  # a numpy in-place update is the module's update
    assert torch.equal(last.detach(), torch.from_numpy(params[-10:]))


def test_a_new_vector_rebinds_and_a_read_only_vector_is_accepted():
    spec = ModelSpec("lenet5", classes=10)
    model = build_model(spec)
    a, b = model.init_params(1), model.init_params(2)
    x, y = _batch(spec, 4, seed=0)
    la, ga = model.loss_and_grad(a, x, y)
    ga = ga.copy()
    lb, _ = model.loss_and_grad(b, x, y)
    assert la != lb
    frozen = a.copy()
    frozen.flags.writeable = False
    assert model.loss_and_grad(frozen, x, y)[0] == la and np.array_equal(model.grad, ga)
    with pytest.raises(ValueError, match="contiguous float32 vector of 61706"):
        model.loss_and_grad(a[:-1], x, y)
    with pytest.raises(ValueError, match="contiguous float32 vector"):
        model.loss_and_grad(a.astype(np.float64), x, y)
    with pytest.raises(ValueError, match="contiguous float32 vector"):
        model.loss_and_grad(list(a), x, y)
    assert model.loss_and_grad(a[:], x, y)[0] == la  # a new view of the same memory


def _plain_net(model, params: np.ndarray) -> torch.nn.Module:
    """The same architecture with its own ordinary parameters, copied from ``params``."""
    spec = model.spec
    cls = ARCHITECTURES[spec.name]
    gen = torch.Generator()
    kwargs = {"side": spec.height} if spec.name == "cnn" else {}
    net = cls(spec.channels, spec.classes, spec.dropout, gen, **kwargs)
    torch.nn.utils.vector_to_parameters(torch.from_numpy(params.copy()), net.parameters())
    return net, gen


@pytest.mark.parametrize("name", ["lenet5", "cnn", "mobilenet_v3_small"])
def test_steps_equal_a_plain_torch_loop(name):
    spec = ModelSpec.for_dataset(name, "fashion-mnist", classes=10)
    model = build_model(spec)
    params = model.init_params(4)
    plain, gen = _plain_net(model, params)
    plain.train()
    opt = torch.optim.SGD(plain.parameters(), lr=0.05)
    for step in range(3):
        x, y = _batch(spec, 16, seed=step)
        model.rng = np.random.default_rng([9, 0, step, 1])
        gen.set_state(model._gen.get_state())  # the same dropout masks
        opt.zero_grad()
        ref = F.cross_entropy(plain(torch.from_numpy(model.prepare(x))),
                              torch.from_numpy(y.astype(np.int64)))
        ref.backward()
        opt.step()
        loss, grad = model.loss_and_grad(params, x, y)
        grad *= np.float32(-0.05)
        params += grad
        assert loss == pytest.approx(ref.item(), rel=1e-5)
    want = torch.nn.utils.parameters_to_vector(plain.parameters()).detach().numpy()
    np.testing.assert_allclose(params, want, rtol=1e-5, atol=1e-6)


def test_batch_norm_needs_calibration_and_the_vector_alone_defines_the_model():
    spec = ModelSpec.for_dataset("mobilenet_v3_small", "fashion-mnist", classes=10)
    trained, fresh = build_model(spec), build_model(spec)
    assert trained.needs_calibration
    params = trained.init_params(5)
    test_x, test_y = _batch(spec, 40, seed=1)
    calib, _ = _batch(spec, 64, seed=2)
    with pytest.raises(ValueError, match="has batch norm: evaluate needs calib="):
        trained.evaluate(params, test_x, test_y)
    for step in range(3):  # training never touches the running statistics
        x, y = _batch(spec, 16, seed=10 + step)
        _, grad = trained.loss_and_grad(params, x, y)
        params -= 0.1 * grad
    bn = trained._bns[0]
    assert torch.all(bn.running_mean == 0) and torch.all(bn.running_var == 1)
    other, _ = _batch(spec, 32, seed=3)
    trained.evaluate(params, test_x, test_y, calib=other)  # leaves other statistics behind
    before = params.copy()
    got = trained.evaluate(params, test_x, test_y, batch=16, calib=calib)
    assert got == fresh.evaluate(params, test_x, test_y, batch=16, calib=calib)
    assert np.array_equal(params, before)


def test_calibration_is_the_average_of_full_minibatch_statistics():
    spec = ModelSpec.for_dataset("mobilenet_v3_small", "cifar10", classes=10)
    model = build_model(spec)
    params = model.init_params(6)
    calib, _ = _batch(spec, 20, seed=4)  # two full batches of 8; the last 4 images unused
    model.calibrate(params, calib, batch=8)
    conv, bn = model.net.features[0][0], model.net.features[0][1]
    with torch.no_grad():
        out = [conv(torch.from_numpy(model.prepare(calib[i : i + 8]))) for i in (0, 8)]
    means = torch.stack([o.mean(dim=(0, 2, 3)) for o in out])
    variances = torch.stack([o.var(dim=(0, 2, 3), unbiased=True) for o in out])
    torch.testing.assert_close(bn.running_mean, means.mean(0), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, variances.mean(0), rtol=1e-5, atol=1e-6)
    assert int(bn.num_batches_tracked) == 2 and not bn.track_running_stats and not bn.training


def test_evaluate_in_batches_equals_one_batch():
    spec = ModelSpec.for_dataset("squeezenet1_1", "fashion-mnist", classes=10)
    model = build_model(spec)
    params = model.init_params(0)
    x, y = _batch(spec, 30, seed=0)
    acc1, loss1 = model.evaluate(params, x, y, batch=7)
    acc2, loss2 = model.evaluate(params, x, y, batch=30)
    z = model.logits(params, x)
    assert acc1 == acc2 == float(np.mean(z.argmax(1) == y))
    assert loss1 == pytest.approx(loss2, rel=1e-6)


def test_init_is_seeded_and_follows_the_reference_scheme():
    spec = ModelSpec("mobilenet_v3_small", channels=3, height=32, width=32, classes=10)
    model = build_model(spec)
    a, b, c = model.init_params(1), model.init_params(1).copy(), model.init_params(2)
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    model.init_params(1)
    first = model.net.features[0][0].weight  # conv 3->16, 3x3: kaiming normal, fan_out
    assert first.std().item() == pytest.approx((2 / (16 * 9)) ** 0.5, rel=0.1)
    assert torch.all(model.net.features[0][1].weight == 1)
    head = model.net.classifier[0].weight  # Linear: normal(0, 0.01), zero bias
    assert head.std().item() == pytest.approx(0.01, rel=0.05)
    assert torch.all(model.net.classifier[0].bias == 0)
    sq = build_model(ModelSpec("squeezenet1_1", classes=10))
    sq.init_params(0)
    assert sq.net.final_conv.weight.std().item() == pytest.approx(0.01, rel=0.1)


def test_dropout_masks_follow_the_rng_hook_per_model():
    spec = ModelSpec("cnn", classes=10, dropout=0.5)
    m1, m2 = build_model(spec), build_model(spec)
    params = m1.init_params(0)
    x, y = _batch(spec, 8, seed=0)
    m1.rng = np.random.default_rng([1, 0, 1, 1])
    first = m1.loss_and_grad(params, x, y)[0]
    m2.rng = np.random.default_rng([1, 0, 2, 1])  # another model in the same process
    m2.loss_and_grad(params, x, y)
    torch.manual_seed(123)  # torch's global generator plays no part
    m1.rng = np.random.default_rng([1, 0, 1, 1])
    assert m1.loss_and_grad(params, x, y)[0] == first
    m1.rng = np.random.default_rng([1, 0, 2, 1])
    assert m1.loss_and_grad(params, x, y)[0] != first
    no_drop = m1.loss_and_grad(params, x, y, train=False)[0]
    assert no_drop == m1.loss_and_grad(params, x, y, train=False)[0]


def test_threads_default_to_one_unless_configured():
    was = torch.get_num_threads()
    try:
        assert configure_threads(env={}) == 1 and torch.get_num_threads() == 1
        assert configure_threads(env={"OMP_NUM_THREADS": "2"}) == 2
        assert configure_threads(3, env={"OMP_NUM_THREADS": "2"}) == 3
        assert configure_threads(env={"OMP_NUM_THREADS": "lots"}) == 1
        with pytest.raises(ValueError, match="threads must be >= 1"):
            configure_threads(0)
    finally:
        torch.set_num_threads(was)
