"""``emnist sim sweep``: the scale study, one simulation per (cost file, variant, W).

Each record keeps what explains where more workers stop helping: time to target and to the
end, samples/s, staleness (pushes by others between a worker's read and its push landing),
cas conflicts and lost updates, the busiest store server's utilisation, mean queue wait and
bytes/s, and the run's cost. ``table`` formats them; ``plot`` draws them against W
(matplotlib, the ``plot`` extra).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from emnist.bench.results import format_table
from emnist.sim.config import SimConfig
from emnist.sim.costs import load_costs
from emnist.sim.engine import simulate

__all__ = ["COLUMNS", "PlotUnavailable", "parse_variant", "plot", "record", "sweep", "table"]

COLUMNS = [("costs", "costs", ""), ("variant", "variant", ""), ("workers", "W", ",d"),
           ("time_to_target", "s to target", ".3f"), ("seconds", "s to end", ".3f"),
           ("samples_per_s", "samples/s", ",.0f"), ("staleness_mean", "staleness", ".2f"),
           ("conflicts", "conflicts", ",d"), ("lost", "lost", ",d"),
           ("server_utilisation", "store util", ".0%"),
           ("queue_wait_ms", "queue wait ms", ".3f"),
           ("server_mb_per_s", "store MB/s", ",.0f"), ("usd", "cost $", ".5f"),
           ("accuracy", "accuracy", ".4f"), ("wall_s", "wall s", ".1f")]


# p2p and serverless counters a record keeps when the run has them
P2P_KEYS = ("time_to_target_training", "phases_per_epoch", "epochs", "steps_per_epoch",
            "function_calls", "cold_starts", "function_instances", "function_max_running",
            "function_mean_s", "function_queue_wait_s", "mb_sent_per_epoch")


class PlotUnavailable(RuntimeError):
    pass


def parse_variant(text: str) -> tuple[str, dict[str, Any]]:
    """``NAME:KEY=VALUE[,KEY=VALUE]`` (values as JSON where they parse)."""
    import json
    name, sep, rest = text.partition(":")
    if not sep or not name:
        raise ValueError(f"variant {text!r}: want NAME:KEY=VALUE[,KEY=VALUE]")
    over: dict[str, Any] = {}
    for item in filter(None, rest.split(",")):
        k, eq, v = item.partition("=")
        if not eq:
            raise ValueError(f"variant {text!r}: {item!r} is not KEY=VALUE")
        try:
            over[k.strip().replace("-", "_")] = json.loads(v)
        except ValueError:
            over[k.strip().replace("-", "_")] = v
    return name, over


def record(r: dict[str, Any], costs: str, variant: str) -> dict[str, Any]:
    servers = r.get("servers") or [{}]
    busiest = max(servers, key=lambda s: s.get("utilisation", 0.0))
    return {"costs": costs, "variant": variant, "workers": r["workers"],
            "algorithm": r["algorithm"], "reached": r["reached"],
            "time_to_target": r["time_to_target"], "seconds": r["seconds"],
            "samples": r["samples"], "samples_per_s": r["samples_per_s"],
            "staleness_mean": r.get("staleness_mean", 0.0),
            "staleness_max": r.get("staleness_max", 0), "conflicts": r.get("conflicts", 0),
            "lost": r.get("lost", 0), "accuracy": r["accuracy"],
            "server_utilisation": busiest.get("utilisation", 0.0),
            "queue_wait_ms": 1e3 * busiest.get("queue_wait_mean_s", 0.0),
            "server_mb_per_s": busiest.get("bytes_per_s", 0.0) / 1e6,
            "usd": r["cost"]["usd"], "cost": r["cost"], "nodes": r["nodes"],
            "steps_per_pass": r.get("steps_per_pass"), "stop_reasons": r["stop_reasons"],
            "wall_s": r["wall_s"], "bookkeeping_fraction": r["bookkeeping_fraction"],
            "events": r["events"], "aborted": r.get("aborted", ""),
            "alpha": r["config"]["alpha"],
            "shard_sizes": (r.get("shard_sizes") or [None])[:1],
            **{k: r[k] for k in P2P_KEYS if k in r},
            "config": r["config"]}


ALPHA_SCALING = {"none": lambda w: 1.0, "linear": lambda w: 1.0 / w,
                 "sqrt": lambda w: w ** -0.5}


def scaled(d: dict[str, Any]) -> dict[str, Any]:
    """A variant's ``alpha_scaling`` (not a SimConfig field: the sweep's): Downpour's W
    workers all add their steps to one vector, so ``linear`` divides alpha by W (the sum of
    a round of pushes moves as far as one worker would), ``sqrt`` by sqrt(W)."""
    d = dict(d)
    how = d.pop("alpha_scaling", "none")
    if how not in ALPHA_SCALING:
        raise ValueError(f"alpha_scaling must be one of {', '.join(ALPHA_SCALING)}, "
                         f"got {how!r}")
    d["alpha"] = d["alpha"] * ALPHA_SCALING[how](d["workers"])
    return d


def sweep(base: SimConfig, cost_names: list[str], counts: list[int],
          variants: list[tuple[str, dict[str, Any]]],
          echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    out = []
    for name in cost_names:
        costs = load_costs(name)
        for vname, over in variants:
            for w in counts:
                cfg = SimConfig.from_dict(scaled({**base.to_dict(), **over, "workers": w}))
                t = time.perf_counter()
                r = simulate(cfg, costs)
                rec = record(r, costs.name, vname)
                out.append(rec)
                tt = rec["time_to_target"]
                reach = "target not reached" if tt is None else f"{tt:.3f} s to target"
                echo(f"{costs.name} {vname} W={w}: {reach}, "
                     f"{rec['samples_per_s']:,.0f} samples/s, staleness "
                     f"{rec['staleness_mean']:.2f}, ${rec['usd']:.5f} "
                     f"({time.perf_counter() - t:.1f} s wall)")
    return out


def table(records: list[dict[str, Any]]) -> str:
    return format_table(records, COLUMNS)


def plot(records: list[dict[str, Any]], path: str | Path) -> Path:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("matplotlib is not installed: pip install 'emnist[plot]'") \
            from None
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    panels = [("time_to_target", "virtual s to target"), ("samples_per_s", "samples/s"),
              ("usd", "cost of the run ($)"), ("staleness_mean", "staleness (pushes)")]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in records:
        groups.setdefault((r["costs"], r["variant"]), []).append(r)
    for ax, (key, label) in zip(axes.flat, panels):
        for (costs, variant), rs in groups.items():
            rs = sorted(rs, key=lambda r: r["workers"])
            pts = [(r["workers"], r[key]) for r in rs if r[key] is not None and r[key] > 0]
            if pts:
                xs, ys = zip(*pts)
                name = costs if variant == "base" else f"{costs} {variant}"
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_xscale("log", base=2)
        if key != "staleness_mean":
            ax.set_yscale("log")
        ax.set_xlabel("workers")
        ax.set_ylabel(label)
        ax.grid(True, alpha=0.3)
    axes.flat[0].legend(fontsize=8)
    fig.suptitle("emnist sim sweep (virtual time, real training math)")
    fig.tight_layout()
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(p, dpi=110)
    plt.close(fig)
    return p
