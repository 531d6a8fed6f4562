"""Dataset registry: one name -> one loader, all returning uint8 (N, C*H*W) upright images,
flattened channel-major (MNIST family: (N, 784), one channel; CIFAR-10: (N, 3072), R, G, B
planes); ``Dataset.image_shape`` is (C, H, W).

Roots: an explicit ``root`` wins; otherwise ``$EMNIST_DATA_DIR/<family>`` when the variable is
set (family is ``mnist``, ``fashion-mnist``, ``emnist`` or ``cifar10``; EMNIST files are also
looked for directly in ``$EMNIST_DATA_DIR``, their names being unambiguous); otherwise Debian's
``/usr/share/datasets/fashion-mnist`` for Fashion-MNIST and ``<cache>/<family>`` for the rest
(:func:`emnist.paths.cache_dir`). CIFAR-10's binary release may sit in the root itself or in
its ``cifar-10-batches-bin`` folder. Nothing is ever downloaded.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from emnist.paths import cache_dir

from .idx import DataError, read_idx

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "Dataset",
    "dataset_files",
    "dataset_shape",
    "default_roots",
    "load_dataset",
    "make_synthetic",
]

DATA_DIR_ENV = "EMNIST_DATA_DIR"
FASHION_DEBIAN_ROOT = Path("/usr/share/datasets/fashion-mnist")
_EMNIST_SPLITS = ("byclass", "bymerge", "balanced", "letters", "digits", "mnist")

DATASETS: tuple[str, ...] = (
    "mnist",
    "fashion-mnist",
    *(f"emnist-{s}" for s in _EMNIST_SPLITS),
    "cifar10",
    "synthetic",
)

_MNIST_FILES = {
    "train_x": "train-images-idx3-ubyte.gz",
    "train_y": "train-labels-idx1-ubyte.gz",
    "test_x": "t10k-images-idx3-ubyte.gz",
    "test_y": "t10k-labels-idx1-ubyte.gz",
}


@dataclass(eq=False)
class Dataset:
    """Train/test arrays in one fixed layout so trainers never care where data came from.

    ``train_x``/``test_x`` are uint8 (N, C*H*W), channel-major, each plane row-major in
    MNIST orientation; ``train_y``/``test_y`` are uint8 (N,) in 0..num_classes-1.
    ``mapping`` (optional) maps a class index to its ASCII code for EMNIST; ``image_shape``
    is (C, H, W).
    """

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    num_classes: int
    name: str
    mapping: np.ndarray | None = None
    image_shape: tuple[int, int, int] = (1, 28, 28)


def _check_name(name: str) -> str:
    key = name.strip().lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    return key


def dataset_shape(name: str) -> tuple[int, tuple[int, int, int]]:
    """The class count and image shape (C, H, W) of a dataset, from its name alone (a
    generated ``fashion-mnist-gen-<N>`` too): a run's config is checked against them before
    any file is read or a set prepared, so a refused request leaves nothing behind.
    ValueError for an unknown name."""
    from .generated import generated_samples

    key = name.strip().lower()
    if generated_samples(key) is not None:
        return 10, (1, 28, 28)  # Fashion-MNIST's images and labels, transformed
    key = _check_name(key)
    if key == "cifar10":
        from .cifar import IMAGE_SHAPE

        return 10, IMAGE_SHAPE
    if key.startswith("emnist-"):
        from .emnist import EMNIST_SPLITS

        return EMNIST_SPLITS[key[len("emnist-"):]], (1, 28, 28)
    return 10, (1, 28, 28)  # mnist, fashion-mnist, synthetic (make_synthetic's default)


def _family(name: str) -> str:
    return "emnist" if name.startswith("emnist-") else name


def default_roots(name: str) -> list[Path]:
    """Directories searched for ``name`` when no root is given, in order."""
    key = _check_name(name)
    fam = _family(key)
    env = os.environ.get(DATA_DIR_ENV)
    if env:
        base = Path(env).expanduser()
        return [base / fam, base] if fam == "emnist" else [base / fam]
    if fam == "fashion-mnist":
        return [FASHION_DEBIAN_ROOT]
    return [cache_dir() / fam]


def _mnist_like_files(name: str, root: Path | None) -> list[Path]:
    roots = [root] if root is not None else default_roots(name)
    for r in roots:
        paths = [r / f for f in _MNIST_FILES.values()]
        if all(p.is_file() for p in paths):
            return paths
    missing = [str(r / f) for r in roots for f in _MNIST_FILES.values() if not (r / f).is_file()]
    hint = (
        f" (on Debian/Ubuntu: apt-get install dataset-fashion-mnist, or set {DATA_DIR_ENV})"
        if name == "fashion-mnist"
        else f" (place the four IDX .gz files there or set {DATA_DIR_ENV})"
    )
    raise DataError(f"{name}: missing {', '.join(missing)}{hint}", missing=True)


def dataset_files(name: str, root: str | os.PathLike[str] | None = None) -> list[Path]:
    """Source files ``load_dataset(name, root)`` would read (empty for synthetic).

    Used to fingerprint data (sizes, mtimes) without loading it. Raises DataError when absent.
    """
    key = _check_name(name)
    r = Path(root).expanduser() if root is not None else None
    if key == "synthetic":
        return []
    if key == "cifar10":
        from .cifar import release_files

        roots = [r] if r is not None else default_roots(key)
        errors = []
        for cand in roots:
            try:
                return release_files(cand)
            except DataError as e:
                errors.append(str(e))
        raise DataError("; ".join(errors), missing=True)
    if key.startswith("emnist-"):
        from .emnist import find_emnist_files

        split = key[len("emnist-") :]
        roots = [r] if r is not None else default_roots(key)
        errors = []
        for cand in roots:
            try:
                return find_emnist_files(split, cand)
            except DataError as e:
                errors.append(str(e))
        raise DataError("; ".join(errors), missing=True)
    return _mnist_like_files(key, r)


def _load_mnist_like(name: str, paths: list[Path]) -> Dataset:
    named = dict(zip(_MNIST_FILES, paths, strict=True))
    arrays: dict[str, np.ndarray] = {}
    for part in ("train", "test"):
        xp, yp = named[f"{part}_x"], named[f"{part}_y"]
        x, y = read_idx(xp), read_idx(yp)
        if x.dtype != np.uint8 or x.ndim != 3 or x.shape[1:] != (28, 28):
            raise DataError(f"{xp}: expected uint8 images (N, 28, 28), got {x.dtype} {x.shape}")
        if y.dtype != np.uint8 or y.ndim != 1 or len(y) != len(x):
            raise DataError(f"{yp}: expected {len(x)} uint8 labels, got {y.dtype} {y.shape}")
        if y.size and y.max() > 9:
            raise DataError(f"{yp}: label {y.max()} outside 0..9")
        arrays[f"{part}_x"] = x.reshape(len(x), 784)
        arrays[f"{part}_y"] = y
    return Dataset(name=name, num_classes=10, **arrays)


def make_synthetic(
    seed: int = 0,
    num_train: int = 4000,
    num_test: int = 1000,
    num_classes: int = 10,
    noise: float = 60.0,
) -> Dataset:
    """Noisy class prototypes: tiny, deterministic and learnable, for fast training tests.

    Each class is a blocky random 28x28 pattern (7x7 cells of 4x4 pixels); samples add
    Gaussian noise and clip to uint8, so an MLP should reach high accuracy in a few epochs.
    """
    rng = np.random.default_rng(seed)
    cells = rng.random((num_classes, 7, 7)) < 0.35
    protos = np.kron(cells, np.ones((4, 4))).reshape(num_classes, 784) * 200.0 + 20.0

    def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = (np.arange(n) % num_classes)[rng.permutation(n)]
        x = protos[y] + rng.normal(0.0, noise, size=(n, 784))
        return np.clip(np.rint(x), 0, 255).astype(np.uint8), y.astype(np.uint8)

    train_x, train_y = sample(num_train)
    test_x, test_y = sample(num_test)
    return Dataset(train_x, train_y, test_x, test_y, num_classes, "synthetic")


def load_dataset(name: str, root: str | Path | None = None) -> Dataset:
    """Load a dataset by name (see ``DATASETS``); ``root`` overrides where files are read.

    ``emnist-<split>`` reads the gzip IDX release from ``root`` or ``root/gzip`` or else the
    ``.mat`` release from ``root`` or ``root/matlab``. ``synthetic`` ignores ``root``.
    Missing files raise DataError naming the paths looked at.
    """
    key = _check_name(name)
    if key == "synthetic":
        return make_synthetic()
    files = dataset_files(key, root)
    if key == "cifar10":
        from .cifar import load_cifar10

        return load_cifar10(files[0].parent)
    if key.startswith("emnist-"):
        from .emnist import load_emnist_idx, load_emnist_mat

        split = key[len("emnist-") :]
        if files[0].suffix == ".mat":
            return load_emnist_mat(files[0], split)
        return load_emnist_idx(split, files[0].parent)
    return _load_mnist_like(key, files)
