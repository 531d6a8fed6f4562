"""`emnist bench train`: what distribution costs, against a plain loop on the same data.

Each emnist configuration runs once untimed first (replica start, imports, shard
preparation), then once timed, like nanoGPT's bench.py warms up before it measures.
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

COLUMNS = [("mode", "mode", ""), ("workers", "workers", ""),
           ("samples_per_s_per_worker", "samples/s per worker", ",.0f"),
           ("seconds_to_target", "s to target", ".2f"), ("target_accuracy", "target", ""),
           ("accuracy", "accuracy", ".4f"), ("iterations", "iterations", ""),
           ("reached", "reached", ""), ("throughput_vs_plain", "vs plain", ".0%")]

ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def plain_record(cfg: TrainConfig) -> dict[str, Any]:
    """The plain loop in a fresh process, so one BLAS thread is set before numpy loads."""
    out = subprocess.run([sys.executable, "-m", "emnist.bench.plain", json.dumps(cfg.to_dict())],
                         env={**os.environ, **ONE_THREAD}, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"plain loop failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def emnist_record(outcome: Any, workers: int, target: float) -> dict[str, Any]:
    results = outcome.results
    return {"mode": "emnist", "workers": workers,
            "samples_per_s_per_worker": mean(r["samples_per_s"] for r in results),
            "seconds_to_target": outcome.seconds, "target_accuracy": target,
            "accuracy": max(r["accuracy"] for r in results),
            "iterations": max(r["iterations"] for r in results), "reached": outcome.reached,
            "run_id": outcome.run_id, "pushes": sum(r["pushes"] for r in results),
            "fetches": sum(r["fetches"] for r in results),
            "bytes_pushed": sum(r["bytes_pushed"] for r in results)}


def median_record(rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """The median round by each timing; every round's figures are kept alongside."""
    out = dict(rounds[0])
    for key in ("samples_per_s_per_worker", "seconds_to_target"):
        out[key] = median(r[key] for r in rounds)
        out[f"{key}_rounds"] = [round(r[key], 4) for r in rounds]
    out["reached"] = all(r["reached"] for r in rounds)
    out["rounds"] = len(rounds)
    return out


def bench_train(run: Callable[[dict[str, Any]], Any], worker_counts: list[int], target: float,
                dataset: str, n_fetch: int, n_push: int, rounds: int = 3,
                echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Median of ``rounds`` timed runs per configuration, after one untimed warm-up each."""
    base = {"target_accuracy": target, "dataset": dataset, "n_fetch": n_fetch,
            "n_push": n_push}  # no store: the functions use their deployment's
    cfg = TrainConfig(**base)
    echo("plain loop: warm-up, then timed rounds ...")
    plain_record(cfg)  # shard preparation, page cache
    records = [median_record([plain_record(cfg) for _ in range(rounds)])]
    for workers in worker_counts:
        config = {**base, "number_of_workers": workers}
        echo(f"emnist, {workers} worker(s): warm-up, then timed rounds ...")
        run(config)
        records.append(median_record([emnist_record(run(config), workers, target)
                                      for _ in range(rounds)]))
    base_rate = records[0]["samples_per_s_per_worker"]
    for r in records:
        r["throughput_vs_plain"] = r["samples_per_s_per_worker"] / base_rate
        r.pop("curve", None)
    return records
