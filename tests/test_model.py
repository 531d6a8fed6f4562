import numpy as np
import pytest

from emnist.model import MLP, MLPShape, init_params, views


def _fd_check(dropout: float) -> None:
    shape = MLPShape(12, 7, 5)
    params = init_params(shape, 3).astype(np.float64)
    rng = np.random.default_rng(0)
    x, y = rng.random((9, 12)), rng.integers(0, 5, 9)
    model = MLP(shape, dropout, seed=5)
    model.grad = np.zeros(shape.num_params, dtype=np.float64)
    model._g = views(model.grad, shape)
    state = model.rng.bit_generator.state

    def loss(p):
        model.rng.bit_generator.state = state  # the same dropout mask every call
        return model.loss_and_grad(p, x, y)[0]

    loss(params)
    analytic = model.grad.copy()
    eps = 1e-6
    numeric = np.empty_like(params)
    for i in range(params.size):
        p1, p2 = params.copy(), params.copy()
        p1[i] += eps
        p2[i] -= eps
        numeric[i] = (loss(p1) - loss(p2)) / (2 * eps)
    np.testing.assert_allclose(analytic, numeric, rtol=1e-4, atol=1e-7)


def test_gradient_matches_finite_differences():
    _fd_check(0.0)


def test_gradient_with_dropout_matches_finite_differences():
    _fd_check(0.3)


def test_views_share_memory_and_layout():
    shape = MLPShape(784, 100, 47)
    flat = init_params(shape, 0)
    assert flat.dtype == np.float32 and flat.size == 784 * 100 + 100 + 100 * 47 + 47
    v = views(flat, shape)
    v["b2"][...] = 7.0
    assert np.all(flat[-47:] == 7.0)
    assert v["w1"].shape == (784, 100) and np.shares_memory(v["w1"], flat)


def test_init_is_seeded():
    shape = MLPShape(20, 4, 3)
    assert np.array_equal(init_params(shape, 1), init_params(shape, 1))
    assert not np.array_equal(init_params(shape, 1), init_params(shape, 2))


def test_sgd_learns_a_separable_problem():
    rng = np.random.default_rng(0)
    centers = rng.random((3, 16)) * 255
    y = rng.integers(0, 3, 600)
    x = np.clip(centers[y] + rng.normal(0, 20, (600, 16)), 0, 255).astype(np.uint8)
    shape = MLPShape(16, 8, 3)
    p, model = init_params(shape, 0), MLP(shape)
    before = model.accuracy(p, x, y)
    for _ in range(30):
        for i in range(0, 600, 50):
            _, g = model.loss_and_grad(p, x[i:i + 50].astype(np.float32) / 255, y[i:i + 50])
            p -= 0.5 * g
    assert model.accuracy(p, x, y) > 0.95 > before


def test_bad_dropout_is_refused():
    with pytest.raises(ValueError, match="dropout"):
        MLP(MLPShape(4, 2, 2), dropout=1.0)
