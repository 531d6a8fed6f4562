"""A numpy MLP (inputs -> tanh hidden -> softmax) over one flat float32 parameter vector.

Every layer's weights are views into one contiguous vector, so a worker fetches, pushes and
averages parameters as a single array with no packing step, and the store never sees layers.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class MLPShape:
    inputs: int = 784
    hidden: int = 100
    classes: int = 47

    @property
    def sizes(self) -> list[tuple[str, tuple[int, ...]]]:
        return [
            ("w1", (self.inputs, self.hidden)),
            ("b1", (self.hidden,)),
            ("w2", (self.hidden, self.classes)),
            ("b2", (self.classes,)),
        ]

    @property
    def num_params(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.sizes)


def views(flat: np.ndarray, shape: MLPShape) -> dict[str, np.ndarray]:
    """Per-layer views into ``flat``: writing a view writes the vector."""
    assert flat.shape == (shape.num_params,), f"want {shape.num_params} params, got {flat.shape}"
    out, at = {}, 0
    for name, dims in shape.sizes:
        n = int(np.prod(dims))
        out[name] = flat[at : at + n].reshape(dims)
        at += n
    return out


def init_params(shape: MLPShape, seed: int) -> np.ndarray:
    """Seeded Glorot-uniform weights, zero biases: the same seed gives the same network."""
    rng = np.random.default_rng(seed)
    flat = np.zeros(shape.num_params, dtype=np.float32)
    v = views(flat, shape)
    for name, fan_in, fan_out in (("w1", shape.inputs, shape.hidden),
                                  ("w2", shape.hidden, shape.classes)):
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        v[name][...] = rng.uniform(-limit, limit, size=v[name].shape)
    return flat


def to_float(x_uint8: np.ndarray) -> np.ndarray:
    """Pixels 0..255 -> float32 0..1 (shards stay uint8 on disk; this is the one conversion)."""
    return np.multiply(x_uint8, np.float32(1.0 / 255.0), dtype=np.float32)


class MLP:
    """Forward/backward for a batch; buffers are reused so a training step allocates little."""

    def __init__(self, shape: MLPShape, dropout: float = 0.0, seed: int = 0) -> None:
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.shape = shape
        self.dropout = dropout
        self.rng = np.random.default_rng(seed)
        self.grad = np.zeros(shape.num_params, dtype=np.float32)
        self._g = views(self.grad, shape)

    def logits(self, params: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Inference: dropout off (inverted dropout needs no rescaling at test time)."""
        v = views(params, self.shape)
        h = np.tanh(x @ v["w1"] + v["b1"])
        return h @ v["w2"] + v["b2"]

    def loss_and_grad(self, params: np.ndarray, x: np.ndarray, y: np.ndarray,
                      train: bool = True) -> tuple[float, np.ndarray]:
        """Mean cross-entropy of softmax(logits) and its gradient w.r.t. ``params``.

        Returns ``self.grad`` (reused between calls): copy it if you keep it.
        """
        v, g = views(params, self.shape), self._g
        n = x.shape[0]
        h = np.tanh(x @ v["w1"] + v["b1"])
        if train and self.dropout > 0.0:
            keep = 1.0 - self.dropout
            mask = (self.rng.random(h.shape, dtype=np.float32) < keep) / np.float32(keep)
            hd = h * mask
        else:
            mask, hd = None, h
        z = hd @ v["w2"] + v["b2"]
        z -= z.max(axis=1, keepdims=True)
        np.exp(z, out=z)
        z /= z.sum(axis=1, keepdims=True)  # z is now softmax probabilities
        idx = np.arange(n)
        loss = float(-np.log(np.maximum(z[idx, y], 1e-12)).mean())
        z[idx, y] -= 1.0
        z *= np.float32(1.0 / n)  # dL/dlogits
        np.matmul(hd.T, z, out=g["w2"])
        np.sum(z, axis=0, out=g["b2"])
        dh = z @ v["w2"].T
        if mask is not None:
            dh *= mask
        dh *= 1.0 - h * h  # tanh'
        np.matmul(x.T, dh, out=g["w1"])
        np.sum(dh, axis=0, out=g["b1"])
        return loss, self.grad

    def accuracy(self, params: np.ndarray, x_uint8: np.ndarray, y: np.ndarray,
                 batch: int = 5000) -> float:
        """Top-1 accuracy, in slices so a large test set never materialises as float32."""
        correct = 0
        for i in range(0, len(y), batch):
            z = self.logits(params, to_float(x_uint8[i : i + batch]))
            correct += int((z.argmax(axis=1) == y[i : i + batch]).sum())
        return correct / max(len(y), 1)

    def loss(self, params: np.ndarray, x_uint8: np.ndarray, y: np.ndarray,
             batch: int = 5000) -> float:
        """Mean cross-entropy without dropout (validation loss)."""
        total = 0.0
        for i in range(0, len(y), batch):
            z = self.logits(params, to_float(x_uint8[i : i + batch]))
            z -= z.max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            total += float(-logp[np.arange(len(z)), y[i : i + batch]].sum())
        return total / max(len(y), 1)
