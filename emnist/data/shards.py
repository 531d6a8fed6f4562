"""Per-worker training shards stored as uint8 ``.npy`` files and opened as memmaps.

Images keep their channels: each row is one image flattened channel-major (C*H*W values),
and the manifest records ``image_shape`` (C, H, W), so a conv model reshapes a row to its
planes and the MLP takes it flat.

Each worker memory-maps only its own shard, so N workers on one host share the page cache
instead of each holding the whole training set. A shard set in a directory is a prepared set
(``emnist.data.prepared``: content-addressed, the same bytes as at an ``s3://`` data URL);
this module opens one in place. Workers reading from a data URL go through
``emnist.data.cache``, which fetches and verifies their own shard into the local cache.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .idx import DataError
from .npyio import file_crc

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
FORMAT_VERSION = 2  # 2: CRC-32C of every file's data and of the manifest (3: prepared sets)


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
    """A hash of the dataset's source content (``emnist.data.prepared.source_fingerprint``)."""
    from .prepared import source_fingerprint as content_fingerprint

    return content_fingerprint(dataset_name, root)


def load_manifest(shard_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read and check ``manifest.json`` of a shard directory; DataError if absent or altered.

    The file must be exactly the canonical form of its content with a matching digest, so any
    change to it is refused rather than trusted. Format 3 (prepared sets) and format 2 (shard
    directories written before) share that form and the file layout.
    """
    from .prepared import FORMAT, manifest_bytes

    p = Path(shard_dir) / MANIFEST
    try:
        raw = p.read_bytes()
        manifest = json.loads(raw)
    except FileNotFoundError as e:
        raise DataError(f"{p}: no shard manifest (run prepare_shards first)",
                        missing=True) from e
    except (OSError, ValueError) as e:
        raise DataError(f"{p}: unreadable shard manifest: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") not in (FORMAT_VERSION, FORMAT):
        raise DataError(f"{p}: not a format-{FORMAT} shard manifest")
    if manifest_bytes(manifest) != raw:
        raise DataError(f"{p}: shard manifest fails its checksum (altered or damaged)")
    return manifest


def _file_crc(path: Path) -> int:
    """CRC-32C of a whole file (header and data: any changed byte shows), read in bounded
    pieces so checking a shard does not map it all into the process."""
    return file_crc(path)


def prepare_shards(
    dataset_name: str,
    root: str | os.PathLike[str] | None,
    workers: int,
    out_dir: str | os.PathLike[str],
    seed: int,
) -> Path:
    """Write (once) and return ``out_dir/<dataset>-w<workers>-s<seed>-<key>/``: the prepared
    set of ``emnist.data.prepared.prepare_set`` in a local directory.

    The training set is permuted with ``seed`` and cut into ``workers`` contiguous parts whose
    sizes differ by at most one (``worker-<i>-{x,y}.npy``); the test set is stored whole
    (``test-{x,y}.npy``); ``manifest.json`` records the parameters, sizes and the CRC-32C of
    each file (checked by every open). Files are written into a temporary directory that is
    renamed into place, so concurrent callers (threads or processes) only ever see a complete
    set; an existing complete set is returned without loading any data.
    """
    from .prepared import prepare_set

    try:
        return Path(prepare_set(dataset_name, workers, str(out_dir), seed=seed, root=root).url)
    except OSError as e:  # not writable, full, ...: the shard location's problem
        raise DataError(f"{out_dir}: cannot write shards: {e}", field="data_location") from e


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
