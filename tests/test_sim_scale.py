"""Simulations past the machine: 1,000 Downpour workers, the memory bound, the node-local
tier, serverless functions with cold starts and a concurrency limit, stragglers at an
averaging barrier, and what a run costs."""

from __future__ import annotations

import pytest
import yaml

from emnist.sim.config import SimConfig, SimConfigError
from emnist.sim.costs import COSTS_DIR, parse_costs
from emnist.sim.engine import simulate
from emnist.sim.threads import one_blas_thread

TINY = {"dataset": "synthetic", "hidden_size": 8, "target_accuracy": 1.0, "eval_samples": 100}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    one_blas_thread()
    return str(tmp_path_factory.mktemp("sim-scale"))


def costs(name="cluster10", **changes):
    doc = yaml.safe_load((COSTS_DIR / f"{name}.yml").read_text())
    for key, value in changes.items():
        section, field = key.split("__")
        if section == "nodes" and isinstance(value, list):
            doc["nodes"] = value
            continue
        for part in doc[section] if section == "nodes" else [doc[section]]:
            part[field] = value
    return parse_costs(yaml.safe_dump(doc))


def test_a_thousand_downpour_workers_run_with_sane_staleness(root):
    """1,000 workers of a 784-8-10 MLP, minibatches of 4, 3 minibatches each, launched 1 ms
    apart, on 10 nodes and one memcached: they overlap in the store (staleness)
    and every one finishes. (With 10 minibatches each they saturate the server and
    the cas loops livelock: ~4,000,000 retries for 10,000 pushes; see docs/sim.md.)"""
    r = simulate(SimConfig(workers=1000, batch_size=4, max_steps=3, n_fetch=1, n_push=1,
                           data_location=root, **{**TINY, "dataset": "fashion-mnist"}),
                 costs(gateway__async=1e-3))  # fashion-mnist: 60 samples each, no 100% accuracy
    assert r["workers"] == 1000 and r["steps"] == 3000 and r["samples"] == 12_000
    assert r["stop_reasons"] == ["max steps"]
    assert r["pushes"] >= 3000 and not r["aborted"]
    assert 0 < r["staleness_mean"] <= r["staleness_max"] <= r["pushes"]
    assert 0 < r["servers"][0]["utilisation"] < 1
    assert r["nodes"] == 10 and len(r["stop_reasons"]) >= 1 and r["seconds"] > 0
    assert 0 <= r["bookkeeping_fraction"] <= 1 and r["events"] > 3000


def test_parameter_copies_beyond_the_memory_bound_are_refused_before_allocating(root):
    with pytest.raises(SimConfigError) as e:
        simulate(SimConfig(workers=1000, model="vgg11", dataset="fashion-mnist",
                           data_location=root), costs())
    assert e.value.field == "workers" and "GiB" in str(e.value) and "vgg11" in str(e.value)


def test_the_node_local_tier_syncs_in_the_background(root):
    r = simulate(SimConfig(workers=4, batch_size=50, iterations=2, tiered=True,
                           sync_interval=0.001, data_location=root,
                           **{**TINY, "hidden_size": 100}),
                 costs(nodes__count=2))
    assert r["tier_syncs"] > 4 and r["tier_bytes_synced"] > 0
    assert r["accuracy"] > 0.5  # the updates reached the global store and back
    assert r["tier_servers"][0]["requests"] > 0


def test_serverless_functions_cold_start_queue_at_their_limit_and_bill(root):
    cfg = SimConfig(algorithm="p2p", workers=3, serverless=True, batch_size=50, sync_every=4,
                    iterations=1, target_accuracy=0.0, max_steps=5, data_location=root,
                    dataset="synthetic")
    free = simulate(cfg, costs("lambda"))
    assert free["function_calls"] == 3 * 5 * 4 and free["cost"]["function_calls"] == 60
    assert free["cold_starts"] == free["function_instances"] == free["function_max_running"]
    assert free["cost"]["function_gb_s"] >= 60 * 0.001 * 1.769
    tight = simulate(cfg, costs("lambda", functions__concurrency=2))
    assert tight["function_max_running"] == 2 and tight["cold_starts"] == 2
    assert tight["function_queue_wait_s"] > 0
    assert tight["time_to_target_training"] is None  # no target: it ran its 5 steps
    assert tight["seconds"] > free["seconds"]
    assert tight["final_params_crc"] == free["final_params_crc"]  # same math, other timing


def test_a_straggler_node_makes_the_averaging_barrier_wait(root):
    base = SimConfig(algorithm="averaging", workers=4, batch_size=50, iterations=1,
                     average_every=5, data_location=root, **{**TINY, "hidden_size": 100})
    even = simulate(base, costs(nodes__count=4))
    slow = costs(nodes__kinds=[{"name": "fast", "count": 3, "cores": 8, "speed": 1.0,
                                "memory_gb": 32, "link_bandwidth": 1.25e9},
                               {"name": "slow", "count": 1, "cores": 8, "speed": 0.1,
                                "memory_gb": 32, "link_bandwidth": 1.25e9}])
    mixed = simulate(base, slow)
    assert mixed["barrier_wait_mean_s"] > 2 * even["barrier_wait_mean_s"]
    assert mixed["seconds"] > even["seconds"]
    assert mixed["final_params_crc"] == even["final_params_crc"]  # synchronous: same math


def test_a_runs_vm_cost_is_its_nodes_and_store_for_its_duration(root):
    c = costs(nodes__count=2)
    r = simulate(SimConfig(workers=2, batch_size=100, iterations=1, data_location=root,
                           **TINY), c)
    p, node, store = c["prices"], c.nodes[0], c["store"]
    vcpu_s = (2 * node.cores + store["vcpus"]) * r["seconds"]
    gb_s = (2 * node.memory_gb + store["memory_gb"]) * r["seconds"]
    assert r["cost"]["vm_vcpu_s"] == pytest.approx(vcpu_s)
    assert r["cost"]["usd"] == pytest.approx(vcpu_s / 3600 * p["vcpu_hour"]
                                             + gb_s / 3600 * p["gb_hour"])
    assert r["cost"]["function_calls"] == 0


def test_p2p_phases_add_up_to_every_peers_time(root):
    """The per-epoch phases (the real report's compute/send/receive/update/validate/barrier
    columns) cover a peer's whole loop: summed over peers and epochs they are its time."""
    cfg = SimConfig(algorithm="p2p", workers=3, batch_size=50, sync_every=4, iterations=2,
                    target_accuracy=0.0, max_steps=6, data_location=root, dataset="synthetic")
    r = simulate(cfg, costs("local"))
    ph, epochs = r["phases_per_epoch"], sum(len(e) for e in r["peer_epochs"].values())
    total = sum(v for v in ph.values()) * epochs
    peers = sum(e[-1][1] for e in r["peer_epochs"].values())  # each peer's last epoch time
    assert total == pytest.approx(peers, abs=1e-5)  # epoch times are kept to 1 us
    assert ph["compute_s"] > 0 and ph["send_s"] > 0 and ph["recv_s"] > 0


def test_lenet5_peers_train_in_the_simulator(root):
    """p2p peers build any emnist.models network from the split (as emnist.p2p.peer does)."""
    cfg = SimConfig(algorithm="p2p", workers=2, model="lenet5", batch_size=32, sync_every=1,
                    iterations=1, target_accuracy=0.0, max_steps=3, data_location=root,
                    dataset="fashion-mnist", val_fraction=0.01)
    r = simulate(cfg, costs("local"))
    assert r["model"] == "lenet5" and r["params"] == 61706 and r["steps"] == 6
    assert r["phases_per_epoch"]["compute_s"] > 0
