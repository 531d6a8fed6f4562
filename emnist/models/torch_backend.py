"""Torch models behind the flat-vector interface, on the CPU, one intra-op thread by default.

Parameters: the caller owns one flat float32 numpy vector. The module's parameters are views
into it (``torch.from_numpy`` + one slice per parameter, bound once per vector: a pointer
compare per step), so a worker that updates the vector in place (``params += grad``, a fetch
into it) changes the network with no copy. Gradients: every ``p.grad`` is a view into one flat
tensor whose numpy view is ``model.grad``; it is zeroed before each backward, and autograd
accumulates into the existing ``.grad`` in place (tests check the pointers), so the returned
gradient is the reused buffer, as with the MLP.

Batch normalisation (mobilenet_v3_small; the other models have none): the vector holds only
trainable parameters (BN's weight and bias included). Training uses batch statistics and
never updates running statistics. Before each evaluation the model re-estimates them from the
caller's training images (``calibrate``: train-mode BN forward without gradients, a
cumulative average over full minibatches), then evaluates in eval mode. So the parameter
vector alone defines the model: Downpour, averaging, p2p and serverless gradients evaluate
alike, checkpoints of parameters are complete, and no BN buffer crosses the network or is
averaged as if it were a gradient. Measured (mobilenet_v3_small, Fashion-MNIST 28 px, batch
64, SGD 0.1, accuracy on 2000 test images after 100/300/500 steps): re-estimated from 2048
training images 0.736/0.806/0.840 (from 256: 0.730/0.814/0.831); local running averages with
torchvision's momentum 0.01 0.097/0.097/0.470 (still near their initial values); with
PyTorch's default 0.1 0.697/0.802/0.837; test-batch statistics 0.729/0.796/0.839. So the
re-estimate is as good as the best local choice at every point and needs nothing shared;
its cost is one forward pass over the calibration images per evaluation.

Dropout masks come from the model's own ``torch.Generator``, seeded by assigning ``rng`` (a
numpy Generator, as the MLP's hook; the training loop assigns one before every minibatch,
positioned by (seed, worker, pass, offset)), so a minibatch's masks depend only on that key.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from emnist.data.normalize import Normalizer

from .spec import ModelSpec
from .torch_nets import SeededDropout, build_net, input_pad

__all__ = ["TorchModel", "configure_threads", "param_count"]

_TORCH_DTYPES = {np.dtype(np.float32): torch.float32, np.dtype(np.float64): torch.float64}
THREADS_ENV = "OMP_NUM_THREADS"


def configure_threads(threads: int | None = None, env: Mapping[str, str] | None = None) -> int:
    """Set torch's intra-op threads: ``threads``, else $OMP_NUM_THREADS, else 1 (one core per
    worker, like OPENBLAS_NUM_THREADS=1 for the MLP). Process-wide; returns the count."""
    if threads is None:
        raw = (os.environ if env is None else env).get(THREADS_ENV, "").strip()
        threads = int(raw) if raw.isdigit() and int(raw) > 0 else 1
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)
    return threads


def _net(spec: ModelSpec, gen: torch.Generator) -> nn.Module:
    if spec.height != spec.width:
        raise ValueError(f"{spec.name} takes square images, got {spec.height}x{spec.width}")
    side = spec.height + 2 * input_pad(spec.name, spec.height)
    return build_net(spec.name, spec.channels, side, spec.classes, spec.dropout, gen)


def param_count(spec: ModelSpec) -> int:
    """Trainable parameters of ``spec``'s network, counted without allocating them."""
    return sum(p.numel() for p in _net(spec, torch.Generator()).parameters())


class TorchModel:
    """A torch network over one flat vector (``dtype`` float64 is for gradient checks)."""

    default_batch = 256

    def __init__(self, spec: ModelSpec, dtype: type = np.float32, threads: int | None = None,
                 seed: int = 0) -> None:
        if not spec.is_torch:
            raise ValueError(f"{spec.name} is not a torch model")
        self.dtype = np.dtype(dtype)
        if self.dtype not in _TORCH_DTYPES:
            raise ValueError(f"dtype must be float32 or float64, got {self.dtype}")
        tdtype = _TORCH_DTYPES[self.dtype]
        self.threads = configure_threads(threads)
        self.spec = spec
        self._gen = torch.Generator()
        self.rng = np.random.default_rng(seed)
        self.net = _net(spec, self._gen)
        pad = input_pad(spec.name, spec.height)
        self._norm = Normalizer(spec.channels, spec.height, spec.width, spec.mean, spec.std,
                                pad=pad, dtype=self.dtype)
        self._in_shape = (spec.channels, spec.height + 2 * pad, spec.width + 2 * pad)
        self._slots: list[tuple[nn.Module, str, int, int, torch.Size]] = []
        at = 0
        for m in self.net.modules():
            for name, p in m.named_parameters(recurse=False):
                self._slots.append((m, name, at, at + p.numel(), p.shape))
                at += p.numel()
            for name, b in m.named_buffers(recurse=False):  # BN statistics: local, real memory
                m._buffers[name] = torch.zeros(b.shape, dtype=tdtype if b.is_floating_point()
                                               else b.dtype)
        self.num_params = at
        self._bns = [m for m in self.net.modules() if isinstance(m, nn.BatchNorm2d)]
        for bn in self._bns:  # buffers are zeros: start at mean 0, variance 1
            bn.reset_running_stats()
            bn.track_running_stats = False  # training: batch statistics, no buffer updates
        self._drops = [m for m in self.net.modules() if isinstance(m, SeededDropout)]
        self.needs_calibration = bool(self._bns)
        self.grad: np.ndarray = np.zeros(at, dtype=self.dtype)  # pages mapped on first write
        self._gflat = torch.from_numpy(self.grad)
        self._bound: np.ndarray | None = None
        self._key: tuple[int, tuple[int, ...]] | None = None
        self._mode: tuple[bool, bool] | None = None

    @property
    def rng(self) -> np.random.Generator:
        return self._rng

    @rng.setter
    def rng(self, rng: np.random.Generator) -> None:
        """Seed the dropout masks from a numpy Generator (the MLP's per-minibatch hook)."""
        self._rng = rng
        self._gen.manual_seed(int(rng.integers(0, 2**63 - 1)))

    def _bind(self, params: np.ndarray) -> None:
        """Make the module's parameters views of ``params`` (no-op for the bound vector)."""
        if params is self._bound:  # the common case: one vector for a worker's life
            return
        if (not isinstance(params, np.ndarray) or params.dtype != self.dtype
                or params.shape != (self.num_params,) or not params.flags.c_contiguous):
            raise ValueError(f"{self.spec.name} needs a contiguous {self.dtype} vector of "
                             f"{self.num_params} parameters, got {getattr(params, 'dtype', '?')}"
                             f" {getattr(params, 'shape', '?')}")
        key = (params.__array_interface__["data"][0], params.strides)
        if key == self._key:  # another ndarray object over the same memory
            self._bound = params
            return
        with warnings.catch_warnings():  # a read-only vector is fine: the model never writes it
            warnings.simplefilter("ignore", UserWarning)
            flat = torch.from_numpy(params)
        for m, name, a, b, shape in self._slots:
            view = flat[a:b].view(shape)
            p = m._parameters[name]
            if p is not None and p.is_meta:
                p = nn.Parameter(view)
                p.grad = self._gflat[a:b].view(shape)
                m._parameters[name] = p
            else:
                p.data = view
        self._bound, self._key = params, key

    def _set_mode(self, bn_train: bool, dropout: bool) -> None:
        if self._mode == (bn_train, dropout):
            return
        self.net.train(bn_train)
        for d in self._drops:
            d.train(dropout)
        self._mode = (bn_train, dropout)

    def _tensor(self, x: np.ndarray) -> torch.Tensor:
        arr = self._norm(x) if x.dtype == np.uint8 else x
        if arr.dtype != self.dtype:
            raise ValueError(f"{self.spec.name} takes uint8 pixels or {self.dtype} from prepare, "
                             f"got {arr.dtype}")
        return torch.from_numpy(np.ascontiguousarray(arr)).reshape(len(arr), *self._in_shape)

    def init_params(self, seed: int) -> np.ndarray:
        """A new vector initialised like the reference implementation, from ``seed``."""
        flat = np.zeros(self.num_params, dtype=self.dtype)
        self._bind(flat)
        gen = torch.Generator()
        gen.manual_seed(int(seed))
        with torch.no_grad():
            self.net.init_weights(gen)
        return flat

    def prepare(self, x_uint8: np.ndarray) -> np.ndarray:
        """uint8 pixels -> normalised (N, C, H, W) input, padded for lenet5/vgg11 at 28 px."""
        return self._norm(x_uint8)

    def loss_and_grad(self, params: np.ndarray, x: np.ndarray, y: np.ndarray,
                      train: bool = True) -> tuple[float, np.ndarray]:
        """Mean cross-entropy on (x, y) and its gradient in ``self.grad`` (reused buffer).

        ``train`` turns dropout on; batch norm always uses the batch's statistics here.
        """
        self._bind(params)
        self._set_mode(True, train)
        xt = self._tensor(x)
        yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
        self._gflat.zero_()
        loss = F.cross_entropy(self.net(xt), yt)
        loss.backward()
        return float(loss.item()), self.grad

    def logits(self, params: np.ndarray, x: np.ndarray) -> np.ndarray:
        """Eval-mode outputs (batch norm uses the last ``calibrate``'s statistics)."""
        self._bind(params)
        self._set_mode(False, False)
        with torch.no_grad():
            return self.net(self._tensor(x)).numpy()

    def calibrate(self, params: np.ndarray, x_uint8: np.ndarray, batch: int | None = None) -> None:
        """Re-estimate BN running statistics for ``params`` from training images.

        Uses full minibatches of ``batch`` (all of ``x_uint8`` at once if shorter), each
        weighted equally (a cumulative average), in train-mode BN without gradients.
        """
        if not self._bns:
            return
        batch = batch or self.default_batch
        if len(x_uint8) < 2:
            raise ValueError(f"{self.spec.name}: calibration needs at least 2 images")
        self._bind(params)
        self._set_mode(False, False)
        for bn in self._bns:
            bn.momentum, bn.track_running_stats = None, True  # None: a cumulative average
            bn.reset_running_stats()  # (a no-op unless tracking is on)
            bn.train()
        stop = max(len(x_uint8) // batch * batch, min(len(x_uint8), batch))
        try:
            with torch.no_grad():
                for i in range(0, stop, batch):
                    self.net(self._tensor(x_uint8[i : min(i + batch, stop)]))
        finally:
            for bn in self._bns:
                bn.track_running_stats = False
                bn.eval()

    def evaluate(self, params: np.ndarray, x_uint8: np.ndarray, y: np.ndarray,
                 batch: int | None = None,
                 calib: np.ndarray | None = None) -> tuple[float, float]:
        """(top-1 accuracy, mean cross-entropy) over slices of ``batch`` images.

        Models with batch norm need ``calib`` (training images, e.g. a fixed slice of the
        worker's shard): the statistics are re-estimated from it first, every time.
        """
        if self.needs_calibration:
            if calib is None:
                raise ValueError(f"{self.spec.name} has batch norm: evaluate needs calib= "
                                 "(training images to estimate its statistics from)")
            self.calibrate(params, calib, batch)
        batch = batch or self.default_batch
        self._bind(params)
        self._set_mode(False, False)
        correct, total = 0, 0.0
        with torch.no_grad():
            for i in range(0, len(y), batch):
                z = self.net(self._tensor(x_uint8[i : i + batch]))
                yt = torch.from_numpy(np.asarray(y[i : i + batch], dtype=np.int64))
                correct += int((z.argmax(dim=1) == yt).sum())
                total += float(F.cross_entropy(z, yt, reduction="sum"))
        n = max(len(y), 1)
        return correct / n, total / n
