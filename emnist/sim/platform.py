"""The serverless platform and the broker, in virtual time.

:class:`Functions` (emnist-grad behind the gateway): a call pays the gateway's ``invoke`` and
``per_byte`` costs (as CPU work on the caller's node when ``gateway.on_node``, the local
gateway; else as a delay), takes a warm idle instance or starts one (``cold_start``) while
fewer than ``concurrency`` run, else queues FIFO; ``instances`` > 0 keeps that many warm
(local replicas, never cold) and caps them. An instance idle for ``keep_warm`` s is reclaimed.
The execution (billed per call: ``memory_gb`` x its duration) is the handler's fixed work, a
fetch of the step's parameters from the store unless the instance already holds them (the
real handler caches recent steps' per replica, 256 MB: so does an instance) and the work of
taking them (``params_fetch``), the gradient (the model's compute cost at
``functions.speed``) and encoding the gradient; its response then streams back through the
gateway. With ``on_node`` the instances share the node's cores with the peers (one machine).

:class:`Broker` (Redis Streams, ``emnist.p2p.broker.RedisBroker``): a publish is one XADD
call carrying the message, visible to readers when served; a reader's XREAD returns every
entry past its cursor (its own included, as a real stream read does) or blocks at the server
until one lands; the peer ignores its own entries, as ``receive`` does. One server FIFO.
"""

from __future__ import annotations

import math
from collections import OrderedDict, deque
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from emnist.sim.costs import Costs, NodeKind
from emnist.sim.events import CPU, Fifo, Loop, Proc
from emnist.sim.net import Net, Node, ServerQ

G = Generator[Any, Any, Any]
PARAMS_CACHE_BYTES = 256 << 20  # emnist-grad's cache of recent steps' parameters per replica


@dataclass
class Instance:
    index: int
    params: OrderedDict = field(default_factory=OrderedDict)  # cached keys, least recent first
    idle_since: float = 0.0
    calls: int = 0

    def holds(self, key: str, nbytes: int) -> bool:
        """True if ``key`` is cached (made most recent); else it is now, evicting the least
        recent past the handler's cache size (it keeps at least one)."""
        if key in self.params:
            self.params.move_to_end(key)
            return True
        self.params[key] = None
        while len(self.params) > max(1, PARAMS_CACHE_BYTES // max(1, nbytes)):
            self.params.popitem(last=False)
        return False


class Functions:
    def __init__(self, loop: Loop, net: Net, costs: Costs, nodes: list[Node]) -> None:
        self.loop, self.net, self.costs = loop, net, costs
        f, self.g = costs["functions"], costs["gateway"]
        self.f = f
        self.fixed = f["instances"]
        limit = f["concurrency"] or math.inf
        self.limit = min(limit, self.fixed) if self.fixed else limit
        self.on_node = f["on_node"]
        if self.on_node:
            self.node = nodes[0]
        else:  # each instance its own core and NIC: a platform of unbounded cores
            kind = NodeKind("functions", 1, 1e9, f["speed"], 0.0, 1e12)
            self.node = Node(-1, kind, CPU(loop, 1e9, f["speed"], "functions"), Fifo("fn:up"),
                             Fifo("fn:down"))
        self.idle: list[Instance] = [Instance(i) for i in range(self.fixed)]
        self.count = self.fixed
        self.running = 0
        self.queue: deque[tuple[Proc, Any]] = deque()
        self.cold_starts = 0
        self.calls = 0
        self.durations: list[float] = []
        self.queue_wait = 0.0
        self.max_running = 0

    def _gateway(self, node: Node, nbytes: int) -> Any:
        work = self.g["invoke"] / 2 + self.g["per_byte"] * nbytes  # each direction half
        return node.cpu.op(self.g["io_factor"] * work) if self.g["on_node"] else work

    def acquire(self) -> Any:
        """A process op: resume with (instance, cold) once one may run."""
        def start(p: Proc) -> None:
            if self.running < self.limit:
                self.running += 1
                self.max_running = max(self.max_running, self.running)
                p.resume_at(self.loop.now, self._take())
            else:
                self.queue.append((p, self.loop.now))
        return start

    def _take(self) -> tuple[Instance, bool]:
        keep = self.f["keep_warm"]
        now = self.loop.now
        if not self.fixed:  # reclaim instances idle too long
            fresh = [i for i in self.idle if now - i.idle_since <= keep]
            self.count -= len(self.idle) - len(fresh)
            self.idle = fresh
        if self.idle:
            return self.idle.pop(), False
        self.count += 1
        self.cold_starts += 1
        return Instance(self.count), True

    def release(self, inst: Instance) -> None:
        inst.idle_since = self.loop.now
        self.idle.append(inst)
        if self.queue:
            p, since = self.queue.popleft()
            self.queue_wait += self.loop.now - since
            p.resume_at(self.loop.now, self._take())
        else:
            self.running -= 1

    def call(self, caller: Node, store: Any, params_key: str, params_bytes: int, work: float,
             resp_bytes: int) -> G:
        """One emnist-grad call from ``caller`` (use with ``yield from``)."""
        self.calls += 1
        req = 400
        yield self._gateway(caller, req)
        inst, cold = yield self.acquire()
        if cold:
            yield self.f["cold_start"]
        t0 = self.loop.now
        node = self.node
        yield node.cpu.op(self.f["handler"]) if self.f["handler"] else 0.0
        if not inst.holds(params_key, params_bytes):
            yield from store.get_many(node, [params_key])
            yield node.cpu.op(self.costs["client"]["decode_per_byte"] * params_bytes
                              + self.f["params_fetch"])
        yield node.cpu.op(work)
        yield node.cpu.op(self.costs["client"]["encode_per_byte"] * resp_bytes)
        inst.calls += 1
        self.durations.append(self.loop.now - t0)
        self.release(inst)
        yield self._gateway(caller, resp_bytes)
        if not self.on_node:  # the gradient crosses the caller's link
            _, got = caller.down.reserve(self.loop.now, resp_bytes / caller.bw, resp_bytes)
            yield max(0.0, got - self.loop.now)

    def report(self) -> dict[str, Any]:
        d = self.durations
        return {"function_calls": self.calls, "cold_starts": self.cold_starts,
                "function_instances": self.count, "function_max_running": self.max_running,
                "function_mean_s": sum(d) / len(d) if d else 0.0,
                "function_queue_wait_s": self.queue_wait}


@dataclass
class _Reader:
    proc: Proc
    node: Node
    cursor: int


@dataclass
class _Stream:
    entries: list[tuple[int, int, Any]] = field(default_factory=list)  # (sender, bytes, data)
    blocked: list[_Reader] = field(default_factory=list)


class Broker:
    """Redis Streams for peers: one stream per topic, every peer reads every entry."""

    def __init__(self, loop: Loop, net: Net, costs: Costs, seed: int = 0) -> None:
        self.loop, self.net = loop, net
        self.server = ServerQ("broker", costs.broker, Fifo("broker"))
        self.streams: dict[str, _Stream] = {}
        b = costs["broker"]
        self.wake, self.wake_spread, self.io_factor = b["wake"], b["wake_spread"], b["io_factor"]
        self.rng = np.random.default_rng([seed, 0xB0])

    def publish(self, node: Node, topic: str, sender: int, nbytes: int, data: Any) -> G:
        def land(_t: float) -> None:
            s = self.streams.setdefault(topic, _Stream())
            s.entries.append((sender, nbytes, data))
            blocked, s.blocked = s.blocked, []
            for r in blocked:  # a blocked XREAD returns later than a plain call would
                delay = self.wake
                if delay and self.wake_spread:
                    delay *= float(self.rng.lognormal(0.0, self.wake_spread))
                if delay:
                    self.loop.after(delay, lambda _, r=r: self._serve(topic, r))
                else:
                    self._serve(topic, r)
        yield self.net.rpc(node, self.server, nbytes + 100, 20, land)
        yield from self._extra(node, nbytes + 120)

    def read(self, node: Node, topic: str, cursor: int) -> Any:
        """A process op: the entries past ``cursor`` (blocking until there is one)."""
        return lambda p: self._start(p, node, topic, cursor)

    def _start(self, p: Proc, node: Node, topic: str, cursor: int) -> None:
        _, sent = node.up.reserve(self.loop.now, 100 / node.bw, 100)
        self.loop.at(sent + self.server.cost.rtt / 2,
                     lambda _: self._arrive(topic, _Reader(p, node, cursor)))

    def _arrive(self, topic: str, r: _Reader) -> None:
        s = self.streams.setdefault(topic, _Stream())
        if len(s.entries) > r.cursor:
            self._serve(topic, r)
        else:
            s.blocked.append(r)

    def _serve(self, topic: str, r: _Reader) -> None:
        s = self.streams[topic]
        got = s.entries[r.cursor:r.cursor + 64]  # XREAD COUNT 64
        nbytes = sum(b for _, b, _ in got) + 50
        start, end = self.server.fifo.reserve(self.loop.now, self.server.cost.service(100, nbytes),
                                              nbytes)
        _, down = r.node.down.reserve(start, nbytes / r.node.bw, nbytes)
        done = max(end, down) + self.server.cost.rtt / 2
        if self.server.cost.on_node:  # one machine: the read's work is on the reader's cores
            work = self.io_factor * (self.server.cost.rtt + self.server.cost.service(100, nbytes))
            r.node.cpu.run(work, lambda: r.proc.resume_at(max(done, self.loop.now), got))
        else:
            r.proc.resume_at(done, got)

    def delete(self, node: Node, topic: str) -> G:
        def drop(_t: float) -> None:
            self.streams.pop(topic, None)
        yield self.net.rpc(node, self.server, 80, 20, drop)
        yield from self._extra(node, 100)

    def _extra(self, node: Node, nbytes: int) -> G:
        """The io_factor's share of an on-node call beyond the work ``rpc`` charged."""
        c = self.server.cost
        if c.on_node and self.io_factor > 1:
            yield node.cpu.op((self.io_factor - 1) * (c.rtt + c.service(nbytes, 20)))

    def stats(self, horizon: float) -> dict[str, Any]:
        return self.server.stats(horizon)
