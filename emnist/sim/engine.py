"""One simulated run: build the cluster from a cost file, the real data and model, start the
workers (or peers) as processes, run the virtual clock, report.

What is real: the shards (``prepare_shards``/``open_shard``, or the p2p ``split``), the model
(``emnist.models.build_model``), every minibatch's gradient and update, every evaluation, the
parameter values in the store and every float operation on them. What is simulated: time
(compute from the cost file's per-model table, with a seeded lognormal spread per minibatch;
every call, transfer and queue from :mod:`emnist.sim.net`), and so the order in which
workers' pushes and fetches meet in the store.

One model object serves every worker (the math runs one minibatch at a time in this process);
each worker holds its own parameter vectors: Downpour two (``params`` and ``base``; the real
Exchange's other buffers are only ever chunk-sized temporaries here), averaging three during
a round, p2p one for all peers (they are bit-identical by construction). ``memory_bytes``
checks that bound before anything is allocated.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from emnist.models import ModelSpec, build_model, calibration_images, param_count
from emnist.sim.billing import bill
from emnist.sim.config import SimConfig, SimConfigError
from emnist.sim.costs import Costs, ModelCost
from emnist.sim.events import Loop, Op
from emnist.sim.net import Net, Node, make_nodes
from emnist.sim.store import SimKV, SimParams
from emnist.train.evaluation import Evaluator
from emnist.train.state import WorkerState

__all__ = ["Sim", "WorkerCtx", "check_memory", "memory_bytes", "simulate"]


def memory_bytes(cfg: SimConfig, num_params: int) -> int:
    """Parameter copies the simulation holds at once (the bound it refuses runs above)."""
    per = {"downpour": 2, "averaging": 4, "p2p": 0}[cfg.algorithm]  # averaging: its vector
    # plus its published copies of the last KEEP_ROUNDS rounds
    extra = 3 if cfg.algorithm != "p2p" else 4 + (cfg.workers if cfg.compression == "topk"
                                                 else 0)
    tier = 2 * max(1, cfg.workers) if cfg.tiered else 0
    return 4 * num_params * (per * cfg.workers + extra + tier)


def check_memory(cfg: SimConfig, spec: ModelSpec | None = None) -> int:
    """Refuse (SimConfigError naming ``workers``) a run whose parameter copies would exceed
    ``max_memory_gb``, before any data or model is allocated; returns the bytes needed."""
    spec = spec or cfg.train_config().model_spec()
    n = param_count(spec)
    need = memory_bytes(cfg, n)
    if need > cfg.max_memory_gb * 2**30:
        raise SimConfigError("workers", f"{cfg.workers} workers of {spec.name} ({n:,} "
                             f"parameters) need {need / 2**30:.1f} GiB of parameter copies, "
                             f"above max_memory_gb {cfg.max_memory_gb:g}")
    return need


@dataclass
class WorkerCtx:
    w: int
    node: Node
    st: WorkerState
    rng: np.random.Generator  # compute-time spread, seeded per worker
    params: np.ndarray | None = None
    base: np.ndarray | None = None
    seen: list[int] = field(default_factory=list)  # per chunk clock as of the last read
    drift: float = 0.0  # log speed factor (AR(1)), see ``Sim.step_work``
    finished: float | None = None
    first_target: float | None = None
    evaluator: Any = None  # its emnist.train.evaluation.Evaluator, made at its first pass end


class Sim:
    def __init__(self, cfg: SimConfig, costs: Costs) -> None:
        self.cfg, self.costs = cfg, costs
        self.loop = Loop()
        self.net = Net(self.loop)
        kinds = costs.node_list()
        self.nodes = make_nodes(self.loop, kinds[:max(1, min(len(kinds), cfg.workers))])
        self.wall_math = 0.0
        self.samples = 0
        self.stopped = False  # a sample budget ran out
        self.curve: list[list[float]] = []  # [t, worker, pass, accuracy, samples so far]
        self.first_target: float | None = None
        self.function_calls: list[float] = []
        self.extra: dict[str, Any] = {}
        self._rho = math.exp(-1.0 / costs["compute"]["drift_steps"])
        self._innov = costs["compute"]["drift"] * math.sqrt(1.0 - self._rho ** 2)

    # -- model and data ----------------------------------------------------------------------
    def spec(self, classes: int, image_shape: tuple[int, int, int] | None = None) -> ModelSpec:
        """The run's ModelSpec, as the real setup derives it (``TrainConfig.model_spec``)."""
        return self.cfg.train_config().model_spec(classes, image_shape)

    def build_model(self, classes: int, image_shape: tuple[int, int, int] | None = None,
                    spec: ModelSpec | None = None) -> Any:
        spec = spec or self.spec(classes, image_shape)
        check_memory(self.cfg, spec)
        self.model = build_model(spec, seed=self.cfg.seed)
        self.num_params = self.model.num_params
        self.mcost: ModelCost = self.costs.model(spec.name, self.cfg.hidden_size
                                                 if spec.name == "mlp" else None)
        return self.model

    def evaluator(self, ctx: WorkerCtx, test_x: np.ndarray, test_y: np.ndarray,
                  shard_x: np.ndarray) -> Evaluator:
        """The worker's pass-end evaluation as ``run_worker`` makes it (a batch-norm model
        calibrated on ``calibration_images`` of the worker's own shard), over the first
        ``eval_samples`` of the test set."""
        if ctx.evaluator is None:
            n = self.cfg.eval_samples or len(test_y)
            calib = calibration_images(shard_x) if self.model.needs_calibration else None
            ctx.evaluator = Evaluator(self.model, (test_x[:n], test_y[:n]), calib,
                                      self.cfg.train_config())
        return ctx.evaluator

    # -- costs -------------------------------------------------------------------------------
    def node_of(self, w: int) -> Node:
        node = self.nodes[w % len(self.nodes)]
        node.workers.append(w)
        return node

    def worker(self, w: int) -> WorkerCtx:
        node = self.node_of(w)
        rng = np.random.default_rng([self.cfg.timing_seed, w, 0x51])
        ctx = WorkerCtx(w, node, WorkerState(w, hostname=f"sim-{node.index}"), rng)
        if self.cfg.spread and self.drift:
            ctx.drift = float(rng.normal(0.0, self.drift))  # a stationary start
        return ctx

    @property
    def drift(self) -> float:
        return self.costs["compute"]["drift"]

    def step_work(self, ctx: WorkerCtx, batch: int) -> float:
        """Core-seconds of one minibatch (speed 1): the model's median for ``batch``, times
        the worker's slowly drifting speed factor, times this minibatch's own spread."""
        t = self.mcost.step_s(batch, self.num_params)
        if not self.cfg.spread:
            return t
        if self.drift:
            rho = self._rho
            ctx.drift = rho * ctx.drift + self._innov * float(ctx.rng.standard_normal())
            t *= math.exp(ctx.drift)
        if self.mcost.spread > 0:
            t *= float(ctx.rng.lognormal(0.0, self.mcost.spread))
        return t

    def cpu(self, node: Node, work: float) -> Op | float:
        return node.cpu.op(work) if work > 0 else 0.0

    def client(self, decode: int = 0, encode: int = 0, vector: int = 0) -> float:
        """Worker CPU seconds for moving bytes (decode / encode / elementwise passes)."""
        c = self.costs["client"]
        return (decode * c["decode_per_byte"] + encode * c["encode_per_byte"]
                + vector * c["vector_per_byte"])

    def eval_work(self, n_images: int) -> float:
        return self.mcost.eval_per_sample * n_images * (self.num_params / self.mcost.params)

    def math(self, t0: float) -> None:
        self.wall_math += time.perf_counter() - t0

    def count_samples(self, n: int) -> None:
        self.samples += n
        if self.cfg.samples and self.samples >= self.cfg.samples:
            self.stopped = True

    def note_eval(self, t: float, w: int, it: int, acc: float) -> None:
        self.curve.append([round(t, 6), w, it, acc, self.samples])
        if acc >= self.cfg.target_accuracy and self.first_target is None:
            self.first_target = t

    def run(self) -> None:
        """The virtual clock to the end, or to ``max_events`` (then the report says
        ``aborted``: e.g. a saturated store whose cas loops livelock)."""
        limit = self.cfg.max_events or None
        self.loop.run(max_events=limit)
        if limit and self.loop.pending and self.loop.events >= limit:
            self.extra["aborted"] = (f"stopped after {limit:,} events at virtual "
                                     f"{self.loop.now:.3f} s")

    # -- the store ---------------------------------------------------------------------------
    def make_store(self, run_id: str) -> SimParams:
        c = self.costs
        servers = self.cfg.servers or c["store"]["servers"]
        self.store_kv = SimKV(self.loop, self.net, c.store, servers, "store")
        return SimParams(self.store_kv, run_id, self.num_params, self.cfg.chunk_bytes)

    # -- the report --------------------------------------------------------------------------
    def report(self, workers: list[WorkerCtx], wall: float, extra: dict[str, Any]) -> dict:
        c, costs = self.cfg, self.costs
        ends = [x.finished for x in workers if x.finished is not None]
        t_end = max(ends) if ends else self.loop.now
        reached = any(x.st.reached for x in workers)
        samples = sum(x.st.samples for x in workers)
        vms = [(n.kind.cores, n.kind.memory_gb, 1) for n in self.nodes]
        servers = extra.pop("_servers", [])
        for s in servers:
            vms.append((s.cost.vcpus, s.cost.memory_gb, 1))
        price = bill(costs["prices"], t_end, vms, self.function_calls,
                     costs["functions"]["memory_gb"])
        horizon = t_end or 1.0
        out = {
            "algorithm": c.algorithm, "workers": c.workers, "model": c.model,
            "params": self.num_params, "batch_size": c.batch_size, "costs": costs.name,
            "nodes": len(self.nodes), "reached": reached,
            "time_to_target": self.first_target, "seconds": t_end,
            "samples": samples, "samples_per_s": samples / t_end if t_end else 0.0,
            "accuracy": max((x.st.accuracy for x in workers), default=0.0),
            "iterations": max((x.st.iteration for x in workers), default=0),
            "steps": sum(x.st.step for x in workers),
            "stop_reasons": sorted({x.st.stop_reason for x in workers}),
            "cost": price, "aborted": self.extra.get("aborted", ""),
            "servers": [s.stats(horizon) for s in servers],
            "node_cpu_utilisation": [n.cpu.busy / (n.kind.cores * horizon) for n in self.nodes
                                     ][:16],
            "events": self.loop.events, "calls": self.net.calls,
            "wall_s": wall, "wall_math_s": self.wall_math,
            "bookkeeping_fraction": max(0.0, 1 - self.wall_math / wall) if wall else 0.0,
            "config": c.to_dict(),
        }
        out.update(extra)
        keep = workers if len(workers) <= 8 else workers[:1]
        out["worker_curves"] = {x.w: x.st.curve for x in keep}
        out["curve"] = self.curve if len(self.curve) <= 5000 else self.curve[:: math.ceil(
            len(self.curve) / 5000)]
        return out


def simulate(cfg: SimConfig, costs: Costs, run_id: str = "sim") -> dict[str, Any]:
    """Run ``cfg`` on the cluster ``costs`` describes; the report (see ``Sim.report``)."""
    from emnist.sim.threads import one_blas_thread
    one_blas_thread()
    check_memory(cfg)
    sim = Sim(cfg, costs)
    if cfg.algorithm == "p2p":
        from emnist.sim.p2p import run_p2p
        return run_p2p(sim)
    from emnist.sim.downpour import run_store_algorithm
    return run_store_algorithm(sim, run_id)
