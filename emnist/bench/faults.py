"""`emnist bench faults`: time to target per execution type x algorithm, and what a SIGKILLed
replica and a restarted memcached cost, on the local gateway.

Fault costs compare a run with the fault against the same run without it (same seed, same
slowed-down learning rate so the fault lands mid-run). Local only: replicas are found by their
HOSTNAME in /proc and memcached is restarted through the pid file `emnist up` wrote.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from statistics import median
from typing import Any

from emnist.gateway.client import GatewayClient
from emnist.runner import TRAIN, RunError, start_run, status, wait_replicas, watch
from emnist.wait import wait_until

SLOW = {"alpha": 0.02, "target_accuracy": 0.84, "number_of_workers": 2, "lease_seconds": 1.0,
        "iterations": 200}


def pid_of(hostname: str) -> int:
    """The local replica process whose environment says HOSTNAME=hostname."""
    needle = f"HOSTNAME={hostname}".encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    return int(entry.name)
            except OSError:
                continue
    raise LookupError(f"no process with HOSTNAME={hostname}")


def timed_run(gw: GatewayClient, config: dict[str, Any],
              fault: Callable[[str], None] | None = None) -> dict[str, Any]:
    """One run; ``fault(run_id)`` is called from a thread once worker 0 finished 2 passes."""
    gw.scale(TRAIN, config["number_of_workers"])
    wait_replicas(gw, TRAIN, config["number_of_workers"])
    state, invoked = start_run(gw, config)
    if fault is not None:
        def inject() -> None:
            while True:
                try:
                    p = status(gw, state["run_id"])["progress"][0]
                except RunError:  # the store may still be settling after the last fault
                    time.sleep(0.05)
                    continue
                if p and p["iteration"] >= 2:
                    fault(p["hostname"])
                    return
                time.sleep(0.02)
        threading.Thread(target=inject, daemon=True).start()
    out = watch(gw, state, invoked, timeout=600)
    return {"seconds": out.seconds, "reached": out.reached, "run_id": out.run_id,
            "iterations": max(r["iterations"] for r in out.results),
            "recoveries": len(out.recoveries)}


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def restart_memcached(pidfile: Path, start: Callable[[], None]) -> Callable[[str], None]:
    def fault(_hostname: str) -> None:
        pid = int(pidfile.read_text())
        os.kill(pid, signal.SIGKILL)
        wait_until(lambda: not _alive(pid), 10, f"memcached (pid {pid}) survived SIGKILL",
                   interval=0.01)
        start()
    return fault


def bench_faults(gw: GatewayClient, rounds: int, checkpoint_dir: str,
                 restart: Callable[[str], None],
                 echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    records = []
    for etype in (1, 2, 3):
        for algorithm in ("downpour", "averaging"):
            echo(f"type {etype} {algorithm} ...")
            cfg = {"number_of_workers": 2, "target_accuracy": 0.84, "execution_type": etype,
                   "algorithm": algorithm}
            runs = [timed_run(gw, cfg) for _ in range(rounds)]
            records.append({"case": f"type {etype} {algorithm}", "execution_type": etype,
                            "algorithm": algorithm, "target_accuracy": 0.84,
                            "seconds_to_target": median(r["seconds"] for r in runs),
                            "seconds_rounds": [round(r["seconds"], 3) for r in runs],
                            "reached": all(r["reached"] for r in runs)})
    ckpt = {**SLOW, "checkpoint_url": checkpoint_dir}
    cases = [("slow baseline", SLOW, None),
             ("slow + SIGKILL of worker 0's replica", SLOW,
              lambda host: os.kill(pid_of(host), signal.SIGKILL)),
             ("slow + checkpoints", ckpt, None),
             ("slow + checkpoints + memcached restart", ckpt, restart)]
    for name, cfg, fault in cases:
        echo(f"{name} ...")
        runs = [timed_run(gw, cfg, fault) for _ in range(rounds)]
        records.append({"case": name, "target_accuracy": 0.84,
                        "seconds_to_target": median(r["seconds"] for r in runs),
                        "seconds_rounds": [round(r["seconds"], 3) for r in runs],
                        "reached": all(r["reached"] for r in runs),
                        "recoveries": [r["recoveries"] for r in runs]})
    by = {r["case"]: r["seconds_to_target"] for r in records}
    for r in records:
        base = {"slow + SIGKILL of worker 0's replica": "slow baseline",
                "slow + checkpoints + memcached restart": "slow + checkpoints"}.get(r["case"])
        if base:
            r["cost_seconds"] = r["seconds_to_target"] - by[base]
    return records


COLUMNS = [("case", "case", ""), ("seconds_to_target", "s to 0.84 (median)", ".2f"),
           ("cost_seconds", "cost of the fault (s)", ".2f"), ("reached", "reached", "")]
