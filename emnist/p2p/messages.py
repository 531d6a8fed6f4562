"""Peer messages on the wire: a codec-encoded JSON header, then codec-encoded arrays.

Layout: u32 length + ``codec.encode_doc(meta)``, then per array u32 length + ``codec.encode``.
Every piece carries the codec's magic, dtype, shape and crc32c, so a corrupt or foreign message
is refused; ``meta`` names the run, kind, step, epoch and sender, and for a gradient its
shape, dtype and compression, all checked on receipt against what the receiver expects.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

import numpy as np

from emnist.p2p.compress import CompressionError, Compressor
from emnist.store import codec

_LEN = struct.Struct("<I")
VERSION = 1


class BadMessage(ValueError):
    """A message that must not be used (corrupt, foreign, stale or of the wrong shape)."""


@dataclass
class Message:
    meta: dict[str, Any]
    parts: list[np.ndarray]

    @property
    def sender(self) -> int:
        return int(self.meta["sender"])


def pack(meta: dict[str, Any], parts: list[np.ndarray] = ()) -> bytes:
    pieces = [codec.encode_doc({"v": VERSION, **meta})]
    pieces += [codec.encode(p) for p in parts]
    out = bytearray()
    for piece in pieces:
        out += _LEN.pack(len(piece))
        out += piece
    return bytes(out)


def unpack(data: bytes, where: str = "message") -> Message:
    """Split and check every piece; BadMessage names what is wrong."""
    pieces, at, view = [], 0, memoryview(data)
    while at < len(data):
        if at + 4 > len(data):
            raise BadMessage(f"{where}: truncated length field")
        (n,) = _LEN.unpack_from(data, at)
        at += 4
        if at + n > len(data):
            raise BadMessage(f"{where}: piece of {n} bytes runs past the end")
        pieces.append(bytes(view[at:at + n]))
        at += n
    if not pieces:
        raise BadMessage(f"{where}: empty")
    try:
        meta = codec.decode_doc(where, pieces[0])
        parts = [codec.decode(f"{where}[{i}]", p).array for i, p in enumerate(pieces[1:], 1)]
    except codec.CorruptValue as e:
        raise BadMessage(str(e)) from None
    if not isinstance(meta, dict) or meta.get("v") != VERSION:
        raise BadMessage(f"{where}: not a version-{VERSION} peer message")
    for key in ("run", "kind", "sender"):
        if key not in meta:
            raise BadMessage(f"{where}: header lacks {key!r}")
    if any(p is None for p in parts):
        raise BadMessage(f"{where}: a part is not an array")
    return Message(meta, parts)


def gradient(run: str, step: int, epoch: int, sender: int, comp: Compressor,
             parts: list[np.ndarray], n: int, loss: float) -> bytes:
    return pack({"run": run, "kind": "grad", "step": step, "epoch": epoch, "sender": sender,
                 "shape": [n], "dtype": "float32", "compression": comp.spec(), "loss": loss},
                parts)


def check(msg: Message, *, run: str, kind: str, size: int, **expect: Any) -> None:
    """Refuse a message of another run, kind, step, epoch, or from no known peer."""
    m = msg.meta
    if m.get("run") != run:
        raise BadMessage(f"run {m.get('run')!r} where {run!r} was expected")
    if m.get("kind") != kind:
        raise BadMessage(f"kind {m.get('kind')!r} where {kind!r} was expected")
    sender = m.get("sender")
    if not isinstance(sender, int) or isinstance(sender, bool) or not 0 <= sender < size:
        raise BadMessage(f"sender {sender!r} is not a peer rank 0..{size - 1}")
    for key, value in expect.items():
        if m.get(key) != value:
            raise BadMessage(f"{key} {m.get(key)!r} where {value!r} was expected (stale?)")


def read_gradient(msg: Message, comp: Compressor, n: int) -> np.ndarray:
    """The dense float32 gradient of a checked message; BadMessage on shape/dtype/codec."""
    m = msg.meta
    if m.get("shape") != [n]:
        raise BadMessage(f"shape {m.get('shape')} where [{n}] was expected")
    if m.get("dtype") != "float32":
        raise BadMessage(f"dtype {m.get('dtype')!r} where 'float32' was expected")
    if m.get("compression") != comp.spec():
        raise BadMessage(f"compression {m.get('compression')} where {comp.spec()} was expected")
    try:
        g = comp.decompress(msg.parts, n)
    except CompressionError as e:
        raise BadMessage(str(e)) from None
    if not np.all(np.isfinite(g)):
        raise BadMessage("gradient has non-finite values")
    return g
