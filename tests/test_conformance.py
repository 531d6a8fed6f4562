"""Conformance with the real OpenFaaS tools.

1. The real faas-cli 0.18.12 against `emnist up` (the CLI's local stack), with and without
   basic auth: list, describe, version, deploy -f emnist.yml from a shell with no STORE_URL,
   invoke (a real 2-worker run, watched through emnist-setup's GET), invoke --async, logs,
   remove, secret create/list/remove.
2. Each function under the real of-watchdog 0.11.6 and the vendored template's index.py (in a
   network namespace with only loopback: the watchdog binds every interface and port 8081),
   answering the same good and bad requests as the same function behind the local gateway.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from emnist.cluster.build import shrinkwrap
from emnist.model import MLPShape, init_params
from emnist.store import codec
from tests.netns import Netns, Probe
from tests.openfaas_tools import OPENFAAS_BIN, faas_cli, faas_login
from tests.servers import ROOT, free_port, start_memcached

EMNIST = [sys.executable, "-m", "emnist.cli"]
FUNCTIONS = ("emnist-setup", "emnist-train", "emnist-grad")


# -- 1. faas-cli against `emnist up` ------------------------------------------------------------


class Stack:
    """`emnist up` on a free port with its own EMNIST_HOME and memcached; `emnist down` after."""

    def __init__(self, tmp: Path, password: str | None) -> None:
        self.tmp, self.password = tmp, password
        self.mc_port = free_port()
        # as large as the one `emnist up` starts: the default stack keeps its data there too
        self.memcached = start_memcached(self.mc_port, 256)
        self.url = f"http://127.0.0.1:{free_port()}"
        self.env = {k: v for k, v in os.environ.items()
                    if k not in ("OPENFAAS_URL", "OPENFAAS_PASSWORD", "OPENFAAS_USER",
                                 "STORE_URL")}
        self.env["EMNIST_HOME"] = str(tmp / "home")
        if password:
            self.env["OPENFAAS_PASSWORD"] = password
        self.cfg = tmp / "faas-cli"  # faas-cli's own config (login) directory
        self.cfg.mkdir()

    def emnist(self, *args: str, **env: str) -> subprocess.CompletedProcess:
        return subprocess.run([*EMNIST, "--gateway", self.url, *args], cwd=ROOT,
                              env={**self.env, **env}, capture_output=True, text=True,
                              timeout=180)

    def up(self) -> None:
        out = self.emnist("up", STORE_URL=f"memcached://127.0.0.1:{self.mc_port}")
        assert out.returncode == 0, out.stdout + out.stderr

    def cli(self, *args: str, stdin: str | None = None) -> tuple[int, str, str]:
        """faas-cli from a shell that has no STORE_URL (and no gateway password)."""
        return faas_cli(*args, config_dir=self.cfg, gateway=self.url, stdin=stdin)

    def down(self) -> None:
        out = self.emnist("down")
        self.memcached.terminate()
        self.memcached.wait(10)
        assert out.returncode == 0, out.stdout + out.stderr


@pytest.fixture(scope="module", params=["no-auth", "auth"])
def stack(request, tmp_path_factory) -> Iterator[Stack]:
    password = "pw-" + secrets.token_hex(8) if request.param == "auth" else None
    s = Stack(tmp_path_factory.mktemp(request.param), password)
    s.up()
    try:
        if password:
            rc, out, err = s.cli("list")
            assert rc != 0 and "unauthorized" in (out + err).lower(), out + err
            faas_login(s.cfg, s.url, password)
        yield s
    finally:
        s.down()


def _ok(result: tuple[int, str, str]) -> str:
    rc, out, err = result
    assert rc == 0, f"faas-cli exited {rc}: {out}{err}"
    return out


def test_list_describe_and_version(stack: Stack) -> None:
    rows = {line.split()[0]: line.split()[1:] for line in _ok(stack.cli("list")).splitlines()[1:]}
    assert set(FUNCTIONS) <= set(rows)
    assert rows["emnist-train"][1] == "2"  # replicas: the stack's com.openfaas.scale.min
    desc = _ok(stack.cli("describe", "emnist-train"))
    assert "Status:             Ready" in desc and "Available Replicas: 2" in desc
    assert "store_url: memcached://127.0.0.1:" in desc  # the store `up` was given
    _, out, _ = stack.cli("version")  # exits 1 here: it cannot look up its latest release
    provider = out.split("Provider", 1)[1]
    assert "name:          emnist-local" in provider
    assert "orchestration: process" in provider


def _json(out: str) -> Any:
    """The function's answer: faas-cli may print a note first ("Failed to lookup auth
    config" when not logged in), the body is the last line."""
    return json.loads(out.strip().splitlines()[-1])


def _status(stack: Stack, run_id: str) -> dict[str, Any]:
    return _json(_ok(stack.cli("invoke", "emnist-setup", "--method", "GET", "--query",
                               f"run_id={run_id}")))


def test_deploy_with_no_store_url_then_invoke_a_real_run_and_read_its_logs(stack: Stack) -> None:
    out = _ok(stack.cli("deploy", "-f", str(ROOT / "emnist.yml")))
    assert out.count("Deployed. 202 Accepted.") == len(FUNCTIONS)
    # the stack's default store (memcached.openfaas-fn:11211) now reaches the local memcached
    desc = _ok(stack.cli("describe", "emnist-setup"))
    assert "store_url: memcached://memcached.openfaas-fn:11211" in desc
    body = {"dataset": "fashion-mnist", "iterations": 3, "target_accuracy": 0.8,
            "number_of_workers": 2, "seed": 3}
    run = _json(_ok(stack.cli("invoke", "emnist-setup", stdin=json.dumps(body))))
    assert run["workers"] == 2
    # the provider resolved the cluster's service name to the memcached `emnist up` was given
    assert run["config"]["store_url"] == f"memcached://127.0.0.1:{stack.mc_port}"
    deadline = time.monotonic() + 120
    while not (st := _status(stack, run["run_id"]))["done"]:
        assert time.monotonic() < deadline, st
        time.sleep(0.2)
    results = {r["worker_id"]: r for r in st["results"]}
    assert sorted(results) == [0, 1]
    # Two asynchronous workers' accuracy after a few passes swings 0.65-0.86 with how their
    # pushes interleave (docs/sim.md), so reaching 0.8 in 3 passes is not certain: the run
    # trained (well above chance, 0.1) and stopped on the target or after its last pass.
    assert all(r["accuracy"] > 0.5 for r in results.values()), results
    assert any(r["reached"] for r in results.values()) \
        or all(r["iteration"] == 3 for r in results.values()), results
    logs = _ok(stack.cli("logs", "emnist-train", "--tail=false"))
    for w, r in results.items():  # the original study's result line, for each worker
        line = f"Worker ID: {w} Iterations: {r['iteration']} Time: {r['seconds']:.3f} " \
               f"Name: {r['hostname']}"
        assert line in logs
    assert logs.count(f'"run_id": "{run["run_id"]}"') == 2  # the JSON result lines


def test_invoke_async_and_its_error_in_the_logs(stack: Stack) -> None:
    run_id = "conformance-" + secrets.token_hex(4)
    rc, out, err = stack.cli("invoke", "emnist-train", "--async",
                             stdin=json.dumps({"run_id": run_id, "worker_id": 0}))
    assert rc == 0 and "Function submitted asynchronously" in out + err, out + err
    deadline = time.monotonic() + 30
    while True:  # the queue's answer for the call (an unknown run) is in the function's logs
        logs = _ok(stack.cli("logs", "emnist-train", "--tail=false"))
        if any("failed: 404" in line and run_id in line for line in logs.splitlines()):
            break
        assert time.monotonic() < deadline, logs[-2000:]
        time.sleep(0.2)


def test_secret_create_list_remove(stack: Stack) -> None:
    name = "conformance-" + secrets.token_hex(3)
    assert "Created" in _ok(stack.cli("secret", "create", name, "--from-literal", "v4lue"))
    listed = _ok(stack.cli("secret", "list"))
    assert name in listed and "v4lue" not in listed
    _ok(stack.cli("secret", "remove", name))
    assert name not in _ok(stack.cli("secret", "list"))


def test_remove_then_redeploy(stack: Stack) -> None:
    _ok(stack.cli("remove", "emnist-grad"))
    assert "emnist-grad" not in _ok(stack.cli("list"))
    rc, out, err = stack.cli("describe", "emnist-grad")
    assert rc != 0
    _ok(stack.cli("deploy", "-f", str(ROOT / "emnist.yml"), "--filter", "emnist-grad"))
    assert "emnist-grad" in _ok(stack.cli("list"))


# -- 2. each function under the real of-watchdog ------------------------------------------------

GATEWAY_PORT, WATCHDOG_PORT, MEMCACHED_PORT = 8090, 8080, 11211
JSON = {"Content-Type": "application/json"}
GOOD = {"emnist-setup": 2, "emnist-train": 1, "emnist-grad": 1}


def _grad_request(shape: MLPShape) -> dict[str, Any]:
    rng = np.random.default_rng(0)
    batch = np.concatenate([rng.integers(0, 256, (8, shape.inputs)),
                            rng.integers(0, shape.classes, (8, 1))], axis=1).astype(np.uint8)
    params = init_params(shape, 1)
    return {"params": base64.b64encode(codec.encode(params)).decode(),
            "batch_data": base64.b64encode(codec.encode(batch)).decode(),
            "inputs": shape.inputs, "hidden": shape.hidden, "classes": shape.classes,
            "step": 4}


def _run(run_id: str) -> dict[str, Any]:
    return {"dataset": "synthetic", "iterations": 1, "number_of_workers": 1, "run_id": run_id}


def _cases(run_id: str) -> dict[str, list[tuple[str, str, bytes]]]:
    """Per function: (method, path+query, body) of bad requests, then ``GOOD[fn]`` good ones;
    ``run_id`` is a finished one-worker run (asked about), ``run_id + "-new"`` a run to start."""
    j = lambda obj: json.dumps(obj).encode()  # noqa: E731
    return {
        "emnist-setup": [
            ("POST", "/", b"{"), ("POST", "/", b"[1, 2]"), ("POST", "/", j({"alpha": "x"})),
            ("POST", "/", b'{"alpha": NaN}'), ("POST", "/", j({"hidden_size": 10 ** 8})),
            ("POST", "/", j({"number_of_workers": 100000})),
            ("POST", "/", j({"store_url": "redis://evil.example:6379/0"})),
            ("POST", "/", j({"dataset_dir": "/etc"})), ("POST", "/", j({"nope": 1})),
            ("PUT", "/", b"{}"), ("GET", "/", b""), ("GET", "/?run_id=no-such-run", b""),
            ("GET", "/?run_id=..%2Fetc", b""), ("GET", f"/?run_id={run_id}", b""),
            ("POST", "/", j(_run(run_id + "-new"))),
        ],
        "emnist-train": [
            ("POST", "/", b""), ("POST", "/", j({"run_id": "no-such-run", "worker_id": 0})),
            ("POST", "/", j({"run_id": "bad id!", "worker_id": 0})),
            ("POST", "/", j({"run_id": run_id, "worker_id": -1})),
            ("POST", "/", j({"run_id": run_id, "worker_id": True})),
            ("POST", "/", j({"run_id": run_id, "worker_id": 0,
                             "store_url": "memcached://evil.example:11211"})),
            ("GET", "/", b""), ("POST", "/", j({"run_id": run_id, "worker_id": 0})),
        ],
        "emnist-grad": [
            ("POST", "/", b"{}"), ("GET", "/", b""),
            ("POST", "/", j({"data": "/etc", "batch": "passwd", "inputs": 784, "hidden": 10,
                             "classes": 10, "params": ""})),
            ("POST", "/", j({**_grad_request(MLPShape(784, 16, 10)), "inputs": 10 ** 9})),
            ("POST", "/", j({**_grad_request(MLPShape(784, 16, 10)), "params": "%%%"})),
            ("POST", "/", j(_grad_request(MLPShape(784, 16, 10)))),
        ],
    }


# What legitimately differs between two answers to the same request: who answered and when.
VOLATILE = {"started", "finished", "since_setup", "now", "heartbeat", "hostname", "seconds",
            "train_seconds", "samples_per_s", "curve", "invocations", "resumes", "lease",
            "at", "from"}


def _normal(body: bytes, content_type: str) -> Any:
    if "json" not in content_type:
        return body
    def strip(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: strip(v) for k, v in x.items() if k not in VOLATILE}
        if isinstance(x, list):
            return [strip(v) for v in x]
        return x
    return strip(json.loads(body))


def _without_run_ids(answer: tuple[int, str, Any], run_id: str) -> tuple[int, str, Any]:
    """The two sides ask about runs of their own: the ids are the one expected difference."""
    text = json.dumps(answer[2]) if not isinstance(answer[2], bytes) else None
    if text is None:
        return answer
    return answer[0], answer[1], json.loads(text.replace(run_id, "RUN"))


def _answer(resp: dict[str, Any]) -> tuple[int, str, Any]:
    headers = {k.lower(): v for k, v in resp.get("headers", {}).items()}
    ctype = headers.get("content-type", "")
    return resp["status"], ctype.split(";")[0], _normal(resp.get("body", b""), ctype)


@pytest.fixture(scope="module")
def netns_stack(tmp_path_factory) -> Iterator[tuple[Netns, Probe, Path]]:
    """memcached and the local gateway inside a fresh namespace, plus a probe to reach them."""
    tmp = tmp_path_factory.mktemp("netns")
    with Netns() as ns:
        user = ["-u", "root"] if os.geteuid() == 0 else []
        ns.popen(["memcached", "-l", "127.0.0.1", "-p", str(MEMCACHED_PORT), "-m", "64",
                  *user])
        # one data location for the stack's replicas and the watchdog's (its envVars): a
        # train function opens only shards under its own (emnist.train.rundoc)
        env = {**os.environ, "STORE_URL": f"memcached://127.0.0.1:{MEMCACHED_PORT}",
               "EMNIST_HOME": str(tmp / "home"), "DATA_LOCATION": str(tmp / "shards")}
        for k in ("OPENFAAS_URL", "OPENFAAS_PASSWORD"):
            env.pop(k, None)
        ns.popen([sys.executable, "-m", "emnist.gateway.server", "--stack",
                  str(ROOT / "emnist.yml"), "--port", str(GATEWAY_PORT), "--state-dir",
                  str(tmp / "state"), "--replicas", "emnist-grad=1"], env=env, cwd=ROOT,
                 stdout=subprocess.DEVNULL, stderr=open(tmp / "gateway.log", "wb"))  # noqa: SIM115
        probe = ns.probe()
        probe.wait_ok(GATEWAY_PORT, "/healthz", 60)
        for fn in FUNCTIONS:  # every replica ready
            deadline = time.monotonic() + 60
            while True:
                r = probe.request("GET", GATEWAY_PORT, f"/system/function/{fn}")
                doc = json.loads(r["body"]) if r["status"] == 200 else {}
                if doc.get("availableReplicas", 0) >= 1:
                    break
                assert time.monotonic() < deadline, (tmp / "gateway.log").read_text()[-3000:]
                time.sleep(0.1)
        yield ns, probe, tmp


def _watchdog(ns: Netns, probe: Probe, tmp: Path, fn: str) -> Any:
    """The real of-watchdog running ``fn``'s build context (the template's index.py)."""
    ctx = shrinkwrap(ROOT / "emnist.yml", out_dir=tmp / "build", only=[fn],
                     env={**os.environ, "STORE_URL": f"memcached://127.0.0.1:{MEMCACHED_PORT}"})
    r = probe.request("GET", GATEWAY_PORT, f"/system/function/{fn}")
    fn_env = json.loads(r["body"])["envVars"]  # what the gateway deployed
    wd_tmp = tmp / f"wd-{fn}"
    wd_tmp.mkdir()
    env = {"PATH": os.environ["PATH"], "HOME": str(wd_tmp), "TMPDIR": str(wd_tmp),
           **fn_env, "OPENFAAS_URL": f"http://127.0.0.1:{GATEWAY_PORT}",
           "HOSTNAME": f"{fn}-watchdog", "fprocess": f"{sys.executable} index.py",
           "mode": "http", "upstream_url": "http://127.0.0.1:5000",
           "port": str(WATCHDOG_PORT)}
    log = open(wd_tmp / "watchdog.log", "wb")  # noqa: SIM115 - lives as long as the process
    proc = ns.popen([str(OPENFAAS_BIN / "fwatchdog")], env=env, cwd=ctx[0].path, stdout=log,
                    stderr=subprocess.STDOUT)
    probe.wait_ok(WATCHDOG_PORT, "/_/health", 30)
    probe.wait_ok(5000, "/_/health", 30, ok=range(100, 600))  # the Flask app is up
    return proc, wd_tmp


@pytest.mark.parametrize("fn", FUNCTIONS)
def test_each_function_answers_the_same_under_the_real_watchdog(netns_stack, fn: str) -> None:
    ns, probe, tmp = netns_stack
    proc, wd_tmp = _watchdog(ns, probe, tmp, fn)
    try:
        run_ids = {"gateway": "conf-gw-" + secrets.token_hex(3),
                   "watchdog": "conf-wd-" + secrets.token_hex(3)}
        if fn != "emnist-grad":  # a finished run to ask about: a deterministic good request
            for rid in run_ids.values():
                body = json.dumps(_run(rid)).encode()
                r = probe.request("POST", GATEWAY_PORT, "/function/emnist-setup", body, JSON)
                assert r["status"] == 200, r
                deadline = time.monotonic() + 60
                while not json.loads(probe.request(
                        "GET", GATEWAY_PORT, f"/function/emnist-setup?run_id={rid}")["body"]
                        )["done"]:
                    assert time.monotonic() < deadline
                    time.sleep(0.1)
        cases = {where: _cases(rid)[fn] for where, rid in run_ids.items()}
        statuses = []
        for (method, path, body), (_, wd_path, wd_body) in zip(cases["gateway"],
                                                                cases["watchdog"]):
            via_gw = probe.request(method, GATEWAY_PORT, f"/function/{fn}{path.lstrip('/')}"
                                   if path != "/" else f"/function/{fn}", body, JSON)
            via_wd = probe.request(method, WATCHDOG_PORT, wd_path, wd_body, JSON)
            a, b = _answer(via_gw), _answer(via_wd)
            a, b = _without_run_ids(a, run_ids["gateway"]), _without_run_ids(b, run_ids["watchdog"])
            assert a == b, (method, path, via_gw, via_wd,
                            (wd_tmp / "watchdog.log").read_text()[-2000:])
            if fn == "emnist-grad" and a[0] == 200:  # the loss header too
                assert via_gw["headers"]["X-Loss"] == via_wd["headers"]["X-Loss"]
            statuses.append(a[0])
        good = GOOD[fn]
        assert all(400 <= s < 500 for s in statuses[:-good]), statuses  # the bad ones
        assert statuses[-good:] == [200] * good, statuses
    finally:
        proc.terminate()
        proc.wait(20)
