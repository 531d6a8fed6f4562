"""Execution types, algorithms and faults on the real local gateway with its own memcached
(so the tests can kill and restart it): SIGKILLed replicas and a restarted store."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from click.testing import CliRunner

from emnist.bench.faults import SLOW, pid_of
from emnist.cli import main
from emnist.runner import start_run, status, watch
from tests.servers import free_port, local_gateway, start_memcached

ROOT = Path(__file__).resolve().parents[1]


class Memcached:
    """A memcached of this module's own, so a test can kill and restart it."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"memcached://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        self.proc = start_memcached(self.port, 128)

    def stop(self) -> None:
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("faults")
    mc = Memcached()
    mc.start()
    env = {"STORE_URL": mc.url, "DATA_LOCATION": str(tmp / "shards"), "TRAIN_REPLICAS": "2",
           "CHECKPOINT_ROOTS": str(tmp_path_factory.getbasetemp()),  # tests' checkpoint dirs
           "GRAD_REPLICAS": "0"}
    try:
        with local_gateway(tmp, env) as gw:
            yield gw, mc, tmp
    finally:
        mc.stop()


@pytest.mark.parametrize("execution_type", ["1", "2", "3"])
@pytest.mark.parametrize("algorithm", ["downpour", "averaging"])
def test_each_execution_type_and_algorithm_reaches_target(stack, execution_type, algorithm,
                                                          tmp_path):
    gw, mc, _ = stack
    out = tmp_path / "r.json"
    r = CliRunner().invoke(main, ["--gateway", gw.url, "train", "--workers", "2",
                                  "--target-accuracy", "0.84", "--store", mc.url,
                                  "--execution-type", execution_type, "--algorithm", algorithm,
                                  "--json", str(out), "--timeout", "300"],
                           catch_exceptions=False)
    assert r.exit_code == 0, r.output
    rows = json.loads(out.read_text())
    assert sorted(x["worker_id"] for x in rows) == [0, 1]
    assert max(x["accuracy"] for x in rows) >= 0.84
    if execution_type == "2":  # one invocation per pass
        assert all(x["invocations"] >= x["iterations"] for x in rows)
        assert any(x["invocations"] > 1 for x in rows)
    else:
        assert all(x["invocations"] == 1 for x in rows)
    if algorithm == "averaging":
        assert all(x["averages"] > 0 for x in rows)
        assert rows[0]["accuracy"] == rows[1]["accuracy"]  # both evaluate the same average


def _run_in_background(pool, gw, config):
    """Start a run and watch it on a thread; the future's result() joins it and re-raises
    the watcher's error in the test."""
    state, invoked = start_run(gw, config)
    return state, pool.submit(watch, gw, state, invoked, timeout=300)


def _wait_for_iteration(gw, run_id, worker, at_least, timeout=120):
    deadline = time.monotonic() + timeout
    while True:
        p = status(gw, run_id)["progress"][worker]
        if p and p["iteration"] >= at_least:
            return p
        assert time.monotonic() < deadline, "worker made no progress"
        time.sleep(0.05)


def test_sigkilled_replica_resumes_its_worker(stack):
    gw, mc, _ = stack
    gw.scale("emnist-train", 2)
    with ThreadPoolExecutor(1) as pool:
        state, watching = _run_in_background(pool, gw, {**SLOW, "store_url": mc.url})
        p = _wait_for_iteration(gw, state["run_id"], 0, 2)
        os.kill(pid_of(p["hostname"]), signal.SIGKILL)
        out = watching.result(timeout=330)
    assert out.reached
    w0 = next(r for r in out.results if r["worker_id"] == 0)
    # resumed from the state the killed replica saved (at or after the pass seen before the
    # kill), not restarted from zero; every later invocation records one resume
    assert w0["invocations"] >= 2 and w0["invocations"] == 1 + len(w0["resumes"])
    assert w0["resumes"][0]["from"] == p["hostname"]
    assert w0["resumes"][0]["iteration"] >= p["iteration"]
    assert w0["hostname"] != p["hostname"]


def test_memcached_restart_resumes_from_the_checkpoint(stack, tmp_path):
    gw, mc, _ = stack
    config = {**SLOW, "store_url": mc.url, "checkpoint_url": str(tmp_path / "ckpt")}
    with ThreadPoolExecutor(1) as pool:
        state, watching = _run_in_background(pool, gw, config)
        _wait_for_iteration(gw, state["run_id"], 0, 3)
        assert (tmp_path / "ckpt" / f"{state['run_id']}.ckpt").exists()
        mc.stop()
        mc.start()  # empty
        out = watching.result(timeout=330)
    assert out.reached
    assert any("restored from checkpoint" in r for r in out.recoveries)
    # the workers went on from the checkpoint's counters, not from zero
    assert all(r["resumes"] and r["resumes"][0]["iteration"] >= 1 for r in out.results)


def test_resume_of_an_unknown_run_is_a_clear_error(stack):
    gw, mc, _ = stack
    r = CliRunner().invoke(main, ["--gateway", gw.url, "train", "--resume", "no-such-run",
                                  "--store", mc.url])
    assert r.exit_code == 1
    assert "unknown run id no-such-run" in r.output
