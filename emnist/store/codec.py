"""Every value in the store carries a header, so a corrupt, truncated or foreign value is refused.

Layout (little-endian): magic ``EMNS`` | version u8 | dtype code u8 | ndim u8 | flags u8 |
clock u64 | crc32c u32 | ndim x u32 dims | payload. The checksum (CRC-32C, hardware-accelerated
by the ``crc32c`` package: ~25 GB/s against zlib's ~4) covers the header (checksum field
zeroed) and the payload, so a flipped bit anywhere is caught. No pickle: raw array bytes only.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from typing import Any

import numpy as np
from crc32c import crc32c

MAGIC = b"EMNS"
VERSION = 1
_HEAD = struct.Struct("<4sBBBBQI")
_CRC_AT = 16  # offset of the crc32 field inside _HEAD

DTYPES: dict[int, np.dtype | None] = {
    0: None,  # raw bytes (JSON documents)
    1: np.dtype("<f4"), 2: np.dtype("<f8"), 3: np.dtype("<f2"),
    4: np.dtype("i1"), 5: np.dtype("u1"), 6: np.dtype("<i2"), 7: np.dtype("<i4"),
    8: np.dtype("<i8"), 9: np.dtype("<u2"), 10: np.dtype("<u4"), 11: np.dtype("<u8"),
    12: np.dtype("?"),
}
_CODES = {dt: code for code, dt in DTYPES.items() if dt is not None}


class CorruptValue(ValueError):
    """A stored value failed a header, shape or checksum check; it was not used."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"store value {key!r} refused: {reason}")
        self.key, self.reason = key, reason


class Refused(bytes):
    """A value a store handle refused before it was decoded (a document whose seal does not
    verify: emnist.store.signing); decoding it raises ``CorruptValue`` with ``reason``, so
    every reader refuses it the way it refuses a damaged value."""

    reason: str

    def __new__(cls, reason: str) -> Refused:
        self = super().__new__(cls, b"")
        self.reason = reason
        return self


@dataclass
class Decoded:
    array: np.ndarray | None  # read-only view into the value's bytes (no copy)
    raw: bytes | None  # payload for dtype code 0
    clock: int


def _pack(code: int, shape: tuple[int, ...], clock: int, payload: bytes | memoryview) -> bytes:
    head = bytearray(_HEAD.pack(MAGIC, VERSION, code, len(shape), 0, clock, 0))
    head += struct.pack(f"<{len(shape)}I", *shape)
    struct.pack_into("<I", head, _CRC_AT, crc32c(payload, crc32c(head)))
    return b"".join((head, payload))  # the payload's one copy, straight from the array


def encode(array: np.ndarray, clock: int = 0) -> bytes:
    """Header + the array's bytes in little-endian C order."""
    dt = array.dtype.newbyteorder("<") if array.dtype.byteorder == ">" else array.dtype
    code = _CODES.get(np.dtype(dt))
    if code is None:
        raise TypeError(f"dtype {array.dtype} cannot be stored")
    arr = np.ascontiguousarray(array, dtype=DTYPES[code])
    return _pack(code, arr.shape, clock, memoryview(arr).cast("B"))


def encode_doc(obj: Any, clock: int = 0) -> bytes:
    """A JSON document with the same header (dtype code 0)."""
    payload = json.dumps(obj, separators=(",", ":")).encode()
    return _pack(0, (len(payload),), clock, payload)


def decode(key: str, value: bytes | None, *, dtype: np.dtype | str | None = None,
           shape: tuple[int, ...] | None = None) -> Decoded:
    """Check everything, then return a zero-copy view; ``dtype``/``shape`` are expectations."""
    if value is None:
        raise CorruptValue(key, "missing")
    if isinstance(value, Refused):
        raise CorruptValue(key, value.reason)
    if len(value) < _HEAD.size:
        raise CorruptValue(key, f"truncated header ({len(value)} bytes)")
    magic, version, code, ndim, _flags, clock, crc = _HEAD.unpack_from(value)
    if magic != MAGIC:
        raise CorruptValue(key, f"foreign value (magic {magic!r})")
    if version != VERSION:
        raise CorruptValue(key, f"unsupported version {version}")
    if code not in DTYPES:
        raise CorruptValue(key, f"unknown dtype code {code}")
    start = _HEAD.size + 4 * ndim
    if len(value) < start:
        raise CorruptValue(key, "truncated shape")
    dims = struct.unpack_from(f"<{ndim}I", value, _HEAD.size)
    dt = DTYPES[code]
    itemsize = 1 if dt is None else dt.itemsize
    expected = itemsize * int(np.prod(dims, dtype=np.int64))
    if len(value) - start != expected:
        raise CorruptValue(key, f"payload is {len(value) - start} bytes, header says {expected}")
    view = memoryview(value)
    head = bytearray(view[:start])
    head[_CRC_AT:_CRC_AT + 4] = b"\0\0\0\0"
    if crc32c(view[start:], crc32c(head)) != crc:
        raise CorruptValue(key, "checksum mismatch")
    if dtype is not None and (dt is None or dt != np.dtype(dtype).newbyteorder("<")):
        raise CorruptValue(key, f"dtype {dt} where {np.dtype(dtype)} was expected")
    if shape is not None and tuple(dims) != tuple(shape):
        raise CorruptValue(key, f"shape {tuple(dims)} where {tuple(shape)} was expected")
    if dt is None:
        return Decoded(None, bytes(view[start:]), clock)
    return Decoded(np.frombuffer(value, dtype=dt, offset=start).reshape(dims), None, clock)


def decode_doc(key: str, value: bytes | None) -> Any:
    d = decode(key, value)
    if d.raw is None:
        raise CorruptValue(key, "an array where a document was expected")
    try:
        return json.loads(d.raw)
    except ValueError as e:
        raise CorruptValue(key, f"invalid JSON ({e})") from None
    except RecursionError:
        raise CorruptValue(key, "invalid JSON (nested too deeply)") from None


# -- streaming: headers apart from payloads (vectors of hundreds of MB, no joined copy) --------
@dataclass
class Header:
    """A parsed value header: ``size`` header bytes, then ``payload`` bytes of ``dtype``."""

    size: int
    dtype: np.dtype | None
    dims: tuple[int, ...]
    clock: int
    crc: int
    zeroed_crc: int  # crc32c of the header with its checksum field zeroed: the running start

    @property
    def payload(self) -> int:
        itemsize = 1 if self.dtype is None else self.dtype.itemsize
        return itemsize * int(np.prod(self.dims, dtype=np.int64))


def encode_parts(array: np.ndarray, clock: int = 0) -> tuple[bytes, memoryview]:
    """``encode(array)`` as (header, payload view): the same bytes, the payload not copied
    (``array`` must be C-contiguous with a little-endian storable dtype)."""
    code = _CODES.get(np.dtype(array.dtype))
    if code is None or array.dtype.byteorder == ">" or not array.flags.c_contiguous:
        raise TypeError(f"encode_parts needs a C-contiguous little-endian array, got "
                        f"{array.dtype} (contiguous: {array.flags.c_contiguous})")
    payload = memoryview(array).cast("B")
    head = bytearray(_HEAD.pack(MAGIC, VERSION, code, array.ndim, 0, clock, 0))
    head += struct.pack(f"<{array.ndim}I", *array.shape)
    struct.pack_into("<I", head, _CRC_AT, crc32c(payload, crc32c(head)))
    return bytes(head), payload


def header_size(ndim: int) -> int:
    return _HEAD.size + 4 * ndim


def read_header(key: str, data: bytes | memoryview) -> Header:
    """Parse the header at the start of ``data`` (at least ``header_size(ndim)`` bytes; the
    payload may follow or arrive later); the payload's checksum is the caller's to finish:
    ``crc32c(payload, h.zeroed_crc) == h.crc``."""
    if len(data) < _HEAD.size:
        raise CorruptValue(key, f"truncated header ({len(data)} bytes)")
    magic, version, code, ndim, _flags, clock, crc = _HEAD.unpack_from(data)
    if magic != MAGIC:
        raise CorruptValue(key, f"foreign value (magic {bytes(magic)!r})")
    if version != VERSION:
        raise CorruptValue(key, f"unsupported version {version}")
    if code not in DTYPES:
        raise CorruptValue(key, f"unknown dtype code {code}")
    size = header_size(ndim)
    if len(data) < size:
        raise CorruptValue(key, "truncated shape")
    dims = struct.unpack_from(f"<{ndim}I", data, _HEAD.size)
    head = bytearray(memoryview(data)[:size])
    head[_CRC_AT:_CRC_AT + 4] = b"\0\0\0\0"
    return Header(size, DTYPES[code], tuple(dims), clock, crc, crc32c(head))
