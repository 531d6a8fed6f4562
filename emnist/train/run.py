"""A run's life in the store: set it up once, then let each worker join it by run id.

Setup writes everything a worker needs (config, shard location, initial parameters) under the
run id, so a train invocation carries only ``{run_id, worker_id}`` and every worker of a run
trains with the same configuration, whatever its own environment says.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from typing import Any

from emnist.data import open_shard, open_test, prepare_shards
from emnist.model import MLPShape, init_params
from emnist.store import KV, MissingState, ParameterStore, open_kv
from emnist.store.tiered import TieredStore
from emnist.train.config import ConfigError, TrainConfig
from emnist.train.downpour import WorkerResult, run_worker


class UnknownRun(LookupError):
    pass


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def setup_run(cfg: TrainConfig, kv: KV, workers: int, *, run_id: str | None = None,
              start_worker: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Prepare shards, write the run's state, then start one worker per shard."""
    if workers < 1:
        raise ConfigError("number_of_workers", f"must be >= 1, got {workers}")
    t0 = time.time()
    shard_dir = prepare_shards(cfg.dataset, cfg.dataset_dir, workers, cfg.shard_location,
                               cfg.seed)
    num_classes = open_shard(shard_dir, 0).num_classes
    if cfg.num_labels is not None and cfg.num_labels != num_classes:
        raise ConfigError("num_labels", f"{cfg.num_labels} given but {cfg.dataset} has "
                          f"{num_classes} classes")
    x0 = open_shard(shard_dir, 0).x
    if x0.shape[1] != cfg.pixels_per_image:
        raise ConfigError("pixels_per_image", f"{cfg.pixels_per_image} given but {cfg.dataset} "
                          f"has {x0.shape[1]}")
    shape = MLPShape(cfg.pixels_per_image, cfg.hidden_size, num_classes)
    run_id = run_id or new_run_id()
    store = ParameterStore(kv, run_id, chunk_bytes=cfg.chunk_bytes)
    if store.get_doc("run") is not None:
        raise ConfigError("run_id", f"run {run_id!r} already exists in {kv.url}")
    state = {"run_id": run_id, "config": cfg.to_dict(), "workers": workers,
             "shard_dir": str(shard_dir), "num_classes": num_classes,
             "num_params": shape.num_params, "started": t0}
    store.init(init_params(shape, cfg.seed))
    store.put_doc("run", state)
    for w in range(workers):
        if start_worker:
            start_worker({"run_id": run_id, "worker_id": w, "store_url": cfg.store_url})
    return state


def load_run(kv: KV, run_id: str) -> tuple[ParameterStore, dict[str, Any]]:
    store = ParameterStore(kv, run_id)
    state = store.get_doc("run")
    if state is None:
        raise UnknownRun(f"unknown run id {run_id!r} (not in {kv.url})")
    store.attach()
    return store, state


def train_worker(kv: KV, run_id: str, worker_id: int,
                 hostname: str) -> tuple[WorkerResult, dict[str, Any]]:
    """One Downpour worker of a run; returns its result and the JSON record it stored."""
    store, state = load_run(kv, run_id)
    if not 0 <= worker_id < state["workers"]:
        raise ConfigError("worker_id", f"{worker_id} is outside run {run_id} "
                          f"(workers 0..{state['workers'] - 1})")
    cfg = TrainConfig(**state["config"])
    shard = open_shard(state["shard_dir"], worker_id)
    test_x, test_y = open_test(state["shard_dir"])
    shape = MLPShape(cfg.pixels_per_image, cfg.hidden_size, state["num_classes"])
    if shape.num_params != store.num_params:
        raise MissingState(f"run {run_id} stores {store.num_params} parameters, "
                           f"its config needs {shape.num_params}")

    def report(progress: dict[str, Any]) -> None:
        store.put_doc(f"progress:{worker_id}", {**progress, "heartbeat": time.time()})

    tier = None
    if cfg.local_store_url:
        tier = TieredStore(kv, open_kv(cfg.local_store_url), run_id, cfg.sync_interval)
        tier.attach()
    try:
        res = run_worker(cfg, tier or store, shard.x, shard.y, test_x, test_y, shape,
                         worker_id=worker_id, hostname=hostname, report=report)
    finally:
        if tier is not None:
            tier.close()  # flushes what the node has not synchronised yet
    finished = time.time()
    out = {**res.to_dict(), "run_id": run_id, "finished": finished,
           "since_setup": finished - state["started"]}
    if tier is not None:
        out.update(tier_syncs=tier.syncs, tier_bytes_synced=tier.bytes_synced)
    store.put_docs({f"result:{worker_id}": out,
                    f"progress:{worker_id}": {"worker_id": worker_id, "done": True,
                                              "iteration": res.iterations,
                                              "accuracy": res.accuracy, "hostname": hostname,
                                              "heartbeat": time.time()}})
    return res, out


def run_status(kv: KV, run_id: str) -> dict[str, Any]:
    """Per-worker progress and results, for the CLI's progress bar and `emnist status`."""
    store = ParameterStore(kv, run_id)
    state = store.get_doc("run")
    if state is None:
        raise UnknownRun(f"unknown run id {run_id!r} (not in {kv.url})")
    n = state["workers"]
    names = [f"progress:{w}" for w in range(n)] + [f"result:{w}" for w in range(n)] + ["stop"]
    docs = store.get_docs(names)
    results = [docs.get(f"result:{w}") for w in range(n)]
    return {"run_id": run_id, "workers": n, "config": state["config"],
            "started": state["started"], "stop": docs.get("stop"),
            "progress": [docs.get(f"progress:{w}") for w in range(n)],
            "results": results, "done": all(r is not None for r in results)}
