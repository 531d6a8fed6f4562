"""The worker's side of a prepared set: fetch only this worker's shard (and the test set),
verify it, keep it on local disk, memory-map it.

A set at a directory is read in place. A set at ``s3://``, http(s) or ``store:`` (the
function's parameter store: what a replica without a shared disk reads) is copied file by file
into ``<cache>/sets/<set name>/`` (``emnist.paths.cache_dir``): each file is downloaded to a
temporary name, checked against the size and CRC-32C in the set's manifest, then renamed into
place, so a second run on the same node (another replica, a later invocation) finds it whole
and only checks it again. The set name carries its content key, so a cached file can only be
the file the manifest describes (and a file that fails its check is fetched anew). Opened
arrays are read-only memory maps: a worker's resident memory grows with the pages it touches
of its own shard, never with the dataset.

The cache is bounded (``max_cache_bytes`` in the environment, default 32 GiB): after a
download, the least recently used other sets are removed until it fits.
"""

from __future__ import annotations

import os
import shutil
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from emnist.paths import cache_dir

from .idx import DataError
from .location import LocalLocation, Location, open_location
from .npyio import file_crc
from .prepared import MANIFEST, mark_used, parse_manifest
from .shards import Shard, image_shape, load_manifest

__all__ = ["CACHE_BYTES_ENV", "FetchStats", "SetReader", "open_set"]

CACHE_BYTES_ENV = "max_cache_bytes"
DEFAULT_CACHE_BYTES = 32 << 30


@dataclass
class FetchStats:
    """What opening cost: bytes downloaded, files found in the cache, seconds spent."""

    downloaded: int = 0
    cached: list[str] = field(default_factory=list)
    fetched: list[str] = field(default_factory=list)
    seconds: float = 0.0


class SetReader:
    """One prepared set, opened through its manifest; arrays come from a local copy."""

    def __init__(self, loc: Location, env: Mapping[str, str] | None = None) -> None:
        self.loc, self.env = loc, os.environ if env is None else env
        self.stats = FetchStats()
        if isinstance(loc, LocalLocation):
            self.manifest = load_manifest(loc.root)  # also a shard directory of format 2
            self.dir = loc.root
            mark_used(loc)  # a set in use is the last its data location evicts
        else:
            raw = loc.read(MANIFEST, max_bytes=1 << 20)
            self.manifest = parse_manifest(raw, loc.where(MANIFEST))
            self.dir = cache_dir(self.env) / "sets" / loc.url.rstrip("/").rsplit("/", 1)[-1]
            self.dir.mkdir(parents=True, exist_ok=True)
            _write_atomic(self.dir / MANIFEST, raw)
        self.name = self.dir.name
        self.workers = int(self.manifest["workers"])

    def path(self, name: str) -> Path:
        """The local, verified file ``name`` of the set (downloaded when not cached)."""
        meta = self.manifest["files"].get(name)
        if meta is None:
            raise DataError(f"{self.loc.where(name)}: not listed in the set manifest")
        t0 = time.perf_counter()
        dest = self.dir / name
        try:
            if self._whole(dest, meta):
                if not isinstance(self.loc, LocalLocation):
                    self.stats.cached.append(name)
                return dest
            if isinstance(self.loc, LocalLocation):
                if not dest.exists():
                    raise DataError(f"{dest}: set file missing", missing=True)
                raise DataError(f"{dest}: fails its checksum or size (damaged or replaced)")
            tmp = self.dir / f".{name}.{uuid.uuid4().hex[:8]}.part"
            try:
                self.loc.download(name, tmp, meta["bytes"], meta["crc32c"])
                os.replace(tmp, dest)
            finally:
                tmp.unlink(missing_ok=True)
            self.stats.downloaded += meta["bytes"]
            self.stats.fetched.append(name)
            _touch(self.dir)
            _evict(self.dir, _limit(self.env))
            return dest
        finally:
            self.stats.seconds += time.perf_counter() - t0

    @staticmethod
    def _whole(path: Path, meta: Mapping[str, Any]) -> bool:
        try:
            return path.stat().st_size == meta["bytes"] and file_crc(path) == meta["crc32c"]
        except FileNotFoundError:
            return False

    def array(self, name: str) -> np.ndarray:
        """A read-only memory map of the verified file ``name`` (C-ordered uint8)."""
        path = self.path(name)
        try:
            arr = np.load(path, mmap_mode="r", allow_pickle=False)
        except (ValueError, OSError, EOFError) as e:
            raise DataError(f"{path}: not a valid .npy file: {e}") from None
        if arr.dtype != np.uint8 or not arr.flags.c_contiguous:
            raise DataError(f"{path}: {arr.dtype} data where C-ordered uint8 was expected")
        return arr

    def shard(self, worker: int) -> Shard:
        """Worker ``worker``'s shard, memory-mapped (only its own files are fetched)."""
        if not 0 <= worker < self.workers:
            raise ValueError(f"worker {worker} out of range 0..{self.workers - 1} for "
                             f"{self.loc.url}")
        x = self.array(f"worker-{worker}-x.npy")
        y = self.array(f"worker-{worker}-y.npy")
        if len(x) != len(y) or x.ndim != 2 or y.ndim != 1:
            raise DataError(f"{self.loc.url}: worker {worker} has images {x.shape} but labels "
                            f"{y.shape}")
        return Shard(x=x, y=y, num_classes=int(self.manifest["num_classes"]), worker=worker,
                     workers=self.workers, image_shape=image_shape(self.manifest, x.shape[1]))

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        """The test set, memory-mapped (evaluated in batches from the map)."""
        return self.array("test-x.npy"), self.array("test-y.npy")


def open_set(set_url: str, env: Mapping[str, str] | None = None) -> SetReader:
    """The prepared set at ``set_url`` (a directory, ``s3://...``, ``store:/...`` or
    http(s)); ``env`` (default: the process's) says which S3 endpoint or store."""
    return SetReader(open_location(set_url, env), env)


def _write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _touch(d: Path) -> None:
    now = time.time()
    os.utime(d, (now, now))


def _limit(env: Mapping[str, str]) -> int:
    from emnist.policy import env_number

    return env_number(env, CACHE_BYTES_ENV, DEFAULT_CACHE_BYTES, 1 << 20, 1 << 50)


def _size(d: Path) -> int:
    return sum(f.stat().st_size for f in d.iterdir() if f.is_file())


def _evict(keep: Path, limit: int) -> None:
    """Remove the least recently used sets other than ``keep`` until the cache fits."""
    root = keep.parent
    sets = sorted((d for d in root.iterdir() if d.is_dir() and d != keep),
                  key=lambda d: d.stat().st_mtime)
    total = _size(keep) + sum(_size(d) for d in sets)
    for d in sets:
        if total <= limit:
            break
        total -= _size(d)
        shutil.rmtree(d, ignore_errors=True)
