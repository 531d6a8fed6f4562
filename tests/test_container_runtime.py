"""`emnist up --runtime container`: every replica a container of its real image, built by the
real faas-cli, under the OpenFaaS runtime contract, with the store and the gateway's service
name in containers on the stack's own network, and no disk shared by anything.

What a cluster would do to a run is done here to real containers: a 2-worker Fashion-MNIST run
to 0.85, a replica container killed mid-run, scale to zero then invoke, every emnist-train call
delivered twice (CE's ack_wait), an arbitrary UID."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from emnist.gateway.podman import ContainerRuntime, ContainerSettings
from emnist.gateway.stack import FunctionSpec
from emnist.gateway.validate import BadRequest, parse_deploy
from emnist.runner import status
from emnist.store import ParameterStore, open_kv
from emnist.train.state import state_key
from tests.containers import FUNCTIONS, TAG, build_images, container_stack, podman, podman_env
from tests.openfaas_tools import faas_cli
from tests.servers import ROOT

ONE_GI = 1 << 30
RUN = {"dataset": "fashion-mnist", "number_of_workers": 1, "iterations": 3,
       "target_accuracy": 0.99, "batch_size": 100, "n_fetch": 5, "n_push": 5}


@pytest.fixture(scope="module")
def penv(tmp_path_factory):
    return podman_env(tmp_path_factory.mktemp("shim"))


@pytest.fixture(scope="module")
def images(penv):
    return build_images(penv)


@pytest.fixture(scope="module")
def stack(images, penv, tmp_path_factory):
    with container_stack(penv, tmp_path_factory.mktemp("home"), TRAIN_REPLICAS="2",
                         GRAD_REPLICAS="1") as s:
        yield s


def _train(stack, *args: str) -> subprocess.CompletedProcess[str]:
    return stack.emnist("train", "--workers", "2", "--dataset", "fashion-mnist", *args,
                        timeout=600)


def test_replicas_are_containers_under_the_openfaas_runtime_contract(stack, images):
    found = {fn: stack.containers(fn) for fn in FUNCTIONS}
    assert {fn: len(c) for fn, c in found.items()} == \
        {"emnist-setup": 1, "emnist-train": 2, "emnist-grad": 1}
    for fn, containers in found.items():
        for c in containers:
            name = c["Name"]
            assert c["ImageName"] == images[fn]  # the stack's image, built by faas-cli
            assert podman(stack.env, "exec", name, "cat", "/proc/1/comm") == "fwatchdog"
            assert podman(stack.env, "exec", name, "id", "-un") == "app"
            assert not c["HostConfig"].get("PortBindings")  # nothing published on the host
            assert c["HostConfig"]["ReadonlyRootfs"]  # the stack asks for it
            mounts = {m["Destination"] for m in c["Mounts"]}
            assert mounts <= {"/var/openfaas/secrets"}, mounts  # no shared disk
            assert c["HostConfig"]["Memory"] == ONE_GI if fn != "emnist-setup" else 2 * ONE_GI
            env = dict(e.split("=", 1) for e in c["Config"]["Env"])
            assert env["OPENFAAS_URL"] == "http://gateway.openfaas:8080"
            assert "EMNIST_HOST_ALIASES" not in env and "EMNIST_SECRETS_DIR" not in env
            assert str(ROOT) not in " ".join(env.values())  # nothing of the host's checkout
    train = found["emnist-train"][0]["Name"]
    # the stack's secret, readable by the function's user; the cluster's names resolve
    key = podman(stack.env, "exec", train, "sh", "-c",
                 "wc -c < /var/openfaas/secrets/emnist-store-key")
    assert int(key) > 20
    resolve = ("import socket; print(' '.join(socket.gethostbyname(h) for h in "
               "('memcached.openfaas-fn', 'gateway.openfaas', 'redis.openfaas-fn')))")
    assert len(podman(stack.env, "exec", train, "python", "-c", resolve).split()) == 3


def test_two_workers_train_fashion_mnist_to_the_target_on_containers(stack, tmp_path):
    out = tmp_path / "run.json"
    r = _train(stack, "--target-accuracy", "0.85", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "reached target accuracy 0.85" in r.stdout, r.stdout
    rows = json.loads(out.read_text())
    assert max(w["accuracy"] for w in rows) >= 0.85, rows
    hosts = {w["hostname"] for w in rows}  # the pods' names, one per container
    assert len(hosts) == 2 and all(h.startswith("emnist-train-") for h in hosts), rows


def test_a_replica_container_killed_mid_run_still_reaches_the_target(stack):
    """The worker's container dies with a lease held; the replica is replaced, the watcher
    invokes the worker again after its lease, it resumes from its stored state."""
    kv = open_kv(stack.store_url)
    proc = subprocess.Popen(
        [sys.executable, "-m", "emnist.cli", "--gateway", stack.url, "train", "--workers", "2",
         "--dataset", "fashion-mnist", "--target-accuracy", "0.86", "--alpha", "0.05",
         "--lease-seconds", "2", "--timeout", "300"],
        env=stack.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        run_id = ""
        deadline = time.monotonic() + 120
        while not run_id:
            line = proc.stdout.readline()
            assert line and time.monotonic() < deadline, "no run started"
            if line.startswith("run "):
                run_id = line.split()[1]
        store = ParameterStore(kv, run_id)
        while not ((doc := store.get_doc(state_key(0)) or {}).get("lease")
                   and doc.get("step", 0) > 0):
            assert proc.poll() is None, "the run ended before the kill"
            assert time.monotonic() < deadline
            time.sleep(0.05)
        victim = f"{stack.network}-{doc['hostname']}"
        podman(stack.env, "kill", victim)
        output, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
        kv.close()
    assert proc.returncode == 0, output
    assert "reached target accuracy 0.86" in output, output
    assert podman(stack.env, "ps", "-aq", "--filter", f"name={victim}") == ""
    assert len(stack.containers("emnist-train")) == 2  # the replica was replaced


def test_scale_to_zero_then_invoke_starts_a_container(stack):
    stack.gw.scale("emnist-grad", 0)
    assert stack.containers("emnist-grad") == []
    r = stack.gw.invoke("emnist-grad", {"no_such_field": 1}, check=False)
    assert 400 <= r.status_code < 500 and "no_such_field" in r.text, r.text  # a handler answered
    assert len(stack.containers("emnist-grad")) == 1
    assert stack.gw.get_function("emnist-grad")["replicas"] == 1


@pytest.fixture(scope="module")
def twice(images, penv, tmp_path_factory):
    """CE's at-least-once delivery at its worst: every queued call delivered again 0.3 s after
    it started, to an idle queue-worker, while the first delivery still trains. Replicas run
    as an arbitrary UID (OpenShift's way) on read-only root filesystems."""
    with container_stack(penv, tmp_path_factory.mktemp("twice"), "--container-user", "4242:0",
                         TRAIN_REPLICAS="2", GRAD_REPLICAS="1",
                         EMNIST_GATEWAY_QUEUE_WORKERS="4", EMNIST_GATEWAY_ACK_WAIT="0.3") as s:
        yield s


def _params(store: ParameterStore) -> np.ndarray:
    out = np.empty(store.num_params, dtype=np.float32)
    store.fetch(out)
    return out


def _run(stack, config: dict) -> tuple[str, ParameterStore]:
    r = stack.gw.invoke("emnist-setup", config, check=False)
    assert r.status_code == 200, r.text
    run_id = r.json()["run_id"]
    store = ParameterStore(open_kv(stack.store_url), run_id)
    deadline = time.monotonic() + 300
    while not all(store.get_doc(f"result:{w}") for w in range(config["number_of_workers"])):
        assert time.monotonic() < deadline, "the run did not finish"
        time.sleep(0.1)
    store.attach()
    return run_id, store


def _result_lines(stack, run_id: str) -> int:
    texts = [m["text"] for m in stack.gw.logs("emnist-train", tail=0)]
    return sum(f'"run_id": "{run_id}"' in t and '{"emnist_result"' in t for t in texts)


def test_every_call_delivered_twice_trains_and_reports_as_delivered_once(stack, twice):
    config = {**RUN, "seed": 7}
    base_id, base = _run(stack, config)
    twin_id, twin = _run(twice, config)
    np.testing.assert_array_equal(_params(twin), _params(base))
    for w in range(config["number_of_workers"]):
        a, b = base.get_doc(f"result:{w}"), twin.get_doc(f"result:{w}")
        assert (a["iterations"], a["accuracy"], a["samples"]) == \
            (b["iterations"], b["accuracy"], b["samples"])
        assert b["invocations"] == 1
    deadline = time.monotonic() + 60
    while int(twice.gw.get_function("emnist-train")["invocationCount"]) <= 1:
        assert time.monotonic() < deadline, "no redelivery happened"
        time.sleep(0.1)
    assert _result_lines(stack, base_id) == 1
    assert _result_lines(twice, twin_id) == 1  # the copies printed nothing
    for c in twice.containers("emnist-train"):
        assert podman(twice.env, "exec", c["Name"], "id", "-u") == "4242"


def test_faas_cli_deploy_then_invoke_with_nothing_but_the_stacks_defaults_trains(stack,
                                                                                tmp_path):
    """What a new user of a cluster does: the real faas-cli deploys emnist.yml as it is and
    invokes emnist-setup with an empty body; the run trains on containers that share no
    disk (the shards travel through the store) to the stack's target, 0.85."""
    env = {"TAG": TAG}
    rc, out, err = faas_cli("deploy", "-f", "emnist.yml", config_dir=tmp_path,
                            gateway=stack.url, env=env, timeout=300)
    assert rc == 0, out + err
    rc, out, err = faas_cli("invoke", "emnist-setup", config_dir=tmp_path, gateway=stack.url,
                            stdin="{}", env=env)
    assert rc == 0, out + err
    started = json.loads(out.strip().splitlines()[-1])  # after faas-cli's own notes
    assert started["workers"] == 2, started
    deadline = time.monotonic() + 300
    while not (st := status(stack.gw, started["run_id"]))["done"]:
        assert time.monotonic() < deadline, st
        time.sleep(0.5)
    assert any(r and r.get("reached") for r in st["results"]), st["results"]
    assert {r["hostname"] for r in st["results"]} <= {
        c["Config"]["Hostname"] for c in stack.containers("emnist-train")}


# -- what a deploy request may make the container runtime do (no containers needed) ----------

@pytest.mark.parametrize("memory", ["lots", "1Gi; rm -rf /", "-1Gi", "1e9", "5Mi", "2Ti",
                                    "9" * 40])
def test_a_deploy_cannot_size_a_container_with_a_bad_memory_quantity(memory):
    body = {"service": "emnist-train", "image": "x", "limits": {"memory": memory}}
    with pytest.raises(BadRequest, match="memory"):
        parse_deploy(body)


def test_the_podman_command_follows_the_stack_and_the_operator_not_the_request(tmp_path):
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    spec = FunctionSpec(name="emnist-train", lang="python3-http", handler=tmp_path,
                        image="docker.io/emnist/emnist-train:v1",
                        environment={"store_url": "memcached://memcached.openfaas-fn:11211"},
                        limits={"memory": "1.5Gi"}, readonly_root_filesystem=True)
    runtime = ContainerRuntime(ContainerSettings(network="emnist-9", stack="emnist-9",
                                                 user="4242:0"))
    base = {"OPENFAAS_URL": "http://127.0.0.1:9", "EMNIST_HOST_ALIASES": "a:1=b:2",
            "EMNIST_SECRETS_DIR": str(secrets)}
    cmd = runtime.command(spec, base, "emnist-train-abcde-fghij", "emnist-9-x")
    assert cmd[:2] == ["podman", "run"] and cmd[-1] == "docker.io/emnist/emnist-train:v1"
    pairs = list(zip(cmd, cmd[1:], strict=False))
    assert ("--memory", f"{int(1.5 * 2**30)}b") in pairs and ("--user", "4242:0") in pairs
    assert ("--network", "emnist-9") in pairs and ("--pull", "never") in pairs
    assert "--read-only" in cmd and ("--tmpfs", "/tmp:rw,mode=1777") in pairs
    assert ("--volume", f"{secrets.resolve()}:/var/openfaas/secrets:ro,U") in pairs
    assert not {"-p", "--publish", "--privileged", "--network=host"} & set(cmd)
    env = [b for a, b in pairs if a == "--env"]
    assert "OPENFAAS_URL=http://gateway.openfaas:8080" in env
    assert not [e for e in env if e.startswith(("EMNIST_HOST_ALIASES", "EMNIST_SECRETS_DIR"))]
