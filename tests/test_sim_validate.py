"""`emnist sim validate` against the real local gateway (its own memcached): one real
Downpour worker next to its simulation gives the same accuracy per pass, and the record
splits time to target into passes and seconds per pass; probes are averaged; the real
emnist-grad is measured behind a real gateway for the functions' figures."""

from __future__ import annotations

import json
import math
import os

import pytest
from click.testing import CliRunner

from emnist.cli import main
from emnist.sim.calibrate import (
    function_figures,
    mean_of,
    measure_grad_calls,
    measure_serverless,
    probe_mean,
    serverless_factor,
)
from tests.conftest import MEMCACHED_URL
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


def test_mean_of_averages_what_the_probes_measured_and_lists_their_notes():
    docs = [{"nodes": [{"name": "this", "cores": c, "speed": v, "count": 1}],
             "compute": {"spread": sp, "drift_steps": 140.0},
             "calibrated": {"fast": False, "probe": {"cores": c}}}
            for c, v, sp in ((2.0, 1.0, 0.02), (1.5, 0.8, 0.04), (1.0, 0.6, 0.03))]
    m = mean_of(docs)
    assert m["nodes"] == [{"name": "this", "cores": 1.5, "speed": pytest.approx(0.8),
                           "count": 1}]
    assert m["compute"] == {"spread": pytest.approx(0.03), "drift_steps": 140.0}
    assert m["calibrated"] == {"fast": False, "probes": [{"cores": 2.0}, {"cores": 1.5},
                                                         {"cores": 1.0}]}


def test_probe_mean_takes_speed_and_cores_from_the_mean_step_times():
    """Probes at speed 1 and 1/2 (steps of 0.4 and 0.8 ms alone): runs take the mean step,
    0.6 ms, so speed 2/3 -- not the mean speed, 3/4."""
    def probe(alone, concurrent):
        doc = {"nodes": [{"name": "this", "cores": 0.0, "speed": 0.0}],
               "calibrated": {"probe": {}}}
        return doc, {"calibrated_step_s": 0.4e-3, "alone_window_step_s": alone,
                     "concurrent_window_step_s": concurrent}
    doc = probe_mean([probe(0.4e-3, 0.8e-3), probe(0.8e-3, 1.2e-3)])
    cores = os.cpu_count() or 1
    assert doc["nodes"][0]["speed"] == pytest.approx(2 / 3, abs=1e-4)
    assert doc["nodes"][0]["cores"] == pytest.approx(min(cores, max(1.0, cores * 0.6)),
                                                     abs=1e-3)


def test_the_real_emnist_grad_is_measured_behind_a_real_gateway():
    """measure_grad_calls starts a local gateway with this repository's emnist.yml and calls
    the real emnist-grad (cached and fresh parameters); function_figures turns that into
    the cost file's handler and params_fetch by the stated subtraction."""
    fg = measure_grad_calls(MEMCACHED_URL, "fashion-mnist", None, 100, 6)
    assert fg["calls"] == 10 and fg["batch"] == 50 and fg["hit_s"] > 0 and fg["miss_s"] > 0
    assert fg["response_bytes"] == 4 * 79_510 + 40
    doc = {"compute": {"models": {"mlp-h100": {"step": {32: 1e-4, 64: 3e-4}}}},
           "client": {"encode_per_byte": 1e-10, "decode_per_byte": 2e-10},
           "functions": {"handler": 0.0}}
    got = {**fg, "hit_s": 4e-3, "miss_s": 5e-3, "response_bytes": 1_000_000}
    notes = function_figures(doc, got, {"client_big_s": 3e-3}, {"fetch_p50_s": 2e-4},
                             "mlp-h100")
    grad = 1e-4 + 2e-4 * (50 - 32) / 32  # the step at batch 50, between 32 and 64
    assert notes["gradient_s"] == pytest.approx(grad)
    assert doc["functions"]["handler"] == pytest.approx(4e-3 - 3e-3 - grad - 1e-4, abs=1e-7)
    assert doc["functions"]["params_fetch"] == pytest.approx(1e-3 - 2e-4 - 2e-4, abs=1e-7)


def test_serverless_peers_compute_phase_is_measured_with_the_real_emnist_grad():
    """measure_serverless runs peers' ServerlessGradients against the real emnist-grad behind
    a local gateway; it refuses a run where a peer's calls were not all answered."""
    step = measure_serverless(MEMCACHED_URL, "fashion-mnist", 100, peers=2, steps=10,
                              replicas=1)
    assert math.isfinite(step) and step > 0


def test_the_gateway_factor_is_solved_from_a_serverless_step():
    """serverless_factor: each extra second of three peers' step on 2 cores at speed 1 is
    2/3 s of gateway work per peer, spread over its two calls' gateway figures; a step no
    longer than the other work leaves the factor at 1."""
    doc = {"nodes": [{"cores": 2.0, "speed": 1.0}],
           "compute": {"models": {"m": {"params": 1000, "step": {50: 1e-3}}}},
           "store": {"rtt": 1e-5, "op": 1e-5, "bandwidth": 1e9, "write_bandwidth": 1e9},
           "client": {"decode_per_byte": 1e-10, "encode_per_byte": 1e-10,
                      "vector_per_byte": 1e-11},
           "gateway": {"invoke": 1e-3, "per_byte": 1e-9},
           "functions": {"handler": 1e-3, "params_fetch": 1e-4}}
    gateway = 2 * (1e-3 + 1e-9 * (400 + 4000 + 40))
    k1, k2 = serverless_factor(doc, 0.02, "m"), serverless_factor(doc, 0.03, "m")
    assert k2 - k1 == pytest.approx(0.01 * 2 / 3 / gateway)
    assert serverless_factor(doc, 1e-4, "m") == 1.0
