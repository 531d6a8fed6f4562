"""uint8 ``.npy`` files written as a header and a stream of row chunks, with their CRC-32C.

A prepared set's files are plain ``.npy`` (what ``np.load(mmap_mode="r")`` opens), but they
are produced a chunk at a time (generated rows, slices of a permutation) and sent to a local
file or an S3 multipart upload without ever holding the whole array. Writing the header here
instead of through ``np.save`` keeps the bytes identical on every backend, so one set has one
manifest wherever it lives.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterable, Iterator

import numpy as np
from crc32c import crc32c

__all__ = ["READ_CHUNK", "chunk_bytes", "file_crc", "npy_header", "npy_size"]

READ_CHUNK = 8 << 20  # bytes per read when checksumming a file: bounded memory, any size


def npy_header(shape: tuple[int, ...]) -> bytes:
    """The ``.npy`` header (version 1.0, as ``np.save`` writes it) of a C-ordered uint8 array."""
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": "|u1", "fortran_order": False, "shape": tuple(int(v) for v in shape)})
    return out.getvalue()


def npy_size(shape: tuple[int, ...]) -> int:
    """Bytes of the whole file: header plus one byte per element."""
    return len(npy_header(shape)) + int(np.prod(shape, dtype=np.int64))


def chunk_bytes(shape: tuple[int, ...], chunks: Iterable[np.ndarray]) -> Iterator[memoryview]:
    """The file's bytes in pieces: the header, then each chunk's rows (checked to add up to
    ``shape``; a producer that yields too few or too many rows is a bug, never a short file)."""
    yield memoryview(npy_header(shape))
    rows, want = 0, shape[0]
    tail = tuple(shape[1:])
    for chunk in chunks:
        chunk = np.ascontiguousarray(chunk, dtype=np.uint8)
        if chunk.shape[1:] != tail:
            raise ValueError(f"chunk of shape {chunk.shape} for a {shape} array")
        rows += len(chunk)
        if rows > want:
            raise ValueError(f"{rows} rows produced for a {shape} array")
        yield memoryview(chunk).cast("B")
    if rows != want:
        raise ValueError(f"{rows} rows produced for a {shape} array")


def file_crc(path: str | os.PathLike[str]) -> int:
    """CRC-32C of a whole file, read in bounded pieces (no memory map: RSS stays flat)."""
    crc = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(READ_CHUNK)
        view = memoryview(buf)
        while n := f.readinto(buf):
            crc = crc32c(view[:n], crc)
    return crc
