"""Prepared sets: each worker's shard and the test set, written once at a data URL (a directory,
``s3://bucket/prefix`` or ``store:[/prefix]``, the function's own parameter store),
content-addressed, published atomically, uploaded resumably.

A set is named ``<dataset>-w<workers>-s<seed>-<key>``, where ``key`` is the start of a SHA-256
of everything that determines its bytes: the format version, dataset, seed, number of workers,
preprocessing and the source's content fingerprint (a hash of the source files' bytes, so the
same files give the same key on every machine). Its files are the ones ``emnist.data.shards``
memory-maps (``worker-<i>-{x,y}.npy``, ``test-{x,y}.npy``) plus ``manifest.json`` (canonical
JSON carrying each file's size and CRC-32C and its own digest).

Publishing: in a directory the set is built under a temporary name and renamed into place
(``emnist.publish``). On S3 and in the store there is no rename, so the manifest is the
commit: it is written last, after every data object exists whole (one PUT, or a completed
multipart upload; in the store, a file's header after its chunks), and a reader opens a set
only through its manifest. Two prepares of the same key write identical bytes (the content is
a function of the key), so racing ones cannot corrupt each other. A rerun after an
interruption skips each object already uploaded whole: the object has its planned size and an
upload marker (``.uploaded/<file>``, written after the object) records its size and CRC-32C;
a store file's header records them itself (written last), so the store needs no markers.

Bounded: a run's setup (``ensure_set``) names its seed, and every seed is a new set, so the
sets at a data location are kept within ``max_prepared_bytes`` (the operator's environment,
default 16 GiB; 128 MiB in a ``store:`` location, whose bytes are the store's memory, shared
with the runs' parameters: two Fashion-MNIST sets, half of `emnist up`'s memcached), like the
node's shard cache: a set too big for it is refused before anything is written, and the least
recently used other sets are removed to make room (a directory set's last use is its
directory's time, touched whenever a run finds or opens it; a store set's is its manifest's
header time, touched likewise; an s3:// set's is its manifest's). The set being prepared is
never removed.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from crc32c import crc32c

from emnist.publish import publish_dir, temp_dir_for

from . import generated as gen
from .datasets import DATASETS, dataset_files, load_dataset
from .idx import DataError
from .kvlocation import KVLocation, is_store_url
from .location import LocalLocation, Location, is_remote, open_location
from .npyio import chunk_bytes, npy_size

__all__ = ["DEFAULT_PREPARED_BYTES", "DEFAULT_STORE_PREPARED_BYTES", "FORMAT", "MANIFEST",
           "PREPARED_BYTES_ENV", "PREPROCESSING",
           "PreparedSet", "SetSummary", "canonical_dataset", "ensure_set", "evict_sets",
           "find_set", "list_sets", "manifest_bytes", "mark_used", "parse_manifest",
           "prepare_set", "prepared_limit", "read_manifest", "remove_set", "set_key",
           "set_name", "source_fingerprint"]

MANIFEST = "manifest.json"
FORMAT = 3  # 3: content-addressed sets on any data URL (2: local shard directories)
PREPROCESSING = "uint8-raw"  # pixels as published; scaling happens in the model
MARKERS = ".uploaded"
CHUNK_ROWS = 16384  # rows gathered at a time from an in-memory dataset
KEY_CHARS = 12
_NAME = re.compile(r"^[a-z0-9][a-z0-9.-]{0,60}-w\d{1,6}-s\d{1,20}-[0-9a-f]{12}$")
Progress = Callable[[int], None]
PREPARED_BYTES_ENV = "max_prepared_bytes"
DEFAULT_PREPARED_BYTES = 16 << 30  # many sets of any dataset; the shard cache has its own bound
# store: sets live in the store's memory, beside the runs' parameters: a memcached whose pages
# all hold data chunks refuses parameter writes ("out of memory storing object")
DEFAULT_STORE_PREPARED_BYTES = 128 << 20


def canonical_dataset(name: str) -> str:
    """The dataset's one name (lowercase; a generated size written its shortest way)."""
    key = name.strip().lower()
    samples = gen.generated_samples(key)
    if samples is not None:
        return gen.canonical_name(samples)
    if key not in DATASETS:
        raise ValueError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)} or "
                         f"{gen.GEN_PREFIX}<N> (N samples, e.g. 1300k)")
    return key


# -- content addressing -----------------------------------------------------------------------

_FINGERPRINTS: dict[tuple[str, int, int], str] = {}


def _file_hash(path: Path) -> str:
    st = path.stat()
    memo = (str(path), st.st_size, st.st_mtime_ns)
    if memo not in _FINGERPRINTS:
        h = hashlib.sha256()
        with open(path, "rb") as f:
            while piece := f.read(8 << 20):
                h.update(piece)
        _FINGERPRINTS[memo] = h.hexdigest()
    return _FINGERPRINTS[memo]


def source_fingerprint(dataset: str, root: str | os.PathLike[str] | None = None) -> str:
    """A hash of the source's content (its files' bytes; for a generated set the generator's
    version, size and its base's fingerprint): equal on every machine holding the same files.
    DataError (``missing``) when the files are not there."""
    key = canonical_dataset(dataset)
    samples = gen.generated_samples(key)
    if samples is not None:
        base = source_fingerprint(gen.BASE, root)
        return hashlib.sha256(f"gen-v{gen.GEN_VERSION}:{samples}:{base}".encode()).hexdigest()
    h = hashlib.sha256(f"dataset={key}".encode())
    for f in dataset_files(key, root):
        h.update(f";{f.name}:{_file_hash(f)}".encode())
    return h.hexdigest()


def set_key(dataset: str, workers: int, seed: int, source: str,
            preprocessing: str = PREPROCESSING) -> str:
    """The SHA-256 of what determines a set's bytes."""
    ident = {"format": FORMAT, "dataset": canonical_dataset(dataset), "workers": int(workers),
             "seed": int(seed), "preprocessing": preprocessing, "source": source}
    return hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()


def set_name(dataset: str, workers: int, seed: int, key: str) -> str:
    return f"{canonical_dataset(dataset)}-w{workers}-s{seed}-{key[:KEY_CHARS]}"


# -- the manifest -----------------------------------------------------------------------------

def _canonical(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, indent=1, sort_keys=True).encode() + b"\n"


def manifest_bytes(manifest: dict[str, Any]) -> bytes:
    """The manifest as written: canonical JSON carrying the CRC-32C of its own content."""
    body = {k: v for k, v in manifest.items() if k != "digest"}
    return _canonical({**body, "digest": f"{crc32c(_canonical(body)):08x}"})


def parse_manifest(raw: bytes, where: str) -> dict[str, Any]:
    """The manifest in ``raw``; DataError unless it is exactly the canonical form of a
    format-3 manifest with a matching digest."""
    try:
        manifest = json.loads(raw)
    except ValueError as e:
        raise DataError(f"{where}: unreadable set manifest: {e}") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise DataError(f"{where}: not a format-{FORMAT} set manifest")
    if manifest_bytes(manifest) != raw:
        raise DataError(f"{where}: set manifest fails its checksum (altered or damaged)")
    files = manifest.get("files")
    if not isinstance(files, dict) or not all(
            isinstance(m, dict) and isinstance(m.get("bytes"), int)
            and isinstance(m.get("crc32c"), int) for m in files.values()):
        raise DataError(f"{where}: set manifest lists no valid files")
    return manifest


def read_manifest(loc: Location) -> dict[str, Any]:
    """The checked manifest of the set at ``loc`` (DataError ``missing`` when there is none)."""
    return parse_manifest(loc.read(MANIFEST, max_bytes=1 << 20), loc.where(MANIFEST))


def _complete(loc: Location, expected: Mapping[str, Any]) -> dict[str, Any] | None:
    """The manifest when the set at ``loc`` is whole and is the one ``expected`` describes."""
    try:
        manifest = read_manifest(loc)
    except DataError:
        return None
    if any(manifest.get(k) != v for k, v in expected.items()):
        return None
    for name, meta in manifest["files"].items():
        info = loc.stat(name)
        if info is None or info.size != meta["bytes"]:
            return None
    return manifest


# -- sources: where rows come from ------------------------------------------------------------

class _Source:
    """Training images and labels by sample index, plus the test set."""

    num_classes: int
    image_shape: tuple[int, int, int]
    n: int

    def __enter__(self) -> _Source:
        return self

    def __exit__(self, *exc: object) -> None:
        pass

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError

    def images(self, idx: np.ndarray) -> Iterator[np.ndarray]:
        """The images of training samples ``idx``, in order, a chunk at a time."""
        raise NotImplementedError

    def labels(self, idx: np.ndarray) -> np.ndarray:
        raise NotImplementedError


class _Loaded(_Source):
    def __init__(self, dataset: str, root: str | os.PathLike[str] | None) -> None:
        self.ds = load_dataset(dataset, root)
        self.num_classes, self.n = int(self.ds.num_classes), len(self.ds.train_y)
        self.image_shape = tuple(int(v) for v in self.ds.image_shape)  # type: ignore[assignment]

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        return self.ds.test_x, self.ds.test_y

    def images(self, idx: np.ndarray) -> Iterator[np.ndarray]:
        for s in range(0, len(idx), CHUNK_ROWS):
            yield self.ds.train_x[idx[s:s + CHUNK_ROWS]]

    def labels(self, idx: np.ndarray) -> np.ndarray:
        return self.ds.train_y[idx]


class _Generated(_Source):
    def __init__(self, samples: int, root: str | os.PathLike[str] | None,
                 processes: int | None) -> None:
        self.base = load_dataset(gen.BASE, root)
        self.num_classes, self.n, self.image_shape = 10, samples, (1, 28, 28)
        self.gen = gen.Generator(self.base.train_x, processes)

    def __enter__(self) -> _Generated:
        self.gen.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.gen.__exit__(*exc)

    def test(self) -> tuple[np.ndarray, np.ndarray]:
        return self.base.test_x, self.base.test_y

    def images(self, idx: np.ndarray) -> Iterator[np.ndarray]:
        return self.gen.rows(idx)

    def labels(self, idx: np.ndarray) -> np.ndarray:
        return gen.labels_for(self.base.train_y, idx)


def _source(dataset: str, root: str | os.PathLike[str] | None,
            processes: int | None) -> _Source:
    samples = gen.generated_samples(dataset)
    return _Generated(samples, root, processes) if samples is not None else _Loaded(dataset,
                                                                                    root)


# -- writers: a temporary directory renamed, or objects with the manifest last ----------------

class _DirWriter:
    def __init__(self, final: Path) -> None:
        self.final = final
        self.tmp = temp_dir_for(final)
        self.loc = LocalLocation(str(self.tmp))

    def have(self, name: str, size: int) -> int | None:
        return None  # a fresh temporary directory holds nothing yet

    def put(self, name: str, pieces: Any, size: int) -> int:
        return self.loc.put(name, pieces, size)

    def commit(self, manifest: bytes, expected: Mapping[str, Any]) -> None:
        (self.tmp / MANIFEST).write_bytes(manifest)
        publish_dir(self.tmp, self.final,
                    lambda d: _complete(LocalLocation(str(d)), expected) is not None)

    def close(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)


class _ObjectWriter:
    def __init__(self, loc: Location) -> None:
        self.loc = loc
        self.markers = not isinstance(loc, KVLocation)  # a store header is its own marker

    def have(self, name: str, size: int) -> int | None:
        """The CRC-32C of ``name`` when an earlier run uploaded it whole."""
        info = self.loc.stat(name)
        if info is None or info.size != size:
            return None
        if not self.markers:
            return info.crc32c
        try:
            mark = json.loads(self.loc.read(f"{MARKERS}/{name}", max_bytes=4096))
        except (DataError, ValueError):
            return None
        if not isinstance(mark, dict) or mark.get("bytes") != size or \
                not isinstance(mark.get("crc32c"), int):
            return None
        return mark["crc32c"]

    def put(self, name: str, pieces: Any, size: int) -> int:
        crc = self.loc.put(name, pieces, size)
        if self.markers:
            mark = json.dumps({"bytes": size, "crc32c": crc}).encode()
            self.loc.put(f"{MARKERS}/{name}", [mark], len(mark))
        return crc

    def commit(self, manifest: bytes, expected: Mapping[str, Any]) -> None:
        self.loc.put(MANIFEST, [manifest], len(manifest))  # last: the set exists from now

    def close(self) -> None:
        pass


# -- prepare ----------------------------------------------------------------------------------

@dataclass
class PreparedSet:
    """A prepared set: its URL (``data_url/name``), name and manifest; ``reused`` when it was
    already complete, ``resumed`` the files an earlier run had uploaded whole."""

    url: str
    name: str
    manifest: dict[str, Any]
    reused: bool = False
    resumed: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        return sum(m["bytes"] for m in self.manifest["files"].values())


def _plan(n: int, workers: int, source: _Source) -> dict[str, tuple[int, ...]]:
    from .shards import shard_sizes

    features = int(np.prod(source.image_shape))
    shapes: dict[str, tuple[int, ...]] = {}
    for i, size in enumerate(shard_sizes(n, workers)):
        shapes[f"worker-{i}-x.npy"] = (size, features)
        shapes[f"worker-{i}-y.npy"] = (size,)
    return shapes


def _counted(pieces: Iterator[memoryview], progress: Progress | None) -> Iterator[memoryview]:
    for p in pieces:
        if progress is not None:
            progress(len(p))
        yield p


def prepare_set(dataset: str, workers: int, data_url: str, *, seed: int = 0,
                root: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] | None = None, processes: int | None = None,
                progress: Progress | None = None,
                on_total: Callable[[int], None] | None = None,
                max_bytes: int | None = None) -> PreparedSet:
    """Write (once) and return the set of ``dataset`` cut into ``workers`` shards at
    ``data_url``. The training set is permuted with ``seed`` and cut into contiguous parts
    whose sizes differ by at most one; the test set is stored whole. An existing complete set
    is returned without reading the source's data. ``progress(n)`` is called as bytes are
    written (skipped files count at once); ``on_total(bytes)`` once the plan is known.
    With ``max_bytes`` the sets at ``data_url`` stay within it: a new set larger than that is
    refused before anything is written, and the least recently used others make room."""
    key_name = canonical_dataset(dataset)
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    try:
        source_fp = source_fingerprint(key_name, root)
    except DataError as e:
        e.field = e.field or "dataset_dir"
        raise
    key = set_key(key_name, workers, seed, source_fp)
    name = set_name(key_name, workers, seed, key)
    base = open_location(data_url, env)
    loc = base.child(name)
    expected = {"format": FORMAT, "key": key, "dataset": key_name, "workers": workers,
                "seed": seed, "preprocessing": PREPROCESSING, "source": source_fp}
    found = _complete(loc, expected)
    if found is not None:
        return PreparedSet(loc.url, name, found, reused=True)
    if not base.writable:
        raise DataError(f"{loc.url}: not prepared, and {base.url} is read-only",
                        missing=True, field="data_location")
    with _source(key_name, root, processes) as src:
        if src.n < workers:
            msg = f"{key_name} has {src.n} training samples, fewer than {workers} workers"
            raise DataError(msg, field="number_of_workers", public=msg)
        test_x, test_y = src.test()
        shapes = _plan(src.n, workers, src)
        shapes["test-x.npy"], shapes["test-y.npy"] = test_x.shape, test_y.shape
        planned = sum(npy_size(s) for s in shapes.values())
        if on_total is not None:
            on_total(planned)
        if max_bytes is not None:
            _make_room(base, name, planned + _manifest_room(len(shapes)), max_bytes)
        writer: Any = _DirWriter(Path(base.url) / name) if isinstance(base, LocalLocation) \
            else _ObjectWriter(loc)
        try:
            files, resumed = _write_all(writer, src, shapes, seed, workers, progress)
            manifest = {**expected, "num_classes": src.num_classes,
                        "features": int(np.prod(src.image_shape)),
                        "image_shape": list(src.image_shape),
                        "sizes": [shapes[f"worker-{i}-y.npy"][0] for i in range(workers)],
                        "test_size": int(len(test_y)), "files": files}
            raw = manifest_bytes(manifest)
            writer.commit(raw, expected)
            manifest = json.loads(raw)  # as every reader sees it (with its digest)
        except OSError as e:
            raise DataError(f"{base.url}: cannot write the set: {e}",
                            field="data_location") from e
        finally:
            writer.close()
    if max_bytes is not None:  # again with the real sizes: a concurrent prepare also wrote
        mark_used(loc)
        evict_sets(base, max_bytes, keep=name)
    return PreparedSet(loc.url, name, manifest, resumed=resumed)


# -- the bound on what a data location holds ---------------------------------------------------

def prepared_limit(env: Mapping[str, str], data_url: str = "") -> int:
    """``max_prepared_bytes`` of the operator's environment (default 16 GiB; 128 MiB for a
    ``store:`` ``data_url``: memory, shared with the runs' parameters)."""
    from emnist.policy import env_number

    default = DEFAULT_STORE_PREPARED_BYTES if is_store_url(data_url) else DEFAULT_PREPARED_BYTES
    return env_number(env, PREPARED_BYTES_ENV, default, 1 << 20, 1 << 50)


def _manifest_room(files: int) -> int:
    return 4096 + 256 * files  # a manifest's canonical JSON, generously


def mark_used(loc: Location) -> None:
    """Record that a run uses the set at ``loc`` now (a directory's time, a store set's
    manifest header; its least recently used peers are evicted first). A read-only directory
    keeps its old time."""
    if isinstance(loc, KVLocation):
        loc.touch(MANIFEST)
    elif isinstance(loc, LocalLocation):
        now = time.time_ns()  # the fine clock: the kernel's own stamp ties within its tick
        try:
            os.utime(loc.root, ns=(now, now))
        except OSError:
            pass


def _tree_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(dirpath, f)).st_size
            except FileNotFoundError:
                pass
    return total


def _usage(base: Location) -> list[tuple[float, str, int]]:
    """(last use, name, bytes) of each set directly under ``base``, least recently used
    first. An s3:// set without its manifest is an upload in progress (or resumable): left
    alone, as it is not a set yet."""
    out: list[tuple[float, str, int]] = []
    for name in base.dirs():
        if not _NAME.match(name):
            continue
        if isinstance(base, LocalLocation):
            try:
                when = (base.root / name).stat().st_mtime
            except FileNotFoundError:
                continue  # evicted by a concurrent caller
            out.append((when, name, _tree_bytes(base.root / name)))
            continue
        infos = base.child(name).list()
        man = next((i for i in infos if i.name == MANIFEST), None)
        if man is not None:
            out.append((man.modified, name, sum(i.size for i in infos)))
    return sorted(out)


def _remove(base: Location, name: str) -> None:
    """Remove a set so that no reader finds half of it: a directory renamed aside first, an
    s3:// set's manifest first."""
    if isinstance(base, LocalLocation):
        aside = base.root / f".evicted-{name}-{uuid.uuid4().hex[:8]}"
        try:
            os.rename(base.root / name, aside)
        except FileNotFoundError:
            return
        shutil.rmtree(aside, ignore_errors=True)
        return
    loc = base.child(name)
    loc.delete(MANIFEST)
    loc.delete("")


def evict_sets(base: Location, limit: int, keep: str = "") -> list[str]:
    """Remove the least recently used sets under ``base`` (never ``keep``) until the sets
    there take at most ``limit`` bytes; the names removed."""
    sets = _usage(base)
    total = sum(size for _, _, size in sets)
    removed = []
    for _, name, size in sets:
        if total <= limit:
            break
        if name == keep:
            continue
        _remove(base, name)
        total -= size
        removed.append(name)
    return removed


def _make_room(base: Location, name: str, planned: int, limit: int) -> None:
    """Refuse a set larger than ``limit``; otherwise evict until ``planned`` more bytes fit."""
    if planned > limit:
        msg = (f"its prepared set would take {planned} bytes, more than {PREPARED_BYTES_ENV} "
               f"({limit}) in the function's environment")
        if isinstance(base, KVLocation):
            msg += (" (a store: data location keeps it in the store's memory: raise both, or "
                    "use an s3:// data_location)")
        raise DataError(f"{base.url}/{name}: {msg}", field="dataset", public=msg)
    evict_sets(base, limit - planned, keep=name)


def _write_all(writer: Any, src: _Source, shapes: dict[str, tuple[int, ...]], seed: int,
               workers: int, progress: Progress | None
               ) -> tuple[dict[str, dict[str, int]], list[str]]:
    files: dict[str, dict[str, int]] = {}
    resumed: list[str] = []

    def put(name: str, pieces: Iterator[memoryview]) -> None:
        size = npy_size(shapes[name])
        files[name] = {"bytes": size, "crc32c": writer.put(name, _counted(pieces, progress),
                                                           size)}

    def done(name: str) -> bool:
        size = npy_size(shapes[name])
        crc = writer.have(name, size)
        if crc is None:
            return False
        files[name] = {"bytes": size, "crc32c": crc}
        resumed.append(name)
        if progress is not None:
            progress(size)
        return True

    perm = np.random.default_rng(seed).permutation(src.n)
    start = 0
    for i in range(workers):
        xn, yn = f"worker-{i}-x.npy", f"worker-{i}-y.npy"
        size = shapes[yn][0]
        idx = perm[start:start + size]
        start += size
        if not done(xn):
            put(xn, chunk_bytes(shapes[xn], src.images(idx)))
        if not done(yn):
            put(yn, chunk_bytes(shapes[yn], [src.labels(idx)]))
    test_x, test_y = src.test()
    for name, arr in (("test-x.npy", test_x), ("test-y.npy", test_y)):
        if not done(name):
            put(name, chunk_bytes(shapes[name], [arr]))
    return files, resumed


# -- find, list, remove -----------------------------------------------------------------------

@dataclass
class SetSummary:
    """One set at a data URL, for ``emnist data ls``."""

    name: str
    complete: bool
    dataset: str = ""
    workers: int = 0
    seed: int = 0
    nbytes: int = 0
    samples: int = 0
    modified: float = 0.0


def _summary(loc: Location, name: str) -> SetSummary:
    child = loc.child(name)
    try:
        m = read_manifest(child)
    except DataError:
        return SetSummary(name, complete=False,
                          nbytes=sum(i.size for i in child.list() if "/" not in i.name))
    info = child.stat(MANIFEST)
    return SetSummary(name, True, m["dataset"], m["workers"], m["seed"],
                      sum(f["bytes"] for f in m["files"].values()), sum(m["sizes"]),
                      info.modified if info else 0.0)


def list_sets(data_url: str, env: Mapping[str, str] | None = None) -> list[SetSummary]:
    """Every set (complete or a partial upload) directly under ``data_url``."""
    loc = open_location(data_url, env)
    return [_summary(loc, d) for d in loc.dirs() if _NAME.match(d)]


def find_set(data_url: str, dataset: str, workers: int, seed: int, *,
             root: str | os.PathLike[str] | None = None,
             env: Mapping[str, str] | None = None) -> PreparedSet | None:
    """The complete set of (dataset, workers, seed) at ``data_url``: the one whose key the
    local source files give when they are here, else the newest one of those parameters
    (a function that never saw the source files trains on what ``emnist data prepare``
    uploaded). None when there is none."""
    key_name = canonical_dataset(dataset)
    base = open_location(data_url, env)
    want = {"format": FORMAT, "dataset": key_name, "workers": workers, "seed": seed,
            "preprocessing": PREPROCESSING}
    try:
        source_fp: str | None = source_fingerprint(key_name, root)
    except DataError as e:
        if not e.missing:
            raise
        source_fp = None
    if source_fp is not None:
        key = set_key(key_name, workers, seed, source_fp)
        name = set_name(key_name, workers, seed, key)
        m = _complete(base.child(name), {**want, "key": key, "source": source_fp})
        return PreparedSet(base.child(name).url, name, m, reused=True) if m else None
    prefix = f"{key_name}-w{workers}-s{seed}-"
    best: tuple[float, str, dict[str, Any]] | None = None
    for d in base.dirs():
        if not (d.startswith(prefix) and _NAME.match(d)):
            continue
        child = base.child(d)
        m = _complete(child, want)
        if m is None or set_name(key_name, workers, seed, m["key"]) != d:
            continue
        info = child.stat(MANIFEST)
        when = info.modified if info else 0.0
        if best is None or (when, d) > best[:2]:
            best = (when, d, m)
    if best is None:
        return None
    return PreparedSet(base.child(best[1]).url, best[1], best[2], reused=True)


def ensure_set(dataset: str, workers: int, data_url: str, *, seed: int = 0,
               root: str | os.PathLike[str] | None = None,
               env: Mapping[str, str] | None = None,
               max_bytes: int | None = None) -> PreparedSet:
    """The set a run needs: prepared here when the source files are here (or found complete
    by its key), else the newest complete one of these parameters at ``data_url`` (prepared
    elsewhere, e.g. by ``emnist data prepare`` on a laptop). DataError ``missing`` when
    neither exists. A request picks the seed, so what it can make a data location hold is
    bounded: the sets there stay within ``max_bytes`` (default: ``max_prepared_bytes`` of
    ``env``, else of the process's environment), least recently used evicted first."""
    limit = max_bytes if max_bytes is not None else \
        prepared_limit(os.environ if env is None else env, data_url)
    found = _find_or_prepare(dataset, workers, data_url, seed, root, env, limit)
    if not is_remote(found.url):
        mark_used(LocalLocation(found.url))
    elif is_store_url(found.url):
        mark_used(open_location(found.url, env))
    return found


def _find_or_prepare(dataset: str, workers: int, data_url: str, seed: int,
                     root: str | os.PathLike[str] | None, env: Mapping[str, str] | None,
                     limit: int) -> PreparedSet:
    try:
        return prepare_set(dataset, workers, data_url, seed=seed, root=root, env=env,
                           max_bytes=limit)
    except DataError as e:
        if not e.missing:
            raise
        if e.field == "data_location":  # a read-only location without the set
            raise DataError(str(e), missing=True, field="data_location",
                            public="no prepared set for this run there (run `emnist data "
                                   "prepare` with the run's dataset, workers and seed)") \
                from None
        found = find_set(data_url, dataset, workers, seed, root=root, env=env)
        if found is not None:
            return found
        if root is not None:  # the caller named where the source files are: they are not
            raise
        raise DataError(f"{data_url}: no prepared set of {canonical_dataset(dataset)} for "
                        f"{workers} workers (seed {seed}), and the source files are not here "
                        f"({e})", missing=True, field="data_location",
                        public="no prepared set for this run there and no source files to "
                               "prepare one (run `emnist data prepare` with the run's dataset, "
                               "workers and seed)") from None


def remove_set(data_url: str, name: str, env: Mapping[str, str] | None = None) -> int:
    """Delete the set ``name`` (its manifest first, so no reader opens it half-deleted); the
    number of files removed (0: there was no such set)."""
    if not _NAME.match(name):
        raise DataError(f"{name!r}: not a prepared set's name", public="not a set name")
    loc = open_location(data_url, env).child(name)
    count = loc.delete(MANIFEST)
    count += loc.delete("")
    if isinstance(loc, LocalLocation):
        shutil.rmtree(loc.root, ignore_errors=True)
    return count
