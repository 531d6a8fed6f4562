"""Peer-to-peer synchronous SGD in virtual time: ``emnist.p2p.peer.Peer`` with the Redis
Streams broker, and ``LocalGradients`` or ``ServerlessGradients``.

Per peer, as ``Peer.run``: the real split (``emnist.p2p.split.split`` / ``load_partition``),
the epoch order ``default_rng(seed + 1 + rank).permutation(batches)``, per step the mean
gradient of its ``sync_every`` minibatches (rows ``[bB, (b+1)B)``), the real compressor
(``compress.make`` with the peer's seed), the message's real size (``messages.gradient``),
publish on ``g.{step}``, collect every other peer's, sum in rank order, ``params -= lr *
(total * 1/m)``, delete the previous topic; per epoch ``validate`` on its validation part
and test slice, the barrier exchange of those numbers, and the same decisions (target, early
stopping, learning-rate plateau) on every peer.

Peers hold bit-identical parameters after every step (the real guarantee), so one vector
serves all: a peer computes its step's gradient from it when the step starts (no peer can
have applied that step's update yet: it needs this peer's gradient), and the first peer to
have every gradient applies the update once. Serverless: the peer writes its parameters to
the store, fans its minibatches out to emnist-grad (``grad_parallel`` in flight, the real
pool's ``min(sync_every, 16)`` by default) through :class:`emnist.sim.platform.Functions`;
the functions' gradients are the same bits the peer would compute (same rows, same model),
averaged in batch order.

Missing peers (``allow_missing``), RabbitMQ and peer timeouts are not simulated.
"""

from __future__ import annotations

import time
from collections.abc import Generator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from emnist.data import shard_sizes
from emnist.p2p import compress, messages
from emnist.p2p.peer import dropout_key, has_dropout, split_spec
from emnist.p2p.serverless import params_key
from emnist.p2p.split import load_partition, split
from emnist.paths import cache_dir
from emnist.sim.engine import Sim, WorkerCtx
from emnist.sim.events import Proc
from emnist.sim.platform import Broker, Functions
from emnist.sim.store import SimKV

G = Generator[Any, Any, Any]
RUN_ID = "sim"
PHASES = ("compute_s", "send_s", "recv_s", "update_s", "val_s", "barrier_s")


@dataclass
class P2PRun:
    params: np.ndarray
    size: int
    applied: int = -1  # the last step whose update is in params
    grads: dict[int, dict[int, np.ndarray]] = field(default_factory=dict)
    stats: dict[int, dict[int, dict[str, float]]] = field(default_factory=dict)
    lr: float = 0.3
    bytes_sent: int = 0
    epochs: dict[int, list[list[float]]] = field(default_factory=dict)  # rank -> [epoch, t, acc]
    # virtual seconds per phase over all peers, as the real report splits a step
    phases: dict[str, float] = field(default_factory=lambda: dict.fromkeys(PHASES, 0.0))


def _join(n: int) -> tuple[Any, Any]:
    """An op that resumes once ``done()`` was called ``n`` times."""
    state: dict[str, Any] = {"left": n, "proc": None}

    def done(_: Any = None) -> None:
        state["left"] -= 1
        if state["left"] == 0 and state["proc"] is not None:
            p = state["proc"]
            p.resume_at(p.loop.now)

    def wait(p: Proc) -> None:
        if state["left"] <= 0:
            p.resume_at(p.loop.now)
        else:
            state["proc"] = p
    return wait, done


def run_p2p(sim: Sim) -> dict[str, Any]:
    wall = time.perf_counter()
    cfg, costs = sim.cfg, sim.costs
    root = cfg.data_location or str(cache_dir() / "p2p-data")
    split_dir = split(cfg.dataset, cfg.dataset_dir, cfg.workers, root, cfg.seed,
                      cfg.val_fraction)
    parts = [load_partition(str(split_dir), r) for r in range(cfg.workers)]
    man = parts[0].manifest
    model = sim.build_model(man["num_classes"], spec=split_spec(cfg.model, cfg.hidden_size, man))
    bs = cfg.batch_size
    batches = min(man["train_sizes"]) // bs
    if batches < 1:
        raise ValueError(f"batch_size {bs} is larger than a peer's partition")
    k = cfg.sync_every or batches
    if k > batches:
        raise ValueError(f"sync_every {k} > {batches} minibatches per peer")
    steps_per_epoch = batches // k
    run = P2PRun(model.init_params(cfg.seed), cfg.workers, lr=cfg.lr)
    broker = Broker(sim.loop, sim.net, costs, cfg.timing_seed)
    funcs = store = None
    if cfg.serverless:
        funcs = Functions(sim.loop, sim.net, costs, sim.nodes)
        store = SimKV(sim.loop, sim.net, costs.store, cfg.servers or costs["store"]["servers"])
    sizes = shard_sizes(len(parts[0].test_y), cfg.workers)
    peers = [sim.worker(r) for r in range(cfg.workers)]
    max_steps = cfg.max_steps
    if cfg.samples:
        budget = max(1, cfg.samples // (cfg.workers * k * bs))
        max_steps = min(max_steps, budget) if max_steps else budget
    for r, ctx in enumerate(peers):
        test = slice(sum(sizes[:r]), sum(sizes[:r + 1]))
        gen = peer(sim, run, ctx, parts[r], test, batches, k, steps_per_epoch, broker, funcs,
                   store, max_steps)
        sim.loop.spawn(gen, f"peer-{r}", delay=costs["run"]["peer_start"])
    sim.run()
    servers = [broker.server] + (list(store.servers) if store else [])
    reached = [min((t for _, t, a in eps if a >= cfg.target_accuracy), default=None)
               for eps in run.epochs.values()] if cfg.target_accuracy else [None]
    extra: dict[str, Any] = {
        "steps_per_epoch": steps_per_epoch, "batches_per_peer": batches,
        "time_to_target_training": (max(reached) if reached and None not in reached
                                    else None),
        "epochs": max((len(e) for e in run.epochs.values()), default=0),
        "mb_sent_per_epoch": run.bytes_sent / max(1, len(run.epochs.get(0, [1]))) / 1e6,
        "final_params_crc": _crc(run.params), "_servers": servers,
        "peer_epochs": {r: e for r, e in list(run.epochs.items())[:8]},
        # per peer and epoch, the real report's columns (emnist.p2p.report)
        "phases_per_epoch": {k: v / max(1, sum(len(e) for e in run.epochs.values()))
                             for k, v in run.phases.items()},
    }
    if funcs is not None:
        extra.update(funcs.report())
        sim.function_calls = funcs.durations
    sim.final_params = run.params
    return sim.report(peers, time.perf_counter() - wall, extra)


def peer(sim: Sim, run: P2PRun, ctx: WorkerCtx, part: Any, test: slice, batches: int,
         k: int, steps_per_epoch: int, broker: Broker, funcs: Functions | None,
         store: SimKV | None, max_steps: int) -> G:
    cfg, model, node, st = sim.cfg, sim.model, ctx.node, ctx.st
    rank, n, bs = ctx.w, sim.num_params, cfg.batch_size
    comp = compress.make(cfg.compression, seed=cfg.seed * 1009 + rank + 1,
                         levels=cfg.qsgd_levels, ratio=cfg.topk_ratio)
    rng = np.random.default_rng(cfg.seed + 1 + rank)
    acc_buf = np.zeros(n, dtype=np.float32)
    t_start = sim.loop.now
    run.epochs[rank] = []
    best, bad, plateau, lr = float("inf"), 0, 0, cfg.lr
    step_no, prev_topic, msg_bytes = 0, None, None
    tx, ty = part.test_x[test], part.test_y[test]
    others = run.size - 1
    par = cfg.grad_parallel or max(1, min(cfg.sync_every, 16))
    ph, loop = run.phases, sim.loop
    dropout = has_dropout(model.spec)
    for epoch in range(1, cfg.iterations + 1):
        order = rng.permutation(batches)
        for s in range(steps_per_epoch):
            chosen = order[s * k:(s + 1) * k]
            # the gradient: LocalGradients.compute (ServerlessGradients computes the same bits)
            t = time.perf_counter()
            acc_buf[:] = 0.0
            loss = 0.0
            for b in chosen:
                if dropout:  # LocalGradients: the minibatch's masks from dropout_key
                    model.rng = np.random.default_rng(dropout_key(cfg.seed, rank, step_no,
                                                                  int(b)))
                rows = slice(int(b) * bs, (int(b) + 1) * bs)
                batch_loss, g = model.loss_and_grad(run.params, part.train_x[rows],
                                                    part.train_y[rows])
                acc_buf += g
                loss += batch_loss
            grad = acc_buf * np.float32(1.0 / len(chosen))
            pieces = comp.compress(grad)
            own = comp.decompress(pieces, n)
            run.grads.setdefault(step_no, {})[rank] = own
            if msg_bytes is None:
                msg_bytes = len(messages.gradient(RUN_ID, step_no, epoch, rank, comp, pieces, n,
                                                  loss / len(chosen)))
            sim.math(t)
            work = sim.step_work(ctx, bs)
            t_phase = loop.now
            if funcs is None:
                yield sim.cpu(node, sum(sim.step_work(ctx, bs) for _ in chosen[1:]) + work
                              + sim.client(vector=4 * n * (len(chosen) + 1)))
            else:
                yield from _serverless(sim, ctx, funcs, store, step_no, chosen, par)
            ph["compute_s"] += loop.now - t_phase
            t_phase = loop.now
            st.step += 1
            st.samples += bs * len(chosen)
            sim.count_samples(bs * len(chosen))
            # send: compress, decompress own, encode, publish
            yield sim.cpu(node, sim.client(encode=msg_bytes, vector=2 * 4 * n))
            yield from broker.publish(node, f"g.{step_no}", rank, msg_bytes, None)
            run.bytes_sent += msg_bytes
            ph["send_s"] += loop.now - t_phase
            t_phase = loop.now
            # receive: every other peer's gradient of this step
            yield from _collect(sim, node, broker, f"g.{step_no}", rank, others, msg_bytes)
            ph["recv_s"] += loop.now - t_phase
            t_phase = loop.now
            # update: sum in rank order, apply (once for all peers: they are identical)
            yield sim.cpu(node, sim.client(vector=4 * n * (run.size + 2)))
            if run.applied < step_no:
                t = time.perf_counter()
                got = run.grads.pop(step_no)
                total = np.zeros(n, dtype=np.float32)
                for r in sorted(got):
                    total += got[r]
                run.params -= np.float32(run.lr) * (total * np.float32(1.0 / len(got)))
                run.applied = step_no
                sim.math(t)
            ph["update_s"] += loop.now - t_phase
            t_phase = loop.now
            if prev_topic is not None:  # finished(): counted as the real report does, receive
                yield from broker.delete(node, prev_topic)
            ph["recv_s"] += loop.now - t_phase
            prev_topic = f"g.{step_no}"
            step_no += 1
            if max_steps and step_no >= max_steps:
                break
        # validate on the own validation part and test slice, then the barrier
        t_phase = loop.now
        yield sim.cpu(node, sim.eval_work(len(part.val_y) + len(ty)))
        t = time.perf_counter()
        nv = len(part.val_y)
        val_sum = model.evaluate(run.params, part.val_x, part.val_y)[1] * nv if nv else 0.0
        correct = round(model.evaluate(run.params, tx, ty)[0] * len(ty))
        sim.math(t)
        run.stats.setdefault(epoch, {})[rank] = {"val_sum": val_sum, "val_n": nv,
                                                 "correct": correct, "test_n": len(ty)}
        ph["val_s"] += loop.now - t_phase
        t_phase = loop.now
        yield from broker.publish(node, f"b.{epoch}", rank, 300, None)
        yield from _collect(sim, node, broker, f"b.{epoch}", rank, others, 300)
        ph["barrier_s"] += loop.now - t_phase
        got = run.stats[epoch]
        ranks = sorted(got)
        val_loss = sum(got[r]["val_sum"] for r in ranks) / max(1, sum(got[r]["val_n"]
                                                                      for r in ranks))
        acc = sum(got[r]["correct"] for r in ranks) / max(1, sum(got[r]["test_n"]
                                                               for r in ranks))
        t_epoch = sim.loop.now - t_start
        run.epochs[rank].append([epoch, round(t_epoch, 6), acc])
        st.iteration, st.accuracy, st.val_loss = epoch, acc, val_loss
        st.curve.append([round(t_epoch, 4), epoch, acc, round(val_loss, 6), st.samples])
        sim.note_eval(sim.loop.now, rank, epoch, acc)
        reason = ""
        if cfg.target_accuracy and acc >= cfg.target_accuracy:
            reason = "target"
        else:
            if val_loss < best - cfg.min_delta:
                best, bad, plateau = val_loss, 0, 0
            else:
                bad, plateau = bad + 1, plateau + 1
            if bad >= cfg.patience:
                reason = "early-stopping"
            elif plateau >= cfg.lr_patience and lr > cfg.min_lr:
                lr, plateau = max(lr * cfg.lr_factor, cfg.min_lr), 0
                run.lr = lr  # every peer decides the same: the shared update uses it
        if max_steps and step_no >= max_steps and not reason:
            reason = "max steps"
        if reason:
            st.done, st.reached, st.stop_reason = True, reason == "target", reason
            break
    else:
        st.done, st.stop_reason = True, "max-epochs"
    st.seconds = sim.loop.now - t_start
    ctx.finished = sim.loop.now


def _collect(sim: Sim, node: Any, broker: Broker, topic: str, rank: int, want: int,
             nbytes: int) -> G:
    """``collect``: XREAD until every other peer's entry of ``topic`` is in; decode each."""
    cursor, have = 0, 0
    while have < want:
        entries = yield broker.read(node, topic, cursor)
        cursor += len(entries)
        theirs = sum(1 for sender, _, _ in entries if sender != rank)
        have += theirs
        if theirs:
            yield sim.cpu(node, sim.client(decode=nbytes * theirs))


def _serverless(sim: Sim, ctx: WorkerCtx, funcs: Functions, store: SimKV, step: int,
                chosen: np.ndarray, par: int) -> G:
    """``ServerlessGradients.compute``: parameters to the store, one call per minibatch
    (``par`` in flight), the gradients decoded and averaged in batch order."""
    node, n = ctx.node, sim.num_params
    key = params_key(RUN_ID, ctx.w, step)
    yield sim.cpu(node, sim.client(encode=4 * n))
    yield from store.set_many(node, {key: None}, {key: 4 * n + 40})
    todo = list(range(len(chosen)))
    work = [sim.step_work(ctx, sim.cfg.batch_size) for _ in chosen]
    wait, done = _join(min(par, len(todo)))

    def caller() -> G:
        while todo:
            i = todo.pop(0)
            yield from funcs.call(node, store, key, 4 * n, work[i], 4 * n + 40)
            yield sim.cpu(node, sim.client(decode=4 * n))

    for _ in range(min(par, len(todo))):
        sim.loop.spawn(caller(), f"grad-{ctx.w}", on_exit=done)
    yield wait
    yield sim.cpu(node, sim.client(vector=4 * n * (len(chosen) + 1)))
    if step:
        yield from store.delete_many(node, [params_key(RUN_ID, ctx.w, step - 1)])


def _crc(arr: np.ndarray) -> int:
    from crc32c import crc32c
    return int(crc32c(np.ascontiguousarray(arr).data))
