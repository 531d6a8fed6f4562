"""Partition a dataset for peer-to-peer training, and read the partitions back.

``split`` writes, once per (dataset, peers, seed, validation size), a directory::

    manifest.json                     sizes, classes, features, crc of every file
    peer-<r>/train-x, train-y         peer r's training part (a seeded permutation, cut)
    peer-<r>/val-x, val-y             peer r's held-out validation part
    test-x, test-y                    the test set, whole
    batches-<B>/peer-<r>/<b>          (--batches) peer r's b-th minibatch: (B, features + 1)
                                      uint8, label in the last column, for the emnist-grad
                                      function; batch b is rows [b*B, (b+1)*B) of train-x/y

Every file is a codec value (magic, dtype, shape, crc32c) of uint8 data, so a truncated or
foreign file is refused. A data location is a local directory, an ``s3://bucket/prefix`` or an
http(s) URL prefix that serves the same tree (write locally, then upload or serve it).
"""

from __future__ import annotations

import json
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from emnist.data import DATASETS, DataError, load_dataset, shard_sizes
from emnist.data.location import HttpLocation, is_remote, open_location
from emnist.publish import publish_dir, temp_dir_for
from emnist.store import codec

MANIFEST = "manifest.json"
FORMAT = 1


def _write(path: Path, arr: np.ndarray) -> int:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = codec.encode(np.ascontiguousarray(arr, dtype=np.uint8))
    path.write_bytes(data)
    return len(data)


def _has_manifest(d: Path) -> bool:
    return (d / MANIFEST).exists()


def split(dataset: str, root: str | os.PathLike[str] | None, peers: int,
          out_dir: str | os.PathLike[str], seed: int = 0, val_fraction: float = 1 / 12,
          batch_size: int | None = None, train_samples: int | None = None,
          test_samples: int | None = None) -> Path:
    """Write (once) and return the split directory; with ``batch_size`` also its batch files.

    ``train_samples`` / ``test_samples``: use only that many (the first of the seeded
    permutation; the first test images), for short runs; the directory name records them.
    """
    key = dataset.strip().lower()
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; known: {', '.join(DATASETS)}")
    if peers < 1:
        raise ValueError(f"peers must be >= 1, got {peers}")
    if not 0.0 <= val_fraction < 0.5:
        raise ValueError(f"val_fraction must be in [0, 0.5), got {val_fraction}")
    for name, value in (("train_samples", train_samples), ("test_samples", test_samples)):
        if value is not None and value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    out = Path(out_dir)
    limits = (f"-n{train_samples}" if train_samples else "") + \
        (f"-t{test_samples}" if test_samples else "")
    final = out / f"{key}-p{peers}-s{seed}-v{round(val_fraction * 1000)}{limits}"
    if not (final / MANIFEST).exists():
        ds = load_dataset(key, root)
        perm = np.random.default_rng(seed).permutation(len(ds.train_y))[:train_samples]
        n = len(perm)
        if n < 2 * peers:
            raise ValueError(f"{key} has {n} training samples, too few for {peers} peers")
        test_x, test_y = ds.test_x[:test_samples], ds.test_y[:test_samples]
        tmp = temp_dir_for(final)
        manifest: dict[str, Any] = {
            "format": FORMAT, "dataset": key, "peers": peers, "seed": seed,
            "val_fraction": val_fraction, "num_classes": int(ds.num_classes),
            "features": int(ds.train_x.shape[1]), "train_sizes": [], "val_sizes": [],
            "test_size": int(len(test_y)), "train_samples": n,
        }
        start = 0
        for r, size in enumerate(shard_sizes(n, peers)):
            idx = perm[start:start + size]
            start += size
            n_val = int(round(size * val_fraction))
            val, train = idx[:n_val], idx[n_val:]
            _write(tmp / f"peer-{r}" / "train-x", ds.train_x[train])
            _write(tmp / f"peer-{r}" / "train-y", ds.train_y[train])
            _write(tmp / f"peer-{r}" / "val-x", ds.train_x[val])
            _write(tmp / f"peer-{r}" / "val-y", ds.train_y[val])
            manifest["train_sizes"].append(int(len(train)))
            manifest["val_sizes"].append(int(len(val)))
        _write(tmp / "test-x", test_x)
        _write(tmp / "test-y", test_y)
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
        publish_dir(tmp, final, _has_manifest)
    if batch_size:
        write_batches(final, batch_size)
    return final


def write_batches(split_dir: Path, batch_size: int) -> Path:
    """Per-batch files of every peer's training part (idempotent), for emnist-grad."""
    if batch_size < 1:
        raise ValueError(f"batch size must be >= 1, got {batch_size}")
    final = split_dir / f"batches-{batch_size}"
    if (final / MANIFEST).exists():
        return final
    loc = Location(str(split_dir))
    man = loc.manifest()
    tmp = temp_dir_for(final)
    counts = []
    for r in range(man["peers"]):
        x, y = loc.array(f"peer-{r}/train-x"), loc.array(f"peer-{r}/train-y")
        xy = np.concatenate([x, y[:, None]], axis=1)
        count = len(y) // batch_size
        for b in range(count):
            _write(tmp / f"peer-{r}" / f"{b:05d}", xy[b * batch_size:(b + 1) * batch_size])
        counts.append(count)
    (tmp / MANIFEST).write_text(json.dumps({"format": FORMAT, "batch_size": batch_size,
                                            "counts": counts}))
    publish_dir(tmp, final, _has_manifest)
    return final


def batch_name(batch_size: int, rank: int, b: int) -> str:
    return f"batches-{batch_size}/peer-{rank}/{b:05d}"


class Location:
    """Read files of a split from a local directory, an ``s3://bucket/prefix`` or an http(s)
    URL prefix, through the one data-URL layer (``emnist.data.location``; S3 endpoint and
    keys from the environment)."""

    def __init__(self, url: str, timeout: float = 30.0, max_bytes: int = 4 << 30) -> None:
        self.url = url.rstrip("/")
        self.remote = is_remote(self.url)
        self.timeout, self.max_bytes = timeout, max_bytes
        self._loc = HttpLocation(self.url, timeout) if self.url.startswith(
            ("http://", "https://")) else open_location(self.url)

    def __repr__(self) -> str:
        return f"Location({self.url!r})"

    def read(self, name: str) -> bytes:
        """The file's bytes; DataError (``missing`` when absent) naming the path in its
        message only (callers facing a request show neither path nor content)."""
        try:
            return self._loc.read(name, self.max_bytes)
        except DataError as e:
            if e.missing and not self.remote:
                raise DataError(f"{e} (run `emnist data split`)", missing=True) from None
            raise

    def manifest(self, sub: str = "") -> dict[str, Any]:
        name = f"{sub}/{MANIFEST}" if sub else MANIFEST
        try:
            man = json.loads(self.read(name))
        except ValueError as e:
            raise DataError(f"{self.url}/{name}: not a split manifest ({e})") from None
        if not isinstance(man, dict) or man.get("format") != FORMAT:
            raise DataError(f"{self.url}/{name}: not a format-{FORMAT} split manifest")
        return man

    def array(self, name: str) -> np.ndarray:
        try:
            return codec.decode(name, self.read(name), dtype=np.uint8).array
        except codec.CorruptValue as e:
            raise DataError(f"{self.url}: {e}") from None


@dataclass
class Partition:
    """One peer's part: training and validation data, the whole test set, the manifest."""

    train_x: np.ndarray
    train_y: np.ndarray
    val_x: np.ndarray
    val_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    manifest: dict[str, Any]


def load_partition(location: str, rank: int) -> Partition:
    loc = Location(location)
    man = loc.manifest()
    if not 0 <= rank < man["peers"]:
        raise DataError(f"{location}: peer {rank} out of range 0..{man['peers'] - 1}")
    p = f"peer-{rank}"
    return Partition(loc.array(f"{p}/train-x"), loc.array(f"{p}/train-y"),
                     loc.array(f"{p}/val-x"), loc.array(f"{p}/val-y"),
                     loc.array("test-x"), loc.array("test-y"), man)


class BatchCache:
    """A byte-bounded LRU of decoded batch files, shared by a function replica's threads; it
    keeps at most ``max_locations`` locations' HTTP sessions (also LRU)."""

    def __init__(self, max_bytes: int = 64 << 20, max_locations: int = 16,
                 max_file: int = 64 << 20) -> None:
        self.max_bytes, self.size = max_bytes, 0
        self.max_locations, self.max_file = max_locations, max_file
        self._items: OrderedDict[tuple[str, str], np.ndarray] = OrderedDict()
        self._locations: OrderedDict[str, Location] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, location: str, name: str) -> np.ndarray:
        key = (location, name)
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
                return self._items[key]
            loc = self._locations.pop(location, None) or Location(location,
                                                                  max_bytes=self.max_file)
            self._locations[location] = loc
            while len(self._locations) > self.max_locations:
                self._locations.popitem(last=False)
        arr = loc.array(name)
        with self._lock:
            self._items[key] = arr
            self.size += arr.nbytes
            while self.size > self.max_bytes and len(self._items) > 1:
                _, old = self._items.popitem(last=False)
                self.size -= old.nbytes
        return arr
