"""Peer messages on the wire: a codec-encoded JSON header, then codec-encoded arrays.

Layout: u32 length + ``codec.encode_doc(meta)``, then per array u32 length + ``codec.encode``.
Every piece carries the codec's magic, dtype, shape and crc32c, so a corrupt or foreign message
is refused; ``meta`` names the run, kind, step, epoch and sender, and for a gradient its
shape, dtype and compression, all checked on receipt against what the receiver expects.

Big messages (a VGG11 gradient is 515 MB: more than a Redis value may be, 512 MB, and than
RabbitMQ's default message limit, 128 MB) travel as frames of at most ``MAX_FRAME`` bytes
(8 MiB): each frame is a header (run, kind "frame", sender, message id, index, count, total
size, crc32c of its slice) and a slice of the message's bytes, cut from the arrays' own memory
(one frame's copy at a time). A message that fits one frame is sent as before. The receiver
(``Assembler``) accepts at most ``max_bytes`` per message (what the expected gradient can take:
``Compressor.max_bytes`` plus headers), one message per sender at a time, each frame once,
into one buffer of the announced size; the parts are views into that buffer (no further copy).
"""

from __future__ import annotations

import re
import secrets
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
from crc32c import crc32c

from emnist.p2p.compress import CompressionError, Compressor
from emnist.store import codec

_LEN = struct.Struct("<I")
VERSION = 1
MAX_FRAME = 8 << 20  # bytes of message per frame
HEADROOM = 1 << 20  # header bytes a gradient message may add to its parts' payload
MAX_FRAMES = 1 << 20
_MSG_ID = re.compile(r"^[0-9a-f]{16}$")


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


def unpack(data: bytes | bytearray | memoryview, where: str = "message") -> Message:
    """Split and check every piece; BadMessage names what is wrong. The parts are read-only
    views into ``data`` (no copy)."""
    pieces, at, view = [], 0, memoryview(data).toreadonly()
    while at < len(view):
        if at + 4 > len(view):
            raise BadMessage(f"{where}: truncated length field")
        (n,) = _LEN.unpack_from(view, at)
        at += 4
        if at + n > len(view):
            raise BadMessage(f"{where}: piece of {n} bytes runs past the end")
        pieces.append(view[at:at + n])
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


def _grad_meta(run: str, step: int, epoch: int, sender: int, comp: Compressor, n: int,
               loss: float) -> dict[str, Any]:
    return {"run": run, "kind": "grad", "step": step, "epoch": epoch, "sender": sender,
            "shape": [n], "dtype": "float32", "compression": comp.spec(), "loss": loss}


def gradient(run: str, step: int, epoch: int, sender: int, comp: Compressor,
             parts: list[np.ndarray], n: int, loss: float) -> bytes:
    return pack(_grad_meta(run, step, epoch, sender, comp, n, loss), parts)


def gradient_frames(run: str, step: int, epoch: int, sender: int, comp: Compressor,
                    parts: list[np.ndarray], n: int, loss: float,
                    max_frame: int = MAX_FRAME) -> Iterator[bytes]:
    """The gradient message as frames of at most ``max_frame`` bytes of message each."""
    return frames(_grad_meta(run, step, epoch, sender, comp, n, loss), parts, max_frame)


def frames(meta: dict[str, Any], parts: list[np.ndarray] = (),
           max_frame: int = MAX_FRAME) -> Iterator[bytes]:
    """``pack(meta, parts)`` cut into frames (one, the message itself, when it fits)."""
    pieces: list[bytes | memoryview] = []
    for piece in [codec.encode_doc({"v": VERSION, **meta})]:
        pieces += [_LEN.pack(len(piece)), piece]
    for p in parts:
        head, payload = codec.encode_parts(np.ascontiguousarray(p))
        pieces += [_LEN.pack(len(head) + len(payload)), head, payload]
    total = sum(len(p) for p in pieces)
    if total <= max_frame:
        yield b"".join(pieces)
        return
    count = -(-total // max_frame)
    if count > MAX_FRAMES:
        raise ValueError(f"a message of {total} bytes needs {count} frames (at most "
                         f"{MAX_FRAMES}): raise max_frame")
    msg_id = secrets.token_hex(8)
    per = -(-total // count)  # <= max_frame; the receiver derives it from size and count
    it = iter(pieces)
    cur, at = memoryview(next(it)).cast("B"), 0
    for i in range(count):
        want = min(per, total - i * per)
        buf = bytearray(want)
        got = 0
        while got < want:
            if at == len(cur):
                cur, at = memoryview(next(it)).cast("B"), 0
                continue
            k = min(want - got, len(cur) - at)
            buf[got:got + k] = cur[at:at + k]
            got, at = got + k, at + k
        head = codec.encode_doc({"v": VERSION, "run": meta.get("run"), "kind": "frame",
                                 "sender": meta.get("sender"), "id": msg_id, "i": i,
                                 "of": count, "size": total, "crc": crc32c(buf)})
        yield b"".join((_LEN.pack(len(head)), head, _LEN.pack(want), buf))


def _frame(raw: bytes, where: str) -> tuple[dict[str, Any], memoryview] | None:
    """(frame header, slice) if ``raw`` is a frame, None if it is a whole message."""
    if len(raw) < 4:
        raise BadMessage(f"{where}: truncated length field")
    (n,) = _LEN.unpack_from(raw, 0)
    if 4 + n > len(raw):
        raise BadMessage(f"{where}: piece of {n} bytes runs past the end")
    view = memoryview(raw)
    try:
        meta = codec.decode_doc(where, view[4:4 + n])
    except codec.CorruptValue as e:
        raise BadMessage(str(e)) from None
    if not isinstance(meta, dict) or meta.get("v") != VERSION:
        raise BadMessage(f"{where}: not a version-{VERSION} peer message")
    if meta.get("kind") != "frame":
        return None
    at = 4 + n
    if at + 4 > len(raw):
        raise BadMessage(f"{where}: frame without its slice")
    (k,) = _LEN.unpack_from(raw, at)
    if at + 4 + k != len(raw):
        raise BadMessage(f"{where}: frame slice of {k} bytes does not end the frame")
    return meta, view[at + 4:]


class Assembler:
    """Whole messages out of whole messages and frames, within bounds (see the module doc)."""

    def __init__(self, max_bytes: int, senders: set[int], where: str = "message") -> None:
        self.max_bytes, self.senders, self.where = max_bytes, set(senders), where
        self.pending: dict[int, dict[str, Any]] = {}  # sender -> the message it is sending

    def feed(self, raw: bytes) -> bytes | bytearray | None:
        """The whole message ``raw`` completes (itself when not a frame), or None yet."""
        framed = _frame(raw, self.where)
        if framed is None:
            if len(raw) > self.max_bytes:
                raise BadMessage(f"{self.where}: a message of {len(raw)} bytes, more than the "
                                 f"{self.max_bytes} accepted")
            return raw
        meta, piece = framed
        sender, size, count, i = (meta.get(k) for k in ("sender", "size", "of", "i"))
        ints = all(isinstance(v, int) and not isinstance(v, bool)
                   for v in (sender, size, count, i, meta.get("crc")))
        if not ints or not _MSG_ID.match(str(meta.get("id"))):
            raise BadMessage(f"{self.where}: malformed frame header")
        if sender not in self.senders:
            raise BadMessage(f"sender {sender} is not a peer this step waits for")
        if not 0 < size <= self.max_bytes:
            raise BadMessage(f"{self.where}: a framed message of {size} bytes, more than the "
                             f"{self.max_bytes} accepted")
        if not 1 < count <= MAX_FRAMES or not 0 <= i < count:
            raise BadMessage(f"{self.where}: frame {i} of {count}")
        per = -(-size // count)
        if (count - 1) * per >= size or len(piece) != min(per, size - i * per):
            raise BadMessage(f"{self.where}: frame {i} of {count} has {len(piece)} bytes")
        if crc32c(piece) != meta["crc"]:
            raise BadMessage(f"{self.where}: frame {i} checksum mismatch")
        st = self.pending.get(sender)
        if st is None:
            st = self.pending[sender] = {"id": meta["id"], "size": size, "of": count,
                                         "got": set(), "buf": bytearray(size)}
        elif (st["id"], st["size"], st["of"]) != (meta["id"], size, count):
            raise BadMessage(f"{self.where}: a frame of another message from peer {sender} "
                             "while one is arriving")
        if i in st["got"]:
            raise BadMessage(f"{self.where}: frame {i} from peer {sender} twice")
        st["buf"][i * per:i * per + len(piece)] = piece
        st["got"].add(i)
        if len(st["got"]) < count:
            return None
        del self.pending[sender]
        return st["buf"]


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
