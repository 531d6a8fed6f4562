"""Reader and writer for the IDX format used by MNIST, Fashion-MNIST and EMNIST.

Layout: two zero bytes, a dtype code, the number of dimensions, one big-endian uint32 per
dimension, then the payload in C order with big-endian multi-byte values. Files may be gzip
compressed; compression is detected by the gzip magic bytes, not by the file extension, so a
renamed or already decompressed file still loads.
"""

from __future__ import annotations

import gzip as _gzip
import os
import struct
from pathlib import Path
from typing import BinaryIO

import numpy as np

__all__ = ["DataError", "read_idx", "write_idx", "IDX_DTYPES"]

_GZIP_MAGIC = b"\x1f\x8b"

# IDX dtype code -> big-endian numpy dtype. 0x0A is not defined by the format.
IDX_DTYPES: dict[int, np.dtype] = {
    0x08: np.dtype(">u1"),
    0x09: np.dtype(">i1"),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
_CODES: dict[tuple[str, int], int] = {(dt.kind, dt.itemsize): c for c, dt in IDX_DTYPES.items()}


class DataError(Exception):
    """A data file is missing, malformed or inconsistent; the message names the file.

    The message is for logs (it carries paths). For a function's caller: ``field`` names the
    setting that points at the data (when known), ``missing`` says the files are absent rather
    than malformed, and ``public`` (optional) is a message with no path or content in it.
    """

    def __init__(self, message: str, field: str | None = None, missing: bool = False,
                 public: str | None = None) -> None:
        super().__init__(message)
        self.field, self.missing, self.public = field, missing, public


def _open(path: Path) -> BinaryIO:
    """Open plain or gzip by sniffing the magic, so file extensions never matter."""
    f = open(path, "rb")  # closed by the caller
    magic = f.read(2)
    f.seek(0)
    if magic == _GZIP_MAGIC:
        return _gzip.GzipFile(fileobj=f, mode="rb")  # type: ignore[return-value]
    return f


def _read_exact(f: BinaryIO, n: int) -> bytes:
    buf = f.read(n)
    return buf if buf is not None else b""


def read_idx(path: str | os.PathLike[str]) -> np.ndarray:
    """Read an IDX file (gzip or plain) into a writable native-endian array.

    The payload is decompressed straight into the result buffer, so a 60k-image file costs
    one allocation and no intermediate copy. Raises DataError naming the file when the magic,
    dtype code, dimensions or payload length are wrong.
    """
    p = Path(path)
    try:
        f = _open(p)
    except FileNotFoundError as e:
        raise DataError(f"{p}: file not found") from e
    except OSError as e:
        raise DataError(f"{p}: cannot open: {e}") from e
    try:
        with f:
            magic = _read_exact(f, 4)
            if len(magic) < 4:
                raise DataError(f"{p}: not an IDX file (shorter than the 4-byte magic)")
            if magic[0] != 0 or magic[1] != 0:
                raise DataError(f"{p}: not an IDX file (magic {magic.hex()} must start 0000)")
            code, ndim = magic[2], magic[3]
            if code not in IDX_DTYPES:
                raise DataError(f"{p}: unknown IDX dtype code 0x{code:02x}")
            if ndim == 0:
                raise DataError(f"{p}: IDX header declares 0 dimensions")
            raw_dims = _read_exact(f, 4 * ndim)
            if len(raw_dims) != 4 * ndim:
                raise DataError(f"{p}: truncated IDX header ({ndim} dimensions declared)")
            dims = struct.unpack(f">{ndim}I", raw_dims)
            dtype = IDX_DTYPES[code]
            out = np.empty(dims, dtype=dtype)
            expected = out.nbytes
            view = memoryview(out.reshape(-1).view(np.uint8))
            got = 0
            while got < expected:
                n = f.readinto(view[got:])
                if not n:
                    break
                got += n
            if got != expected:
                raise DataError(
                    f"{p}: payload is {got} bytes, dims {dims} x {dtype.itemsize} need {expected}"
                )
            extra = len(_read_exact(f, 1))
            if extra:
                raise DataError(f"{p}: trailing bytes after the {expected}-byte payload of {dims}")
    except (EOFError, _gzip.BadGzipFile, OSError) as e:
        raise DataError(f"{p}: corrupt or truncated file: {e}") from e
    if dtype.itemsize > 1:
        out = out.astype(dtype.newbyteorder("="))
    return out


def write_idx(path: str | os.PathLike[str], array: np.ndarray, gzip: bool = True) -> Path:
    """Write ``array`` as an IDX file (gzip-compressed by default), e.g. to convert data.

    Supported dtypes: uint8, int8, int16, int32, float32, float64 (the format's only types).
    The file is written under a temporary name and renamed, so readers never see half a file.
    """
    p = Path(path)
    arr = np.asarray(array)
    if arr.ndim == 0 or arr.ndim > 255:
        raise ValueError(f"IDX needs 1..255 dimensions, got {arr.ndim}")
    key = (arr.dtype.kind, arr.dtype.itemsize)
    if key not in _CODES:
        raise ValueError(
            f"dtype {arr.dtype} has no IDX code; use one of uint8, int8, int16, "
            "int32, float32, float64"
        )
    if any(d >= 2**32 for d in arr.shape):
        raise ValueError(f"dimension too large for IDX: {arr.shape}")
    code = _CODES[key]
    header = bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape)
    payload = np.ascontiguousarray(arr, dtype=IDX_DTYPES[code])
    tmp = p.with_name(f".{p.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as raw:
            if gzip:
                with _gzip.GzipFile(fileobj=raw, mode="wb", compresslevel=6, mtime=0) as f:
                    f.write(header)
                    f.write(payload.reshape(-1).view(np.uint8))
            else:
                raw.write(header)
                raw.write(payload.reshape(-1).view(np.uint8))
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p
