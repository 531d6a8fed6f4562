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
from statistics import mean
from typing import Any

from emnist.train.config import TrainConfig

COLUMNS = [("mode", "mode", ""), ("workers", "workers", ""),
           ("samples_per_s_per_worker", "samples/s per worker", ",.0f"),
           ("seconds_to_target", "s to target", ".2f"), ("target_accuracy", "target", ""),
           ("accuracy", "accuracy", ".4f"), ("iterations", "iterations", ""),
           ("reached", "reached", "")]

ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def plain_record(cfg: TrainConfig) -> dict[str, Any]:
    """The plain loop in a fresh process, so one BLAS thread is set before numpy loads."""
    out = subprocess.run([sys.executable, "-m", "emnist.bench.plain", json.dumps(cfg.to_dict())],
                         env={**os.environ, **ONE_THREAD}, capture_output=True, text=True,
                         check=False)
    if out.returncode != 0:
        raise RuntimeError(f"plain loop failed: {out.stderr.strip()[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench_train(run: Callable[[dict[str, Any]], Any], worker_counts: list[int], target: float,
                dataset: str, n_fetch: int, n_push: int, store_url: str,
                echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    base = {"target_accuracy": target, "dataset": dataset, "n_fetch": n_fetch,
            "n_push": n_push, "store_url": store_url}
    cfg = TrainConfig(**base)
    plain_record(cfg)  # warm-up: shard preparation, page cache
    echo("plain loop ...")
    records = [plain_record(cfg)]
    for workers in worker_counts:
        config = {**base, "number_of_workers": workers}
        echo(f"emnist, {workers} worker(s): warm-up ...")
        run(config)
        echo(f"emnist, {workers} worker(s): timed ...")
        out = run(config)
        best = max(out.results, key=lambda r: r["accuracy"])
        records.append({
            "mode": "emnist", "workers": workers,
            "samples_per_s_per_worker": mean(r["samples_per_s"] for r in out.results),
            "seconds_to_target": out.seconds, "target_accuracy": target,
            "accuracy": best["accuracy"], "iterations": max(r["iterations"] for r in out.results),
            "reached": out.reached, "run_id": out.run_id,
            "bytes_pushed": sum(r["bytes_pushed"] for r in out.results),
            "pushes": sum(r["pushes"] for r in out.results),
            "fetches": sum(r["fetches"] for r in out.results)})
    base_rate = records[0]["samples_per_s_per_worker"]
    for r in records:
        r["throughput_vs_plain"] = r["samples_per_s_per_worker"] / base_rate
    return records
