"""The run's shared state: a chunked parameter vector plus small JSON documents.

The vector is cut into fixed-size chunks (one key each, far below memcached's 1 MB item
limit). A fetch reads the chunks and copies each straight into the caller's buffer: one copy
per fetch. A push adds a delta to every chunk atomically through the backend's
``update_many``; ``mode="overwrite"`` is the original's racy read-add-write, kept only to show
what it loses.

Round trips are bounded: at most ``batch_values`` chunks and ``batch_bytes`` bytes each
(64 chunks, 16 MiB). A vector that fits one batch (the reference MLP: one chunk; a 6 MB
model: 16 chunks) moves in one round trip exactly as before; a bigger one (VGG11: 515 MB,
~1,300 chunks) moves batch after batch, so the client holds at most one batch of values
beside the caller's vectors. What a batched push means:

- memcached (and the binary protocol): every chunk is its own cas, as always, so batching
  changes nothing about atomicity: no concurrent push is lost; a reader may see a vector
  some of whose chunks have a push and some not yet (as before). The progress note and the
  lease check behave as without batching (checked after the chunks, note written last).
- Redis: still one WATCH/MULTI/EXEC transaction over all chunks, the note and the checked key
  (``RedisKV.update_batched``), so the push and its note land together or not at all,
  whatever the size. Without ``out`` the new chunks wait in one temporary vector between the
  read and the write phase (the one extra copy); with ``out`` they are built in ``out``.
  Redis holds the queued SETs until EXEC: about one more copy of the vector, server side.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from emnist import policy
from emnist.store import codec
from emnist.store.keys import key_for
from emnist.store.kv import KV, StoreError

DEFAULT_CHUNK_BYTES = 384 * 1024  # the 784-100-47 model (333 KB) in one value
DEFAULT_BATCH_BYTES = 16 << 20  # value bytes per round trip (big vectors only)
DEFAULT_BATCH_VALUES = 64  # values per round trip
MAX_CHUNKS = 1 << 16  # keys of one vector: bounds the key and bound lists a layout makes
MAX_CHUNK_ELEMS = 1 << 24  # values per chunk (a layout read back from the store)
MODES = ("atomic", "overwrite")
Check = tuple[str, Callable[[str, "bytes | None"], object]]  # (key, fn raising to refuse)


def _whole(value: object, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high


class MissingState(StoreError):
    """Keys that must exist are gone (evicted, server restarted, or an unknown run)."""


@dataclass
class PushStats:
    bytes_sent: int = 0
    bytes_skipped: int = 0  # delta bytes of chunks a sparse push left with the caller
    retries: int = 0
    clock: int = 0  # smallest chunk clock after the push


class ParameterStore:
    """A run's chunked vector and documents, under ``emnist:{run}:`` (or a ``prefix`` inside
    the run, e.g. a serverless peer's per-step parameters)."""

    def __init__(self, kv: KV, run_id: str, *, num_params: int | None = None,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES, prefix: tuple[object, ...] = (),
                 batch_bytes: int = DEFAULT_BATCH_BYTES,
                 batch_values: int = DEFAULT_BATCH_VALUES) -> None:
        self.kv, self.run_id = kv, run_id
        self.base = key_for(run_id, *prefix)
        self.chunk = max(1, chunk_bytes // 4)
        self.batch_bytes, self.batch_values = max(1, batch_bytes), max(1, batch_values)
        self.num_params = num_params
        if num_params is not None:
            self._layout(num_params)

    @classmethod
    def at_key(cls, kv: KV, base: str, **kw: Any) -> ParameterStore:
        """The vector whose layout is ``{base}:layout`` (a key its caller has validated)."""
        n = kw.pop("num_params", None)
        ps = cls(kv, "x", **kw)
        ps.base, ps.run_id = base, None
        if n is not None:
            ps._layout(n)
        return ps

    def _layout(self, num_params: int) -> None:
        if -(-num_params // self.chunk) > MAX_CHUNKS:
            raise policy.PolicyError("chunk_bytes", f"the parameters would be cut into more "
                                     f"than {MAX_CHUNKS} chunks: use a larger chunk_bytes")
        self.num_params = num_params
        starts = range(0, num_params, self.chunk)
        self.bounds = [(a, min(a + self.chunk, num_params)) for a in starts]
        self.keys = [self.key("w", i) for i in range(len(self.bounds))]

    def key(self, *parts: object) -> str:
        return ":".join([self.base, *map(str, parts)])

    @property
    def per_batch(self) -> int:
        """Chunks per round trip: at most ``batch_values`` and ``batch_bytes``."""
        return max(1, min(self.batch_values, self.batch_bytes // (4 * self.chunk)))

    def batches(self, chunks: Iterable[int] | None = None, share: int = 1) -> list[list[int]]:
        """Chunk indices in round-trip batches (``share``: values moved per chunk, e.g. one per
        worker whose copy is read in the same round trip)."""
        idx = list(range(len(self.keys)) if chunks is None else chunks)
        per = max(1, self.per_batch // max(1, share))
        return [idx[i:i + per] for i in range(0, len(idx), per)]

    # -- documents -------------------------------------------------------------------------
    def put_doc(self, name: str, obj: Any) -> None:
        self.kv.set_many({self.key(name): codec.encode_doc(obj)})

    def put_docs(self, docs: dict[str, Any]) -> None:
        self.kv.set_many({self.key(n): codec.encode_doc(o) for n, o in docs.items()})

    def get_docs(self, names: list[str]) -> dict[str, Any]:
        """Present documents only; a corrupt one raises ``CorruptValue`` naming its key."""
        keys = {self.key(n): n for n in names}
        got = self.kv.get_many(list(keys))
        return {keys[k]: codec.decode_doc(k, v) for k, v in got.items()}

    def get_doc(self, name: str) -> Any | None:
        return self.get_docs([name]).get(name)

    # -- parameters ------------------------------------------------------------------------
    def init(self, params: np.ndarray, meta: dict[str, Any] | None = None) -> None:
        """Write the vector and its layout; the layout doc lets workers size their buffers
        (written last: a reader that finds it finds every chunk)."""
        params = np.ascontiguousarray(params, dtype=np.float32)
        self._layout(params.size)
        layout = {"num_params": params.size, "chunk_elems": self.chunk, "dtype": "float32",
                  "created": time.time(), **(meta or {})}
        self.put(params, {self.key("layout"): codec.encode_doc(layout)})

    def put(self, params: np.ndarray, then: Mapping[str, bytes] | None = None) -> None:
        """Overwrite the vector (for algorithms with one writer per round: averaging), batch
        by batch; ``then``: values written with the last batch."""
        batches = self.batches()
        for j, batch in enumerate(batches):
            values = {self.keys[i]: codec.encode(params[slice(*self.bounds[i])]) for i in batch}
            if j == len(batches) - 1 and then:
                values.update(then)
            self.kv.set_many(values)
        if not batches and then:
            self.kv.set_many(dict(then))

    def attach(self, max_params: int = policy.DEFAULT_MAX_PARAMS) -> dict[str, Any]:
        """Read the layout written by ``init`` (a worker joining the run). The store is not
        trusted: its numbers are checked (``max_params``, chunk size and count) before they
        size anything, else ``CorruptValue`` naming the field."""
        layout = self.get_doc("layout")
        if layout is None:
            raise MissingState(f"run {self.run_id!r} has no parameters in {self.kv.url}")
        key = self.key("layout")
        if not isinstance(layout, dict):
            raise codec.CorruptValue(key, "not a parameter layout (not a JSON object)")
        n, elems = layout.get("num_params"), layout.get("chunk_elems")
        if not _whole(n, 1, max_params):
            raise codec.CorruptValue(key, f"num_params: must be a whole number in "
                                     f"1..{max_params} (max_params)")
        if not _whole(elems, 1, MAX_CHUNK_ELEMS):
            raise codec.CorruptValue(key, f"chunk_elems: must be a whole number in "
                                     f"1..{MAX_CHUNK_ELEMS}")
        if -(-n // elems) > MAX_CHUNKS:
            raise codec.CorruptValue(key, f"chunk_elems: cuts the vector into more than "
                                     f"{MAX_CHUNKS} chunks")
        self.chunk = elems
        self._layout(n)
        return layout

    def fetch(self, out: np.ndarray, docs: tuple[str, ...] = ()) -> tuple[int, dict[str, Any]]:
        """Fill ``out`` with the global vector; also read ``docs`` in the same round trip.

        Returns the smallest chunk clock (how many pushes every chunk has seen at least).
        """
        doc_keys = [self.key(n) for n in docs]
        clock: int | None = None
        extra: dict[str, Any] = {}
        for j, batch in enumerate(self.batches() or [[]]):
            keys = [self.keys[i] for i in batch]
            got = self.kv.get_many(keys + doc_keys if j == 0 else keys)
            self._require(keys, got)
            c = self._read_into(out, batch, got)
            clock = c if clock is None else min(clock, c)
            if j == 0:
                extra = {n: codec.decode_doc(k, got[k]) for n, k in zip(docs, doc_keys)
                         if k in got}
        return int(clock or 0), extra

    def _require(self, keys: list[str], got: Mapping[str, bytes]) -> None:
        missing = [k for k in keys if k not in got]
        if missing:
            raise MissingState(f"{len(missing)} of {len(self.keys)} parameter chunks missing "
                               f"from {self.kv.url} (first: {missing[0]})")

    def _read_into(self, out: np.ndarray, chunks: Iterable[int], got: dict[str, bytes]) -> int:
        """Check and copy chunks into ``out`` (their one copy); the smallest clock."""
        clock = None
        for i in chunks:
            (a, b), k = self.bounds[i], self.keys[i]
            d = codec.decode(k, got.get(k), dtype=np.float32, shape=(b - a,))
            out[a:b] = d.array
            clock = d.clock if clock is None else min(clock, d.clock)
        return int(clock or 0)

    def push(self, delta: np.ndarray, mode: str = "atomic", out: np.ndarray | None = None,
             chunks: Iterable[int] | None = None, check: Check | None = None,
             note: Mapping[str, bytes] | None = None) -> PushStats:
        """global += delta, chunk by chunk; concurrent pushes are all kept in atomic mode.

        ``chunks``: push only these chunk indices (a sparse push); the caller keeps the rest
        of its delta. With ``out``, the new global vector is written there as it is
        computed (the other chunks are read in the same round trip): a push that doubles as a
        fetch, with no second round trip and no extra copy.

        ``note``: values that say the push happened (a worker's progress), in keys only
        this caller writes; ``check``: (key, fn) that refuses the push by raising (a lost
        lease). Where ``update_many`` is one transaction over all its keys (the KV's
        ``atomic_many``: Redis), both are part of the push's own transaction: the checked key
        is watched (and written back unchanged), so the push and its note land together or
        not at all, and a refusal aborts both. Elsewhere (memcached: no multi-key atomicity)
        the checked key is read in the push's first round trip and checked once the chunks
        have landed, then the note is written (one plain set): never before its update, but a
        crash in between leaves the update without its note, and a refusal comes too late to
        stop the update (it stops the note, and the caller).
        """
        if mode not in MODES:
            raise ValueError(f"update mode must be one of {MODES}, got {mode!r}")
        chosen = range(len(self.keys)) if chunks is None else sorted(set(chunks))
        keys = [self.keys[i] for i in chosen]
        picked = set(chosen)
        others = [i for i in range(len(self.keys)) if i not in picked]
        stats = PushStats()
        stats.bytes_sent = 4 * sum(self.bounds[i][1] - self.bounds[i][0] for i in chosen)
        stats.bytes_skipped = 4 * self.num_params - stats.bytes_sent
        index = dict(zip(self.keys, self.bounds))
        clocks: dict[str, int] = {}

        def add(key: str, old: bytes | None) -> bytes:
            if old is None:
                raise MissingState(f"parameter chunk {key} missing from {self.kv.url}")
            a, b = index[key]
            d = codec.decode(key, old, dtype=np.float32, shape=(b - a,))
            new = np.add(d.array, delta[a:b], out=None if out is None else out[a:b])
            clocks[key] = d.clock + 1
            return codec.encode(new, d.clock + 1)

        read = [self.keys[i] for i in others] if out is not None else []
        note = dict(note or {})
        together = bool(check or note) and mode == "atomic" and \
            getattr(self.kv, "atomic_many", False)
        if len(keys) + len(read) > self.per_batch:  # a big vector: bounded round trips
            return self._push_batched(delta, mode, out, list(chosen), others, check, note,
                                      stats, add, clocks)
        if together:
            def add_or_note(key: str, old: bytes | None) -> bytes:
                if check is not None and key == check[0]:
                    check[1](key, old)  # raising here aborts the whole transaction
                    if old is None:
                        raise MissingState(f"{key} missing from {self.kv.url}")
                    return old  # watched, so written back as it was
                return note[key] if key in note else add(key, old)

            # the check first: a refusal stops before any chunk is computed
            first = [check[0]] if check is not None else []
            stats.retries, got = self.kv.update_many([*first, *note, *keys], add_or_note,
                                                     read=read)
        elif mode == "atomic":
            extra = [check[0]] if check is not None else []
            stats.retries, got = self.kv.update_many(keys, add, read=read + extra)
        else:
            extra = [check[0]] if check is not None else []
            got = self.kv.get_many(keys + read + extra)
            self.kv.set_many({k: add(k, got.get(k)) for k in keys})
        clock = min(clocks.values(), default=None)
        if read:
            missing = [k for k in read if k not in got]
            if missing:
                raise MissingState(f"{len(missing)} of {len(self.keys)} parameter chunks "
                                   f"missing from {self.kv.url} (first: {missing[0]})")
            c = self._read_into(out, others, got)
            clock = c if clock is None else min(clock, c)
        if not together:
            if check is not None:
                check[1](check[0], got.get(check[0]))
            if note:
                self.kv.set_many(note)
        stats.clock = int(clock or 0)
        return stats

    def _push_batched(self, delta: np.ndarray, mode: str, out: np.ndarray | None,
                      chosen: list[int], others: list[int], check: Check | None,
                      note: dict[str, bytes], stats: PushStats,
                      add: Callable[[str, bytes | None], bytes],
                      clocks: dict[str, int]) -> PushStats:
        """``push`` in round trips of at most one batch each (see the module docstring)."""
        clock: int | None = None
        if mode == "atomic" and hasattr(self.kv, "update_batched"):  # Redis: one transaction
            buf = out if out is not None else np.empty(self.num_params, dtype=np.float32)
            index = {self.keys[i]: self.bounds[i] for i in chosen}
            checked: list[bytes] = []
            lowest: list[int] = []

            def see(key: str, old: bytes | None) -> None:
                if check is not None and key == check[0]:
                    check[1](key, old)  # raising here aborts the whole transaction
                    if old is None:
                        raise MissingState(f"{key} missing from {self.kv.url}")
                    checked[:] = [old]
                    return
                if key in note:
                    return
                if old is None:
                    raise MissingState(f"parameter chunk {key} missing from {self.kv.url}")
                a, b = index[key]
                d = codec.decode(key, old, dtype=np.float32, shape=(b - a,))
                np.add(d.array, delta[a:b], out=buf[a:b])
                clocks[key] = d.clock + 1

            def make(key: str) -> bytes:
                if check is not None and key == check[0]:
                    return checked[0]  # watched, so written back as it was
                if key in note:
                    return note[key]
                a, b = index[key]
                return codec.encode(buf[a:b], clocks[key])

            def see_read(key: str, value: bytes | None) -> None:
                if value is None:
                    raise MissingState(f"parameter chunk {key} missing from {self.kv.url}")
                i = read_index[key]
                lowest.append(self._read_into(out, [i], {key: value}))

            first = ([check[0]] if check is not None else []) + list(note)
            batches = ([first] if first else []) + [[self.keys[i] for i in b]
                                                    for b in self.batches(chosen)]
            read_index = {self.keys[i]: i for i in others} if out is not None else {}
            reads = [[self.keys[i] for i in b] for b in self.batches(others)] if out is not None \
                else []
            stats.retries = self.kv.update_batched(batches, see, make, read=reads,
                                                   see_read=see_read)
            clock = min([*clocks.values(), *lowest], default=None)
            stats.clock = int(clock or 0)
            return stats
        checked_value: bytes | None = None
        for j, batch in enumerate(self.batches(chosen)):
            keys = [self.keys[i] for i in batch]
            extra = [check[0]] if check is not None and j == 0 else []
            if mode == "atomic":
                retries, got = self.kv.update_many(keys, add, read=extra)
                stats.retries += retries
            else:
                got = self.kv.get_many(keys + extra)
                self.kv.set_many({k: add(k, got.get(k)) for k in keys})
            if extra:
                checked_value = got.get(check[0])
        if check is not None and not chosen:
            checked_value = self.kv.get_many([check[0]]).get(check[0])
        clock = min(clocks.values(), default=None)
        if out is not None:
            for batch in self.batches(others):
                keys = [self.keys[i] for i in batch]
                got = self.kv.get_many(keys)
                self._require(keys, got)
                c = self._read_into(out, batch, got)
                clock = c if clock is None else min(clock, c)
        if check is not None:
            check[1](check[0], checked_value)
        if note:
            self.kv.set_many(note)
        stats.clock = int(clock or 0)
        return stats

    def delete(self, doc_names: list[str]) -> None:
        self.kv.delete_many(self.keys + [self.key(n) for n in doc_names])
