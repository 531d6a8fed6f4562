"""The simulated parameter store: real parameters, simulated servers.

:class:`SimKV` is the store's key-value contract (``emnist.store.kv``) in virtual time:
values by key, each with a version (memcached's cas token); ``get_many``/``set_many``/``cas``/
``delete_many`` are calls through :mod:`emnist.sim.net` to the server the key hashes to, with
pymemcache's own rendezvous hash (``HashClient``'s default) over ``host:port`` names. A write
stores a new array and never changes one in place, exactly as a server stores new bytes, so a
value read earlier stays a valid snapshot at no cost.

:class:`SimParams` mirrors ``emnist.store.params.ParameterStore`` over it: the same chunk
layout (``chunk_bytes``), ``fetch`` (one get_many of every chunk), ``push`` (memcached's
``cas_loop``: gets of the chunks, the add per chunk on the client, one cas per chunk, again
for the chunks another writer changed meanwhile; ``overwrite``: get, add, set, losing
concurrent pushes) and the push that doubles as a fetch. Float operations are the real ones
(``np.add(old, delta[a:b])`` per chunk), so one simulated worker computes the bits a real one
does. Per chunk it also counts conflicts (cas retries), lost updates (overwrite) and
staleness (pushes by others between a worker's read of a chunk and its push landing).

:class:`SimTier` mirrors ``emnist.store.tiered.TieredStore``: one node-local server per node
holding ``[params, unsynced]`` rows per chunk, each worker's background syncer taking the
unsynced rows, pushing them to the global store (a push that returns the global vector) and
merging it back.
"""

from __future__ import annotations

from collections.abc import Generator, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from pymemcache.client.rendezvous import RendezvousHash

from emnist.sim.costs import Server
from emnist.sim.events import Fifo, Loop
from emnist.sim.net import Call, Net, Node, ServerQ
from emnist.store.keys import key_for
from emnist.store.outcome import MAX_CONFLICTS
from emnist.store.params import DEFAULT_CHUNK_BYTES, MODES


class CasGaveUp(RuntimeError):
    """A push conflicted more than the real ``cas_loop`` allows (its StoreError)."""


HEADER = 40  # codec header + shape: bytes a value carries besides its array
KEY_BYTES = 48  # a request's bytes per key
REPLY = 16  # a write's reply ("STORED", "EXISTS")
G = Generator[Any, Any, Any]


@dataclass
class Value:
    data: Any  # np.ndarray (never changed in place) or a document
    version: int
    size: int
    clock: int = 0  # the codec clock of a parameter chunk (pushes it has seen)
    writes: int = 0  # pushes landed on the chunk when this value was written (SimParams)


def value_size(data: Any, size: int | None = None) -> int:
    if size is not None:
        return size
    return HEADER + data.nbytes if isinstance(data, np.ndarray) else HEADER + 200


class SimKV:
    """Keys over ``servers`` (rendezvous hashing), every access a simulated call."""

    def __init__(self, loop: Loop, net: Net, cost: Server, servers: int, name: str = "store"
                 ) -> None:
        self.loop, self.net = loop, net
        self.servers = [ServerQ(f"{name}{i}", cost, Fifo(f"{name}{i}")) for i in range(servers)]
        self._hash = RendezvousHash()
        self._names = {}
        for i in range(servers):
            host = f"10.0.{i // 256}.{i % 256}:11211"
            self._hash.add_node(host)
            self._names[host] = self.servers[i]
        self._where: dict[str, ServerQ] = {}
        self.values: dict[str, Value] = {}
        self._version = 0

    def server(self, key: str) -> ServerQ:
        s = self._where.get(key)
        if s is None:
            s = self._where[key] = (self.servers[0] if len(self.servers) == 1
                                    else self._names[self._hash.get_node(key)])
        return s

    def _by_server(self, keys: Iterable[str]) -> dict[int, list[str]]:
        groups: dict[int, list[str]] = {}
        for k in keys:
            groups.setdefault(id(self.server(k)), []).append(k)
        return groups

    # -- immediate access (setup, not timed) -----------------------------------------------
    def put_now(self, key: str, data: Any, size: int | None = None) -> None:
        self._version += 1
        self.values[key] = Value(data, self._version, value_size(data, size))

    def write(self, key: str, data: Any, size: int | None = None, clock: int = 0,
              writes: int = 0) -> int:
        """Store a new value (at the current event); returns its version."""
        self._version += 1
        self.values[key] = Value(data, self._version, value_size(data, size), clock, writes)
        return self._version

    # -- simulated calls (use with ``yield from`` in a process) ----------------------------
    def get_many(self, node: Node, keys: list[str]) -> G:
        """{key: Value} of the present keys, each read when its server serves the call."""
        calls = []
        for ks in self._by_server(keys).values():
            def read(_t: float, ks: list[str] = ks) -> dict[str, Value]:
                return {k: self.values[k] for k in ks if k in self.values}
            size = sum(self.values[k].size for k in ks if k in self.values)
            calls.append(Call(self.server(ks[0]), KEY_BYTES * len(ks), size + REPLY, read))
        replies = yield self.net.rpc_many(node, calls)
        out: dict[str, Value] = {}
        for r in replies:
            out.update(r)
        return out

    def set_many(self, node: Node, values: Mapping[str, Any],
                 sizes: Mapping[str, int] | None = None) -> G:
        calls = []
        for ks in self._by_server(values).values():
            def store(_t: float, ks: list[str] = ks) -> None:
                for k in ks:
                    self.write(k, values[k], (sizes or {}).get(k))
            size = sum(value_size(values[k], (sizes or {}).get(k)) for k in ks)
            calls.append(Call(self.server(ks[0]), size + KEY_BYTES * len(ks), REPLY, store))
        yield self.net.rpc_many(node, calls)

    def cas(self, node: Node, key: str, compute: Any, version: int) -> G:
        """Store ``compute(current)`` -> (data, clock, writes) if the key still has
        ``version``; True if it did. ``compute`` is called only when the cas succeeds (at
        the server: the new bytes were computed by the client from the value it read, which
        is then still current)."""
        def swap(_t: float) -> Any:
            v = self.values.get(key)
            if v is None or v.version != version:
                return None
            data, clock, writes = compute(v)
            self.write(key, data, clock=clock, writes=writes)
            return data
        size = self.values[key].size if key in self.values else HEADER
        return (yield self.net.rpc(node, self.server(key), size + KEY_BYTES, REPLY, swap))

    def delete_many(self, node: Node, keys: list[str]) -> G:
        calls = []
        for ks in self._by_server(keys).values():
            def drop(_t: float, ks: list[str] = ks) -> None:
                for k in ks:
                    self.values.pop(k, None)
            calls.append(Call(self.server(ks[0]), KEY_BYTES * len(ks), REPLY, drop))
        yield self.net.rpc_many(node, calls)

    def stats(self, horizon: float) -> list[dict[str, Any]]:
        return [s.stats(horizon) for s in self.servers]


@dataclass
class Counters:
    pushes: int = 0
    fetches: int = 0
    conflicts: int = 0  # cas retries
    lost: int = 0  # updates an overwrite push destroyed
    staleness_sum: int = 0
    staleness_max: int = 0
    staleness_n: int = 0
    bytes_pushed: int = 0
    bytes_fetched: int = 0
    hist: dict[int, int] = field(default_factory=dict)

    def stale(self, s: int) -> None:
        self.staleness_sum += s
        self.staleness_n += 1
        self.staleness_max = max(self.staleness_max, s)
        b = 0 if s <= 0 else int(np.ceil(np.log2(s + 1)))  # 0, 1, 2-3, 4-7, ...
        self.hist[b] = self.hist.get(b, 0) + 1


class SimParams:
    """``ParameterStore`` in virtual time: chunked global vector, fetch, push (cas loop)."""

    def __init__(self, kv: SimKV, run_id: str, num_params: int,
                 chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> None:
        self.kv, self.run_id = kv, run_id
        self.chunk = max(1, chunk_bytes // 4)
        self.num_params = num_params
        starts = range(0, num_params, self.chunk)
        self.bounds = [(a, min(a + self.chunk, num_params)) for a in starts]
        self.keys = [key_for(run_id, "w", i) for i in range(len(self.bounds))]
        self.clock = [0] * len(self.keys)  # writes landed per chunk (staleness is in these)
        self.counters = Counters()

    def key(self, *parts: object) -> str:
        return key_for(self.run_id, *parts)

    def init(self, params: np.ndarray) -> None:
        for k, (a, b) in zip(self.keys, self.bounds):
            self.kv.put_now(k, params[a:b].copy())

    def global_vector(self) -> np.ndarray:
        out = np.empty(self.num_params, dtype=np.float32)
        for k, (a, b) in zip(self.keys, self.bounds):
            out[a:b] = self.kv.values[k].data
        return out

    # -- documents ---------------------------------------------------------------------------
    def put_doc(self, node: Node, name: str, obj: Any, size: int = 200) -> G:
        yield from self.kv.set_many(node, {self.key(name): obj}, {self.key(name): size})

    def get_doc(self, node: Node, name: str) -> G:
        got = yield from self.kv.get_many(node, [self.key(name)])
        v = got.get(self.key(name))
        return None if v is None else v.data

    # -- the vector --------------------------------------------------------------------------
    def fetch(self, node: Node, reader: Any) -> G:
        """Read every chunk; ``reader(i, array, clock)`` is called per chunk as it is read."""
        def read_chunks(ks: list[str]) -> Any:
            def read(_t: float) -> None:
                for k in ks:
                    v = self.kv.values[k]
                    reader(self._index[k], v.data, v.writes)
            return read
        calls = [Call(self.kv.server(ks[0]), KEY_BYTES * len(ks),
                      sum(self.kv.values[k].size for k in ks) + REPLY, read_chunks(ks))
                 for ks in self.kv._by_server(self.keys).values()]
        yield self.kv.net.rpc_many(node, calls)
        self.counters.fetches += 1
        self.counters.bytes_fetched += 4 * self.num_params

    @property
    def _index(self) -> dict[str, int]:
        idx = getattr(self, "_idx", None)
        if idx is None:
            idx = self._idx = {k: i for i, k in enumerate(self.keys)}
        return idx

    def push(self, node: Node, delta_of: Any, mode: str, reader: Any | None,
             chunks: Iterable[int] | None, seen: list[int] | None,
             client_cpu: Any, also: list[str] = ()) -> G:
        """global += delta for the chosen chunks (all by default); ``delta_of(i)`` gives chunk
        i's delta when its write lands (the pusher is blocked meanwhile, so this is the delta
        it handed over). ``reader(i, new, clock)`` receives every chunk's new value (pushed or
        read: a push that doubles as a fetch); ``seen`` is the pusher's per-chunk clock as of
        its last read (staleness), updated; ``client_cpu(nbytes)`` is the op charging the
        client's decode + add + encode of a chunk; ``also``: keys read in the first round
        trip (the lease check). Returns (retries, lost)."""
        if mode not in MODES:
            raise ValueError(f"update mode must be one of {MODES}, got {mode!r}")
        chosen = list(range(len(self.keys))) if chunks is None else sorted(set(chunks))
        picked = set(chosen)
        others = [i for i in range(len(self.keys)) if i not in picked]
        kv, c = self.kv, self.counters
        pending = [self.keys[i] for i in chosen]
        extra = [self.keys[i] for i in others] if reader is not None else []
        retries = lost = 0
        idx = self._index

        def apply(i: int, v: Value) -> np.ndarray:
            """The write lands: old chunk + this delta (the real add), clock = old + 1."""
            new = np.add(v.data, delta_of(i))
            if seen is not None:
                c.stale(self.clock[i] - seen[i])
            self.clock[i] += 1
            if seen is not None:
                seen[i] = self.clock[i]
            if reader is not None:
                reader(i, new, self.clock[i])
            return new

        def read_extra(got: dict[str, Value]) -> None:
            for k in extra:
                i = idx[k]
                if seen is not None:
                    seen[i] = got[k].writes
                reader(i, got[k].data, got[k].writes)

        if mode == "overwrite":  # the original's read-add-write: no check, losses possible
            got = yield from kv.get_many(node, pending + extra + list(also))
            yield client_cpu(sum(got[k].size for k in pending))
            read_extra(got)
            calls = []
            for ks in kv._by_server(pending).values():
                def store(_t: float, ks: list[str] = ks) -> None:
                    nonlocal lost
                    for k in ks:
                        # what we read plus our delta, over whatever landed since: those
                        # pushes are gone (the clock counts the pushes a value holds)
                        lost += kv.values[k].clock - got[k].clock
                        kv.write(k, apply(idx[k], got[k]), clock=got[k].clock + 1,
                                 writes=self.clock[idx[k]])
                calls.append(Call(kv.server(ks[0]),
                                  sum(got[k].size for k in ks) + KEY_BYTES * len(ks), REPLY,
                                  store))
            yield kv.net.rpc_many(node, calls)
            c.lost += lost
        else:
            first = True
            while pending:
                got = yield from kv.get_many(node, pending + (extra + list(also) if first else []))
                if first:
                    read_extra(got)
                    first = False
                again = []
                for k in pending:
                    v = got[k]
                    yield client_cpu(v.size)  # decode, add, encode this chunk
                    ok = yield from kv.cas(node, k, lambda cur, i=idx[k]: (
                        apply(i, cur), cur.clock + 1, self.clock[i]), v.version)
                    if ok is None:
                        again.append(k)
                retries += len(again)
                if retries > MAX_CONFLICTS:  # the real cas_loop's limit
                    c.conflicts += retries
                    raise CasGaveUp(f"gave up after {retries} cas conflicts on {again[:1]}")
                pending = again
            c.conflicts += retries
        c.pushes += 1
        c.bytes_pushed += 4 * sum(self.bounds[i][1] - self.bounds[i][0] for i in chosen)
        return retries, lost
