"""docs/scale.md's tables are the sweeps' JSON, read by scripts/scale_tables.py: a re-run
of the study that is not carried into the doc (or a hand edit of a figure) fails here."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TABLES = [sys.executable, str(ROOT / "scripts" / "scale_tables.py")]


def test_the_docs_tables_are_the_sweeps_json() -> None:
    got = subprocess.run([*TABLES, "--check"], capture_output=True, text=True)
    assert got.returncode == 0, got.stderr


def test_a_figure_that_differs_from_the_json_is_caught_and_rewritten(tmp_path: Path) -> None:
    results = tmp_path / "results"
    shutil.copytree(ROOT / "results", results,
                    ignore=lambda d, names: [n for n in names if not n.startswith("sim-sweep-")])
    doc = tmp_path / "scale.md"
    shutil.copy(ROOT / "docs" / "scale.md", doc)
    runs = json.loads((results / "sim-sweep-update.json").read_text())
    run = next(r for r in runs if r["variant"] == "atomic" and r["workers"] == 4)
    shown = f"| {run['conflicts']:,d} |"  # its cas retries, as the doc shows them
    run["conflicts"] += 1000
    (results / "sim-sweep-update.json").write_text(json.dumps(runs))
    p2p = json.loads((results / "sim-sweep-p2p-mlp.json").read_text())
    k1 = p2p[1]
    step = k1["phases_per_epoch"]["compute_s"] / k1["steps_per_epoch"]
    k1["phases_per_epoch"]["compute_s"] *= 2  # K = 1's gradient phase, twice as long
    (results / "sim-sweep-p2p-mlp.json").write_text(json.dumps(p2p))
    args = ["--doc", str(doc), "--results", str(results)]

    check = subprocess.run([*TABLES, *args, "--check"], capture_output=True, text=True)
    assert check.returncode == 1 and "tables differ" in check.stderr

    subprocess.run([*TABLES, *args], check=True)
    before = (ROOT / "docs" / "scale.md").read_text().split("\n")
    after = doc.read_text().split("\n")
    changed = [(a, b) for a, b in zip(before, after) if a != b]
    assert len(before) == len(after) and len(changed) == 2
    assert shown in changed[0][0] and changed[0][1].startswith("| atomic | 4 |")
    assert [x.strip() for x in changed[0][1].strip("|").split("|")][7] == f"{run['conflicts']:,d}"
    assert changed[1][0].startswith(f"| serverless | 1 | {step:.4f} |")
    assert changed[1][1].startswith(f"| serverless | 1 | {2 * step:.4f} |")
    assert subprocess.run([*TABLES, *args, "--check"]).returncode == 0
