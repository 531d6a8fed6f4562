#!/usr/bin/env python3
"""Rewrite docs/scale.md's tables from the sweeps' JSON (results/sim-sweep-*.json).

The doc's tables are a reading of the JSON (fewer columns than `emnist sim sweep --table`,
and for the p2p claim per-step figures): this is where that reading lives, so the tables
follow a re-run of scripts/scale_study.sh instead of being edited by hand. Prose is not
touched.

    scripts/scale_tables.py            # rewrite docs/scale.md
    scripts/scale_tables.py --check    # exit 1 if the doc's tables differ from the JSON
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
SWEEPS = ("nfp", "alpha", "batch", "store", "update")  # the "variant | W | alpha" tables
BATCH_TABLES = ("study", "local")  # the "batch | s to target" tables, in the doc's order
P2P_TABLES = ("p2p-mlp", "p2p-lenet5")  # the "gradients | K in flight" tables


def _load(results: Path, name: str) -> list[dict[str, Any]]:
    return json.loads((results / f"sim-sweep-{name}.json").read_text())


def _opt(x: float | None, fmt: str) -> str:
    return "—" if x is None else format(x, fmt)


def sweep_row(r: dict[str, Any], show_alpha: bool) -> str:
    shard = r["shard_sizes"][0] if r.get("shard_sizes") else ""
    cells = [r["variant"], str(r["workers"]), format(r["alpha"], ".4f") if show_alpha else "—",
             _opt(r["time_to_target"], ".3f"), format(r["samples"], ",d"),
             format(round(r["samples_per_s"]), ",d"), format(r["staleness_mean"], ".1f"),
             format(r["conflicts"], ",d"), format(r["server_utilisation"], ".0%"),
             format(r["queue_wait_ms"], ".3f"), format(round(r["server_mb_per_s"]), ",d"),
             format(r["usd"], ".5f"), format(r["accuracy"], ".3f"), str(shard)]
    return "| " + " | ".join(cells) + " |"


def batch_row(r: dict[str, Any]) -> str:
    cells = [r["variant"], _opt(r["time_to_target"], ".2f"),
             format(round(r["samples_per_s"]), ",d"), format(r["lost"], ",d"),
             format(r["staleness_mean"], ".1f"), format(r["server_utilisation"], ".0%"),
             format(r["queue_wait_ms"], ".2f"), format(r["usd"], ".4f"),
             format(r["accuracy"], ".4f")]
    return "| " + " | ".join(cells) + " |"


def p2p_rows(runs: list[dict[str, Any]]) -> list[str]:
    """Per synchronous step of one peer: the gradient phase, and its price (the peer VM's
    time in it, by the cost file's prices, plus the functions' share), against the first
    run (the peer alone)."""
    from emnist.sim.billing import bill
    from emnist.sim.costs import load_costs
    rows, base = [], None
    for r in runs:
        doc = load_costs(r["costs"]).to_dict()
        node = doc["nodes"][0]
        vm_s = bill(doc["prices"], 1.0, [(node["cores"], node["memory_gb"], 1)])["vm_usd"]
        step_s = r["phases_per_epoch"]["compute_s"] / r["steps_per_epoch"]
        usd = step_s * vm_s + r["cost"]["function_usd"] / (
            r["workers"] * r["epochs"] * r["steps_per_epoch"])
        base = base or (step_s, usd)
        alone = not r["config"]["serverless"]
        cells = ["peer alone" if alone else "serverless",
                 "—" if alone else str(r["config"]["grad_parallel"]), format(step_s, ".4f"),
                 format(step_s / base[0] - 1, "+.0%"), format(usd, ".2e"),
                 format(usd / base[1], ".2f") + "x", str(r.get("cold_starts") or 0),
                 format(r.get("function_mean_s") or 0.0, ".4f")]
        rows.append("| " + " | ".join(cells) + " |")
    return rows


def rewrite(doc: str, results: Path) -> str:
    """``doc`` with every table body rebuilt; a sweep table keeps its rows' (variant, W)."""
    runs = {name: {(r["variant"], r["workers"]): r for r in _load(results, name)}
            for name in SWEEPS}
    lines, out, i = doc.split("\n"), [], 0
    batch_tables, p2p_tables = iter(BATCH_TABLES), iter(P2P_TABLES)
    while i < len(lines):
        head = lines[i]
        kind = ("sweep" if head.startswith("| variant | W | alpha") else
                "batch" if head.startswith("| batch | s to target") else
                "p2p" if head.startswith("| gradients |") else "")
        if not kind:
            out.append(head)
            i += 1
            continue
        j = i + 2
        while j < len(lines) and lines[j].startswith("|"):
            j += 1
        if kind == "sweep":
            keys = [(c[0], int(c[1])) for c in
                    ([x.strip() for x in row.strip("|").split("|")] for row in lines[i + 2:j])]
            name = next((n for n in SWEEPS if all(k in runs[n] for k in keys)), None)
            if name is None:
                raise SystemExit(f"no sweep holds the rows of the table at line {i + 1}")
            body = [sweep_row(runs[name][k], name != "nfp") for k in keys]
        elif kind == "batch":
            body = [batch_row(r) for r in sorted(
                _load(results, next(batch_tables)),
                key=lambda r: (int(r["variant"].removeprefix("bs")), r["workers"]))]
        else:
            body = p2p_rows(_load(results, next(p2p_tables)))
        out += lines[i:i + 2] + body
        i = j
    return "\n".join(out)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--doc", type=Path, default=ROOT / "docs" / "scale.md")
    ap.add_argument("--results", type=Path, default=ROOT / "results")
    ap.add_argument("--check", action="store_true", help="only compare; exit 1 on a difference")
    a = ap.parse_args()
    old = a.doc.read_text()
    new = rewrite(old, a.results)
    if a.check:
        if new != old:
            print(f"{a.doc}: tables differ from {a.results}/sim-sweep-*.json; "
                  "run scripts/scale_tables.py", file=sys.stderr)
            return 1
        return 0
    a.doc.write_text(new)
    return 0


if __name__ == "__main__":
    sys.exit(main())
