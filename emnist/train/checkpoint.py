"""Checkpoints of a run (global parameters + run and worker documents) in a durable place.

``checkpoint_url`` is a directory (``/path`` or ``file:///path``: one ``<run>.ckpt`` file,
replaced atomically) or a Redis URL (use a Redis with persistence). The blob is two codec
values, a JSON document and the parameter vector, each checked on the way back.

Vectors of hundreds of MB (VGG11: 515 MB) never exist twice: a file is written from the
array's own memory (its checksum computed over that memory first) and read straight into the
new array in pieces of ``PIECE_BYTES``, the checksum accumulated as it arrives. On Redis the
same byte stream is cut into pieces of at most ``PIECE_BYTES`` (piece 0: the document and the
vector's header; then the vector's bytes) under a fresh generation's keys
(``emnist:{run}:checkpoint:{generation}:{i}``), written ``BATCH_BYTES`` per round trip; the
run's checkpoint key, a small manifest naming the generation, is switched last, in one SET, and
the previous generation deleted: a reader sees the old checkpoint or the new one, whole (a
reader that finds a piece gone because a newer checkpoint replaced it reads the manifest again).
One value per checkpoint, as before, would also hit Redis's 512 MB value limit
(proto-max-bulk-len). Checkpoints written as one value are still read.

A directory is checked when it is used, not only when a request named it: a write or read
starts from the operator's checkpoint root that holds the directory (``checkpoint_roots`` in
the environment) and walks each name below it with ``O_NOFOLLOW``, then creates the file with
``O_EXCL`` and renames it inside that directory's descriptor. A symbolic link placed anywhere
below the root after the request was accepted (the directory itself, a parent, the file) makes
the write fail with nothing written, instead of redirecting it outside the root.
"""

from __future__ import annotations

import errno
import os
import secrets
import struct
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
from crc32c import crc32c

from emnist.policy import env_list
from emnist.store import codec, shared_kv
from emnist.store.keys import key_for, valid_run_id
from emnist.store.kv import KV
from emnist.train.config import ConfigError

_LEN = struct.Struct("<Q")
PIECE_BYTES = 8 << 20  # bytes read or written at a time, and per Redis value
BATCH_BYTES = 32 << 20  # Redis: piece bytes per round trip
MAX_DOC = 64 << 20  # the documents' part of a checkpoint, at most
FORMAT = 2  # Redis manifest: a generation of pieces
READ_ATTEMPTS = 3  # a newer checkpoint replacing the one being read: read the newest again


class NoCheckpoint(LookupError):
    pass


class UnsafeCheckpointDir(ConfigError):
    """The checkpoint directory is, or passes through, a symbolic link (or a file) below the
    operator's root, or is no longer under any root: refused rather than followed."""

    def __init__(self, what: str) -> None:
        super().__init__("checkpoint_url", f"{what}; nothing was written or read there")


_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _local_roots(env: Mapping[str, str]) -> list[str]:
    """The directories of ``checkpoint_roots`` (plain paths or file:///paths)."""
    out = []
    for root in env_list(env, "checkpoint_roots"):
        path = urlsplit(root).path if root.startswith("file://") else root
        if "://" not in path and os.path.isabs(path):
            out.append(os.path.normpath(path))
    return out


def _under(path: str, top: str) -> bool:
    return path == top or path.startswith(top.rstrip(os.sep) + os.sep)


def _anchor(directory: Path, env: Mapping[str, str]) -> tuple[str, list[str]]:
    """Where a write may follow links (the operator's root that holds ``directory``) and the
    names below it that it may not. Without roots, or for the function's own
    ``checkpoint_url``, the directory itself is the operator's (or a local user's) choice."""
    path = os.path.normpath(os.path.abspath(directory))
    roots = _local_roots(env)
    for candidate in (path, os.path.realpath(path)):
        tops = [t for r in roots for t in {r, os.path.realpath(r)} if _under(candidate, t)]
        if tops:
            top = max(tops, key=len)  # the innermost root: the fewest names walked
            rel = os.path.relpath(candidate, top)
            return top, [] if rel == "." else rel.split(os.sep)
    own = env.get("checkpoint_url") or ""
    own = urlsplit(own).path if own.startswith("file://") else own
    if not roots or (own and os.path.normpath(own) == path):
        return path, []
    raise UnsafeCheckpointDir("the checkpoint directory is no longer under checkpoint_roots")


def _open_dir(directory: Path, env: Mapping[str, str], create: bool) -> int:
    """A descriptor of ``directory`` reached from its root without following a link below it
    (created when ``create``). FileNotFoundError when it is not there."""
    top, names = _anchor(directory, env)
    if create:
        os.makedirs(top, exist_ok=True)
    fd = os.open(top, _DIR_FLAGS)
    try:
        for name in names:
            if create:
                try:
                    os.mkdir(name, dir_fd=fd)
                except FileExistsError:
                    pass
            try:
                below = os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except OSError as e:
                if e.errno in (errno.ELOOP, errno.ENOTDIR):
                    raise UnsafeCheckpointDir("the checkpoint directory passes through a "
                                              "symbolic link or a file below its root") \
                        from None
                raise
            os.close(fd)
            fd = below
    except BaseException:
        os.close(fd)
        raise
    return fd


class _Replaced(Exception):
    """A piece of the generation being read is gone: a newer checkpoint replaced it."""


def _head(docs: dict[str, Any], params: np.ndarray) -> tuple[bytes, memoryview]:
    """The blob as (documents + the vector's header, the vector's own bytes: no copy)."""
    doc = codec.encode_doc(docs)
    vhead, payload = codec.encode_parts(np.ascontiguousarray(params, dtype=np.float32))
    return _LEN.pack(len(doc)) + doc + vhead, payload


def pack(docs: dict[str, Any], params: np.ndarray) -> bytes:
    """The whole blob as one value (small vectors; tests)."""
    head, payload = _head(docs, params)
    return head + bytes(payload)


def _fill(readinto: Callable[[memoryview], int], where: str, view: memoryview) -> None:
    got = 0
    while got < len(view):
        n = readinto(view[got:])
        if not n:
            raise codec.CorruptValue(where, "truncated checkpoint")
        got += n


def read_stream(where: str, readinto: Callable[[memoryview], int]
                ) -> tuple[dict[str, Any], np.ndarray]:
    """Parse a blob from ``readinto`` (like a raw file's): the documents, then the vector read
    into a new array piece by piece, its checksum checked as it arrives."""
    def exactly(n: int) -> bytes:
        buf = bytearray(n)
        _fill(readinto, where, memoryview(buf))
        return bytes(buf)

    (n,) = _LEN.unpack(exactly(_LEN.size))
    if n > MAX_DOC:
        raise codec.CorruptValue(where, f"checkpoint documents of {n} bytes (at most {MAX_DOC})")
    docs = codec.decode_doc(where, exactly(n))
    fixed = exactly(codec.header_size(0))
    h = codec.read_header(where, fixed + exactly(4 * fixed[6]))  # byte 6: ndim
    if h.dtype != np.dtype("<f4") or len(h.dims) != 1:
        raise codec.CorruptValue(where, f"checkpoint vector is {h.dtype} {h.dims}, not float32 "
                                 "(n,)")
    params = np.empty(h.dims[0], dtype=np.float32)
    view = memoryview(params).cast("B")
    crc = h.zeroed_crc
    for at in range(0, len(view), PIECE_BYTES):
        piece = view[at:at + PIECE_BYTES]
        _fill(readinto, where, piece)
        crc = crc32c(piece, crc)
    if crc != h.crc:
        raise codec.CorruptValue(where, "checksum mismatch")
    if readinto(memoryview(bytearray(1))):
        raise codec.CorruptValue(where, "trailing bytes after the checkpoint")
    return docs, params


def unpack(where: str, blob: bytes) -> tuple[dict[str, Any], np.ndarray]:
    if len(blob) < _LEN.size:
        raise codec.CorruptValue(where, "truncated checkpoint")
    return read_stream(where, _BytesReader(blob).readinto)


class _BytesReader:
    def __init__(self, data: bytes | memoryview) -> None:
        self.view, self.at = memoryview(data), 0

    def readinto(self, out: memoryview) -> int:
        n = min(len(out), len(self.view) - self.at)
        out[:n] = self.view[self.at:self.at + n]
        self.at += n
        return n


class _PieceReader:
    """``readinto`` over a generation's pieces, fetched ``BATCH_BYTES`` at a time."""

    def __init__(self, kv: KV, keys: list[str], per_batch: int) -> None:
        self.kv, self.keys, self.per = kv, keys, max(1, per_batch)
        self.next, self.got = 0, {}
        self.current: _BytesReader | None = None

    def readinto(self, out: memoryview) -> int:
        while self.current is None or self.current.at == len(self.current.view):
            if self.next == len(self.keys):
                return 0
            key = self.keys[self.next]
            if key not in self.got:
                self.got = self.kv.get_many(self.keys[self.next:self.next + self.per])
            value = self.got.pop(key, None)
            if value is None:
                raise _Replaced
            self.current, self.next = _BytesReader(value), self.next + 1
        return self.current.readinto(out)


class Checkpoints:
    """The checkpoints at ``url``; ``env`` (default: the process's environment) holds the
    operator's ``checkpoint_roots`` that every directory write and read is checked against."""

    def __init__(self, url: str, env: Mapping[str, str] | None = None) -> None:
        self.url = url
        self.env = os.environ if env is None else env
        scheme = urlsplit(url).scheme
        self.kv: KV | None = shared_kv(url) if scheme == "redis" else None
        self.dir = None if self.kv else Path(urlsplit(url).path if scheme == "file" else url)

    def _pieces(self, run_id: str, generation: str, count: int) -> list[str]:
        return [key_for(run_id, "checkpoint", generation, i) for i in range(count)]

    def write(self, run_id: str, docs: dict[str, Any], params: np.ndarray) -> None:
        head, payload = _head(docs, params)
        if self.kv is not None:
            self._write_redis(run_id, head, payload)
            return
        if not valid_run_id(run_id):
            raise ValueError(f"invalid run id {run_id!r}")
        dir_fd = _open_dir(self.dir, self.env, create=True)
        tmp = f".{run_id}.{secrets.token_hex(6)}.tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
                         | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(head)
                    for at in range(0, len(payload), PIECE_BYTES):
                        f.write(payload[at:at + PIECE_BYTES])  # from the array's memory
                    f.flush()
                    os.fsync(f.fileno())
                # readers see the old or the new; a link at the name is replaced, not followed
                os.replace(tmp, f"{run_id}.ckpt", src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
            except BaseException:
                try:
                    os.unlink(tmp, dir_fd=dir_fd)
                except FileNotFoundError:
                    pass
                raise
        finally:
            os.close(dir_fd)

    def _write_redis(self, run_id: str, head: bytes, payload: memoryview) -> None:
        key = key_for(run_id, "checkpoint")
        old = self._manifest(run_id)
        generation = secrets.token_hex(8)
        pieces = [head] + [payload[at:at + PIECE_BYTES]
                           for at in range(0, len(payload), PIECE_BYTES)]
        keys = self._pieces(run_id, generation, len(pieces))
        batch: dict[str, bytes | memoryview] = {}
        size = 0
        for k, piece in zip(keys, pieces):
            batch[k], size = piece, size + len(piece)
            if size >= BATCH_BYTES:
                self.kv.set_many(batch)
                batch, size = {}, 0
        if batch:
            self.kv.set_many(batch)
        self.kv.set_many({key: codec.encode_doc({
            "format": FORMAT, "generation": generation, "pieces": len(pieces),
            "bytes": len(head) + len(payload)})})
        if old is not None and old.get("generation") != generation:
            self.kv.delete_many(self._pieces(run_id, old["generation"], old["pieces"]))

    def _manifest(self, run_id: str) -> dict[str, Any] | None:
        """The Redis manifest, None when there is none or it is a one-value checkpoint."""
        key = key_for(run_id, "checkpoint")
        value = self.kv.get_many([key]).get(key)
        if value is None or not value.startswith(codec.MAGIC):
            return None
        return self._check_manifest(f"{self.kv.url} {key}", codec.decode_doc(key, value))

    @staticmethod
    def _check_manifest(where: str, man: Any) -> dict[str, Any]:
        ok = (isinstance(man, dict) and man.get("format") == FORMAT
              and isinstance(man.get("generation"), str) and man["generation"].isalnum()
              and isinstance(man.get("pieces"), int) and 1 <= man["pieces"] <= 1 << 20)
        if not ok:
            raise codec.CorruptValue(where, "not a checkpoint manifest")
        return man

    def read(self, run_id: str) -> tuple[dict[str, Any], np.ndarray]:
        if self.kv is not None:
            return self._read_redis(run_id)
        path = self.dir / f"{run_id}.ckpt"
        if not valid_run_id(run_id):
            raise ValueError(f"invalid run id {run_id!r}")
        try:
            dir_fd = _open_dir(self.dir, self.env, create=False)
        except FileNotFoundError:
            raise NoCheckpoint(f"no checkpoint of run {run_id!r} at {self.url}") from None
        try:
            fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dir_fd)
        except FileNotFoundError:
            raise NoCheckpoint(f"no checkpoint of run {run_id!r} at {self.url}") from None
        except OSError as e:
            if e.errno == errno.ELOOP:
                raise UnsafeCheckpointDir("the checkpoint file is a symbolic link") from None
            raise
        finally:
            os.close(dir_fd)
        with open(fd, "rb", buffering=0) as f:
            return read_stream(str(path), f.readinto)

    def _read_redis(self, run_id: str) -> tuple[dict[str, Any], np.ndarray]:
        key = key_for(run_id, "checkpoint")
        where = f"{self.kv.url} {key}"
        for _ in range(READ_ATTEMPTS):
            value = self.kv.get_many([key]).get(key)
            if value is None:
                raise NoCheckpoint(f"no checkpoint of run {run_id!r} at {self.url}")
            if not value.startswith(codec.MAGIC):  # written as one value
                return unpack(where, value)
            man = self._check_manifest(where, codec.decode_doc(key, value))
            keys = self._pieces(run_id, man["generation"], man["pieces"])
            try:
                return read_stream(where, _PieceReader(self.kv, keys,
                                                       BATCH_BYTES // PIECE_BYTES).readinto)
            except _Replaced:
                continue
        raise codec.CorruptValue(where, f"checkpoint pieces missing in {READ_ATTEMPTS} reads "
                                 "(replaced each time, or lost)")
