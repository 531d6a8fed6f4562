"""The model interface every training path uses, and the registry that builds models by name.

A model works on ONE flat parameter vector (float32 numpy, owned by the caller), so the
store, codec, chunking, compression and checkpoints never see layers:

    model = build_model(ModelSpec.for_dataset("lenet5", "fashion-mnist", classes=10))
    params = model.init_params(seed)                    # seeded, like the reference init
    model.rng = seeds.at(it, pos)   # this minibatch's dropout masks (emnist.train.worker)
    loss, grad = model.loss_and_grad(params, x_uint8, y)       # grad: model.grad, reused
    params -= alpha * grad                              # in place: the model sees it
    acc, val_loss = model.evaluate(params, test_x, test_y, calib=calibration_images(shard_x))

``rng`` is assigned before every minibatch (a Generator positioned by (seed, worker, pass,
offset)), so a minibatch's masks depend on nothing but its place in the run: a resumed pass
redoes the same ones. ``calib`` (training images) is required by models with batch norm
(``needs_calibration``): their running statistics are re-estimated from it before each
evaluation, never shipped with the parameters (see ``torch_backend``). Every path takes it by
one rule, ``calibration_images``: the first CALIB_IMAGES images of the process's own training
shard (shards are a seeded permutation of the training set, so that is a uniform sample; two
workers of one run calibrate on different images, each on its own data). Names:
``MODEL_NAMES``; aliases such as the p2p seed's ``squeezenet1.1`` and ``mobilenet v3 small``
resolve through ``canonical_name``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from .spec import MODEL_NAMES, TORCH_MODELS, ModelSpec, canonical_name

__all__ = [
    "preload",
    "MODEL_NAMES",
    "TORCH_MODELS",
    "Model",
    "ModelSpec",
    "TorchMissing",
    "CALIB_IMAGES",
    "build_model",
    "calibration_images",
    "canonical_name",
    "param_count",
]

TORCH_HINT = ("pip install 'emnist[torch]' (on a CPU-only machine take the CPU build first, "
              "e.g. pip install torch==2.13.0 from PyTorch's CPU wheel index, or the default "
              "wheel pulls a multi-GB CUDA build)")


CALIB_IMAGES = 2048  # batch-norm calibration images (torch_backend: from 2048 training images
# the re-estimate measured as accurate as the best alternative at every point)


def calibration_images(shard_x: np.ndarray, n: int = CALIB_IMAGES) -> np.ndarray:
    """The images a process re-estimates batch-norm statistics from: the first ``n`` of its
    own training shard (every path uses this rule; a view, nothing copied)."""
    return shard_x[:n]


class TorchMissing(ImportError):
    """A torch model was asked for and torch is not installed."""


class Model(Protocol):
    """What every model offers (emnist.models.mlp.MLPModel, torch_backend.TorchModel)."""

    spec: ModelSpec
    num_params: int
    grad: np.ndarray  # the flat gradient buffer loss_and_grad returns (reused)
    rng: np.random.Generator  # assign to seed dropout masks (before every minibatch)
    needs_calibration: bool  # evaluate needs calib= (batch-norm statistics)

    def init_params(self, seed: int) -> np.ndarray: ...

    def prepare(self, x_uint8: np.ndarray) -> np.ndarray: ...

    def loss_and_grad(self, params: np.ndarray, x: np.ndarray, y: np.ndarray,
                      train: bool = True) -> tuple[float, np.ndarray]: ...

    def logits(self, params: np.ndarray, x: np.ndarray) -> np.ndarray: ...

    def calibrate(self, params: np.ndarray, x_uint8: np.ndarray,
                  batch: int | None = None) -> None: ...

    def evaluate(self, params: np.ndarray, x_uint8: np.ndarray, y: np.ndarray,
                 batch: int | None = None,
                 calib: np.ndarray | None = None) -> tuple[float, float]: ...


def _spec(spec: ModelSpec | Mapping[str, Any] | str) -> ModelSpec:
    if isinstance(spec, ModelSpec):
        return spec
    if isinstance(spec, str):
        return ModelSpec(name=spec)
    return ModelSpec.from_dict(spec)


def _torch_backend() -> Any:
    try:
        from . import torch_backend
    except ImportError as e:
        if (e.name or "").split(".")[0] != "torch":
            raise
        raise TorchMissing(f"torch is not installed: {TORCH_HINT}") from None
    return torch_backend


def preload(name: str) -> bool:
    """Import the backend ``name`` needs now (True if it is torch's and loaded), so a replica
    pays torch's import when it starts rather than inside its first run. Never raises: an
    unknown name or a missing torch is reported when a run asks for the model."""
    try:
        if canonical_name(name) in TORCH_MODELS:
            _torch_backend()
            return True
    except (ValueError, TorchMissing):
        pass
    return False


def build_model(spec: ModelSpec | Mapping[str, Any] | str, *, seed: int = 0,
                dtype: type = np.float32, threads: int | None = None) -> Model:
    """The model for ``spec`` (a ModelSpec, its dict, or a bare name with default fields).

    ``seed`` seeds the initial dropout rng; ``dtype`` float64 (torch models only) is for
    gradient checks; ``threads`` sets torch's intra-op threads (default $OMP_NUM_THREADS or 1).
    """
    spec = _spec(spec)
    if spec.name == "mlp":
        if np.dtype(dtype) != np.float32:
            raise ValueError("the mlp works in float32 only")
        from .mlp import MLPModel

        return MLPModel(spec, seed=seed)
    try:
        backend = _torch_backend()
    except TorchMissing as e:
        raise TorchMissing(f"model {spec.name!r} needs torch: {TORCH_HINT}") from e
    return backend.TorchModel(spec, dtype=dtype, threads=threads, seed=seed)


def param_count(spec: ModelSpec | Mapping[str, Any] | str) -> int:
    """Parameters in ``spec``'s flat vector (torch models are counted without allocating)."""
    spec = _spec(spec)
    if spec.name == "mlp":
        from emnist.model import MLPShape

        from .mlp import DEFAULT_HIDDEN

        return MLPShape(spec.inputs, spec.hidden or DEFAULT_HIDDEN, spec.classes).num_params
    return int(_torch_backend().param_count(spec))
