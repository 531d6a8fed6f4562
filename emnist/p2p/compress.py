"""Gradient compression for the wire: none, QSGD-style quantisation, top-k.

A compressor turns a float32 gradient into a few arrays (each sent codec-encoded) and back.

- ``none``: the gradient itself.
- ``qsgd``: per bucket of ``bucket`` values, a float32 norm (the largest magnitude) and, per
  value, a signed int8 level in [-s, s], ``s = levels``. ``|g| / norm * s`` is rounded to the
  level below or above at random with the probability that makes the expectation exact
  (stochastic rounding), so ``decompress(compress(g))`` is an unbiased estimate of ``g``
  (Alistarh et al., 2017; per-bucket max-norm scaling keeps the variance small). 4x smaller.
- ``topk``: the ``ratio`` largest-magnitude values and their int32 indices. It is biased on its
  own, so the sender keeps what it did not send (error feedback) and adds it to the next
  gradient: nothing is lost, only delayed (Stich et al., 2018). 1/(2 ratio)x smaller.

Big gradients: ``none`` sends and returns the gradient's own memory (no copy); QSGD works in
slabs of ``SLAB`` values, so its temporaries stay a few MB whatever the size (the random draws
follow one another exactly as in one pass: the same bits as unslabbed). Top-k selects over
the whole vector (numpy's argpartition: temporaries of a few times its size). ``max_bytes``
bounds what a receiver accepts for a gradient of n values.
"""

from __future__ import annotations

import numpy as np

NAMES = ("none", "qsgd", "topk")
SLAB = 1 << 20  # QSGD values per slab (a multiple of any bucket up to 2**20 that divides it)


class CompressionError(ValueError):
    """The parts of a message do not form a valid compressed gradient."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise CompressionError(msg)


class Compressor:
    name = "none"

    def spec(self) -> dict[str, object]:
        """What a receiver must share to decompress: sent in every message, checked."""
        return {"name": self.name}

    def max_bytes(self, n: int) -> int:
        """The parts' payload bytes for a gradient of ``n`` values, at most."""
        return 4 * n

    def compress(self, grad: np.ndarray) -> list[np.ndarray]:
        return [np.ascontiguousarray(grad, dtype=np.float32)]

    def decompress(self, parts: list[np.ndarray], n: int) -> np.ndarray:
        """The dense gradient; for ``none`` the part itself (read-only: never written)."""
        _check(len(parts) == 1, f"none: 1 part expected, got {len(parts)}")
        g = parts[0]
        _check(g.dtype == np.float32 and g.shape == (n,),
               f"none: want float32 ({n},), got {g.dtype} {g.shape}")
        return g


class QSGD(Compressor):
    name = "qsgd"

    def __init__(self, levels: int = 127, bucket: int = 512, seed: int = 0) -> None:
        if not 1 <= levels <= 127:
            raise ValueError(f"qsgd levels must be in 1..127 (int8), got {levels}")
        if bucket < 1:
            raise ValueError(f"qsgd bucket must be >= 1, got {bucket}")
        self.levels, self.bucket = levels, bucket
        self.rng = np.random.default_rng(seed)

    def spec(self) -> dict[str, object]:
        return {"name": self.name, "levels": self.levels, "bucket": self.bucket}

    def max_bytes(self, n: int) -> int:
        return n + 4 * -(-n // self.bucket)

    def _slab(self) -> int:
        return max(1, SLAB // self.bucket) * self.bucket

    def compress(self, grad: np.ndarray) -> list[np.ndarray]:
        g = np.asarray(grad, dtype=np.float32).reshape(-1)
        n, b = g.size, self.bucket
        nb = -(-n // b)
        norms = np.empty(nb, dtype=np.float32)
        q = np.empty(n, dtype=np.int8)
        slab = self._slab()
        for start in range(0, n, slab):  # whole buckets per slab: the same bits as one pass
            part = g[start:start + slab]
            m = part.size
            k = -(-m // b)
            padded = np.zeros(k * b, dtype=np.float32)
            padded[:m] = part
            buckets = padded.reshape(k, b)
            mags = np.abs(buckets)
            top = mags.max(axis=1).astype(np.float32)
            norms[start // b:start // b + k] = top
            safe = np.where(top > 0, top, np.float32(1.0))
            scaled = mags / safe[:, None] * np.float32(self.levels)  # in [0, s]
            low = np.floor(scaled)
            up = self.rng.random(scaled.shape, dtype=np.float32) < (scaled - low)
            q[start:start + m] = ((low + up) * np.sign(buckets)).reshape(-1)[:m]
        return [norms, q]

    def decompress(self, parts: list[np.ndarray], n: int) -> np.ndarray:
        _check(len(parts) == 2, f"qsgd: 2 parts expected, got {len(parts)}")
        norms, q = parts
        nb = -(-n // self.bucket)
        _check(norms.dtype == np.float32 and norms.shape == (nb,),
               f"qsgd: want float32 norms ({nb},), got {norms.dtype} {norms.shape}")
        _check(q.dtype == np.int8 and q.shape == (n,),
               f"qsgd: want int8 levels ({n},), got {q.dtype} {q.shape}")
        _check(n == 0 or (int(q.min()) >= -self.levels and int(q.max()) <= self.levels),
               f"qsgd: a level beyond +-{self.levels}")
        _check(bool(np.all(np.isfinite(norms))), "qsgd: a norm is not finite")
        out = np.empty(n, dtype=np.float32)
        slab, b = self._slab(), self.bucket
        for start in range(0, n, slab):
            stop = min(start + slab, n)
            scale = np.repeat(norms[start // b:-(-stop // b)] / np.float32(self.levels), b)
            np.multiply(q[start:stop], scale[:stop - start], out=out[start:stop],
                        dtype=np.float32)
        return out


class TopK(Compressor):
    name = "topk"

    def __init__(self, ratio: float = 0.01, feedback: bool = True) -> None:
        if not 0.0 < ratio <= 1.0:
            raise ValueError(f"topk ratio must be in (0, 1], got {ratio}")
        self.ratio, self.feedback = ratio, feedback
        self.residual: np.ndarray | None = None

    def spec(self) -> dict[str, object]:
        return {"name": self.name, "ratio": self.ratio}

    def max_bytes(self, n: int) -> int:
        return 8 * self.k_for(n)

    def k_for(self, n: int) -> int:
        return max(1, int(round(n * self.ratio)))

    def compress(self, grad: np.ndarray) -> list[np.ndarray]:
        g = np.asarray(grad, dtype=np.float32)
        if self.feedback:
            if self.residual is None:
                self.residual = np.zeros_like(g)
            self.residual += g
            g = self.residual
        k = self.k_for(g.size)
        idx = np.argpartition(np.abs(g), g.size - k)[g.size - k:]
        idx = np.sort(idx).astype(np.int32)
        values = g[idx].copy()
        if self.feedback:
            self.residual[idx] = 0.0
        return [idx, values]

    def decompress(self, parts: list[np.ndarray], n: int) -> np.ndarray:
        _check(len(parts) == 2, f"topk: 2 parts expected, got {len(parts)}")
        idx, values = parts
        k = self.k_for(n)
        _check(idx.dtype == np.int32 and idx.shape == (k,),
               f"topk: want int32 indices ({k},), got {idx.dtype} {idx.shape}")
        _check(values.dtype == np.float32 and values.shape == (k,),
               f"topk: want float32 values ({k},), got {values.dtype} {values.shape}")
        _check(bool(np.all((idx >= 0) & (idx < n))), f"topk: an index outside 0..{n - 1}")
        out = np.zeros(n, dtype=np.float32)
        out[idx] = values
        return out


def make(name: str, *, seed: int = 0, levels: int = 127, ratio: float = 0.01) -> Compressor:
    """The compressor called ``name`` (one per sender: QSGD's RNG and top-k's residual)."""
    if name == "none":
        return Compressor()
    if name == "qsgd":
        return QSGD(levels=levels, seed=seed)
    if name == "topk":
        return TopK(ratio=ratio)
    raise ValueError(f"unknown compression {name!r}; known: {', '.join(NAMES)}")
