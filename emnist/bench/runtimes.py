"""The local stack's two runtimes side by side: replicas as processes of the dev venv, and as
containers of the real images (what OpenFaaS runs). Per round and runtime, interleaved so both
see the same machine: the stack's start (every replica healthy), one replica's start (scale
emnist-grad 0 -> 1, returned once healthy: the cold start a scale from zero pays), and the
same training run's time to target (setup invoked to the last worker's result)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from emnist.gateway.client import GatewayClient
from emnist.runner import RunOutcome

__all__ = ["COLUMNS", "RUNTIMES", "bench_runtimes"]

RUNTIMES = ("process", "container")
COLUMNS = [("runtime", "runtime", ""), ("round", "round", ""),
           ("stack_start_s", "stack start s", ".2f"), ("replica_start_s", "replica start s", ".2f"),
           ("time_to_target_s", "time to target s", ".2f"), ("accuracy", "accuracy", ".4f"),
           ("reached", "reached", "")]


def bench_runtimes(gw: GatewayClient, up: Callable[[str], None], down: Callable[[], None],
                   train: Callable[[], RunOutcome], rounds: int,
                   runtimes: tuple[str, ...] = RUNTIMES,
                   echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """``up(runtime)`` starts the stack, ``down()`` stops it, ``train()`` runs one training
    run on it; one record per (round, runtime)."""
    records = []
    for r in range(1, rounds + 1):
        for runtime in runtimes:
            echo(f"round {r}: {runtime} runtime")
            t0 = time.perf_counter()
            up(runtime)
            try:
                stack_start = time.perf_counter() - t0
                gw.scale("emnist-grad", 0)
                t1 = time.perf_counter()
                gw.scale("emnist-grad", 1)
                replica_start = time.perf_counter() - t1
                out = train()
            finally:
                down()
            records.append({
                "runtime": runtime, "round": r, "stack_start_s": stack_start,
                "replica_start_s": replica_start, "time_to_target_s": out.seconds,
                "accuracy": max((x.get("accuracy", 0.0) for x in out.results), default=0.0),
                "reached": out.reached, "workers": out.workers, "run_id": out.run_id,
                "at": time.time()})
    return records
