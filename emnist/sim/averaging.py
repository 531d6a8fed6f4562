"""Synchronous parameter averaging in virtual time: ``emnist.train.averaging.Averaging``.

Every ``average_every`` minibatches a worker publishes its vector and a marker for round r
(one set_many of its chunks and the marker: its real size), deletes its own round
r - KEEP_ROUNDS, waits at the barrier until every other worker's marker has landed (or the
barrier times out: the missing become suspects, as in the real class), reads the others'
vectors (one get_many: (m - 1) vectors' bytes) and continues from the mean summed in worker
order, then writes ``avglatest`` and its state. A pass end has the lowest live worker write
its vector as the run's global vector.

The barrier's polling (a get of the markers, then 0.5 ms of sleep, until all are there) is
simulated poll by poll when the store is on the workers' machine (``store.on_node``: the
polls take the cores the others compute on, as measured on one machine); for a remote store
it is modelled by its effect: a waiter notices the last marker a seeded fraction of a poll
interval after it lands, then pays one poll's round trip (the polls' own load on the remote
server is not simulated: with 1,000 workers polling, it would be thousands of events per
round).

Math: each worker's published copy is taken when its set is served (the worker is blocked
from then until the round's mean arrives, so it equals its live vector). The mean for a
member set is computed once, ``total += vector`` in worker order then ``* (1/m)`` as the
real ``_average_into`` does, and shared by every worker that averaged the same members: the
bits each real worker computes for itself.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

import numpy as np

from emnist.sim.downpour import end_pass, stopping, train_step
from emnist.sim.engine import Sim, WorkerCtx
from emnist.sim.events import Proc
from emnist.sim.store import SimParams
from emnist.train.averaging import KEEP_ROUNDS, check_finite
from emnist.train.config import TrainConfig
from emnist.train.state import state_key
from emnist.train.worker import SAVE_SECONDS, DropoutSeeds, pass_order

G = Generator[Any, Any, Any]
POLL_S = 0.0005  # the real barrier's sleep between polls
MARKER = 60


class AveragingRun:
    """What the store holds for rounds (vectors, markers) and who waits for them."""

    def __init__(self, sim: Sim, store: SimParams, workers: int) -> None:
        self.sim, self.store, self.n = sim, store, workers
        self.vectors: dict[tuple[int, int], np.ndarray] = {}
        self.landed: dict[int, dict[int, float]] = {}
        self.waiters: dict[int, list[tuple[set[int], Proc, Any]]] = {}
        self.means: dict[tuple[int, tuple[int, ...]], np.ndarray] = {}
        self.timeouts = 0
        self.rounds = 0
        self.wait_s = 0.0
        self.max_wait_s = 0.0

    def publish(self, r: int, w: int, vec: np.ndarray, at: float) -> None:
        self.vectors[(r, w)] = vec.copy()
        self.landed.setdefault(r, {})[w] = at
        still = []
        for need, proc, rng in self.waiters.get(r, []):
            if need <= self.landed[r].keys():
                last = max(self.landed[r][x] for x in need)
                proc.resume_at(max(last, self.sim.loop.now) + float(rng.uniform(0, POLL_S)))
            else:
                still.append((need, proc, rng))
        self.waiters[r] = still

    def drop(self, r: int, w: int) -> None:
        self.vectors.pop((r, w), None)
        self.landed.get(r, {}).pop(w, None)
        for key in [k for k in self.means if k[0] <= r]:
            del self.means[key]

    def wait(self, r: int, need: set[int], rng: np.random.Generator, deadline: float) -> Any:
        """A process op: resume once every worker in ``need`` has landed its round-r marker
        (noticed within a poll interval) or at ``deadline``."""
        def start(p: Proc) -> None:
            landed = self.landed.get(r, {})
            if need <= landed.keys():
                last = max((landed[x] for x in need), default=self.sim.loop.now)
                p.resume_at(max(last, self.sim.loop.now) + float(rng.uniform(0, POLL_S)))
                return
            entry = (need, p, rng)
            self.waiters.setdefault(r, []).append(entry)

            def expire(_: Any) -> None:
                if entry in self.waiters.get(r, []):
                    self.waiters[r].remove(entry)
                    p.resume()
            self.sim.loop.at(max(deadline, self.sim.loop.now), expire)
        return start

    def mean(self, r: int, members: list[int]) -> np.ndarray:
        key = (r, tuple(members))
        m = self.means.get(key)
        if m is None:
            t = time.perf_counter()
            total = np.zeros(self.store.num_params, dtype=np.float32)
            for w in members:
                total += self.vectors[(r, w)]
            m = np.multiply(total, np.float32(1.0 / len(members)))
            self.means[key] = m
            self.sim.math(t)
        return m

    def report(self) -> dict[str, Any]:
        return {"rounds": self.rounds, "barrier_timeouts": self.timeouts,
                "barrier_wait_mean_s": self.wait_s / self.rounds if self.rounds else 0.0,
                "barrier_wait_max_s": self.max_wait_s}


def average(sim: Sim, ctx: WorkerCtx, run: AveragingRun, r: int, cfg: TrainConfig,
            suspect: set[int], stop: list) -> G:
    """``Averaging.average`` for round r."""
    check_finite(ctx.params)
    store, node, st, w = run.store, ctx.node, ctx.st, ctx.w
    kv, n = store.kv, sim.num_params
    others = [x for x in range(run.n) if x != w]
    keys = [store.key("avg", r, w, i) for i in range(len(store.bounds))]
    marker = store.key("avgdone", r, w)
    yield sim.cpu(node, sim.client(encode=4 * n))
    values: dict[str, Any] = dict.fromkeys(keys)  # sizes below; the math uses run.vectors
    sizes = {k: 40 + 4 * (b - a) for k, (a, b) in zip(keys, store.bounds)}
    values[marker], sizes[marker] = None, MARKER
    published = {"at": None}

    def land(t: float) -> None:
        if published["at"] is None:
            published["at"] = t
            run.publish(r, w, ctx.params, t)
    yield from _set(kv, node, values, sizes, land)
    if r > KEEP_ROUNDS:
        old = [store.key("avg", r - KEEP_ROUNDS, w, i) for i in range(len(store.bounds))]
        yield from kv.delete_many(node, old + [store.key("avgdone", r - KEEP_ROUNDS, w)])
        run.drop(r - KEEP_ROUNDS, w)
    t_wait = sim.loop.now
    deadline = sim.loop.now + cfg.barrier_timeout
    need = {x for x in others if x not in suspect}
    poll_keys = [store.key("avgdone", r, x) for x in others] + [store.key("stop")]
    if kv.servers[0].cost.on_node:
        # one machine: the real loop's polls (a get_many, then 0.5 ms of sleep) take the
        # cores the other workers compute on, so they are simulated one by one
        while True:
            got = yield from kv.get_many(node, poll_keys)
            if all(store.key("avgdone", r, x) in got for x in need) \
                    or store.key("stop") in got or sim.loop.now > deadline:
                break
            yield POLL_S
    else:  # a remote store: the waiter notices the last marker within a poll interval
        yield run.wait(r, need, ctx.rng, deadline)
        got = yield from kv.get_many(node, poll_keys)  # the poll that sees them
    present = sorted(x for x in others if store.key("avgdone", r, x) in got
                     and (r, x) in run.vectors)
    if store.key("stop") in got:
        stop[0] = got[store.key("stop")].data
    waiting = [x for x in others if x not in present and x not in suspect]
    if waiting:
        st.barrier_timeouts.append({"round": r, "missing": waiting,
                                    "after_s": cfg.barrier_timeout})
        suspect.update(waiting)
        run.timeouts += 1
    suspect.difference_update(present)
    waited = sim.loop.now - t_wait
    run.wait_s += waited / run.n
    run.max_wait_s = max(run.max_wait_s, waited)
    members = sorted({*present, w})
    if len(members) > 1:
        yield from kv.get_many(node, [store.key("avg", r, x, i) for x in members if x != w
                                      for i in range(len(store.bounds))])
    yield sim.cpu(node, sim.client(decode=4 * n * (len(members) - 1),
                                   vector=4 * n * (len(members) + 1)))
    ctx.params[:] = run.mean(r, members)
    st.averages += 1
    st.bytes_fetched += 4 * n * (len(members) - 1)
    st.bytes_pushed += 4 * n
    if w == min(members):
        run.rounds += 1
    yield from store.put_doc(node, "avglatest", {"round": r}, 60)


def _set(kv: Any, node: Any, values: dict, sizes: dict, on_land: Any) -> G:
    """set_many whose effect also calls ``on_land(service start)`` (the marker landing)."""
    from emnist.sim.net import Call
    from emnist.sim.store import KEY_BYTES, REPLY
    calls = []
    for ks in kv._by_server(values).values():
        def store(t: float, ks: list[str] = ks) -> None:
            for k in ks:
                kv.write(k, values[k], sizes[k])
            on_land(t)
        calls.append(Call(kv.server(ks[0]), sum(sizes[k] for k in ks) + KEY_BYTES * len(ks),
                          REPLY, store))
    yield kv.net.rpc_many(node, calls)


def averaging_worker(sim: Sim, ctx: WorkerCtx, run: AveragingRun, data: tuple,
                     steps_per_pass: int, cfg: TrainConfig, started: float) -> G:
    """``run_worker`` with ``Averaging`` as its exchange (see the module docstring)."""
    yield from stopping(sim, ctx, _averaging_worker(sim, ctx, run, data, steps_per_pass, cfg,
                                                    started))


def _averaging_worker(sim: Sim, ctx: WorkerCtx, run: AveragingRun, data: tuple,
                      steps_per_pass: int, cfg: TrainConfig, started: float) -> G:
    shard_x, shard_y, test_x, test_y = data
    yield max(0.0, started - sim.loop.now)
    t_start = sim.loop.now
    store, st, node = run.store, ctx.st, ctx.node
    n = sim.num_params
    ctx.params = np.empty(n, dtype=np.float32)

    def first(i: int, arr: np.ndarray, clock: int) -> None:
        a, b = store.bounds[i]
        ctx.params[a:b] = arr
    yield from store.fetch(node, first)
    yield sim.cpu(node, sim.client(decode=4 * n))
    st.fetches += 1
    st.bytes_fetched += 4 * n
    yield from store.get_doc(node, "avglatest")  # rejoin: nothing newer at the start
    doc = sim.costs["store"]["doc_bytes"]
    skey = store.key(state_key(ctx.w))
    seeds = DropoutSeeds(cfg.seed, ctx.w)
    alpha, bs, every = np.float32(cfg.alpha), cfg.batch_size, cfg.average_every
    suspect: set[int] = set()
    stop: list = [None]
    last_save = sim.loop.now
    limit = sim.cfg.max_steps
    others = [x for x in range(run.n) if x != ctx.w]
    while not st.done and st.iteration < cfg.iterations:
        it = st.iteration + 1
        order = pass_order(cfg, ctx.w, it, len(shard_y), steps_per_pass)
        t0 = sim.loop.now
        halted = ""
        for pos in range(st.offset, len(order)):
            yield from train_step(sim, ctx, seeds, it, pos, order[pos], shard_x, shard_y,
                                  alpha, bs)
            if st.step % every == 0:
                yield from average(sim, ctx, run, st.step // every, cfg, suspect, stop)
                yield from store.kv.set_many(node, {skey: None}, {skey: doc})  # save_now
                last_save = sim.loop.now
            if stop[0]:
                break
            if sim.stopped or (limit and st.step >= limit):
                halted = "sample budget" if sim.stopped else "max steps"
                break
            if sim.loop.now - last_save > SAVE_SECONDS:
                yield from store.kv.set_many(node, {skey: None}, {skey: doc})
                last_save = sim.loop.now
        if all(x > ctx.w or x in suspect for x in others):  # end_iteration: lowest live id
            check_finite(ctx.params)
            yield sim.cpu(node, sim.client(encode=4 * n))
            yield from store.kv.set_many(
                node, {k: ctx.params[a:b].copy() for k, (a, b) in zip(store.keys, store.bounds)})
        st.train_seconds += sim.loop.now - t0
        if st.offset >= len(order):
            st.iteration, st.offset = it, 0
        yield from end_pass(sim, ctx, store, cfg, stop[0], halted, data, t_start)
        last_save = sim.loop.now
    yield from store.kv.set_many(node, {skey: None}, {skey: doc})
    yield from store.put_doc(node, f"result:{ctx.w}", None, doc)
    st.seconds = sim.loop.now - t_start
    ctx.finished = sim.loop.now
