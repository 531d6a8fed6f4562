"""Per-dataset image shape and normalisation constants, and the one uint8 -> float conversion.

Every dataset is stored as uint8 pixels, flattened channel-major: (N, C*H*W) with C planes of
H rows (CIFAR-10's own record layout; MNIST-family images have C = 1). Models convert a batch
with ``Normalizer``: ``x / 255`` per pixel, then ``(x - mean[c]) / std[c]`` per channel when
constants are given. The numpy MLP keeps plain ``x / 255`` (no constants), so its results are
unchanged; the torch models use the constants below.

Constants are the mean and standard deviation of the training set's pixels in [0, 1]:
MNIST 0.1307/0.3081 (the value pytorch/examples use); Fashion-MNIST 0.2860/0.3530 (computed
here from the release: 0.28604, 0.35302; tests check it against the data on disk); EMNIST one
pair for every split, 0.1751/0.3332 (the balanced split; the splits differ in the third
decimal); CIFAR-10 per channel R, G, B means 0.4914/0.4822/0.4465 and standard deviations
0.2470/0.2435/0.2616 (over all training pixels, not the often-copied 0.2023/0.1994/0.2010,
which are averages of per-image deviations). ``compute_stats`` recomputes them from data.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["DATASET_STATS", "DatasetStats", "Normalizer", "compute_stats", "stats_for"]


@dataclass(frozen=True)
class DatasetStats:
    """Image shape (channels, height, width) and per-channel mean/std of pixels in [0, 1]."""

    channels: int
    height: int
    width: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


_MNIST = DatasetStats(1, 28, 28, (0.1307,), (0.3081,))
_FASHION = DatasetStats(1, 28, 28, (0.2860,), (0.3530,))
_EMNIST = DatasetStats(1, 28, 28, (0.1751,), (0.3332,))
_CIFAR10 = DatasetStats(3, 32, 32, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))

DATASET_STATS: dict[str, DatasetStats] = {
    "mnist": _MNIST,
    "fashion-mnist": _FASHION,
    "emnist": _EMNIST,
    "cifar10": _CIFAR10,
}


def stats_for(dataset: str) -> DatasetStats | None:
    """Stats for a dataset name (``emnist-<split>`` -> emnist, ``cifar-10`` -> cifar10).

    None for datasets without constants (``synthetic``): those use plain x / 255.
    """
    key = dataset.strip().lower()
    if key.startswith("emnist"):
        key = "emnist"
    elif key in ("cifar-10", "cifar_10"):
        key = "cifar10"
    elif key.startswith("fashion-mnist-gen-"):  # generated from Fashion-MNIST's images
        key = "fashion-mnist"
    return DATASET_STATS.get(key)


def compute_stats(x_uint8: np.ndarray, channels: int,
                  batch: int = 10000) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of pixels / 255, accumulated in float64 over slices."""
    n = len(x_uint8)
    if n == 0:
        raise ValueError("compute_stats needs at least one image")
    total = np.zeros(channels)
    squares = np.zeros(channels)
    for i in range(0, n, batch):
        part = x_uint8[i : i + batch].reshape(-1, channels, x_uint8[0].size // channels)
        part = part.astype(np.float64) / 255.0
        total += part.sum(axis=(0, 2))
        squares += np.square(part).sum(axis=(0, 2))
    count = n * (x_uint8[0].size // channels)
    mean = total / count
    std = np.sqrt(np.maximum(squares / count - mean * mean, 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


class Normalizer:
    """uint8 (N, C*H*W) or (N, C, H, W) -> float (N, C, H', W'), optionally padded.

    ``pad`` adds that many pixels of value 0 (before normalisation: the black background of
    the MNIST family) on every side, for architectures that need 32 px inputs.
    """

    def __init__(self, channels: int, height: int, width: int,
                 mean: Sequence[float] | None = None, std: Sequence[float] | None = None,
                 pad: int = 0, dtype: type = np.float32) -> None:
        if (mean is None) != (std is None):
            raise ValueError("give both mean and std, or neither")
        self.shape = (channels, height, width)
        self.pad = pad
        self.dtype = np.dtype(dtype)
        m = np.zeros(channels) if mean is None else np.asarray(mean, dtype=np.float64)
        s = np.ones(channels) if std is None else np.asarray(std, dtype=np.float64)
        if m.shape != (channels,) or s.shape != (channels,) or np.any(s <= 0):
            raise ValueError(f"mean/std need {channels} values with std > 0")
        # x/255 -> (x/255 - m)/s == x * scale + shift, one multiply and one add per pixel
        self.scale = (1.0 / (255.0 * s)).astype(self.dtype).reshape(1, channels, 1, 1)
        self.shift = (-m / s).astype(self.dtype).reshape(1, channels, 1, 1)
        self.plain = mean is None

    def __call__(self, x_uint8: np.ndarray) -> np.ndarray:
        c, h, w = self.shape
        n = len(x_uint8)
        x4 = x_uint8.reshape(n, c, h, w)
        p = self.pad
        out = np.empty((n, c, h + 2 * p, w + 2 * p), dtype=self.dtype)
        inner = out[:, :, p : p + h, p : p + w] if p else out
        if p:
            out[...] = self.shift  # the value pixel 0 takes after normalisation
        np.multiply(x4, self.scale, out=inner, dtype=self.dtype)
        if not self.plain:
            inner += self.shift
        return out
