"""`emnist sim` through the CLI: run, sweep (JSON, table, PNG), costs, calibrate --fast (a
valid cost file from this machine, against the real memcached), and errors as one line."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from emnist.cli import main
from emnist.sim.costs import COSTS_DIR, load_costs
from tests.conftest import MEMCACHED_URL

TINY = ["--dataset", "synthetic", "--hidden-size", "8", "--batch-size", "50",
        "--iterations", "1", "--target-accuracy", "1.0", "--set", "eval_samples=100"]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return str(tmp_path_factory.mktemp("sim-cli"))


def test_sim_run_prints_a_table_and_writes_the_report(tmp_path, root):
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["sim", "run", "--workers", "2", "--costs", "study3",
                                  "--data-location", root, "--json", str(out), *TINY])
    assert r.exit_code == 0, r.output
    assert "| study3 " in r.output and "s to target" in r.output
    report = json.loads(out.read_text())
    assert report["workers"] == 2 and report["costs"] == "study3" and report["samples"] == 4000


def test_sim_sweep_writes_json_table_and_plot(tmp_path, root):
    pytest.importorskip("matplotlib", reason="the plot extra")
    paths = {k: tmp_path / f"s.{k}" for k in ("json", "md", "png")}
    r = CliRunner().invoke(main, [
        "sim", "sweep", "--costs", "study3,cluster10", "--scale", "1,4",
        "--variant", "n1:n_fetch=1,n_push=1", "--variant", "n5:n_fetch=5,n_push=5",
        "--data-location", root, "--json", str(paths["json"]), "--table", str(paths["md"]),
        "--plot", str(paths["png"]), *TINY])
    assert r.exit_code == 0, r.output
    records = json.loads(paths["json"].read_text())
    assert {(x["costs"], x["variant"], x["workers"]) for x in records} == {
        (c, v, w) for c in ("study3", "cluster10") for v in ("n1", "n5") for w in (1, 4)}
    assert all(x["config"]["n_push"] == int(x["variant"][1:]) for x in records)
    assert "| cluster10 | n5" in paths["md"].read_text()
    assert paths["png"].read_bytes()[:4] == b"\x89PNG"


def test_sim_costs_lists_and_checks(tmp_path):
    r = CliRunner().invoke(main, ["sim", "costs"])
    assert r.exit_code == 0 and "cluster100" in r.output and "lambda" in r.output
    bad = tmp_path / "bad.yml"
    bad.write_text((COSTS_DIR / "study3.yml").read_text().replace("rtt: 0.0002", "rtt: -1", 1))
    r = CliRunner().invoke(main, ["sim", "costs", str(bad)])
    assert r.exit_code == 1 and r.output.count("\n") == 1
    assert r.output.startswith("Error: store.rtt: must be between 0")


def test_a_bad_setting_is_one_line_naming_it(root):
    r = CliRunner().invoke(main, ["sim", "run", "--workers", "0", "--data-location", root])
    assert r.exit_code == 1 and r.output == "Error: workers: must be an integer in " \
        "[1, 100000], got 0\n"
    r = CliRunner().invoke(main, ["sim", "run", "--set", "colour=red"])
    assert r.exit_code == 1 and "colour: unknown field" in r.output


def test_calibrate_fast_writes_a_valid_cost_file(tmp_path, root):
    out = tmp_path / "here.yml"
    r = CliRunner().invoke(main, ["sim", "calibrate", "--fast", "--out", str(out),
                                  "--store", MEMCACHED_URL, "--dataset", "synthetic",
                                  "--data-location", root])
    assert r.exit_code == 0, r.output
    c = load_costs(str(out))
    m = c.model("mlp", 100)
    assert m.params == 79_510 and 0 < m.step_s(100) < 1 and m.eval_per_sample > 0
    assert c["calibrated"]["fast"] is True and c["calibrated"]["store"]["fetch_p50_s"] > 0
    assert c.store.bandwidth > 0 and c.store.rtt + c.store.op > 0
    assert c["calibrated"]["gateway"].startswith("not measured")
