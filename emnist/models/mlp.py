"""The numpy MLP behind the model interface, unchanged in maths and speed.

``MLPModel`` is ``emnist.model.MLP`` plus the interface's extras (spec, seeded init, input
conversion, one-pass evaluation). It subclasses instead of wrapping, so ``rng`` and ``grad``
are the MLP's own attributes and a training step costs one dtype check more than before.
"""

from __future__ import annotations

import numpy as np

from emnist.data.normalize import Normalizer
from emnist.model import MLP, MLPShape, init_params, to_float

from .spec import ModelSpec

__all__ = ["MLPModel"]

DEFAULT_HIDDEN = 100


class MLPModel(MLP):
    """inputs -> tanh hidden -> softmax over one flat float32 vector (see emnist.model)."""

    needs_calibration = False
    default_batch = 5000

    def __init__(self, spec: ModelSpec, seed: int = 0) -> None:
        if spec.name != "mlp":
            raise ValueError(f"MLPModel builds mlp, not {spec.name}")
        shape = MLPShape(spec.inputs, spec.hidden or DEFAULT_HIDDEN, spec.classes)
        super().__init__(shape, spec.dropout or 0.0, seed)
        self.spec = spec
        self.num_params = shape.num_params
        self._norm = (None if spec.mean is None else
                      Normalizer(spec.channels, spec.height, spec.width, spec.mean, spec.std))

    def init_params(self, seed: int) -> np.ndarray:
        """Seeded Glorot-uniform weights, zero biases (exactly emnist.model.init_params)."""
        return init_params(self.shape, seed)

    def prepare(self, x_uint8: np.ndarray) -> np.ndarray:
        """uint8 (N, inputs) or (N, C, H, W) -> float32 (N, inputs): x / 255 by default."""
        x2 = x_uint8.reshape(len(x_uint8), self.shape.inputs)
        if self._norm is None:
            return to_float(x2)
        return self._norm(x2).reshape(len(x2), self.shape.inputs)

    def loss_and_grad(self, params: np.ndarray, x: np.ndarray, y: np.ndarray,
                      train: bool = True) -> tuple[float, np.ndarray]:
        """Mean loss and ``self.grad`` (reused); ``x`` is uint8 pixels or ``prepare``'s output."""
        if x.dtype == np.uint8:
            x = self.prepare(x)
        return super().loss_and_grad(params, x, y, train)

    def calibrate(self, params: np.ndarray, x_uint8: np.ndarray, batch: int | None = None) -> None:
        """Nothing to estimate: the MLP has no normalisation statistics."""

    def evaluate(self, params: np.ndarray, x_uint8: np.ndarray, y: np.ndarray,
                 batch: int | None = None,
                 calib: np.ndarray | None = None) -> tuple[float, float]:
        """(top-1 accuracy, mean cross-entropy) in one pass of slices; ``calib`` is unused.

        Computes exactly what ``MLP.accuracy`` and ``MLP.loss`` do, from one forward pass.
        """
        batch = batch or self.default_batch
        correct, total = 0, 0.0
        for i in range(0, len(y), batch):
            z = self.logits(params, self.prepare(x_uint8[i : i + batch]))
            yb = y[i : i + batch]
            correct += int((z.argmax(axis=1) == yb).sum())
            z -= z.max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            total += float(-logp[np.arange(len(z)), yb].sum())
        n = max(len(y), 1)
        return correct / n, total / n
