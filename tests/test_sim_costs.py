"""Cost files: every shipped one is valid; a bad one is refused with a message naming the
field; the cost model's arithmetic (interpolation, bills) is what the docs say."""

from __future__ import annotations

import copy
import math

import pytest
import yaml

from emnist.sim.billing import bill
from emnist.sim.costs import COSTS_DIR, CostError, Costs, load_costs, parse_costs, shipped, validate

BASE = yaml.safe_load((COSTS_DIR / "study3.yml").read_text())


def _with(path: str, value):
    doc = copy.deepcopy(BASE)
    *parents, last = path.split(".")
    at = doc
    for p in parents:
        at = at[int(p)] if isinstance(at, list) else at[p]
    if value is KeyError:
        del at[last]
    else:
        at[last] = value
    return doc


def test_every_shipped_cost_file_is_valid():
    names = set(shipped())
    assert {"local", "study3", "cluster10", "cluster100", "lambda"} <= names
    for name in names:
        c = load_costs(name)
        assert c.nodes and c.model("mlp", 100).step_s(100) > 0
        assert c.store.bandwidth > 0 and c["prices"]["function_gb_second"] >= 0


@pytest.mark.parametrize("path, value, field, words", [
    ("store.bandwidth", -1, "store.bandwidth", "must be > 0"),
    ("store.bandwidth", float("nan"), "store.bandwidth", "finite"),
    ("store.rtt", float("inf"), "store.rtt", "finite"),
    ("store.rtt", "fast", "store.rtt", "must be a number"),
    ("store.op", True, "store.op", "must be a number"),
    ("store.servers", 2.5, "store.servers", "integer"),
    ("store.servers", 0, "store.servers", "between 1"),
    ("nodes.0.cores", 0, "nodes[0].cores", "between 1"),
    ("nodes.0.speed", 0, "nodes[0].speed", "> 0"),
    ("gateway.on_node", "yes", "gateway.on_node", "true or false"),
    ("nodes.0.placement", "random", "nodes[0].placement", "must be one of per-core, shared"),
    ("nodes.0.placement", ["per-core"], "nodes[0].placement", "must be one of"),
    ("prices.vcpu_hour", -0.01, "prices.vcpu_hour", "between 0"),
    ("functions.concurrency", -1, "functions.concurrency", "between 0"),
    ("compute.drift", 1e9, "compute.drift", "between 0"),
    ("store.colour", 1, "store.colour", "unknown field"),
    ("broker.rtt", KeyError, "broker.rtt", "missing"),
    ("compute.models.mlp-h100.step", {"big": 0.1}, "compute.models.mlp-h100.step", "integer"),
    ("compute.models.mlp-h100.step", {100: 0}, "compute.models.mlp-h100.step.100", "> 0"),
    ("compute.models.mlp-h100.step", {10**6: 0.1}, "compute.models.mlp-h100.step", "outside"),
    ("compute.models.mlp-h100.params", KeyError, "compute.models.mlp-h100.params", "missing"),
])
def test_a_bad_field_is_refused_naming_it(path, value, field, words):
    with pytest.raises(CostError) as e:
        validate(_with(path, value))
    assert e.value.field == field and str(e.value).startswith(field + ":")
    assert words in str(e.value)


def test_not_yaml_and_not_a_mapping_are_refused(tmp_path):
    with pytest.raises(CostError, match="not YAML"):
        parse_costs("a: [1, 2", "x.yml")
    with pytest.raises(CostError, match="mapping"):
        parse_costs("- 1\n- 2\n")
    with pytest.raises(CostError, match="no cost file 'nope'"):
        load_costs("nope")


def test_yaml_exponents_without_a_sign_still_read_as_numbers():
    doc = copy.deepcopy(BASE)
    text = yaml.safe_dump(doc).replace("link_bandwidth: 125000000.0", "link_bandwidth: 1.25e8")
    assert "1.25e8" in text  # PyYAML reads this as a string
    assert parse_costs(text).nodes[0].link_bandwidth == 1.25e8


def test_compute_tables_interpolate_and_scale_with_the_parameter_count():
    doc = _with("compute.models", {"mlp": {"params": 1000, "eval_per_sample": 1e-6,
                                           "step": {10: 1e-3, 20: 3e-3}}})
    c = parse_costs(yaml.safe_dump(doc))
    m = c.model("mlp", 100)
    assert m.step_s(10) == pytest.approx(1e-3) and m.step_s(15) == pytest.approx(2e-3)
    assert m.step_s(30) == pytest.approx(5e-3)  # extrapolated from the nearest two
    assert m.step_s(15, params=2000) == pytest.approx(4e-3)
    with pytest.raises(CostError, match="compute.models.vgg11"):
        c.model("vgg11")


def test_bill_arithmetic():
    prices = {"vcpu_hour": 0.036, "gb_hour": 0.0036, "function_gb_second": 1e-5,
              "function_request": 1e-7}
    b = bill(prices, 100.0, [(4, 16, 3), (2, 4, 1)], [0.0104, 0.5, 0.0], 2.0)
    assert b["vm_vcpu_s"] == 100 * (4 * 3 + 2)
    assert b["vm_gb_s"] == 100 * (16 * 3 + 4)
    assert b["vm_usd"] == pytest.approx(1400 / 3600 * 0.036 + 5200 / 3600 * 0.0036)
    # billed per ms, rounded up, at least 1 ms: 0.011 + 0.5 + 0.001 s at 2 GB
    assert b["function_gb_s"] == pytest.approx(2.0 * (0.011 + 0.5 + 0.001))
    assert b["function_usd"] == pytest.approx(b["function_gb_s"] * 1e-5 + 3 * 1e-7)
    assert b["usd"] == pytest.approx(b["vm_usd"] + b["function_usd"]) and b["function_calls"] == 3
    assert math.isfinite(b["usd"])


def test_load_figures_make_the_simulated_steps_the_measured_throughput():
    """One loop alone at twice the median -> speed 0.5; two loops on 2 cores each at twice
    the alone time -> one effective core; both clamped to what a node can be."""
    import numpy as np

    from emnist.sim.calibrate import load_figures, window_means
    assert load_figures(1e-3, 2e-3, 4e-3, 2) == (0.5, 1.0)
    assert load_figures(1e-3, 0.8e-3, 0.8e-3, 2) == (1.25, 2.0)  # quieter than at calibration
    assert load_figures(1e-3, 1e-3, 9e-3, 2) == (1.0, 1.0)  # at least one core
    t = np.array([1e-3] * 1000 + [3e-3] * 1000)  # 1 s of fast steps, then 3 s of slow ones
    w = window_means(t, 0.25)
    assert len(w) == 16 and w[0] == pytest.approx(1e-3) and w[-1] == pytest.approx(3e-3)


def test_on_node_call_costs_are_stored_at_speed_one():
    """Measured at speed 0.5, an on-node call's work is half as much at speed 1 (the
    simulator runs it on the node at its speed); delays off the node are left alone."""
    import copy

    from emnist.sim.calibrate import TEMPLATE, to_speed_one
    doc = copy.deepcopy(TEMPLATE)
    doc["nodes"][0]["speed"] = 0.5
    doc["store"]["on_node"], doc["broker"]["on_node"] = True, False
    to_speed_one(doc)
    assert doc["store"]["rtt"] == TEMPLATE["store"]["rtt"] * 0.5
    assert doc["store"]["bandwidth"] == TEMPLATE["store"]["bandwidth"] * 2
    assert doc["broker"]["rtt"] == TEMPLATE["broker"]["rtt"]
    assert doc["gateway"]["invoke"] == TEMPLATE["gateway"]["invoke"] * 0.5
    assert doc["client"]["decode_per_byte"] == TEMPLATE["client"]["decode_per_byte"] * 0.5


def test_placement_defaults_to_per_core_and_shared_keeps_ideal_sharing():
    from emnist.sim.events import CPU, CoreCPU, Loop
    from emnist.sim.net import make_nodes

    assert "placement" not in BASE["nodes"][0]
    kinds = [Costs(validate(_with("nodes.0.placement", v) if v else copy.deepcopy(BASE)))
             .nodes[0] for v in (None, "shared")]
    assert [k.placement for k in kinds] == ["per-core", "shared"]
    cpus = [n.cpu for n in make_nodes(Loop(), kinds)]
    assert type(cpus[0]) is CoreCPU and type(cpus[1]) is CPU
