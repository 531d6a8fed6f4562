"""`emnist sim validate` against the real local gateway (its own memcached): one real
Downpour worker next to its simulation gives the same accuracy per pass, and the record
splits time to target into passes and seconds per pass; ``between`` averages two probes."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from emnist.cli import main
from emnist.sim.calibrate import between
from tests.servers import free_port, local_gateway, start_memcached


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("validate")
    port = free_port()
    mc = start_memcached(port, 128)
    env = {"STORE_URL": f"memcached://127.0.0.1:{port}", "TRAIN_REPLICAS": "1",
           "GRAD_REPLICAS": "0"}
    try:
        with local_gateway(tmp, env) as gw:
            yield gw
    finally:
        mc.kill()
        mc.wait(10)


def test_validate_downpour_1_matches_the_real_curve_and_splits_passes(gateway, tmp_path):
    out = tmp_path / "v.json"
    r = CliRunner().invoke(main, ["--gateway", gateway.url, "sim", "validate",
                                  "--no-calibrate", "--costs", "local", "--case", "downpour-1",
                                  "--model", "mlp", "--rounds", "1", "--sim-rounds", "1",
                                  "--json", str(out)], catch_exceptions=False)
    assert r.exit_code == 0, r.output
    (rec,) = json.loads(out.read_text())
    assert "error" not in rec or isinstance(rec["error"], float), rec
    assert rec["curve_identical"] is True  # same math, same seeds: the same accuracy per pass
    assert rec["measured_passes"] == [len(rec["real_curve"])]
    assert rec["simulated_passes"] == [len(rec["sim_curve"])] == rec["measured_passes"]
    assert rec["passes"] == f"{rec['measured_passes'][0]} / {rec['simulated_passes'][0]}"
    m, s = rec["measured_rounds"][0], rec["simulated_rounds"][0]
    assert rec["measured_s_per_pass"] == pytest.approx(m / rec["measured_passes"][0], rel=1e-3)
    assert rec["per_pass_error"] == pytest.approx(rec["error"], abs=1e-2)
    assert rec["measured_conflicts_per_push"] == 0 == rec["simulated_conflicts_per_push"]
    assert rec["within"] == (abs(s - m) <= 0.25 * m)
    assert "| downpour-1 | mlp " in r.output


def test_between_averages_what_two_probes_measured_and_keeps_both_notes():
    a = {"nodes": [{"name": "this", "cores": 2.0, "speed": 1.0, "count": 1}],
         "compute": {"spread": 0.02, "drift_steps": 140.0},
         "calibrated": {"fast": False, "probe": {"cores": 2.0}}}
    b = {"nodes": [{"name": "this", "cores": 1.5, "speed": 0.8, "count": 1}],
         "compute": {"spread": 0.04, "drift_steps": 140.0},
         "calibrated": {"fast": False, "probe": {"cores": 1.5}}}
    m = between(a, b)
    assert m["nodes"] == [{"name": "this", "cores": 1.75, "speed": 0.9, "count": 1}]
    assert m["compute"] == {"spread": pytest.approx(0.03), "drift_steps": 140.0}
    assert m["calibrated"] == {"fast": False, "probe_before": {"cores": 2.0},
                               "probe_after": {"cores": 1.5}}
