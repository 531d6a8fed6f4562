"""`emnist bench train`: what distribution costs, against a plain loop on the same data.

In one invocation, for one model: the plain single-process loop (emnist.bench.plain), `emnist
train` with each worker count, and torch DistributedDataParallel with 2 processes (gloo on
loopback, emnist.bench.ddp; torch models only), all with the same data, hyper-parameters and
per-process batch, one thread per process. Each configuration runs once untimed first
(replica start, imports, shard preparation), then ``rounds`` times timed (the median is
reported), like nanoGPT's bench.py warms up before it measures. Every record carries
``model`` and ``params``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from statistics import mean, median
from typing import Any

from emnist.train.config import TrainConfig

COLUMNS = [("mode", "mode", ""), ("model", "model", ""), ("params", "params", ","),
           ("workers", "workers", ""),
           ("samples_per_s_per_worker", "samples/s per worker", ",.0f"),
           ("seconds_to_target", "s to target", ".2f"), ("target_accuracy", "target", ""),
           ("accuracy", "accuracy", ".4f"), ("iterations", "iterations", ""),
           ("reached", "reached", ""), ("throughput_vs_plain", "vs plain", ".0%"),
           ("time_vs_one_worker", "time vs 1 worker", ".2f"), ("time_vs_ddp", "time vs DDP", ".2f")]

ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _subprocess(module: str, arg: dict[str, Any], what: str) -> dict[str, Any]:
    """``python -m module ARG_JSON`` in a fresh process with one BLAS/OpenMP thread set
    before numpy and torch load; its last stdout line is the record."""
    out = subprocess.run([sys.executable, "-m", module, json.dumps(arg)],
                         env={**os.environ, **ONE_THREAD}, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"{what} failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def plain_record(cfg: TrainConfig) -> dict[str, Any]:
    """The plain loop in a fresh process."""
    return _subprocess("emnist.bench.plain", cfg.to_dict(), "plain loop")


def ddp_record(cfg: TrainConfig, processes: int = 2) -> dict[str, Any]:
    """A torch DDP run in a fresh process (which spawns the ranks)."""
    return _subprocess("emnist.bench.ddp", {"config": cfg.to_dict(), "processes": processes},
                       "DDP run")


def emnist_record(outcome: Any, workers: int, target: float) -> dict[str, Any]:
    results = outcome.results
    return {"mode": "emnist", "workers": workers, "model": results[0].get("model", "mlp"),
            "params": results[0].get("params"), "threads": results[0].get("threads"),
            "samples_per_s_per_worker": mean(r["samples_per_s"] for r in results),
            "seconds_to_target": outcome.seconds, "target_accuracy": target,
            "accuracy": max(r["accuracy"] for r in results),
            "iterations": max(r["iterations"] for r in results), "reached": outcome.reached,
            "run_id": outcome.run_id, "pushes": sum(r["pushes"] for r in results),
            "fetches": sum(r["fetches"] for r in results),
            "bytes_pushed": sum(r["bytes_pushed"] for r in results)}


def median_record(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median round by each timing; every round's figures are kept alongside, with the
    machine's 1-minute load average when the configuration finished (benchmarks share it)."""
    out = dict(rounds[0])
    out["load_avg_1m"] = round(os.getloadavg()[0], 2)
    for key in ("samples_per_s_per_worker", "seconds_to_target"):
        out[key] = median(r[key] for r in rounds)
        out[f"{key}_rounds"] = [round(r[key], 4) for r in rounds]
    out["reached"] = all(r["reached"] for r in rounds)
    out["rounds"] = len(rounds)
    return out


def bench_train(run: Callable[[dict[str, Any]], Any], worker_counts: list[int], target: float,
                dataset: str, n_fetch: int, n_push: int, rounds: int = 3,
                echo: Callable[[str], None] = print, model: str = "mlp",
                extra: dict[str, Any] | None = None, ddp: list[int] | None = None,
                warmup: bool = True) -> list[dict[str, Any]]:
    """Median of ``rounds`` timed runs per configuration, after one untimed warm-up each.

    ``extra``: more training settings for every run (alpha, batch_size, iterations, ...);
    ``ddp``: process counts of the DDP runs (default [2] for torch models, none for the mlp);
    ``warmup`` False skips the warm-ups (a slow model on shards and replicas an earlier run
    of the same dataset and worker counts left ready: each warm-up is a whole run).
    """
    base = {"target_accuracy": target, "dataset": dataset, "n_fetch": n_fetch,
            "n_push": n_push, "model": model, **(extra or {})}  # no store: the deployment's
    cfg = TrainConfig(**base)
    base["model"] = cfg.model  # the canonical name
    echo(f"plain loop ({cfg.model}): warm-up, then timed rounds ...")
    if warmup:
        plain_record(cfg)  # shard preparation, page cache
    records = [median_record([plain_record(cfg) for _ in range(rounds)])]
    for workers in worker_counts:
        config = {**base, "number_of_workers": workers}
        echo(f"emnist, {workers} worker(s): warm-up, then timed rounds ...")
        if warmup:
            run(config)
        records.append(median_record([emnist_record(run(config), workers, target)
                                      for _ in range(rounds)]))
    for processes in (ddp if ddp is not None else [2] if cfg.model != "mlp" else []):
        echo(f"torch DDP, {processes} processes (gloo, loopback): warm-up, then timed "
             "rounds ...")
        if warmup:
            ddp_record(cfg, processes)
        records.append(median_record([ddp_record(cfg, processes) for _ in range(rounds)]))
    for r in records:
        r["warmed_up"] = warmup
    compare(records)
    return records


def compare(records: list[dict[str, Any]]) -> None:
    """Ratios for the targets: per-worker throughput against the plain loop's (>= 95%), an
    emnist run's time to target against 1 emnist worker's (2 workers: <= 0.6) and against
    DDP with as many processes (<= 1)."""
    base_rate = records[0]["samples_per_s_per_worker"]
    one = next((r for r in records if r["mode"] == "emnist" and r["workers"] == 1), None)
    ddp = {r["workers"]: r for r in records if r["mode"] == "ddp"}
    for r in records:
        r["throughput_vs_plain"] = r["samples_per_s_per_worker"] / base_rate
        if r["mode"] == "emnist" and one is not None and one["seconds_to_target"]:
            r["time_vs_one_worker"] = r["seconds_to_target"] / one["seconds_to_target"]
        if r["mode"] == "emnist" and r["workers"] in ddp:
            r["time_vs_ddp"] = r["seconds_to_target"] / ddp[r["workers"]]["seconds_to_target"]
        r.pop("curve", None)
