"""Loaders for the two EMNIST releases: gzip IDX files and MATLAB ``.mat`` files.

Both releases store every 28x28 image transposed relative to MNIST (IDX: each image is
column-major; .mat: each row is the image flattened in Fortran order). The loaders undo that so
all datasets in this package share MNIST's upright, row-major (N, 784) layout, and a model
trained on one sees the same orientation as on the others.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .datasets import Dataset
from .idx import DataError, read_idx

__all__ = [
    "EMNIST_SPLITS",
    "emnist_idx_paths",
    "emnist_mat_path",
    "find_emnist_files",
    "load_emnist",
    "load_emnist_idx",
    "load_emnist_mat",
]

# split -> number of classes
EMNIST_SPLITS: dict[str, int] = {
    "byclass": 62,
    "bymerge": 47,
    "balanced": 47,
    "letters": 26,
    "digits": 10,
    "mnist": 10,
}

_SIDE = 28


def _check_split(split: str) -> None:
    if split not in EMNIST_SPLITS:
        raise ValueError(f"unknown EMNIST split {split!r}; expected one of {list(EMNIST_SPLITS)}")


def emnist_idx_paths(split: str, directory: str | os.PathLike[str]) -> dict[str, Path]:
    """Paths of the four gzip IDX files of ``split`` in ``directory`` (existing or not)."""
    _check_split(split)
    d = Path(directory)
    return {
        f"{part}_{kind}": d / f"emnist-{split}-{part}-{stem}-ubyte.gz"
        for part in ("train", "test")
        for kind, stem in (("x", "images-idx3"), ("y", "labels-idx1"))
    }


def emnist_mat_path(split: str, directory: str | os.PathLike[str]) -> Path:
    """Path of the ``.mat`` file of ``split`` in ``directory`` (existing or not)."""
    _check_split(split)
    return Path(directory) / f"emnist-{split}.mat"


def find_emnist_files(split: str, root: str | os.PathLike[str]) -> list[Path]:
    """Source files for ``split`` under ``root``: gzip IDX first, then ``.mat``.

    Looks in ``root``, ``root/gzip``, then ``root``, ``root/matlab`` (the release's own folder
    names), so the unpacked archive can be used as is. Raises DataError listing what was tried.
    """
    _check_split(split)
    r = Path(root)
    tried: list[Path] = []
    for d in (r, r / "gzip"):
        paths = list(emnist_idx_paths(split, d).values())
        if all(p.is_file() for p in paths):
            return paths
        tried.append(paths[0])
    for d in (r, r / "matlab"):
        p = emnist_mat_path(split, d)
        if p.is_file():
            return [p]
        tried.append(p)
    raise DataError(
        f"EMNIST split {split!r} not found under {r}; looked for "
        + ", ".join(str(p) for p in tried)
        + " (the IDX release needs all four emnist-<split>-*-ubyte.gz files)",
        missing=True,
    )


def load_emnist(split: str, root: str | os.PathLike[str]) -> Dataset:
    """Load ``split`` from whichever release is found under ``root`` (see find_emnist_files)."""
    files = find_emnist_files(split, root)
    if files[0].suffix == ".mat":
        return load_emnist_mat(files[0], split)
    return load_emnist_idx(split, files[0].parent)


def _untranspose(images: np.ndarray, path: Path) -> np.ndarray:
    """(N, 28, 28) transposed images -> (N, 784) uint8 row-major in MNIST orientation."""
    if images.ndim != 3 or images.shape[1:] != (_SIDE, _SIDE):
        raise DataError(f"{path}: expected images of shape (N, 28, 28), got {images.shape}")
    out = np.ascontiguousarray(images.transpose(0, 2, 1))
    return out.reshape(len(out), _SIDE * _SIDE)


def _labels(labels: np.ndarray, split: str, path: Path) -> np.ndarray:
    """Validate labels and shift letters from the release's 1..26 to 0..25."""
    y = np.asarray(labels).reshape(-1).astype(np.int64)
    c = EMNIST_SPLITS[split]
    lo = 1 if split == "letters" else 0
    if y.size and (y.min() < lo or y.max() > lo + c - 1):
        raise DataError(
            f"{path}: labels span {y.min()}..{y.max()}, expected {lo}..{lo + c - 1} "
            f"for split {split!r}"
        )
    return (y - lo).astype(np.uint8)


def _mapping(table: np.ndarray | None, split: str) -> np.ndarray | None:
    """Class index -> ASCII code from a (C, 2+) mapping table, or None if it does not fit."""
    if table is None:
        return None
    t = np.asarray(table)
    c = EMNIST_SPLITS[split]
    if t.ndim != 2 or t.shape[0] != c or t.shape[1] < 2:
        return None
    lo = 1 if split == "letters" else 0
    out = np.zeros(c, dtype=np.int64)
    idx = t[:, 0].astype(np.int64) - lo
    if idx.min() < 0 or idx.max() >= c:
        return None
    out[idx] = t[:, 1]
    return out


def _pair(x: np.ndarray, y: np.ndarray, path: Path) -> None:
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels")


def load_emnist_idx(split: str, directory: str | os.PathLike[str]) -> Dataset:
    """Load the gzip IDX release of ``split`` from ``directory``.

    Images come back upright (each stored image is transposed back) as uint8 (N, 784).
    Labels are uint8 0..C-1; ``letters`` labels are stored 1..26 and are shifted to 0..25.
    ``emnist-<split>-mapping.txt`` next to the files, if present, fills ``Dataset.mapping``.
    """
    paths = emnist_idx_paths(split, directory)
    parts: dict[str, np.ndarray] = {}
    for part in ("train", "test"):
        xp, yp = paths[f"{part}_x"], paths[f"{part}_y"]
        x = read_idx(xp)
        if x.dtype != np.uint8:
            raise DataError(f"{xp}: expected uint8 images, got {x.dtype}")
        parts[f"{part}_x"] = _untranspose(x, xp)
        parts[f"{part}_y"] = _labels(read_idx(yp), split, yp)
        _pair(parts[f"{part}_x"], parts[f"{part}_y"], xp)
    mapping_file = Path(directory) / f"emnist-{split}-mapping.txt"
    table = None
    if mapping_file.is_file():
        try:
            table = np.loadtxt(mapping_file, dtype=np.int64, ndmin=2)
        except ValueError:
            table = None
    return Dataset(
        name=f"emnist-{split}",
        num_classes=EMNIST_SPLITS[split],
        mapping=_mapping(table, split),
        **parts,
    )


def _split_from_name(path: Path) -> str:
    stem = path.stem
    if stem.startswith("emnist-") and stem[7:] in EMNIST_SPLITS:
        return stem[7:]
    raise ValueError(f"cannot tell the EMNIST split from {path.name}; pass split=")


def load_emnist_mat(path: str | os.PathLike[str], split: str | None = None) -> Dataset:
    """Load the MATLAB release file ``emnist-<split>.mat`` (needs scipy: ``emnist[mat]``).

    Layout: ``dataset`` is a 1x1 struct with ``train``, ``test`` (1x1 structs holding
    ``images``, N x 784 uint8 rows flattened in Fortran order, and ``labels``, N x 1) and
    ``mapping`` (C x 2: label, ASCII code). Images are returned upright as uint8 (N, 784) and
    labels as uint8 0..C-1; ``letters`` labels (1..26 in the file) are shifted to 0..25.
    """
    p = Path(path)
    split = split or _split_from_name(p)
    _check_split(split)
    try:
        from scipy.io import loadmat
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"reading {p} needs scipy; install it with: pip install 'emnist[mat]'"
        ) from e
    if not p.is_file():
        raise DataError(f"{p}: file not found")
    try:
        mat = loadmat(str(p))
    except Exception as e:  # scipy raises many types for bad files
        raise DataError(f"{p}: cannot read MATLAB file: {e}") from e
    try:
        ds = mat["dataset"][0, 0]
        parts: dict[str, np.ndarray] = {}
        for part in ("train", "test"):
            sub = ds[part][0, 0]
            rows = np.asarray(sub["images"])
            labels = np.asarray(sub["labels"])
            if rows.ndim != 2 or rows.shape[1] != _SIDE * _SIDE:
                raise DataError(f"{p}: {part} images have shape {rows.shape}, expected (N, 784)")
            if rows.dtype != np.uint8:
                if rows.size and (rows.min() < 0 or rows.max() > 255):
                    raise DataError(f"{p}: {part} images are outside 0..255")
                rows = rows.astype(np.uint8)
            # A C-order reshape of a Fortran-flattened row gives the transposed image.
            parts[f"{part}_x"] = _untranspose(rows.reshape(-1, _SIDE, _SIDE), p)
            parts[f"{part}_y"] = _labels(labels, split, p)
            _pair(parts[f"{part}_x"], parts[f"{part}_y"], p)
        table = ds["mapping"] if "mapping" in (ds.dtype.names or ()) else None
    except (KeyError, IndexError, ValueError, TypeError) as e:
        raise DataError(f"{p}: not in the EMNIST .mat layout (dataset.train/test): {e}") from e
    return Dataset(
        name=f"emnist-{split}",
        num_classes=EMNIST_SPLITS[split],
        mapping=_mapping(table, split),
        **parts,
    )
