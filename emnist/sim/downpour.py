"""Downpour workers in virtual time, and the run around them (shared with averaging).

``downpour_worker`` mirrors ``emnist.train.worker.run_worker`` with ``Exchange`` (no overlap),
step for step: the first fetch; per pass the real ``pass_order``; per minibatch the real
``DropoutSeeds`` mask, the model's gradient, ``grad *= -alpha; params += grad``; every
``n_push`` / ``n_fetch`` minibatches ``Exchange.start`` (sparse ``_select``, ``_hand_over``,
the push that doubles as a fetch, ``_apply``: params = fresh + (params - base)); a read of the
stop document every ``STOP_CHECK_EVERY`` exchanges; heartbeats every ``SAVE_SECONDS``; at a
pass end ``flush`` (params = the fetched vector), the evaluation, ``decide``, the stop
document when the target is reached and the state save; at the end the lease release and the
result document. Each of those store accesses is a simulated call with its real size.

The local copy is changed only by its own worker, which is blocked while its exchange is in
flight, so each chunk's hand-over and apply run when that chunk's write (or read) is served:
the same float operations on the same values as the real whole-vector ones, with
chunk-sized temporaries instead of the real ``_sent``/``_fresh`` buffers.

``run_store_algorithm`` mirrors ``emnist.train.run.setup_run`` + ``train_worker``: the real
shards, ``init_params(seed)`` in the store, ``steps_per_pass`` as ``_describe`` computes it,
workers launched one async invocation after another.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any

import numpy as np

from emnist.data import open_shard, open_test, prepare_shards
from emnist.data.shards import Shard
from emnist.sim.engine import Sim, WorkerCtx
from emnist.sim.store import CasGaveUp, SimParams
from emnist.train.config import TrainConfig
from emnist.train.downpour import STOP_CHECK_EVERY
from emnist.train.state import Diverged, require_finite, state_key
from emnist.train.worker import SAVE_SECONDS, DropoutSeeds, decide, pass_order

G = Generator[Any, Any, Any]
NOTE_BYTES = 150  # a push's progress note (13 float64 counters, codec-framed)
STOP_DOC = 120


class Exchange:
    """``emnist.train.downpour.Exchange`` (no overlap) for one simulated worker."""

    def __init__(self, sim: Sim, ctx: WorkerCtx, vec: Any, cfg: TrainConfig) -> None:
        self.sim, self.ctx, self.vec, self.cfg = sim, ctx, vec, cfg
        self.n_push, self.n_fetch, self.mode = cfg.n_push, cfg.n_fetch, cfg.update
        self.threshold, self.top_k = cfg.push_threshold, cfg.push_top_k
        self.count = 0
        self.stop: dict | None = None
        self.nbytes = 4 * sim.num_params
        self.tiered = getattr(vec, "tiered", False)
        self.note = sim.costs["store"]["note_per_push"] or self.tiered
        self.lease_key = [vec.key(state_key(ctx.w))] if self.note and not self.tiered else []

    # the callbacks run when a chunk's write or read is served ------------------------------
    def delta_of(self, i: int) -> np.ndarray:
        """``_hand_over`` for chunk i: the delta sent; the chunk counts as the store's now."""
        a, b = self.vec.bounds[i]
        p, base = self.ctx.params, self.ctx.base
        d = np.subtract(p[a:b], base[a:b])
        base[a:b] = p[a:b]
        return d

    def apply(self, i: int, fresh: np.ndarray, clock: int) -> None:
        """``_apply`` for chunk i: params = fresh + pending; base = fresh."""
        a, b = self.vec.bounds[i]
        p, base = self.ctx.params, self.ctx.base
        np.add(fresh, np.subtract(p[a:b], base[a:b]), out=p[a:b])
        base[a:b] = fresh
        self.ctx.seen[i] = clock

    def replace(self, i: int, fresh: np.ndarray, clock: int) -> None:
        """``flush``'s end for chunk i: params = fresh; base = fresh."""
        a, b = self.vec.bounds[i]
        self.ctx.params[a:b] = fresh
        self.ctx.base[a:b] = fresh
        self.ctx.seen[i] = clock

    def select(self) -> list[int] | None:
        """``_select``: sparse pushes send only chunks whose pending RMS is large enough."""
        if not (self.threshold or self.top_k):
            return None
        p = np.subtract(self.ctx.params, self.ctx.base)
        rms = [float(np.sqrt(np.dot(p[a:b], p[a:b]) / (b - a))) for a, b in self.vec.bounds]
        chosen = [i for i, r in enumerate(rms) if r >= self.threshold]
        if self.top_k:
            chosen = sorted(chosen, key=lambda i: -rms[i])[: self.top_k]
        return chosen

    # the exchange ----------------------------------------------------------------------------
    def client_cpu(self, nbytes: int) -> Any:
        return self.sim.cpu(self.ctx.node, self.sim.client(decode=nbytes, encode=nbytes,
                                                           vector=nbytes))

    def run(self, push: bool, fetch: bool, check: bool, chunks: list[int] | None,
            reader: Any) -> G:
        """``_run``: the push (doubling as the fetch) or the fetch, then the stop check."""
        sim, ctx, st, vec = self.sim, self.ctx, self.ctx.st, self.vec
        node = ctx.node
        if push:
            yield sim.cpu(node, sim.client(vector=self.nbytes))  # the delta
            retries, _ = yield from vec.push(node, self.delta_of, self.mode,
                                             reader if fetch else None, chunks, ctx.seen,
                                             self.client_cpu, also=self.lease_key)
            sent = self.nbytes if chunks is None else 4 * sum(
                vec.bounds[i][1] - vec.bounds[i][0] for i in chunks)
            st.pushes += 1
            st.bytes_pushed += sent
            st.bytes_skipped += self.nbytes - sent
            st.push_retries += retries
            if self.note:  # the progress note; through a tier, the state document instead
                key = vec.key(state_key(ctx.w) if self.tiered else f"note:{ctx.w}")
                size = sim.costs["store"]["doc_bytes"] if self.tiered else NOTE_BYTES
                yield from vec.kv.set_many(node, {key: None}, {key: size})
        elif fetch:
            yield from vec.fetch(node, reader)
            yield sim.cpu(node, sim.client(decode=self.nbytes))
        if fetch:
            yield sim.cpu(node, sim.client(vector=2 * self.nbytes))  # params = fresh + pending
            st.fetches += 1
            st.bytes_fetched += self.nbytes
        st.clock = max(st.clock, min(ctx.seen) if ctx.seen else 0)
        if check:
            self.stop = yield from vec.get_doc(node, "stop")

    def start(self, push: bool, fetch: bool) -> G:
        chunks = None
        if push:
            chunks = self.select()
            if chunks is not None and not chunks:
                push = False  # nothing worth sending yet: it all stays pending
        if not push and not fetch:
            return
        if push:
            self.check_finite()
        self.count += 1
        yield from self.run(push, fetch, self.count % STOP_CHECK_EVERY == 0, chunks,
                            self.apply)

    def after_step(self, step: int) -> G:
        push, fetch = step % self.n_push == 0, step % self.n_fetch == 0
        if push or fetch:
            yield from self.start(push, fetch)

    def flush(self) -> G:
        """Push what is pending (if anything) and fetch, synchronously (pass end)."""
        push = not np.array_equal(self.ctx.params, self.ctx.base)
        if push:
            self.check_finite()
        yield from self.run(push, True, True, None, self.replace)

    def check_finite(self) -> None:
        """``_hand_over``'s guard: a non-finite update is refused before it is sent."""
        require_finite(np.subtract(self.ctx.params, self.ctx.base), "the update to push is")


def downpour_worker(sim: Sim, ctx: WorkerCtx, vec: Any, data: tuple, steps_per_pass: int,
                    cfg: TrainConfig, started: float) -> G:
    """One worker, from its launch to its result document (see the module docstring); a
    push that gives up (``CasGaveUp``, the real StoreError) ends it as it ends a real one."""
    yield from stopping(sim, ctx, _downpour_worker(sim, ctx, vec, data, steps_per_pass, cfg,
                                                   started))


def stopping(sim: Sim, ctx: WorkerCtx, worker: G) -> G:
    """A simulated worker that ends as a real one does on a store error (``CasGaveUp``) or
    a non-finite update (``Diverged``, raised before anything of it is sent)."""
    try:
        yield from worker
    except CasGaveUp as e:
        ctx.st.done, ctx.st.stop_reason = True, f"store error: {e}"
        ctx.finished = sim.loop.now
    except Diverged as e:
        ctx.st.done, ctx.st.stop_reason = True, f"diverged: {e}"
        ctx.finished = sim.loop.now


def _downpour_worker(sim: Sim, ctx: WorkerCtx, vec: Any, data: tuple, steps_per_pass: int,
                     cfg: TrainConfig, started: float) -> G:
    shard_x, shard_y, test_x, test_y = data
    yield max(0.0, started - sim.loop.now)
    t_start = sim.loop.now
    st, node = ctx.st, ctx.node
    n = sim.num_params
    ctx.params = np.empty(n, dtype=np.float32)
    ctx.seen = [0] * len(vec.bounds)

    def first(i: int, arr: np.ndarray, clock: int) -> None:
        a, b = vec.bounds[i]
        ctx.params[a:b] = arr
        ctx.seen[i] = clock

    yield from vec.fetch(node, first)
    yield sim.cpu(node, sim.client(decode=4 * n))
    st.fetches += 1
    st.bytes_fetched += 4 * n
    ctx.base = ctx.params.copy()
    ex = Exchange(sim, ctx, vec, cfg)
    doc = sim.costs["store"]["doc_bytes"]
    skey = vec.key(state_key(ctx.w))
    last_save = sim.loop.now
    seeds = DropoutSeeds(cfg.seed, ctx.w)
    alpha, bs = np.float32(cfg.alpha), cfg.batch_size
    limit = sim.cfg.max_steps
    while not st.done and st.iteration < cfg.iterations:
        it = st.iteration + 1
        order = pass_order(cfg, ctx.w, it, len(shard_y), steps_per_pass)
        t0 = sim.loop.now
        halted = ""
        for pos in range(st.offset, len(order)):
            yield from train_step(sim, ctx, seeds, it, pos, order[pos], shard_x, shard_y,
                                  alpha, bs)
            yield from ex.after_step(st.step)
            if ex.stop:
                break
            if sim.stopped or (limit and st.step >= limit):
                halted = "sample budget" if sim.stopped else "max steps"
                break
            if sim.loop.now - last_save > SAVE_SECONDS:  # heartbeat: the state document
                yield from vec.kv.set_many(node, {skey: None}, {skey: doc})
                last_save = sim.loop.now
        yield from ex.flush()
        st.train_seconds += sim.loop.now - t0
        if st.offset >= len(order):
            st.iteration, st.offset = it, 0
        yield from end_pass(sim, ctx, vec, cfg, ex.stop, halted, data, t_start)
        last_save = sim.loop.now
    if hasattr(vec, "close"):
        yield from vec.close(node)  # the tier's last sync
    yield from vec.kv.set_many(node, {skey: None}, {skey: doc})  # the lease released
    yield from vec.put_doc(node, f"result:{ctx.w}", None, doc)
    st.seconds = sim.loop.now - t_start
    ctx.finished = sim.loop.now


def train_step(sim: Sim, ctx: WorkerCtx, seeds: DropoutSeeds, it: int, pos: int, at: int,
               shard_x: np.ndarray, shard_y: np.ndarray, alpha: np.float32, bs: int) -> G:
    """One minibatch as ``run_worker`` computes it (the real math; its compute time)."""
    st = ctx.st
    t = time.perf_counter()
    sim.model.rng = seeds.at(it, pos)
    _, grad = sim.model.loss_and_grad(ctx.params, shard_x[at:at + bs], shard_y[at:at + bs])
    grad *= -alpha
    ctx.params += grad
    sim.math(t)
    yield sim.cpu(ctx.node, sim.step_work(ctx, bs))
    st.step, st.offset, st.samples = st.step + 1, pos + 1, st.samples + bs
    sim.count_samples(bs)


def end_pass(sim: Sim, ctx: WorkerCtx, vec: Any, cfg: TrainConfig, stop: dict | None,
             halted: str, data: tuple, t_start: float) -> G:
    """``run_worker``'s pass end after the exchange's: the evaluation, ``decide``, the stop
    document when the target is reached, the state save."""
    st, node = ctx.st, ctx.node
    shard_x, _, test_x, test_y = data
    ev = sim.evaluator(ctx, test_x, test_y, shard_x)
    t = time.perf_counter()
    ev.evaluate(ctx.params, st, sim.loop.now - t_start)
    evaluated = ev.evaluated
    decide(cfg, st, stop, None)
    if halted and not st.done:
        st.done, st.stop_reason = True, halted
    if st.done:
        ev.final(ctx.params, st, sim.loop.now - t_start)
        evaluated += ev.evaluated
    sim.wall_math += time.perf_counter() - t
    yield sim.cpu(node, sim.eval_work(evaluated))
    sim.note_eval(sim.loop.now, ctx.w, st.iteration, st.accuracy)
    if st.reached:
        yield from vec.put_doc(node, "stop", {"worker_id": ctx.w, "iteration": st.iteration,
                                              "accuracy": st.accuracy, "reason": "target"},
                               STOP_DOC)
    st.seconds = sim.loop.now - t_start
    skey = vec.key(state_key(ctx.w))
    yield from vec.kv.set_many(node, {skey: None}, {skey: sim.costs["store"]["doc_bytes"]})


def run_store_algorithm(sim: Sim, run_id: str = "sim") -> dict[str, Any]:
    """Downpour or averaging: setup, W workers, the virtual clock to the end, the report."""
    wall = time.perf_counter()
    cfg = sim.cfg
    tcfg = cfg.train_config()
    shard_dir = prepare_shards(cfg.dataset, cfg.dataset_dir, cfg.workers, tcfg.shard_location,
                               cfg.seed)
    shards = open_shards(shard_dir, cfg.workers)
    test_x, test_y = open_test(shard_dir)
    model = sim.build_model(shards[0].num_classes, shards[0].image_shape)
    steps = max(1, min(len(s.y) for s in shards) // cfg.batch_size)
    store = sim.make_store(run_id)
    store.init(model.init_params(cfg.seed))
    costs = sim.costs
    docs = costs["store"]["doc_bytes"]
    setup = costs["run"]["setup"]
    launch = costs["gateway"]["async"]
    workers = [sim.worker(w) for w in range(cfg.workers)]
    vecs = _vectors(sim, store, workers)
    if cfg.algorithm == "averaging":
        from emnist.sim.averaging import AveragingRun, averaging_worker
        rounds = AveragingRun(sim, store, cfg.workers)
    for ctx in workers:
        store.kv.put_now(store.key(state_key(ctx.w)), None, docs)
        started = setup + (ctx.w + 1) * launch + costs["run"]["worker_start"]
        data = (shards[ctx.w].x, shards[ctx.w].y, test_x, test_y)
        if cfg.algorithm == "averaging":
            gen = averaging_worker(sim, ctx, rounds, data, steps, tcfg, started)
        else:
            gen = downpour_worker(sim, ctx, vecs[ctx.w], data, steps, tcfg, started)
        sim.loop.spawn(gen, f"worker-{ctx.w}")
    sim.run()
    c = store.counters
    extra: dict[str, Any] = {
        "steps_per_pass": steps, "shard_sizes": [len(s.y) for s in shards[:8]],
        "pushes": c.pushes, "fetches": c.fetches, "conflicts": c.conflicts, "lost": c.lost,
        "staleness_mean": c.staleness_sum / c.staleness_n if c.staleness_n else 0.0,
        "staleness_max": c.staleness_max,
        "staleness_hist": {f"<{2 ** k}": v for k, v in sorted(c.hist.items())},
        "final_params_crc": _crc(store.global_vector()),
        "_servers": list(store.kv.servers),
    }
    if cfg.algorithm == "averaging":
        extra.update(rounds.report())
    if cfg.tiered:
        extra.update(_tier_report(sim, vecs))
    sim.final_params = store.global_vector()
    return sim.report(workers, time.perf_counter() - wall, extra)


def open_shards(shard_dir: Any, workers: int) -> list[Shard]:
    """Every worker's shard with ``open_shard``'s checks (each file's size and CRC-32C against
    the manifest), reading the manifest once: ``open_shard`` checks the whole manifest per
    call, fine for one process per worker and quadratic for 1,000 workers in one."""
    from pathlib import Path

    from emnist.data.shards import _load, load_manifest
    if workers == 1:
        return [open_shard(shard_dir, 0)]
    d = Path(shard_dir)
    man = load_manifest(d)
    classes = int(man["num_classes"])
    first = open_shard(d, 0)
    return [first] + [Shard(_load(d, f"worker-{w}-x.npy", man),
                            _load(d, f"worker-{w}-y.npy", man), classes, w, workers,
                            first.image_shape) for w in range(1, workers)]


def _vectors(sim: Sim, store: SimParams, workers: list[WorkerCtx]) -> dict[int, Any]:
    """What each worker fetches from and pushes to: the store, or its node's tier."""
    if not sim.cfg.tiered:
        return {x.w: store for x in workers}
    from emnist.sim.tier import SimTier
    tiers: dict[int, SimTier] = {}
    out = {}
    for x in workers:
        tier = tiers.get(x.node.index)
        if tier is None:
            tier = tiers[x.node.index] = SimTier(sim, store, x.node)
        out[x.w] = tier.for_worker(x)
    sim.extra["tiers"] = tiers
    return out


def _tier_report(sim: Sim, vecs: dict[int, Any]) -> dict[str, Any]:
    tiers = sim.extra["tiers"]
    return {"tier_syncs": sum(t.syncs for t in tiers.values()),
            "tier_bytes_synced": sum(t.bytes_synced for t in tiers.values()),
            "tier_servers": [t.kv.servers[0].stats(sim.loop.now or 1.0)
                             for t in list(tiers.values())[:8]]}


def _crc(arr: np.ndarray) -> int:
    from crc32c import crc32c
    return int(crc32c(np.ascontiguousarray(arr).data))
