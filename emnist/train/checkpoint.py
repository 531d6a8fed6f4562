"""Checkpoints of a run (global parameters + run and worker documents) in a durable place.

``checkpoint_url`` is a directory (``/path`` or ``file:///path``: one ``<run>.ckpt`` file,
replaced atomically) or a Redis URL (one key per run; use a Redis with persistence). The blob
is two codec values, a JSON document and the parameter vector, each checked on the way back.
"""

from __future__ import annotations

import os
import struct
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np

from emnist.store import codec, shared_kv
from emnist.store.keys import key_for
from emnist.store.kv import KV

_LEN = struct.Struct("<Q")


class NoCheckpoint(LookupError):
    pass


def pack(docs: dict[str, Any], params: np.ndarray) -> bytes:
    head = codec.encode_doc(docs)
    return _LEN.pack(len(head)) + head + codec.encode(params)


def unpack(where: str, blob: bytes) -> tuple[dict[str, Any], np.ndarray]:
    if len(blob) < _LEN.size:
        raise codec.CorruptValue(where, "truncated checkpoint")
    (n,) = _LEN.unpack_from(blob)
    docs = codec.decode_doc(where, blob[_LEN.size:_LEN.size + n])
    params = codec.decode(where, blob[_LEN.size + n:], dtype=np.float32).array
    return docs, np.array(params)


class Checkpoints:
    def __init__(self, url: str) -> None:
        self.url = url
        scheme = urlsplit(url).scheme
        self.kv: KV | None = shared_kv(url) if scheme == "redis" else None
        self.dir = None if self.kv else Path(urlsplit(url).path if scheme == "file" else url)

    def write(self, run_id: str, docs: dict[str, Any], params: np.ndarray) -> None:
        blob = pack(docs, params)
        if self.kv is not None:
            self.kv.set_many({key_for(run_id, "checkpoint"): blob})
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.dir, prefix=f".{run_id}.")
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.dir / f"{run_id}.ckpt")  # readers see the old or the new, whole

    def read(self, run_id: str) -> tuple[dict[str, Any], np.ndarray]:
        if self.kv is not None:
            key = key_for(run_id, "checkpoint")
            blob = self.kv.get_many([key]).get(key)
            where = f"{self.kv.url} {key}"
        else:
            path = self.dir / f"{run_id}.ckpt"
            blob = path.read_bytes() if path.exists() else None
            where = str(path)
        if blob is None:
            raise NoCheckpoint(f"no checkpoint of run {run_id!r} at {self.url}")
        return unpack(where, blob)
