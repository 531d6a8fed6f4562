"""The generated ~1 GB dataset: an "infinite MNIST"-style expansion of Fashion-MNIST's training
images, of any size, needing no download (``fashion-mnist-gen-<N>``, e.g. ``-1300k``: 1.3M
samples, about 1 GB of uint8 pixels).

Sample ``i`` is always the same image: training image ``i % 60000`` itself for ``i < 60000``
(the real training set is the first 60,000 samples), otherwise that image under a random affine
transform (rotation, anisotropic scale, shear, translation) composed with an elastic
deformation (a smooth random displacement field: a coarse 4x4 grid of offsets, bilinearly
interpolated), bilinearly resampled. Every random number of sample ``i`` is a counter-based
hash of (GEN_SEED, i, k) computed with integer and IEEE arithmetic only (no transcendental
functions, no BLAS, no stream state), so a sample does not depend on which chunk, process or
machine computes it. Labels are the base image's. The test set is Fashion-MNIST's real test set.

Generation runs on all cores (multiprocessing, spawn start method), in ordered chunks of rows
with a bounded number in flight, so memory stays flat whatever the size.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import re
from collections import deque
from collections.abc import Iterator
from typing import Any

import numpy as np

__all__ = ["BASE", "GEN_PREFIX", "GEN_SEED", "GEN_VERSION", "canonical_name", "generate",
           "Generator", "generated_samples", "labels_for"]

BASE = "fashion-mnist"
GEN_PREFIX = "fashion-mnist-gen-"
GEN_VERSION = 1  # part of every prepared set's key: a change here yields new sets
GEN_SEED = 0x6E6D6973  # fixed: the dataset is one dataset, whatever a run's seed
BASE_SIZE = 60_000
MAX_SAMPLES = 100_000_000
TASK_ROWS = 8192  # rows per task sent to a generator process
INNER_ROWS = 1024  # rows transformed at once (keeps temporaries in cache)
_NAME = re.compile(r"^fashion-mnist-gen-(\d{1,9})([km]?)$")
_GRID = 4  # elastic offsets on a 4x4 grid, interpolated to 28x28
_NUMBERS = 6 + 4 * _GRID * _GRID  # random numbers per sample

# -- randomness: splitmix64 of (seed, sample, k) ----------------------------------------------

_M1, _M2, _GOLD = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB), \
    np.uint64(0x9E3779B97F4A7C15)


def _uniforms(samples: np.ndarray, count: int) -> np.ndarray:
    """(len(samples), count) float64 in [0, 1), a pure function of (GEN_SEED, sample, k)."""
    with np.errstate(over="ignore"):
        x = (samples.astype(np.uint64)[:, None] * np.uint64(count)
             + np.arange(count, dtype=np.uint64)[None, :]) ^ np.uint64(GEN_SEED << 32)
        z = x + _GOLD
        z = (z ^ (z >> np.uint64(30))) * _M1
        z = (z ^ (z >> np.uint64(27))) * _M2
        z ^= z >> np.uint64(31)
    return (z >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))


# -- the transform ---------------------------------------------------------------------------

def _grid_matrix() -> np.ndarray:
    """(GRID, 28) bilinear weights: pixel position p takes sum_i W[i, p] * grid[i]."""
    pos = np.arange(28) * (_GRID - 1) / 27.0  # pixel -> grid coordinate in [0, GRID-1]
    i0 = np.minimum(np.floor(pos).astype(np.int64), _GRID - 2)
    w = np.zeros((_GRID, 28), np.float32)
    w[i0, np.arange(28)] = 1 - (pos - i0)
    w[i0 + 1, np.arange(28)] = pos - i0
    return w


_W = _grid_matrix()
_YS, _XS = (a.reshape(784).astype(np.float32) - np.float32(13.5)
            for a in np.meshgrid(np.arange(28), np.arange(28), indexing="ij"))
_PAD = 2  # zero border around each image, so coordinates outside read zeros
_SIDE = 28 + 2 * _PAD


def _transform(base: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Deformed copies (n, 784) uint8 of ``base`` (n, 784) uint8, one per sample number."""
    u = _uniforms(samples, _NUMBERS)
    t = (u[:, 0] * 2 - 1) * 0.13  # tan(theta/2): rotation up to about +-15 degrees
    cos, sin = (1 - t * t) / (1 + t * t), 2 * t / (1 + t * t)
    sx = 1 + (u[:, 1] * 2 - 1) * 0.12  # scale 0.88..1.12 per axis
    sy = 1 + (u[:, 2] * 2 - 1) * 0.12
    shear = (u[:, 3] * 2 - 1) * 0.15
    tx, ty = (u[:, 4] * 2 - 1) * 2.0, (u[:, 5] * 2 - 1) * 2.0  # up to 2 pixels
    # output pixel (x, y) around the centre reads the source at M @ (x, y) + t + elastic
    a = (cos * sx).astype(np.float32)[:, None]
    b = (-sin * sy + shear * cos * sx).astype(np.float32)[:, None]
    c = (sin * sx).astype(np.float32)[:, None]
    d = (cos * sy + shear * sin * sx).astype(np.float32)[:, None]
    # elastic: grid offsets, sums of two uniforms (triangular, +-1.6 px), interpolated
    g = u[:, 6:].reshape(len(samples), 2, 2, _GRID * _GRID)
    off = ((g[:, 0] + g[:, 1] - 1.0) * 1.6).astype(np.float32)  # (n, x|y, cell)
    # separable interpolation as explicit sums in a fixed order (elementwise: no BLAS,
    # whose rounding could depend on the batch)
    grid = off.reshape(len(samples), 2, _GRID, _GRID)
    cols = sum(grid[..., j, None] * _W[j] for j in range(_GRID))  # (n, 2, GRID, 28)
    field = sum(cols[:, :, i, None, :] * _W[i][:, None] for i in range(_GRID))
    field = field.reshape(len(samples), 2, 784)
    ex, ey = field[:, 0], field[:, 1]
    src_x = a * _XS + b * _YS + tx.astype(np.float32)[:, None] + ex + np.float32(13.5 + _PAD)
    src_y = c * _XS + d * _YS + ty.astype(np.float32)[:, None] + ey + np.float32(13.5 + _PAD)
    np.clip(src_x, 0, _SIDE - 1.001, out=src_x)
    np.clip(src_y, 0, _SIDE - 1.001, out=src_y)
    x0, y0 = np.floor(src_x), np.floor(src_y)
    fx, fy = src_x - x0, src_y - y0
    # flat indices into the padded images, one row of SIDE*SIDE per sample
    idx = (y0 * _SIDE + x0).astype(np.intp)  # small integers: exact in float32
    idx += (np.arange(len(base), dtype=np.intp) * (_SIDE * _SIDE))[:, None]
    img = np.zeros((len(base), _SIDE, _SIDE), np.float32)
    img[:, _PAD:_PAD + 28, _PAD:_PAD + 28] = base.reshape(-1, 28, 28)
    flat = img.reshape(-1)
    v00, v01 = flat.take(idx), flat.take(idx + 1)
    v10, v11 = flat.take(idx + _SIDE), flat.take(idx + _SIDE + 1)
    top = v00 + (v01 - v00) * fx
    bottom = v10 + (v11 - v10) * fx
    out = top + (bottom - top) * fy
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def generate(base_x: np.ndarray, samples: np.ndarray) -> np.ndarray:
    """Images (len(samples), 784) uint8 of the given sample numbers (any order, repeats ok)."""
    samples = np.asarray(samples, dtype=np.int64)
    out = np.empty((len(samples), 784), np.uint8)
    for s in range(0, len(samples), INNER_ROWS):
        part = samples[s:s + INNER_ROWS]
        base = base_x[part % BASE_SIZE]
        fresh = part >= BASE_SIZE
        rows = base.copy()
        if fresh.any():
            rows[fresh] = _transform(base[fresh], part[fresh])
        out[s:s + len(part)] = rows
    return out


def labels_for(base_y: np.ndarray, samples: np.ndarray) -> np.ndarray:
    return base_y[np.asarray(samples, dtype=np.int64) % BASE_SIZE]


# -- names -----------------------------------------------------------------------------------

def generated_samples(name: str) -> int | None:
    """The sample count of a generated dataset's name (``fashion-mnist-gen-1300k``), None for
    any other name; ValueError for a count out of range."""
    m = _NAME.match(name.strip().lower())
    if not m:
        return None
    n = int(m.group(1)) * {"": 1, "k": 1000, "m": 1_000_000}[m.group(2)]
    if not 1 <= n <= MAX_SAMPLES:
        raise ValueError(f"{name}: a generated dataset has 1..{MAX_SAMPLES} samples")
    return n


def canonical_name(samples: int) -> str:
    """One name per size: 1300000 -> fashion-mnist-gen-1300k."""
    if samples % 1_000_000 == 0:
        return f"{GEN_PREFIX}{samples // 1_000_000}m"
    if samples % 1000 == 0:
        return f"{GEN_PREFIX}{samples // 1000}k"
    return f"{GEN_PREFIX}{samples}"


# -- parallel generation ---------------------------------------------------------------------

_BASE: np.ndarray | None = None


def _init(base_x: np.ndarray) -> None:
    global _BASE
    _BASE = base_x
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def _task(samples: np.ndarray) -> np.ndarray:
    assert _BASE is not None
    return generate(_BASE, samples)


class Generator:
    """Images of sample numbers, computed by ``processes`` spawned processes (default: every
    core; 1: in this process), which live as long as the ``with`` block."""

    def __init__(self, base_x: np.ndarray, processes: int | None = None) -> None:
        self.base_x = base_x
        self.processes = processes or os.cpu_count() or 1
        self._pool: Any = None

    def __enter__(self) -> Generator:
        if self.processes > 1:
            ctx = mp.get_context("spawn")
            self._pool = ctx.Pool(self.processes, initializer=_init, initargs=(self.base_x,))
        return self

    def __exit__(self, *exc: object) -> None:
        if self._pool is not None:
            self._pool.terminate() if exc[0] is not None else self._pool.close()
            self._pool.join()
            self._pool = None

    def rows(self, samples: np.ndarray) -> Iterator[np.ndarray]:
        """The images of ``samples``, in order, in chunks of TASK_ROWS rows; at most
        2 x processes chunks are in flight, so memory does not grow with the dataset."""
        tasks = (samples[s:s + TASK_ROWS] for s in range(0, len(samples), TASK_ROWS))
        if self._pool is None:
            for t in tasks:
                yield generate(self.base_x, t)
            return
        pending: deque[Any] = deque()
        for t in tasks:
            pending.append(self._pool.apply_async(_task, (t,)))
            if len(pending) >= 2 * self.processes:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
