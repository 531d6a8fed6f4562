"""Nodes, links, servers and the one request/response primitive every simulated call uses.

A call from a node to a server (``rpc``):

1. the request leaves on the node's uplink (a FIFO at ``link_bandwidth``), then travels half
   the round trip ``rtt / 2`` to the server;
2. it waits in the server's FIFO queue; its service takes ``op + request bytes /
   write_bandwidth + response bytes / bandwidth`` (the server's CPU and NIC in one queue).
   Its effect on the server's data (a read, a write, a compare-and-swap) happens when its
   service starts: FIFO order is the order of effects, so a read sees exactly the writes
   served before it;
3. the response streams back through the node's downlink (a FIFO), pipelined with the
   server's send (whichever is slower decides), then ``rtt / 2``.

The effect runs when the request reaches the server (an event in time order), stamped with
its service start; because every access to that server's data goes through the same FIFO,
applying it then or at its start time is the same. Requests to several servers go out in
parallel and the caller resumes when the last answer is back (``rpc_many``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from emnist.sim.costs import NodeKind, Server
from emnist.sim.events import CPU, CoreCPU, Fifo, Loop, Op, Proc, make_cpu

Effect = Callable[[float], Any]  # called with the service start time; returns the reply


@dataclass
class Node:
    """A machine workers run on: shared cores and one NIC (each direction a FIFO)."""

    index: int
    kind: NodeKind
    cpu: CPU | CoreCPU
    up: Fifo
    down: Fifo
    workers: list[int] = field(default_factory=list)

    @property
    def bw(self) -> float:
        return self.kind.link_bandwidth


@dataclass
class ServerQ:
    """One server: its cost figures and its queue."""

    name: str
    cost: Server
    fifo: Fifo

    def stats(self, horizon: float) -> dict[str, Any]:
        return {"server": self.name, **self.fifo.stats(horizon)}


def make_nodes(loop: Loop, kinds: list[NodeKind]) -> list[Node]:
    nodes = []
    for i, k in enumerate(kinds):
        nodes.append(Node(i, k, make_cpu(loop, k.cores, k.speed, f"node{i}", k.placement),
                          Fifo(f"node{i}:up"), Fifo(f"node{i}:down")))
    return nodes


@dataclass
class Call:
    server: ServerQ
    req: int  # bytes sent
    resp: int  # bytes answered
    effect: Effect | None = None


class Net:
    def __init__(self, loop: Loop) -> None:
        self.loop = loop
        self.calls = 0

    def rpc(self, node: Node, server: ServerQ, req: int, resp: int,
            effect: Effect | None = None) -> Op:
        """One call; the process resumes with the effect's reply."""
        return self.rpc_many(node, [Call(server, req, resp, effect)], single=True)

    def rpc_many(self, node: Node, calls: list[Call], single: bool = False) -> Op:
        """Parallel calls (one per server); the process resumes with the list of replies."""
        def start(p: Proc) -> None:
            loop = self.loop
            state = {"left": len(calls), "done": loop.now, "replies": [None] * len(calls)}
            if not calls:
                p.resume_at(loop.now, [])
                return
            for i, c in enumerate(calls):
                self.calls += 1
                _, sent = node.up.reserve(loop.now, c.req / node.bw, c.req)
                loop.at(sent + c.server.cost.rtt / 2, self._arrive, (p, node, c, i, state,
                                                                     single))
        return start

    def _arrive(self, args: tuple) -> None:
        p, node, c, i, state, single = args
        now = self.loop.now
        cost = c.server.cost
        service = cost.service(c.req, c.resp)
        start, end = c.server.fifo.reserve(now, service, c.req + c.resp)
        state["replies"][i] = c.effect(start) if c.effect is not None else None
        _, got = node.down.reserve(start, c.resp / node.bw, c.resp)
        done = max(end, got) + cost.rtt / 2
        if done > state["done"]:
            state["done"] = done
        if cost.on_node:  # the same cores do the work: done when that CPU job is done too
            state["left"] += 1
            node.cpu.run(cost.rtt + service,
                         lambda: self._cpu_done(p, state, single))
        self._one_done(p, state, single)

    def _cpu_done(self, p: Proc, state: dict, single: bool) -> None:
        state["done"] = max(state["done"], self.loop.now)
        self._one_done(p, state, single)

    def _one_done(self, p: Proc, state: dict, single: bool) -> None:
        state["left"] -= 1
        if state["left"] == 0:
            p.resume_at(max(state["done"], self.loop.now),
                        state["replies"][0] if single else state["replies"])
