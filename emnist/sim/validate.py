"""``emnist sim validate``: real runs on this machine next to their simulations.

Each case runs for real (``emnist train`` through the local gateway for Downpour and
averaging, the caller's ``run_train``; ``emnist p2p run`` as a subprocess for the peers), one
untimed warm-up then ``rounds`` timed runs, and is simulated ``sim_rounds`` times with the
calibrated costs (timing seeds 0, 1, ...; the training seed is the real one). Compared:
the medians of the time the real tools report (Downpour/averaging: setup invocation to the
last worker's end; p2p: the report's time to target, from the peers' start), and for
Downpour with one worker the accuracy per pass, which must be identical (same math, same
seeds).

Every case runs for each model asked (the MLP and lenet5 by default); lenet5, ~20x the MLP's
compute per minibatch, trains to a lower target (``TARGETS``) with at most
``LENET5_ROUNDS`` rounds so the whole validation stays near a quarter of an hour. The
machine is shared and its load drifts, so ``probe(kind, model)`` (given by the caller)
re-measures what load changes -- the cores left to a step loop, the case's model's own
step, and for p2p the exchange between gradients -- and returns the cost file to simulate
with; the record keeps those figures and the load average. A probe is a few seconds of step
loops, and this VM's speed moves by a third within a minute (two probes of one case
measured speed 0.66 and 0.99, cores 2.0 and 1.13), so the case is probed before every real
round and after the last, and simulated with the mean of all its probes
(``calibrate.probe_mean``: speed and cores from the mean step times); every probe's
figures are in the record (``probes``).

Time to target is a pass count times a pass's seconds. The pass count of asynchronous
workers is chaotic: it depends on how their pushes interleave (two MLP workers at alpha 0.2
cross 0.85 after 3 to 11 passes, 3 to 14 simulated: alike), so a median of a few rounds is
mostly noise; the cases in ``MIN_ROUNDS`` get at least that many rounds, and every record
also compares the two factors apart: passes (epochs for p2p) per round and seconds per pass,
and for the store cases the share of pushes that conflicted (cas retries).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from emnist.bench.results import format_table
from emnist.sim.calibrate import probe_mean
from emnist.sim.config import SimConfig
from emnist.sim.costs import load_costs, parse_costs
from emnist.sim.engine import simulate

__all__ = ["CASES", "COLUMNS", "table", "validate"]

TOLERANCE = 0.25
MODELS = ("mlp", "lenet5")
TARGETS = {"mlp": {"train": 0.85, "p2p": 0.84}, "lenet5": {"train": 0.83, "p2p": 0.80}}
LENET5_ROUNDS = 3
MIN_ROUNDS = {("downpour-2", "mlp"): 15}  # real and simulated rounds, at least (see above)
STORE_BASE = {"dataset": "fashion-mnist", "n_fetch": 10, "n_push": 10}
P2P_BASE = ["--lr", "0.3", "--epochs", "10"]
# name: (kind, real settings, simulated settings)
CASES: dict[str, tuple[str, Any, dict[str, Any]]] = {
    "downpour-1": ("train", {"number_of_workers": 1},
                   {"algorithm": "downpour", "workers": 1}),
    "downpour-2": ("train", {"number_of_workers": 2},
                   {"algorithm": "downpour", "workers": 2}),
    "averaging-2": ("train", {"number_of_workers": 2, "algorithm": "averaging",
                              "average_every": 10},
                    {"algorithm": "averaging", "workers": 2, "average_every": 10}),
    "p2p-3": ("p2p", ["--batch-size", "100", "--sync-every", "1"],
              {"algorithm": "p2p", "workers": 3, "batch_size": 100, "sync_every": 1}),
    "serverless-3": ("p2p", ["--serverless", "--batch-size", "50", "--sync-every", "2"],
                     {"algorithm": "p2p", "workers": 3, "batch_size": 50, "sync_every": 2,
                      "serverless": True}),
}
COLUMNS = [("case", "case", ""), ("model", "model", ""), ("target", "target", ".2f"),
           ("measured_median_s", "measured s (median)", ".3f"),
           ("simulated_median_s", "simulated s (median)", ".3f"),
           ("error", "error", "+.0%"), ("within", "within 25%", ""),
           ("measured_rounds", "measured rounds", ""),
           ("simulated_rounds", "simulated rounds", ""),
           ("passes", "passes (measured / simulated median)", ""),
           ("per_pass_error", "s per pass error", "+.0%"),
           ("curve_identical", "W=1 curve", "")]


def _p2p_real(gateway: str, argv: list[str], broker: str, store: str, model: str,
              target: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="emnist-sim-val-") as tmp:
        out = Path(tmp) / "summary.json"
        cmd = [sys.executable, "-m", "emnist.cli", "--gateway", gateway, "p2p", "run",
               "--size", "3", "--broker", broker, "--store", store, "--json", str(out),
               "--out", str(Path(tmp) / "runs"), "--model", model, "--target-accuracy",
               str(target), *P2P_BASE, *argv]
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800, check=False)
        if r.returncode != 0 or not out.exists():
            raise RuntimeError(f"p2p run failed: {(r.stderr or r.stdout).strip()[-800:]}")
        return json.loads(out.read_text())


def _simulated(costs: Any, settings: dict[str, Any], rounds: int, model: str,
               extra: dict[str, Any]) -> list[dict[str, Any]]:
    base = {"dataset": "fashion-mnist", "model": model, **extra}
    if settings["algorithm"] == "p2p":
        base.update(target_accuracy=TARGETS[model]["p2p"], lr=0.3, iterations=10)
    else:
        base.update(target_accuracy=TARGETS[model]["train"], n_fetch=10, n_push=10)
    return [simulate(SimConfig.from_dict({**base, **settings, "timing_seed": s}), costs)
            for s in range(rounds)]


def _sim_seconds(r: dict[str, Any]) -> float:
    if r["algorithm"] == "p2p":
        t = r.get("time_to_target_training")
        return float("nan") if t is None else t
    return r["seconds"]


def validate(gateway: str, costs_name: str, rounds: int, sim_rounds: int, cases: list[str], *,
             broker: str, store: str, run_train: Callable[[dict[str, Any]], Any],
             echo: Callable[[str], None] = print, models: tuple[str, ...] = MODELS,
             probe: Callable[[str, str], tuple[dict[str, Any], dict[str, Any]]] | None = None,
             sim_extra: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    """Every case (or ``cases``) for every model: real rounds and simulated rounds, side by
    side. ``run_train(config)`` runs ``emnist train`` and returns its RunOutcome;
    ``probe(kind, model)`` ("train", "p2p" or "serverless"), if given, re-measures the
    machine (before every real round of a case and after the last) and returns (cost
    document, what it measured)."""
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise ValueError(f"unknown case {unknown[0]!r}; known: {', '.join(CASES)}")
    bad = sorted(set(models) - set(TARGETS))
    if bad:
        raise ValueError(f"unknown model {bad[0]!r}; validated: {', '.join(TARGETS)}")
    out = []
    for model in models:
        for name in cases or list(CASES):
            n = min(rounds, LENET5_ROUNDS) if model == "lenet5" else rounds
            sn = min(sim_rounds, LENET5_ROUNDS) if model == "lenet5" else sim_rounds
            least = MIN_ROUNDS.get((name, model), 0)
            try:
                rec = _case(name, model, gateway, costs_name, max(n, least), max(sn, least),
                            broker, store, run_train, echo, sim_extra or {}, probe)
            except Exception as e:  # noqa: BLE001 - one failed case must not lose the others
                echo(f"{name} {model}: FAILED: {e}")
                rec = {"case": name, "model": model, "costs": costs_name,
                       "error": str(e)[-800:], "within": False}
            out.append(rec)
    return out


def passes_of(kind: str, real: Any) -> int:
    """Passes a real round took: the most any worker finished (p2p: epochs)."""
    if kind == "p2p":
        return int(real.get("epochs") or 0)
    return max((int(r.get("iteration", 0)) for r in real.results), default=0)


def _push_conflicts(results: list[dict[str, Any]]) -> tuple[int, int]:
    return (sum(int(r.get("push_retries", 0)) for r in results),
            sum(int(r.get("pushes", 0)) for r in results))


def _case(name: str, model: str, gateway: str, costs_name: str, rounds: int, sim_rounds: int,
          broker: str, store: str, run_train: Callable[[dict[str, Any]], Any],
          echo: Callable[[str], None], sim_extra: dict[str, Any],
          probe: Callable[[str, str], tuple[dict[str, Any], dict[str, Any]]] | None
          ) -> dict[str, Any]:
    kind, real, settings = CASES[name]
    target = TARGETS[model][kind]
    probes = []
    echo(f"{name} {model}: warm-up, then {rounds} real run(s) ...")
    measured, curves, phases, passes = [], [], [], []
    conflicts = [0, 0]
    load = [round(x, 2) for x in os.getloadavg()]
    probe_kind = "serverless" if settings.get("serverless") else kind
    for i in range(rounds + 1):
        if probe is not None:
            probes.append(probe(probe_kind, model))
        t = time.perf_counter()
        if kind == "train":
            outcome = run_train({**STORE_BASE, "target_accuracy": target, "model": model,
                                 **real})
            seconds = outcome.seconds
            curves.append(sorted(outcome.results, key=lambda r: r["worker_id"])[0]
                          .get("curve"))
            got = outcome
        else:
            got = _p2p_real(gateway, real, broker, store, model, target)
            seconds = got.get("time_to_target") or float("nan")
            phases.append({k: got.get(k) for k in ("epochs", "epoch_s", "compute_s",
                                                    "send_s", "recv_s", "update_s",
                                                    "val_s", "barrier_s")})
        echo(f"  {'warm-up' if i == 0 else f'round {i}'}: {seconds:.3f} s "
             f"({time.perf_counter() - t:.1f} s wall)")
        if i:
            measured.append(seconds)
            passes.append(passes_of(kind, got))
            if kind == "train":
                conflicts = [x + y for x, y in zip(conflicts, _push_conflicts(got.results))]
    load.append(round(os.getloadavg()[0], 2))
    if probe is not None:
        probes.append(probe(probe_kind, model))
        doc = probe_mean(probes)
        costs = parse_costs(yaml.safe_dump(doc, sort_keys=False), f"{costs_name} (probed)")
    else:
        costs = load_costs(costs_name)
    echo(f"{name} {model}: {sim_rounds} simulation(s) ...")
    sims = _simulated(costs, settings, sim_rounds, model, sim_extra)
    simulated = [_sim_seconds(r) for r in sims]
    sim_passes = [int(r.get("epochs" if kind == "p2p" else "iterations") or 0) for r in sims]
    m, s = statistics.median(measured), statistics.median(simulated)
    mp, sp = _per_pass(measured, passes), _per_pass(simulated, sim_passes)
    rec: dict[str, Any] = {
        "case": name, "model": model, "target": target, "costs": costs.name,
        "loadavg_before_1_5_15_after_1": load, "measured_median_s": m,
        "simulated_median_s": s, "error": (s - m) / m,
        "within": abs(s - m) <= TOLERANCE * m,
        "measured_rounds": [round(x, 3) for x in measured],
        "simulated_rounds": [round(x, 3) for x in simulated],
        "measured_passes": passes, "simulated_passes": sim_passes,
        "passes": f"{statistics.median(passes):g} / {statistics.median(sim_passes):g}",
        "measured_s_per_pass": mp, "simulated_s_per_pass": sp,
        "per_pass_error": (sp - mp) / mp if mp else float("nan"),
        "curve_identical": "", "real": real, "simulated": settings,
        "simulated_accuracy": [r["accuracy"] for r in sims],
        "simulated_wall_s": [round(r["wall_s"], 2) for r in sims],
        "probes": [notes for _, notes in probes]}
    if kind == "train":  # cas retries per push: how often the workers' pushes collided
        rec["measured_conflicts_per_push"] = conflicts[0] / max(1, conflicts[1])
        rec["simulated_conflicts_per_push"] = (sum(r["conflicts"] for r in sims)
                                               / max(1, sum(r["pushes"] for r in sims)))
    if kind == "p2p":  # the real report's per-epoch phases next to the simulated ones
        rec["measured_phases"] = phases[1:]
        rec["simulated_phases"] = [r.get("phases_per_epoch") for r in sims]
    if name == "downpour-1" and curves[-1] is not None:
        real_curve = [(c[1], c[2]) for c in curves[-1]]
        sim_curve = [(c[1], c[2]) for c in sims[0]["worker_curves"][0]]
        rec["curve_identical"] = real_curve == sim_curve
        rec["real_curve"], rec["sim_curve"] = real_curve, sim_curve
    echo(f"{name} {model}: measured {m:.3f} s, simulated {s:.3f} s ({rec['error']:+.0%}); "
         f"passes {rec['passes']}, s per pass {rec['per_pass_error']:+.0%}")
    return rec


def _per_pass(seconds: list[float], passes: list[int]) -> float:
    """Median seconds per pass over the rounds that finished at least one."""
    per = [t / p for t, p in zip(seconds, passes) if p and t == t]
    return statistics.median(per) if per else float("nan")


def table(records: list[dict[str, Any]]) -> str:
    return format_table(records, COLUMNS)

