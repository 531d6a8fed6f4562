"""`emnist bench train`: what distribution costs, against a plain loop on the same data.

In one invocation, for one model: the plain single-process loop (emnist.bench.plain), `emnist
train` with each worker count, and torch DistributedDataParallel with 2 processes (gloo on
loopback, emnist.bench.ddp; torch models only), all with the same data, hyper-parameters and
per-process batch, one thread per process. Each configuration runs once untimed first
(replica start, imports, shard preparation), like nanoGPT's bench.py warms up before it
measures; then the timed rounds go round-robin over the configurations (plain, 1 worker, 2
workers, DDP, plain, ...), the order rotated each round, so a change in the machine's load
(benchmarks share it) hits every configuration alike instead of whichever ran during it. An
emnist run scales emnist-train to its worker count, so a run with more workers than the last
one gets fresh replicas: it is preceded by an untimed run of its own to warm them.
Measured before this (lenet5, 2 cores, one configuration's rounds after another's, load
2-5): the plain loop's rounds spread 6,359-9,864 samples/s and 1 worker's 6,988-9,957, which
read as a 15% gap; profiled in one process, a worker's lenet5 minibatch of 64 costs no more
than the plain loop's (~5.2 vs ~5.7 ms), the exchange ~2% of the loop and the heartbeats
0.4%. The median round is reported; every round's figures, its load and its ratios to the
same round's plain loop, 1 worker and DDP are kept. Every record carries ``model`` and
``params``.
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
    machine's 1-minute load average as each round finished (benchmarks share the machine)."""
    out = dict(rounds[0])
    out["load_avg_1m_rounds"] = [r.get("load_avg_1m") for r in rounds]
    out["load_avg_1m"] = median(r.get("load_avg_1m") or 0.0 for r in rounds)
    for key in ("samples_per_s_per_worker", "seconds_to_target"):
        out[key] = median(r[key] for r in rounds)
        out[f"{key}_rounds"] = [round(r[key], 4) for r in rounds]
    out["reached"] = all(r["reached"] for r in rounds)
    out["rounds"] = len(rounds)
    return out


def _loaded(record: dict[str, Any]) -> dict[str, Any]:
    return {**record, "load_avg_1m": round(os.getloadavg()[0], 2)}


def bench_train(run: Callable[[dict[str, Any]], Any], worker_counts: list[int], target: float,
                dataset: str, n_fetch: int, n_push: int, rounds: int = 3,
                echo: Callable[[str], None] = print, model: str = "mlp",
                extra: dict[str, Any] | None = None, ddp: list[int] | None = None,
                warmup: bool = True) -> list[dict[str, Any]]:
    """Median of ``rounds`` timed runs per configuration, after one untimed warm-up each;
    the rounds interleave the configurations (see the module docstring).

    ``extra``: more training settings for every run (alpha, batch_size, iterations, ...);
    ``ddp``: process counts of the DDP runs (default [2] for torch models, none for the mlp);
    ``warmup`` False skips the warm-ups (a slow model on shards and replicas an earlier run
    of the same dataset and worker counts left ready: each warm-up is a whole run).
    """
    base = {"target_accuracy": target, "dataset": dataset, "n_fetch": n_fetch,
            "n_push": n_push, "model": model, **(extra or {})}  # no store: the deployment's
    cfg = TrainConfig(**base)
    base["model"] = cfg.model  # the canonical name

    def emnist(workers: int) -> Callable[[], dict[str, Any]]:
        config = {**base, "number_of_workers": workers}
        return lambda: emnist_record(run(config), workers, target)

    def torch_ddp(processes: int) -> Callable[[], dict[str, Any]]:
        return lambda: ddp_record(cfg, processes)

    # (label, emnist worker count or 0, measure)
    configs: list[tuple[str, int, Callable[[], dict[str, Any]]]] = [
        (f"plain loop ({cfg.model})", 0, lambda: plain_record(cfg))]
    configs += [(f"emnist, {w} worker(s)", w, emnist(w)) for w in worker_counts]
    configs += [(f"torch DDP, {p} processes (gloo, loopback)", 0, torch_ddp(p))
                for p in (ddp if ddp is not None else [2] if cfg.model != "mlp" else [])]
    replicas = 0  # emnist-train replicas as the last emnist run left them (each run scales)
    if warmup:
        for label, workers, measure in configs:  # shard preparation, page cache, replicas
            echo(f"{label}: warm-up ...")
            measure()
            replicas = workers or replicas
    done: list[list[dict[str, Any]]] = [[] for _ in configs]
    for r in range(rounds):
        for i in [(r + j) % len(configs) for j in range(len(configs))]:
            label, workers, measure = configs[i]
            if warmup and workers > replicas:
                # a run with fewer workers scaled the replicas down: the new ones would pay
                # their first torch import (1.5-4 s measured) inside the timed run
                echo(f"round {r + 1}/{rounds}: {label}: warm-up of the new replicas ...")
                measure()
            echo(f"round {r + 1}/{rounds}: {label} ...")
            done[i].append(_loaded(measure()))
            replicas = workers or replicas
    records = [median_record(rs) for rs in done]
    for rec in records:
        rec["warmed_up"] = warmup
    compare(records)
    return records


def _per_round(mine: dict[str, Any], other: dict[str, Any], key: str) -> list[float]:
    a, b = mine[f"{key}_rounds"], other[f"{key}_rounds"]
    return [round(x / y, 4) if y else 0.0 for x, y in zip(a, b, strict=False)]


def compare(records: list[dict[str, Any]]) -> None:
    """Ratios for the targets: per-worker throughput against the plain loop's (>= 95%), an
    emnist run's time to target against 1 emnist worker's (2 workers: <= 0.6) and against
    DDP with as many processes (<= 1); of the medians, and per round (``*_rounds``: against
    the same round of the other configuration, when the records have rounds)."""
    plain = records[0]
    base_rate = plain["samples_per_s_per_worker"]
    one = next((r for r in records if r["mode"] == "emnist" and r["workers"] == 1), None)
    ddp = {r["workers"]: r for r in records if r["mode"] == "ddp"}
    paired = all("samples_per_s_per_worker_rounds" in r for r in records)
    for r in records:
        r["throughput_vs_plain"] = r["samples_per_s_per_worker"] / base_rate
        if paired:
            r["throughput_vs_plain_rounds"] = _per_round(r, plain, "samples_per_s_per_worker")
        if r["mode"] == "emnist" and one is not None and one["seconds_to_target"]:
            r["time_vs_one_worker"] = r["seconds_to_target"] / one["seconds_to_target"]
            if paired:
                r["time_vs_one_worker_rounds"] = _per_round(r, one, "seconds_to_target")
        if r["mode"] == "emnist" and r["workers"] in ddp:
            other = ddp[r["workers"]]
            r["time_vs_ddp"] = r["seconds_to_target"] / other["seconds_to_target"]
            if paired:
                r["time_vs_ddp_rounds"] = _per_round(r, other, "seconds_to_target")
        r.pop("curve", None)
