"""``store:`` data locations: files kept in the parameter store itself (memcached or Redis).

Why: on OpenFaaS (Kubernetes, or the container runtime) replicas share no disk, so a set that
emnist-setup prepares in its own container is out of every worker's reach; the one thing every
replica of a run already reaches is its store. A ``store:`` location keeps a prepared set there.

URL: ``store:/`` (the root of the store's data namespace; ``store:`` too, but a stack file
must quote that: YAML reads a trailing colon as a key) or ``store:/prefix[/more]``: a key
prefix only. WHICH store comes from the environment mapping the location is opened with, i.e.
the operator's deployment: its ``store_url`` (host aliases applied, like every store URL),
else :data:`emnist.store.DEFAULT_STORE_URL`. A URL never names a host (``store://host`` is
refused), so a request can point a function at no other server.

Keys (all under ``emnist-data:``, apart from every run's ``emnist:`` keys; a path appears only
as a hash, so any prefix and name fit memcached's 250-byte keys):

- ``emnist-data:c:<path hash>:<gen>:<i>``: chunk ``i`` of a file, ``CHUNK_BYTES`` of it (the
  last one shorter), as a codec value (header + CRC-32C): below memcached's 1 MB item limit and
  its 512 KiB slab chunk.
- ``emnist-data:f:<path hash>``: the file's header, a small codec document: its path, size,
  CRC-32C, chunk count and size, the generation ``gen`` its chunks were written under and the
  time it was written (or last used: :meth:`KVLocation.touch`).
- ``emnist-data:d:<path hash>``: a directory's index: the names of its files and
  subdirectories, updated with cas (memcached) or a transaction (Redis).

A write puts its chunks under a fresh generation, then adds the file to its directory's
index (and the directory to its parents'), then swaps the header (cas), then deletes the
previous generation's chunks: a reader sees the old file or the new one, never half of one.
A read takes the header, checks its numbers against the caps and what the caller expects
before anything is sized, then reads the chunks a few at a time, each checked, and the whole
against the header's CRC-32C.

The store is not trusted (memcached has no authentication): a header, chunk or index is
bounded before it is decoded, and a header or chunk that fails a check is refused (a damaged
index reads as empty: its files stay readable by name). memcached also drops items when its
memory is full, and every item expires after the store URL's ``ttl`` (7 days by default): a
missing chunk is a :class:`DataError` that says the data were evicted and how to avoid it, and
the broken file's header is removed with it, so the next run's setup prepares it again.
Chunks of a write that died before its header, and files whose index was evicted, are not
listed: they go the way every store item goes (memcached's LRU, the ttl). The bytes are not
sealed: whoever can write the store can change what a run trains on, as they can change its
parameters; the checks stop damage and oversized claims, not that writer. The prepared sets a
``store:`` location keeps are bounded by ``max_prepared_bytes`` (emnist.data.prepared: 128 MiB
unless the operator says more), so they leave the runs' parameters room in the store.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import secrets
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from crc32c import crc32c

from emnist.store import codec
from emnist.store.codec import CorruptValue
from emnist.store.kv import DEFAULT_STORE_URL, KV

from .idx import DataError
from .location import MAX_LIST, Location, ObjectInfo, check_name

__all__ = ["CHUNK_BYTES", "EVICTED", "KEY_PREFIX", "SCHEME", "STORE_ENV", "KVLocation",
           "is_store_url", "parse_store_url", "store_kv"]

SCHEME = "store:"
STORE_ENV = "store_url"  # the function setting naming the store (the operator's)
KEY_PREFIX = "emnist-data"
FORMAT = 1
CHUNK_BYTES = 500 * 1024  # + the codec header: below memcached's 512 KiB slab chunk
BATCH_CHUNKS = 8  # chunks per round trip (4 MB)
MAX_FILE_BYTES = 1 << 36  # 64 GiB: a file whose header says more is refused
MAX_CHUNKS = -(-MAX_FILE_BYTES // CHUNK_BYTES)
MAX_PATH = 1024  # characters of a path below the store root
MAX_NAME = 255  # characters of one path component
MAX_HEADER_BYTES = 8192  # a header's stored value at most (a path escaped as JSON fits)
MAX_INDEX_BYTES = 900 * 1024  # one directory's index value at most (memcached's 1 MB item)
MAX_DIR_ENTRIES = 8192  # files + subdirectories of one directory
MAX_WALK_DIRS = 4096  # directories a listing visits at most
MAX_DEPTH = 32
KEY_BATCH = 512  # keys per get/delete round trip (headers, indexes, chunk deletes)
_GEN = re.compile(r"^[0-9a-f]{16}$")
_CODEC_OVERHEAD = codec.header_size(1)
EVICTED = ("the run's data were evicted from the parameter store (memcached drops items when "
           "its memory is full): give the store more memory or use an s3:// data_location, "
           "then run again")


EVICTED_WRITE = ("the parameter store evicted the run's data while setup wrote them (memcached "
                 "drops items when its memory is full): give the store more memory or use an "
                 "s3:// data_location")


class _Missing(Exception):
    """Internal: chunk ``index`` is not in the store."""

    def __init__(self, index: int) -> None:
        super().__init__(index)
        self.index = index


class _Abort(Exception):
    """Internal: an updater found nothing to change (the key is gone or not what it was)."""


def is_store_url(url: object) -> bool:
    """True for a ``store:`` data location URL (well-formed or not)."""
    return isinstance(url, str) and url.startswith(SCHEME)


def _bad_url(url: str, why: str) -> DataError:
    return DataError(f"{url[:200]!r}: {why}", field="data_location",
                     public="a store: data location is store:/ or store:/prefix (no host: the "
                            "store is the function's own store_url)")


def parse_store_url(url: str) -> str:
    """The key prefix of ``store:/`` or ``store:`` ("") or ``store:/a/b`` ("a/b"); DataError
    for anything else (a host, a query, ``..``, empty parts)."""
    if not is_store_url(url):
        raise _bad_url(str(url), "not a store: URL")
    rest = url[len(SCHEME):]
    if rest.startswith("//"):
        raise _bad_url(url, "a store: location names no host (the store is the function's "
                       "store_url)")
    if rest and not rest.startswith("/"):
        raise _bad_url(url, "write store:/prefix (with a slash)")
    if len(rest) > MAX_PATH or any(c in rest for c in "?#\\\x00") or \
            not rest.isprintable():
        raise _bad_url(url, "a store: location is store:/prefix (no query, control characters "
                       "or backslashes)")
    prefix = rest.strip("/")
    if prefix and any(p in ("", ".", "..") or len(p) > MAX_NAME for p in prefix.split("/")):
        raise _bad_url(url, "a store: prefix has no empty, '.' or '..' parts")
    return prefix


def store_kv(env: Mapping[str, str]) -> KV:
    """The store a ``store:`` location opened with ``env`` uses: ``env``'s ``store_url``
    (host aliases applied), else the default store; one shared handle per process."""
    from emnist.policy import STORE_SCHEMES, resolve
    from emnist.store import shared_kv

    url = env.get(STORE_ENV) or DEFAULT_STORE_URL
    scheme = url.split("://", 1)[0] if "://" in url else ""
    if scheme not in STORE_SCHEMES:
        raise DataError("a store: data location needs a memcached:// or redis:// store_url in "
                        "the function's environment", field="data_location",
                        public="the function's store_url names no memcached or Redis store")
    return shared_kv(resolve(env, url))


def _hash(path: str) -> str:
    return hashlib.sha256(path.encode("utf-8", "surrogatepass")).hexdigest()[:32]


def _file_key(path: str) -> str:
    return f"{KEY_PREFIX}:f:{_hash(path)}"


def _dir_key(path: str) -> str:
    return f"{KEY_PREFIX}:d:{_hash(path)}"


def _chunk_key(path: str, gen: str, i: int) -> str:
    return f"{KEY_PREFIX}:c:{_hash(path)}:{gen}:{i}"


def _join(a: str, b: str) -> str:
    return f"{a}/{b}" if a and b else a or b


def _batches(items: list[Any], size: int = KEY_BATCH) -> Iterator[list[Any]]:
    for s in range(0, len(items), size):
        yield items[s:s + size]


# -- headers ----------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Header:
    path: str
    size: int
    crc: int
    chunks: int
    gen: str
    modified: float

    def encode(self) -> bytes:
        return codec.encode_doc({"format": FORMAT, "path": self.path, "size": self.size,
                                 "crc32c": self.crc, "chunks": self.chunks,
                                 "chunk_bytes": CHUNK_BYTES, "gen": self.gen,
                                 "modified": self.modified}, clock=time.time_ns())

    def chunk_keys(self) -> list[str]:
        return [_chunk_key(self.path, self.gen, i) for i in range(self.chunks)]


def _whole(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


def _parse_header(key: str, path: str, raw: bytes) -> _Header:
    """The header stored at ``key`` for ``path``, every number bounded; ValueError naming what
    is wrong (nothing is sized from it before this returns)."""
    if len(raw) > MAX_HEADER_BYTES:
        raise ValueError(f"a header of {len(raw)} bytes (at most {MAX_HEADER_BYTES})")
    try:
        doc = codec.decode_doc(key, raw)
    except CorruptValue as e:
        raise ValueError(e.reason) from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError("not a store: file header")
    if doc.get("path") != path:
        raise ValueError("another file's header")
    size, crc, chunks = doc.get("size"), doc.get("crc32c"), doc.get("chunks")
    if not _whole(size, 0, MAX_FILE_BYTES):
        raise ValueError(f"size: not a whole number of bytes up to {MAX_FILE_BYTES}")
    if doc.get("chunk_bytes") != CHUNK_BYTES:
        raise ValueError(f"chunk_bytes: not {CHUNK_BYTES}")
    if not _whole(chunks, 0, MAX_CHUNKS) or chunks != -(-size // CHUNK_BYTES):
        raise ValueError("chunks: does not match the size")
    if not _whole(crc, 0, 0xFFFFFFFF):
        raise ValueError("crc32c: not a CRC-32C")
    gen, modified = doc.get("gen"), doc.get("modified")
    if not (isinstance(gen, str) and _GEN.match(gen)):
        raise ValueError("gen: not a generation")
    if isinstance(modified, bool) or not isinstance(modified, int | float) or \
            not math.isfinite(modified) or modified < 0:
        raise ValueError("modified: not a time")
    return _Header(path, size, crc, chunks, gen, float(modified))


# -- directory indexes ------------------------------------------------------------------------

@dataclass
class _Index:
    files: set[str]
    dirs: set[str]

    @property
    def empty(self) -> bool:
        return not self.files and not self.dirs

    def encode(self) -> bytes:
        return codec.encode_doc({"files": sorted(self.files), "dirs": sorted(self.dirs)},
                                clock=time.time_ns())


def _component(name: object) -> bool:
    return isinstance(name, str) and 0 < len(name) <= MAX_NAME and "/" not in name and \
        name not in (".", "..") and "\x00" not in name and "\\" not in name


def _parse_index(key: str, raw: bytes | None) -> _Index:
    """A directory's index; an absent, oversized or damaged one reads as empty."""
    if raw is None or len(raw) > MAX_INDEX_BYTES + _CODEC_OVERHEAD:
        return _Index(set(), set())
    try:
        doc = codec.decode_doc(key, raw)
    except CorruptValue:
        return _Index(set(), set())
    files = doc.get("files") if isinstance(doc, dict) else None
    dirs = doc.get("dirs") if isinstance(doc, dict) else None
    if not (isinstance(files, list) and isinstance(dirs, list)
            and len(files) + len(dirs) <= MAX_DIR_ENTRIES
            and all(_component(n) for n in (*files, *dirs))):
        return _Index(set(), set())
    return _Index(set(files), set(dirs))


# -- the location -----------------------------------------------------------------------------

class KVLocation(Location):
    """Files below a key prefix of the function's own store (see the module docstring)."""

    remote = True

    def __init__(self, url: str, env: Mapping[str, str] | None = None,
                 kv: KV | None = None) -> None:
        self.prefix = parse_store_url(url)
        self.url = f"{SCHEME}/{self.prefix}"  # canonical: store:/ or store:/a/b
        self.kv = kv if kv is not None else store_kv(os.environ if env is None else env)

    def child(self, sub: str) -> KVLocation:
        return KVLocation(f"{SCHEME}/{_join(self.prefix, check_name(sub))}", kv=self.kv)

    def where(self, name: str) -> str:
        return f"{SCHEME}/{self._path(name)}"

    def _path(self, name: str) -> str:
        path = _join(self.prefix, check_name(name))
        if len(path) > MAX_PATH or any(len(p) > MAX_NAME for p in path.split("/")):
            raise DataError(f"{path[:200]}...: a store: path is at most {MAX_PATH} characters "
                            f"({MAX_NAME} per part)")
        return path

    # -- headers --

    def _header(self, path: str, where: str) -> _Header | None:
        """The file's checked header; None when there is none; DataError when it is refused."""
        key = _file_key(path)
        raw = self.kv.get_many([key]).get(key)
        if raw is None:
            return None
        try:
            return _parse_header(key, path, raw)
        except ValueError as e:
            raise DataError(f"{where}: its header in the store is refused ({e}): damaged or "
                            "forged") from None

    def _headers(self, paths: list[str]) -> dict[str, _Header]:
        """The valid headers of ``paths`` (absent and refused ones left out), batched."""
        out: dict[str, _Header] = {}
        for batch in _batches(paths):
            keys = {p: _file_key(p) for p in batch}
            got = self.kv.get_many(list(keys.values()))
            for p, k in keys.items():
                if k in got:
                    try:
                        out[p] = _parse_header(k, p, got[k])
                    except ValueError:
                        pass  # damaged or forged: not a file (a write replaces it)
        return out

    def stat(self, name: str) -> ObjectInfo | None:
        path = self._path(name)
        try:
            head = self._header(path, self.where(name))
        except DataError:
            return None  # refused: as if absent, so a prepare writes it anew
        return None if head is None else ObjectInfo(name, head.size, head.crc, head.modified)

    # -- reading --

    def _chunks(self, head: _Header, where: str) -> Iterator[memoryview]:
        """The file's bytes, chunk by chunk, each one checked; ``_Missing`` at the first
        chunk the store does not have."""
        for start in range(0, head.chunks, BATCH_CHUNKS):
            idx = range(start, min(start + BATCH_CHUNKS, head.chunks))
            keys = [_chunk_key(head.path, head.gen, i) for i in idx]
            got = self.kv.get_many(keys)
            for i, key in zip(idx, keys, strict=True):
                raw = got.get(key)
                if raw is None:
                    raise _Missing(i)
                want = min(CHUNK_BYTES, head.size - i * CHUNK_BYTES)
                if len(raw) != want + _CODEC_OVERHEAD:
                    raise DataError(f"{where}: chunk {i} in the store is {len(raw)} bytes, not "
                                    f"{want + _CODEC_OVERHEAD} (damaged or replaced)")
                try:
                    arr = codec.decode(key, raw, dtype=np.uint8, shape=(want,)).array
                except CorruptValue as e:
                    raise DataError(f"{where}: chunk {i} in the store is refused ({e.reason}): "
                                    "damaged or replaced") from None
                yield memoryview(arr)

    def _stream(self, name: str, start: Callable[[], None], write: Callable[[memoryview], Any],
                size: int | None = None, crc: int | None = None,
                max_bytes: int | None = None) -> None:
        """Check the header of ``name`` against ``size``/``crc``/``max_bytes``, then hand its
        bytes to ``write`` (after ``start``, which empties the sink); the whole is checked
        against its CRC-32C. A file rewritten while it is read is read again, once."""
        path, where = self._path(name), self.where(name)
        for attempt in (1, 2):
            head = self._header(path, where)
            if head is None:
                raise DataError(f"{where}: missing", missing=True)
            if size is not None and head.size != size:
                raise DataError(f"{where}: {head.size} bytes where {size} were expected "
                                "(truncated or replaced)")
            if crc is not None and head.crc != crc:
                raise DataError(f"{where}: fails its CRC-32C (damaged or replaced)")
            if max_bytes is not None and head.size > max_bytes:
                raise DataError(f"{where}: larger than {max_bytes} bytes")
            start()
            running = 0
            try:
                for piece in self._chunks(head, where):
                    running = crc32c(piece, running)
                    write(piece)
            except _Missing as m:
                if attempt == 1 and self._rewritten(path, head):
                    continue
                self._forget(head)
                raise DataError(f"{where}: chunk {m.index} of {head.chunks} is not in the "
                                "store: evicted (memcached drops items when its memory is "
                                "full, and every item after its ttl); the file's header was "
                                "removed so the next setup prepares it again",
                                missing=True, field="data_location", public=EVICTED) from None
            if running != head.crc:
                raise DataError(f"{where}: fails its CRC-32C (damaged or replaced)")
            return

    def _rewritten(self, path: str, head: _Header) -> bool:
        try:
            now = self._header(path, path)
        except DataError:
            return False
        return now is not None and now.gen != head.gen

    def _forget(self, head: _Header) -> None:
        """Remove a file that lost chunks (its header first: no reader starts on it), unless
        a writer replaced it meanwhile; so the next prepare writes it again."""
        if self._rewritten(head.path, head):
            return
        self.kv.delete_many([_file_key(head.path)])
        for batch in _batches(head.chunk_keys()):
            self.kv.delete_many(batch)

    def read(self, name: str, max_bytes: int = 64 << 20) -> bytes:
        data = bytearray()
        self._stream(name, data.clear, data.extend, max_bytes=max_bytes)
        return bytes(data)

    def download(self, name: str, dest: Path, size: int, crc: int) -> None:
        try:
            with open(dest, "wb") as out:
                def start() -> None:
                    out.seek(0)
                    out.truncate()
                self._stream(name, start, out.write, size=size, crc=crc)
        except BaseException:
            dest.unlink(missing_ok=True)
            raise

    # -- listing --

    def _walk(self, prefix: str) -> list[str]:
        """Names (below this location) of the indexed files starting with ``prefix``: the
        directories that could hold one, breadth first, bounded."""
        out: list[str] = []
        frontier, visited = [""], 0
        for _ in range(MAX_DEPTH):
            if not frontier or visited >= MAX_WALK_DIRS or len(out) >= MAX_LIST:
                break
            frontier = frontier[:MAX_WALK_DIRS - visited]
            visited += len(frontier)
            indexes = self._indexes([_join(self.prefix, d) for d in frontier])
            nxt = []
            for d in frontier:
                index = indexes[_join(self.prefix, d)]
                for f in index.files:
                    if _join(d, f).startswith(prefix):
                        out.append(_join(d, f))
                for sub in sorted(index.dirs):  # only where a name with the prefix can be
                    below = _join(d, sub) + "/"
                    if below.startswith(prefix) or prefix.startswith(below):
                        nxt.append(below[:-1])
            frontier = nxt
        return sorted(out)[:MAX_LIST]

    def _indexes(self, dirs: list[str]) -> dict[str, _Index]:
        out: dict[str, _Index] = {}
        for batch in _batches(dirs):
            keys = {d: _dir_key(d) for d in batch}
            got = self.kv.get_many(list(keys.values()))
            out.update({d: _parse_index(k, got.get(k)) for d, k in keys.items()})
        return out

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        names = self._walk(prefix)
        heads = self._headers([self._path(n) for n in names])
        return [ObjectInfo(n, h.size, h.crc, h.modified) for n in names
                if (h := heads.get(self._path(n))) is not None]

    def dirs(self) -> list[str]:
        subs = sorted(self._indexes([self.prefix])[self.prefix].dirs)
        indexes = self._indexes([_join(self.prefix, s) for s in subs])
        return [s for s in subs if not indexes[_join(self.prefix, s)].empty]

    # -- writing --

    def _update(self, dirpath: str, fn: Callable[[_Index], bool]) -> _Index | None:
        """Apply ``fn`` to the index of directory ``dirpath`` atomically (cas / a
        transaction); ``fn`` says whether it changed anything. The index as written, or None
        when nothing changed."""
        result: list[_Index] = []
        key = _dir_key(dirpath)

        def update(k: str, old: bytes | None) -> bytes:
            index = _parse_index(k, old)
            if not fn(index):
                raise _Abort
            raw = index.encode()
            if len(raw) > MAX_INDEX_BYTES:
                raise DataError(f"{SCHEME}/{dirpath}: its index in the store would exceed "
                                f"{MAX_INDEX_BYTES} bytes (too many or too long names)")
            result[:] = [index]
            return raw

        try:
            self.kv.update_many([key], update)
        except _Abort:
            return None
        return result[0] if result else None

    def _link(self, path: str, where: str) -> None:
        """Add the file at ``path`` to its directory's index and every directory to its
        parent's; only the indexes that lack the entry are written."""
        parts = path.split("/")
        want = [("/".join(parts[:d]), parts[d], d == len(parts) - 1) for d in range(len(parts))]
        have = self._indexes([d for d, _, _ in want])
        for d, name, is_file in reversed(want):  # the file first, its parents after
            if name in (have[d].files if is_file else have[d].dirs):
                continue

            def add(index: _Index, name: str = name, is_file: bool = is_file) -> bool:
                entries = index.files if is_file else index.dirs
                if name in entries:
                    return False
                if len(index.files) + len(index.dirs) >= MAX_DIR_ENTRIES:
                    raise DataError(f"{where}: its directory in the store holds "
                                    f"{MAX_DIR_ENTRIES} entries, the most it may")
                entries.add(name)
                return True

            self._update(d, add)

    def put(self, name: str, pieces: Iterable[memoryview | bytes], size: int) -> int:
        path, where = self._path(name), self.where(name)
        if not 0 <= size <= MAX_FILE_BYTES:
            raise DataError(f"{where}: {size} bytes is more than a store: file holds "
                            f"({MAX_FILE_BYTES})")
        gen = secrets.token_hex(8)
        crc = n = count = 0
        batch: dict[str, bytes] = {}
        written: list[str] = []

        def emit(data: bytes | bytearray | memoryview) -> None:
            nonlocal count
            key = _chunk_key(path, gen, count)
            batch[key] = codec.encode(np.frombuffer(data, dtype=np.uint8))
            count += 1
            if len(batch) >= BATCH_CHUNKS:
                flush()

        def flush() -> None:
            written.extend(batch)  # first: a failed set may have stored some
            self.kv.set_many(batch)
            batch.clear()

        buf = bytearray()
        swapping = False
        try:
            for piece in pieces:
                crc, n = crc32c(piece, crc), n + len(piece)
                if n > size:
                    raise DataError(f"{where}: more than the {size} bytes planned")
                buf += piece
                pos = 0
                while len(buf) - pos >= CHUNK_BYTES:
                    emit(bytes(memoryview(buf)[pos:pos + CHUNK_BYTES]))
                    pos += CHUNK_BYTES
                del buf[:pos]
            if buf:
                emit(bytes(buf))
            if batch:
                flush()
            if n != size:
                raise DataError(f"{where}: {n} bytes written where {size} were planned")
            self._check_kept(written, where)
            self._link(path, where)
            swapping = True
            old = self._swap(_Header(path, size, crc, count, gen, time.time()))
        except BaseException:
            if swapping:  # the header may have landed (a lost reply): its chunks stay
                raise
            for keys in _batches(written):
                try:
                    self.kv.delete_many(keys)
                except Exception:  # noqa: BLE001 - the first failure is the one to report
                    break
            raise
        if old is not None and old.gen != gen:  # the file this one replaced
            for keys in _batches(old.chunk_keys()):
                self.kv.delete_many(keys)
        return crc

    def _check_kept(self, keys: list[str], where: str) -> None:
        """Every chunk just written is still there. A full memcached evicts within a slab
        class, which may take a file's first chunks while its last are written: then the
        writer (setup) fails now, saying why, instead of every worker later."""
        missing = 0
        for part in _batches(keys, BATCH_CHUNKS):
            got = self.kv.get_many(part)
            missing += sum(1 for k in part if k not in got)
        if missing:
            raise DataError(f"{where}: the store evicted {missing} of {len(keys)} chunks while "
                            "they were written", field="data_location", public=EVICTED_WRITE)

    def _swap(self, head: _Header) -> _Header | None:
        """Write ``head`` (cas: the file appears whole); the valid header it replaced."""
        old: list[bytes | None] = []

        def swap(key: str, value: bytes | None) -> bytes:
            old[:] = [value]
            return head.encode()

        key = _file_key(head.path)
        self.kv.update_many([key], swap)
        if not old or old[0] is None:
            return None
        try:
            return _parse_header(key, head.path, old[0])
        except ValueError:
            return None

    def touch(self, name: str) -> None:
        """Record that ``name`` is used now (its header's time: the least recently used sets
        are evicted first); nothing when it is not there."""
        path = self._path(name)

        def bump(key: str, value: bytes | None) -> bytes:
            try:
                head = _parse_header(key, path, value) if value is not None else None
            except ValueError:
                head = None
            if head is None:
                raise _Abort  # gone or refused: never written back
            return _Header(path, head.size, head.crc, head.chunks, head.gen,
                           time.time()).encode()

        try:
            self.kv.update_many([_file_key(path)], bump)
        except _Abort:
            pass

    def delete(self, prefix: str = "") -> int:
        names = self._walk(prefix)
        paths = [self._path(n) for n in names]
        heads = self._headers(paths)
        for keys in _batches([_file_key(p) for p in paths]):  # no reader starts on them now
            self.kv.delete_many(keys)
        for head in heads.values():
            for keys in _batches(head.chunk_keys()):
                self.kv.delete_many(keys)
        self._unlink(paths)
        return len(heads)

    def _unlink(self, paths: list[str]) -> None:
        """Remove ``paths`` from their directories' indexes, then every directory left empty
        from its parent's, deepest first."""
        pending: dict[str, list[tuple[str, bool]]] = {}
        for p in paths:
            d, _, name = p.rpartition("/")
            pending.setdefault(d, []).append((name, True))
        while pending:
            d = max(pending, key=lambda k: (k.count("/") + bool(k), k))
            gone = pending.pop(d)

            def drop(index: _Index, gone: list[tuple[str, bool]] = gone) -> bool:
                before = len(index.files) + len(index.dirs)
                for name, is_file in gone:
                    (index.files if is_file else index.dirs).discard(name)
                return len(index.files) + len(index.dirs) != before

            index = self._update(d, drop)
            if index is not None and index.empty and d:
                parent, _, name = d.rpartition("/")
                pending.setdefault(parent, []).append((name, False))
