"""Per-worker training shards stored as uint8 ``.npy`` files and opened as memmaps.

Images keep their channels: each row is one image flattened channel-major (C*H*W values),
and the manifest records ``image_shape`` (C, H, W), so a conv model reshapes a row to its
planes and the MLP takes it flat.

Each worker memory-maps only its own shard, so N workers on one host share the page cache
instead of each holding the whole training set. A shard set is prepared once per
(dataset, workers, seed, source files) and reused: its directory name carries a fingerprint
of the source files' names, sizes and mtimes, so changed data yields a new directory.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from crc32c import crc32c

from emnist.publish import publish_dir, temp_dir_for

from .datasets import DATASETS, dataset_files, load_dataset
from .idx import DataError

__all__ = [
    "MANIFEST",
    "Shard",
    "image_shape",
    "load_manifest",
    "open_shard",
    "open_test",
    "prepare_shards",
    "shard_sizes",
    "source_fingerprint",
]

MANIFEST = "manifest.json"
FORMAT_VERSION = 2  # 2: CRC-32C of every file's data and of the manifest, checked on open


@dataclass(eq=False)
class Shard:
    """One worker's read-only slice of the (permuted) training set."""

    x: np.ndarray  # uint8 (n, C*H*W) memmap, channel-major rows
    y: np.ndarray  # uint8 (n,) memmap
    num_classes: int
    worker: int
    workers: int
    image_shape: tuple[int, int, int] = (1, 28, 28)


def shard_sizes(n: int, workers: int) -> list[int]:
    """Sizes of ``workers`` contiguous parts of ``n`` items, differing by at most one."""
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    base, extra = divmod(n, workers)
    return [base + (1 if i < extra else 0) for i in range(workers)]


def source_fingerprint(dataset_name: str, root: str | os.PathLike[str] | None = None) -> str:
    """Short hash of the dataset's source file names, sizes and mtimes (no data is read)."""
    key = dataset_name.strip().lower()
    h = hashlib.sha256(f"format={FORMAT_VERSION};dataset={key}".encode())
    for f in dataset_files(key, root):
        st = f.stat()
        h.update(f";{f.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    return h.hexdigest()[:10]


def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n"


def _manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as written: canonical JSON carrying the CRC-32C of its own content."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return _canonical({**body, "digest": f"{crc32c(_canonical(body)):08x}"})


def load_manifest(shard_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``manifest.json`` of a shard directory; DataError if absent or altered.

    The file must be exactly the canonical form of its content with a matching digest, so any
    change to it is refused rather than trusted.
    """
    p = Path(shard_dir) / MANIFEST
    try:
        raw = p.read_bytes()
        manifest = json.loads(raw)
    except FileNotFoundError as e:
        raise DataError(f"{p}: no shard manifest (run prepare_shards first)",
                        missing=True) from e
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: unreadable shard manifest: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_VERSION:
        raise DataError(f"{p}: not a format-{FORMAT_VERSION} shard manifest")
    if _manifest_bytes(manifest) != raw:
        raise DataError(f"{p}: shard manifest fails its checksum (altered or damaged)")
    return manifest


def _is_complete(shard_dir: Path, expected: dict[str, Any]) -> bool:
    """True when the directory's manifest matches ``expected`` and every file has its size."""
    try:
        manifest = load_manifest(shard_dir)
    except DataError:
        return False
    if any(manifest.get(k) != v for k, v in expected.items()):
        return False
    files = manifest.get("files")
    if not isinstance(files, dict):
        return False
    try:
        return all(
            (shard_dir / name).stat().st_size == meta["bytes"] for name, meta in files.items()
        )
    except (OSError, KeyError, TypeError):
        return False


def _save(path: Path, arr: np.ndarray) -> dict[str, int]:
    arr = np.ascontiguousarray(arr)
    np.save(path, arr, allow_pickle=False)
    return {"bytes": path.stat().st_size, "crc32c": _file_crc(path)}


def _file_crc(path: Path) -> int:
    """CRC-32C of a whole file (header and data: any changed byte shows)."""
    size = path.stat().st_size
    return crc32c(np.memmap(path, dtype=np.uint8, mode="r")) if size else crc32c(b"")


def prepare_shards(
    dataset_name: str,
    root: str | os.PathLike[str] | None,
    workers: int,
    out_dir: str | os.PathLike[str],
    seed: int,
) -> Path:
    """Write (once) and return ``out_dir/<dataset>-w<workers>-s<seed>-<fingerprint>/``.

    The training set is permuted with ``seed`` and cut into ``workers`` contiguous parts whose
    sizes differ by at most one (``worker-<i>-{x,y}.npy``); the test set is stored whole
    (``test-{x,y}.npy``); ``manifest.json`` records the parameters, sizes and the CRC-32C of
    each file (checked by every open). Files are written into a temporary directory that is
    renamed into place, so concurrent callers (threads or processes) only ever see a complete
    set; an existing complete set is returned without loading any data.
    """
    key = dataset_name.strip().lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {dataset_name!r}; known: {', '.join(DATASETS)}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    out = Path(out_dir)
    try:
        fingerprint = source_fingerprint(key, root)
    except DataError as e:
        e.field = e.field or "dataset_dir"
        raise
    except OSError as e:  # a source file vanished or is unreadable
        raise DataError(f"{key}: cannot read its source files: {e}", field="dataset_dir") from e
    final = out / f"{key}-w{workers}-s{seed}-{fingerprint}"
    expected = {
        "format": FORMAT_VERSION,
        "dataset": key,
        "workers": workers,
        "seed": seed,
        "source": fingerprint,
    }
    if _is_complete(final, expected):
        return final

    try:
        ds = load_dataset(key, root)
    except DataError as e:
        e.field = e.field or "dataset_dir"
        raise
    except OSError as e:
        raise DataError(f"{key}: cannot read its source files: {e}", field="dataset_dir") from e
    n = len(ds.train_y)
    if n < workers:
        raise DataError(f"{key} has {n} training samples, fewer than {workers} workers",
                        field="number_of_workers",
                        public=f"{key} has {n} training samples, fewer than {workers} workers")
    perm = np.random.default_rng(seed).permutation(n)
    sizes = shard_sizes(n, workers)
    try:
        return _write_shards(ds, perm, sizes, out, final, expected)
    except OSError as e:  # not writable, full, ...: the shard location's problem
        raise DataError(f"{out}: cannot write shards: {e}", field="data_location") from e


def _write_shards(ds: Any, perm: np.ndarray, sizes: list[int], out: Path, final: Path,
                  expected: dict[str, Any]) -> Path:
    tmp = temp_dir_for(final)
    try:
        files: dict[str, dict[str, int]] = {}
        start = 0
        for i, size in enumerate(sizes):
            idx = perm[start : start + size]
            start += size
            files[f"worker-{i}-x.npy"] = _save(tmp / f"worker-{i}-x.npy", ds.train_x[idx])
            files[f"worker-{i}-y.npy"] = _save(tmp / f"worker-{i}-y.npy", ds.train_y[idx])
        files["test-x.npy"] = _save(tmp / "test-x.npy", ds.test_x)
        files["test-y.npy"] = _save(tmp / "test-y.npy", ds.test_y)
        manifest = {
            **expected,
            "num_classes": int(ds.num_classes),
            "features": int(ds.train_x.shape[1]),
            "image_shape": [int(v) for v in ds.image_shape],
            "sizes": sizes,
            "test_size": int(len(ds.test_y)),
            "files": files,
        }
        (tmp / MANIFEST).write_bytes(_manifest_bytes(manifest))
        publish_dir(tmp, final, lambda d: _is_complete(d, expected))
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def _load(d: Path, name: str, manifest: dict[str, Any]) -> np.ndarray:
    """Memory-map one array of the set after checking its size and CRC-32C against the
    manifest: a damaged or replaced file is refused, never trained on."""
    path = d / name
    meta = manifest.get("files", {}).get(name)
    if not isinstance(meta, dict):
        raise DataError(f"{path}: not listed in the shard manifest")
    try:
        if path.stat().st_size != meta.get("bytes"):
            raise DataError(f"{path}: {path.stat().st_size} bytes, the manifest says "
                            f"{meta.get('bytes')}")
        if _file_crc(path) != meta.get("crc32c"):
            raise DataError(f"{path}: fails its checksum (damaged or replaced)")
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except FileNotFoundError as e:
        raise DataError(f"{path}: shard file missing", missing=True) from e
    except (ValueError, OSError, EOFError, OverflowError, TypeError) as e:
        raise DataError(f"{path}: not a valid .npy file: {e}") from e
    if arr.dtype != np.uint8 or not arr.flags.c_contiguous:
        raise DataError(f"{path}: {arr.dtype} data where C-ordered uint8 was expected")
    return arr


def open_shard(shard_dir: str | os.PathLike[str], worker: int) -> Shard:
    """Memory-map worker ``worker``'s shard (read-only), so the process holds only its part."""
    d = Path(shard_dir)
    manifest = load_manifest(d)
    workers = int(manifest["workers"])
    if not 0 <= worker < workers:
        raise ValueError(f"worker {worker} out of range 0..{workers - 1} for {d}")
    x = _load(d, f"worker-{worker}-x.npy", manifest)
    y = _load(d, f"worker-{worker}-y.npy", manifest)
    if len(x) != len(y) or x.ndim != 2 or y.ndim != 1:
        raise DataError(f"{d}: worker {worker} has images {x.shape} but labels {y.shape}")
    return Shard(x=x, y=y, num_classes=int(manifest["num_classes"]), worker=worker,
                 workers=workers, image_shape=image_shape(manifest, x.shape[1]))


def image_shape(manifest: dict[str, Any], features: int) -> tuple[int, int, int]:
    """(C, H, W) of a shard set's images: the manifest's, or (1, 28, 28) for a set written
    before it recorded one (those held only the 784-pixel MNIST family)."""
    got = manifest.get("image_shape")
    if got is None and features == 784:
        return (1, 28, 28)
    if (not isinstance(got, list) or len(got) != 3
            or not all(isinstance(v, int) and v > 0 for v in got)
            or got[0] * got[1] * got[2] != features):
        raise DataError(f"shard manifest: image_shape {got!r} does not describe "
                        f"{features}-value images")
    return (got[0], got[1], got[2])


def open_test(shard_dir: str | os.PathLike[str]) -> tuple[np.ndarray, np.ndarray]:
    """Memory-map the test set (x uint8 (n, C*H*W), y uint8 (n,)) of a shard directory."""
    d = Path(shard_dir)
    manifest = load_manifest(d)
    return _load(d, "test-x.npy", manifest), _load(d, "test-y.npy", manifest)
