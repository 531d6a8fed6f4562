"""The simulator's clock, queues and store semantics, against closed-form answers."""

from __future__ import annotations

import math

import numpy as np
import pytest

from emnist.sim.costs import NodeKind, Server
from emnist.sim.events import CPU, CoreCPU, Fifo, Loop
from emnist.sim.net import Net, make_nodes
from emnist.sim.store import KEY_BYTES, REPLY, SimKV, SimParams


def _net(rtt=0.0, op=0.0, bw=1e12, wbw=1e12, link=1e15, servers=1):
    loop = Loop()
    net = Net(loop)
    nodes = make_nodes(loop, [NodeKind("n", 1, 4, 1.0, 1.0, link)] * 3)
    kv = SimKV(loop, net, Server(rtt, op, bw, wbw), servers)
    return loop, net, nodes, kv


def test_events_run_in_time_order_ties_in_scheduling_order_and_never_go_back():
    loop, seen = Loop(), []
    for t, name in [(2.0, "c"), (1.0, "a"), (1.0, "b"), (0.5, "first")]:
        loop.at(t, seen.append, name)
    loop.run()
    assert seen == ["first", "a", "b", "c"] and loop.now == 2.0
    with pytest.raises(ValueError, match="before now"):
        loop.at(1.0, seen.append, "late")
    with pytest.raises(ValueError):
        loop.at(float("nan"), seen.append, "nan")


def test_processes_sleep_and_resume_with_values_in_virtual_time():
    loop, log = Loop(), []

    def proc(name, dt):
        for _ in range(3):
            yield dt
            log.append((round(loop.now, 9), name))
    loop.spawn(proc("slow", 0.3))
    loop.spawn(proc("fast", 0.2))
    loop.run()
    times = [t for t, _ in log]
    assert times == sorted(times)  # virtual time is monotone
    assert log[:3] == [(0.2, "fast"), (0.3, "slow"), (0.4, "fast")]
    assert loop.now == pytest.approx(0.9)


def test_fifo_queue_waits_add_up():
    f = Fifo("s")
    assert f.reserve(0.0, 1.0) == (0.0, 1.0)
    assert f.reserve(0.5, 1.0) == (1.0, 2.0)  # queued 0.5 s
    assert f.reserve(3.0, 1.0) == (3.0, 4.0)  # idle server: no wait
    assert f.waited == 0.5 and f.max_wait == 0.5 and f.busy == 3.0 and f.requests == 3


def test_processor_sharing_matches_the_closed_form():
    loop, done = Loop(), {}
    cpu = CPU(loop, cores=2)
    for name in "abc":  # 3 equal jobs on 2 cores: each at 2/3 speed, all done at 1.5
        cpu.run(1.0, lambda n=name: done.setdefault(n, loop.now))
    loop.run()
    assert done == pytest.approx({"a": 1.5, "b": 1.5, "c": 1.5})
    loop, done = Loop(), {}
    cpu = CPU(loop, cores=1, speed=2.0)
    cpu.run(2.0, lambda: done.setdefault("short", loop.now))  # rate 1 each while both run
    cpu.run(4.0, lambda: done.setdefault("long", loop.now))
    loop.run()  # short: 2 work at rate 1 -> t=2; long: 2 left at rate 2 -> t=3
    assert done == pytest.approx({"short": 2.0, "long": 3.0})
    assert cpu.busy == pytest.approx(3.0)


def test_a_saturated_server_serves_at_its_bandwidth():
    """N clients fetching back to back from one server: once the queue never empties, the k-th
    answer leaves at k service times, a service being op + request / write_bandwidth +
    response / bandwidth (closed form)."""
    op, bw, wbw, nbytes = 1e-5, 1e8, 5e8, 100_000
    loop, net, nodes, kv = _net(op=op, bw=bw, wbw=wbw)
    kv.put_now("k", np.zeros(nbytes // 4, np.float32))
    size = kv.values["k"].size
    service = op + KEY_BYTES / wbw + (size + REPLY) / bw
    finished = []

    def client(node):
        while True:
            yield from kv.get_many(node, ["k"])
            finished.append(loop.now)
    for n in nodes:
        loop.spawn(client(n))
    horizon = 0.1
    loop.run(until=horizon)
    assert len(finished) == math.floor(horizon / service)
    assert finished[:3] == pytest.approx([service, 2 * service, 3 * service])
    s = kv.servers[0].fifo.stats(horizon)
    assert s["utilisation"] == pytest.approx(1.0, abs=service / horizon + 1e-9)
    # bytes count every request taken in, the two still queued at the horizon included
    assert s["bytes_per_s"] == pytest.approx((size + REPLY + KEY_BYTES) / service, rel=0.05)


def test_a_fetch_sees_exactly_the_pushes_served_before_it():
    """Pushes of distinct powers of two from three nodes at staggered times and a round trip
    of 2 ms: the value a fetch reads is the sum of exactly the pushes whose cas was served
    before the fetch was (by service start), whatever order they were sent in."""
    loop, net, nodes, kv = _net(rtt=2e-3, op=1e-4, bw=1e9, wbw=1e9)
    ps = SimParams(kv, "t", 4, chunk_bytes=1024)
    ps.init(np.zeros(4, np.float32))
    landed = {}

    def pusher(node, value, start):
        yield start
        delta = np.full(4, value, np.float32)

        def delta_of(i):
            landed[value] = loop.now  # the cas's effect runs when it is served
            return delta
        yield from ps.push(node, delta_of, "atomic", None, None, None, lambda n: 0.0)

    reads = []

    def fetcher(node, start):
        yield start

        def read(i, arr, clock):
            reads.append((loop.now, float(arr[0]), clock))
        yield from ps.fetch(node, read)

    for k, t in enumerate([0.0, 0.0005, 0.004, 0.0041, 0.009]):
        loop.spawn(pusher(nodes[k % 3], float(2 ** k), t))
    for t in (0.0001, 0.003, 0.0045, 0.006, 0.02):
        loop.spawn(fetcher(nodes[1], t))
    loop.run()
    assert len(landed) == 5 and len(reads) == 5
    for at, value, clock in reads:
        before = [v for v, t in landed.items() if t < at]
        assert value == sum(before) and clock == len(before)
    assert reads[-1][1] == 31.0 and ps.counters.conflicts >= 0


def _pusher(ps, node, value, mode):
    delta = np.full(8, value, np.float32)
    yield from ps.push(node, lambda i: delta, mode, None, None, None,
                       lambda n: 1e-4)  # the client's add: the window between gets and cas


def test_concurrent_atomic_pushes_conflict_and_lose_nothing_overwrite_loses():
    for mode in ("atomic", "overwrite"):
        loop, net, nodes, kv = _net(rtt=1e-3, op=1e-5, bw=1e9, wbw=1e9)
        ps = SimParams(kv, "t", 8, chunk_bytes=1024)
        ps.init(np.zeros(8, np.float32))
        for k, node in enumerate(nodes):
            loop.spawn(_pusher(ps, node, float(10 ** k), mode))
        loop.run()
        total = float(ps.global_vector()[0])
        if mode == "atomic":
            assert total == 111.0 and ps.counters.conflicts == 3 and ps.counters.lost == 0
        else:
            assert total in (1.0, 10.0, 100.0) and ps.counters.lost == 2


def test_keys_spread_over_servers_by_the_memcached_clients_rendezvous_hash():
    from pymemcache.client.rendezvous import RendezvousHash
    loop, net, nodes, kv = _net(servers=4)
    h = RendezvousHash()
    for i in range(4):
        h.add_node(f"10.0.0.{i}:11211")
    keys = [f"emnist:r:w:{i}" for i in range(64)]
    for k in keys:
        assert kv.server(k).name == f"store{int(h.get_node(k).split('.')[-1].split(':')[0])}"
    assert len({kv.server(k).name for k in keys}) == 4


def test_per_core_queues_are_not_work_conserving_past_the_cores():
    """Linux's placement: 3 equal jobs on 2 cores go 2 + 1 and stay, so the pair ends at 2.0
    (ideal sharing would end all three at 1.5); at most ``cores`` jobs it is ideal sharing."""
    loop, done = Loop(), {}
    cpu = CoreCPU(loop, cores=2)
    for name in "abc":
        cpu.run(1.0, lambda n=name: done.setdefault(n, loop.now))
    loop.run()
    assert done == pytest.approx({"a": 2.0, "b": 1.0, "c": 2.0})
    assert cpu.busy == pytest.approx(3.0)
    # fractional cores (what load leaves): two jobs on 1.5 cores each run at 0.75, one alone
    # at full speed; a job that arrives later goes to the emptier core
    loop, done = Loop(), {}
    cpu = CoreCPU(loop, cores=1.5)
    cpu.run(0.75, lambda: done.setdefault("a", loop.now))
    cpu.run(1.5, lambda: done.setdefault("b", loop.now))
    loop.at(1.5, lambda _: cpu.run(0.5, lambda: done.setdefault("c", loop.now)))
    loop.run()  # a: 0.75 at 0.75 -> t=1; b: 0.75 by t=1, then alone at 1 -> t=1.75
    # c arrives at 1.5 on the idle core: both at 0.75 -> b's last 0.25 ends at 1.5+1/3
    assert done["a"] == pytest.approx(1.0)
    assert done["b"] == pytest.approx(1.5 + 0.25 / 0.75)
    assert done["c"] == pytest.approx(1.5 + 0.25 / 0.75 + (0.5 - 0.25) / 1.0)
