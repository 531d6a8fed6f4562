"""The benchmark matrix of the original study: stack variants (batch size x workers), rounds.

Each variant is a whole stack file (``tests/stacks/emnist{batch}_{workers}.yml``), deployed
through the gateway API like ``faas-cli deploy -f``; every run appends one JSON line to a
results file, so an unattended ``nohup ./test.sh &`` keeps what it measured even if stopped.
"""

from __future__ import annotations

import json
import math
import os
import statistics
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from emnist.bench.results import format_table, parse_results
from emnist.cluster import k8s
from emnist.gateway.client import GatewayClient, GatewayError, deploy_request
from emnist.gateway.stack import Stack, StackError, load_stack
from emnist.runner import SETUP, TRAIN, RunError, start_run, wait_replicas, watch

__all__ = ["Variant", "load_records", "load_variant", "report", "run_suite", "run_variant",
           "summarize", "worker_results"]

WORKER_FIELDS = ("worker_id", "iterations", "seconds", "accuracy", "reached", "stop_reason",
                 "samples_per_s", "hostname", "curve")


@dataclass
class Variant:
    path: Path
    name: str
    batch_size: int
    workers: int
    stack: Stack


def _int(value: str | None, what: str, path: Path) -> int:
    try:
        return int(value or "")
    except ValueError:
        raise StackError(f"{path}: {what} must be an integer, got {value!r}") from None


def load_variant(path: str | os.PathLike[str], env: Mapping[str, str]) -> Variant:
    """A stack variant: batch_size and number_of_workers from emnist-setup's environment."""
    stack = load_stack(path, env)
    missing = {SETUP, TRAIN} - set(stack.functions)
    if missing:
        raise StackError(f"{stack.path}: a benchmark variant needs {sorted(missing)}")
    setup_env = stack.functions[SETUP].environment
    workers = setup_env.get("number_of_workers") or \
        stack.functions[TRAIN].labels.get("com.openfaas.scale.min")
    return Variant(stack.path, stack.path.stem,
                   _int(setup_env.get("batch_size"), "emnist-setup's batch_size", stack.path),
                   _int(workers, "number_of_workers (or emnist-train's scale.min)", stack.path),
                   stack)


def worker_results(lines: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Parse log messages per replica, recording its pod (instance) and node with each result."""
    by_instance: dict[str, list[Mapping[str, Any]]] = {}
    for ln in lines:
        by_instance.setdefault(str(ln.get("instance", "")), []).append(ln)
    rows = []
    for instance, lns in by_instance.items():
        node = next((ln["node"] for ln in lns if ln.get("node")), "")
        for r in parse_results(str(ln.get("text", "")) for ln in lns):
            rows.append({**r, "pod": instance, "node": node})
    return rows


def _nodes(provider: str, namespace: str) -> dict[str, str]:
    """Pod name -> node, best effort (the local gateway: this machine; a cluster: kubectl)."""
    if provider == k8s.LOCAL_PROVIDER:
        return {"*": os.uname().nodename}
    try:
        return {p.name: p.node for p in k8s.pods(TRAIN, namespace)}
    except k8s.KubectlError:
        return {}


def deploy_variant(gw: GatewayClient, variant: Variant, *, use_kubectl: bool | None = None,
                   namespace: str = k8s.FUNCTIONS_NAMESPACE, replica_timeout: float = 300,
                   echo: Callable[[str], None] = lambda m: None) -> None:
    """faas-cli deploy -f VARIANT, then emnist-train scaled to the variant's workers."""
    for fn in variant.stack.functions.values():
        gw.deploy(deploy_request(fn))
    k8s.scale_function(gw, TRAIN, variant.workers, use_kubectl=use_kubectl,
                       namespace=namespace, echo=echo)
    wait_replicas(gw, TRAIN, variant.workers, timeout=replica_timeout)


def run_variant(gw: GatewayClient, variant: Variant, round_no: int, *,
                config: Mapping[str, Any], timeout: float,
                provider: str = "", namespace: str = k8s.FUNCTIONS_NAMESPACE) -> dict[str, Any]:
    """One timed run of a deployed variant; the record appended to the results file."""
    started = datetime.now(timezone.utc).isoformat(timespec="seconds")
    state, invoked = start_run(gw, dict(config))  # no store: the variant's deployment has one
    out = watch(gw, state, invoked, timeout=timeout)
    nodes = _nodes(provider, namespace)
    workers = []
    for r in sorted(out.results, key=lambda r: r["worker_id"]):
        w = {k: r.get(k) for k in WORKER_FIELDS}
        w["pod"] = r.get("hostname")
        w["node"] = nodes.get(w["pod"], nodes.get("*", ""))
        workers.append(w)
    cfg = state.get("config", {})
    return {"stack": variant.name, "stack_file": str(variant.path),
            "batch_size": cfg.get("batch_size", variant.batch_size),
            "workers": out.workers, "round": round_no, "run_id": out.run_id,
            "seconds": out.seconds, "reached": out.reached, "target": out.target,
            "dataset": cfg.get("dataset"), "started": started, "gateway": gw.url,
            "provider": provider, "results": workers}


def _append(path: Path, record: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def run_suite(gw: GatewayClient, paths: list[str], *, rounds: int, results: Path,
              env: Mapping[str, str], config: Mapping[str, Any], timeout: float,
              warmup: int = 0, use_kubectl: bool | None = None,
              namespace: str = k8s.FUNCTIONS_NAMESPACE,
              echo: Callable[[str], None] = print) -> tuple[int, int]:
    """Every variant, ``rounds`` timed runs each (after ``warmup`` untimed ones).

    A failed run is logged and recorded with its error, and the suite goes on; returns
    (runs recorded, runs failed).
    """
    variants = [load_variant(p, env) for p in paths]  # all parse before anything runs
    provider = k8s.gateway_provider(gw)
    done = failed = 0
    for v in variants:
        echo(f"== {v.name}: batch {v.batch_size}, {v.workers} workers ({v.path})")
        try:
            deploy_variant(gw, v, use_kubectl=use_kubectl, namespace=namespace, echo=echo)
        except (RunError, GatewayError, k8s.KubectlError, OSError, ValueError) as e:
            echo(f"   deploy failed: {e}")
            for r in range(1, rounds + 1):
                _append(results, {"stack": v.name, "stack_file": str(v.path),
                                  "batch_size": v.batch_size, "workers": v.workers,
                                  "round": r, "error": f"deploy: {e}"})
            failed += rounds
            continue
        for r in range(1 - warmup, rounds + 1):
            label = f"warm-up {r + warmup}" if r < 1 else f"round {r}/{rounds}"
            t0 = time.monotonic()
            try:
                rec = run_variant(gw, v, r, config=config, timeout=timeout,
                                  provider=provider, namespace=namespace)
            except (RunError, GatewayError, OSError, ValueError) as e:
                echo(f"   {label}: FAILED after {time.monotonic() - t0:.1f}s: {e}")
                if r >= 1:
                    _append(results, {"stack": v.name, "stack_file": str(v.path),
                                      "batch_size": v.batch_size, "workers": v.workers,
                                      "round": r, "error": str(e)})
                    failed += 1
                continue
            its = "/".join(str(w["iterations"]) for w in rec["results"])
            echo(f"   {label}: run {rec['run_id']} {rec['seconds']:.2f}s, iterations {its}, "
                 f"{'reached' if rec['reached'] else 'did NOT reach'} {rec['target']}")
            if r >= 1:
                _append(results, rec)
                done += 1
    return done, failed


# -- report ------------------------------------------------------------------------------------

def load_records(path: str | os.PathLike[str]) -> tuple[list[dict[str, Any]], int]:
    """The records of a results file and how many lines could not be read."""
    records, bad = [], 0
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except ValueError:
            bad += 1
            continue
        if isinstance(rec, dict) and "stack" in rec:
            records.append(rec)
        else:
            bad += 1
    return records, bad


def _key(rec: Mapping[str, Any]) -> tuple:
    return (rec.get("batch_size") or 0, rec.get("workers") or 0, rec.get("stack", ""))


def _mean_std(values: list[float]) -> tuple[float | None, float | None]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def per_worker_rows(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per stack, round and worker (the original's per-round tables)."""
    rows = []
    for rec in sorted(records, key=lambda r: (_key(r), r.get("round", 0), r.get("started", ""))):
        base = {"stack": rec["stack"], "batch_size": rec.get("batch_size"),
                "workers": rec.get("workers"), "round": rec.get("round"),
                "run_id": rec.get("run_id", "-"), "run_seconds": rec.get("seconds")}
        if rec.get("error"):
            rows.append({**base, "worker_id": "-", "stop_reason": "error: " + rec["error"][:60]})
            continue
        for w in rec.get("results", []):
            rows.append({**base, **{k: w.get(k) for k in ("worker_id", "iterations", "seconds",
                                                          "accuracy", "stop_reason", "pod")}})
    return rows


def summarize(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per stack: mean and standard deviation across rounds (time, iterations per worker)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for rec in records:
        groups.setdefault(_key(rec), []).append(rec)
    rows = []
    for key in sorted(groups):
        recs = groups[key]
        ok = [r for r in recs if not r.get("error")]
        t_mean, t_std = _mean_std([r["seconds"] for r in ok])
        its = [statistics.fmean(w["iterations"] for w in r["results"]) for r in ok
               if r.get("results")]
        wts = [statistics.fmean(w["seconds"] for w in r["results"]) for r in ok
               if r.get("results")]
        i_mean, i_std = _mean_std(its)
        w_mean, w_std = _mean_std(wts)
        rows.append({"stack": recs[0]["stack"], "batch_size": key[0], "workers": key[1],
                     "rounds": len(ok), "failed": len(recs) - len(ok),
                     "time_mean": t_mean, "time_std": t_std, "iters_mean": i_mean,
                     "iters_std": i_std, "wtime_mean": w_mean, "wtime_std": w_std,
                     "reached": f"{sum(1 for r in ok if r.get('reached'))}/{len(ok)}"})
    return rows


ROUND_COLUMNS = [("stack", "stack", ""), ("batch_size", "batch", ""), ("workers", "workers", ""),
                 ("round", "round", ""), ("run_id", "run", ""),
                 ("run_seconds", "run time (s)", ".2f"), ("worker_id", "worker", ""),
                 ("iterations", "iterations", ""), ("seconds", "time (s)", ".3f"),
                 ("accuracy", "accuracy", ".4f"), ("stop_reason", "stopped by", ""),
                 ("pod", "pod", "")]
SUMMARY_COLUMNS = [("stack", "stack", ""), ("batch_size", "batch", ""),
                   ("workers", "workers", ""), ("rounds", "rounds", ""),
                   ("time_mean", "run time mean (s)", ".2f"), ("time_std", "std", ".2f"),
                   ("iters_mean", "iterations/worker mean", ".2f"), ("iters_std", "std", ".2f"),
                   ("wtime_mean", "worker time mean (s)", ".3f"), ("wtime_std", "std", ".3f"),
                   ("reached", "reached", ""), ("failed", "failed", "")]


def report(records: list[dict[str, Any]]) -> str:
    """The per-round table and the summary table, as markdown."""
    return ("Per round (each worker's iterations and time as it logged them; run time is from "
            "the setup call to the last worker):\n\n"
            + format_table(per_worker_rows(records), ROUND_COLUMNS)
            + "\n\nAcross rounds (mean and sample standard deviation):\n\n"
            + format_table(summarize(records), SUMMARY_COLUMNS))
