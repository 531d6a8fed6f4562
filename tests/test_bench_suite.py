"""deploy --target local, deploy --target k8s (stand-in kubectl), scale, logs, the benchmark
suite (bench run + report) and test.sh, all on a real local gateway started by the CLI."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from emnist.bench.suite import load_records, worker_results
from emnist.cli import main
from emnist.gateway.client import GatewayClient
from tests.conftest import MEMCACHED_URL
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
TARGET = "0.8"  # quick on Fashion-MNIST (a few iterations), still a real training run


@pytest.fixture(scope="module")
def stack_env(tmp_path_factory):
    """EMNIST_HOME in a temp dir and a free port: `emnist deploy --target local` starts the
    gateway there (= `emnist up`); `emnist down` stops it afterwards."""
    tmp = tmp_path_factory.mktemp("suite")
    mp = pytest.MonkeyPatch()
    mp.setenv("EMNIST_HOME", str(tmp / "home"))
    mp.setenv("STORE_URL", MEMCACHED_URL)
    mp.delenv("DATA_LOCATION", raising=False)
    url = f"http://127.0.0.1:{free_port()}"
    r = CliRunner().invoke(main, ["--gateway", url, "deploy", "--target", "local", "-f",
                                  str(ROOT / "emnist.yml")])
    try:
        assert r.exit_code == 0, r.output
        yield {"url": url, "tmp": tmp, "deploy_output": r.output}
    finally:
        CliRunner().invoke(main, ["down"])
        mp.undo()


@pytest.fixture(scope="module")
def variants(stack_env):
    out = stack_env["tmp"] / "stacks"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "make_stacks.py"), "--batch",
                    "64,128", "--workers", "1,2", "--out", str(out)], check=True,
                   stdout=subprocess.DEVNULL)
    return out


def _cli(env, *args):
    return CliRunner().invoke(main, ["--gateway", env["url"], *args], catch_exceptions=False)


def test_deploy_target_local_is_up(stack_env):
    gw = GatewayClient(stack_env["url"])
    assert gw.healthy() and gw.info()["provider"]["provider"] == "emnist-local"
    assert "local gateway on " + stack_env["url"] in stack_env["deploy_output"]
    assert "emnist-train: 2/2 replicas" in stack_env["deploy_output"]
    r = _cli(stack_env, "deploy", "--target", "local")  # already up: nothing new starts
    assert r.exit_code == 0 and "local gateway on" not in r.output
    assert "emnist-setup: 1/1 replicas" in r.output


def test_deploy_k8s_applies_manifests_then_deploys_functions_through_the_gateway(
        stack_env, variants, tmp_path):
    from tests.kubectl import fake_kubectl, kubectl_calls
    applied = ["secret/emnist-store-password created", "deployment.apps/memcached created",
               "service/memcached created", "daemonset.apps/memcached-local created",
               "service/memcached-local created", "statefulset.apps/redis created",
               "service/redis created",
               "networkpolicy.networking.k8s.io/emnist-stores created"]
    bindir = fake_kubectl(tmp_path, {"apply": "\n".join(applied) + "\n",
                                      "config current-context": "lab\n"})
    pw = tmp_path / "pw"
    pw.write_text("pw-for-redis")
    r = CliRunner().invoke(main, ["--gateway", stack_env["url"], "deploy", "-f",
                                  str(variants / "emnist641.yml"), "--store-password-file",
                                  str(pw), "--manifests", str(ROOT / "deploy" / "k8s"),
                                  "--no-s3",  # MinIO and its Secrets: tests/test_k8s_s3.py
                                  "--registry", "ghcr.io/lab"],
                           env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    assert r.exit_code == 0, r.output
    # the cluster answers before anything is applied; the queue's width is read last
    check, ready, call, queue = kubectl_calls(tmp_path)
    assert queue["argv"][:3] == ["get", "deployment", "queue-worker"]
    assert check["argv"] == ["config", "current-context"] and ready["argv"][:2] == ["get",
                                                                                    "--raw"]
    assert call["argv"] == ["apply", "-f", "-"]
    assert all(f"  {line}" in r.output for line in applied)
    kinds = re.findall(r"^kind: (\w+)", call["stdin"], re.M)
    assert sorted(kinds) == sorted(["Secret", "Deployment", "Service", "DaemonSet", "Service",
                                    "StatefulSet", "Service", "NetworkPolicy"])
    assert "emnist-store-password: pw-for-redis" in call["stdin"]  # only on kubectl's stdin
    assert "pw-for-redis" not in r.output
    fn = GatewayClient(stack_env["url"]).get_function("emnist-setup")
    assert fn["envVars"]["batch_size"] == "64" and fn["envVars"]["number_of_workers"] == "1"
    assert "deployed emnist-train" in r.output


def test_scale_through_the_gateway(stack_env):
    r = _cli(stack_env, "scale", "emnist-train", "-r", "1")
    assert r.exit_code == 0, r.output
    assert "emnist-train: 1 replicas (via gateway)" in r.output
    assert GatewayClient(stack_env["url"]).replicas("emnist-train") == 1


def _report_rows(text: str) -> list[dict[str, str]]:
    """The per-round table of `bench report` (the first markdown table) as dicts."""
    table = text.split("Across rounds")[0]
    lines = [ln for ln in table.splitlines() if ln.startswith("|")]
    head = [c.strip() for c in lines[0].strip("|").split("|")]
    return [dict(zip(head, (c.strip() for c in ln.strip("|").split("|")))) for ln in lines[2:]]


def test_bench_run_two_variants_two_rounds_and_report(stack_env, variants, tmp_path):
    results = tmp_path / "results.jsonl"
    stacks = [str(variants / "emnist641.yml"), str(variants / "emnist1282.yml")]
    r = _cli(stack_env, "bench", "run", *stacks, "--rounds", "2", "--target-accuracy", TARGET,
             "--results", str(results), "--timeout", "180")
    assert r.exit_code == 0, r.output
    assert "4 runs recorded" in r.output
    records, bad = load_records(results)
    assert bad == 0 and len(records) == 4
    assert [(x["stack"], x["batch_size"], x["workers"], x["round"]) for x in records] == [
        ("emnist641", 64, 1, 1), ("emnist641", 64, 1, 2),
        ("emnist1282", 128, 2, 1), ("emnist1282", 128, 2, 2)]
    for rec in records:
        assert rec["reached"] and rec["target"] == float(TARGET)
        assert rec["dataset"] == "fashion-mnist"
        assert [w["worker_id"] for w in rec["results"]] == list(range(rec["workers"]))
        assert rec["seconds"] >= max(w["seconds"] for w in rec["results"])
        assert all(w["node"] == os.uname().nodename for w in rec["results"])

    # what the workers logged (the original's result lines) ...
    logged = {(x["run_id"], x["worker_id"]): x for x in worker_results(
        GatewayClient(stack_env["url"]).logs("emnist-train"))}
    # ... is what the report shows, run by run and worker by worker
    r = _cli(stack_env, "bench", "report", "--results", str(results), "--plots",
             str(tmp_path / "plots"))
    assert r.exit_code == 0, r.output
    rows = _report_rows(r.output)
    assert len(rows) == sum(x["workers"] for x in records) == 6
    for row in rows:
        log = logged[(row["run"], int(row["worker"]))]
        assert row["iterations"] == str(log["iterations"])
        assert row["time (s)"] == f"{log['seconds']:.3f}"
        assert row["pod"] == log["pod"]
    # summary: mean and std across the two rounds
    summary = r.output.split("Across rounds")[1]
    assert "| emnist641 " in summary and "| emnist1282 " in summary
    for name in ("time-vs-workers.png", "accuracy-vs-time.png"):
        png = tmp_path / "plots" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000

    # logs: the parsed table, with pod and node, as JSON
    out_json = tmp_path / "logs.json"
    r = _cli(stack_env, "logs", "emnist-train", "--json", str(out_json))
    assert r.exit_code == 0, r.output
    rows = [x for x in json.loads(out_json.read_text())
            if x.get("run_id") in {rec["run_id"] for rec in records}]
    assert len(rows) == 6
    assert all(x["node"] == os.uname().nodename and x["pod"] == x["hostname"] for x in rows)

    # without matplotlib: the tables, and a message naming the `plot` extra
    code = ("import sys; sys.modules['matplotlib'] = None\n"
            "from emnist.cli import main\n"
            f"main(['bench', 'report', '--results', {str(results)!r}, '--plots', "
            f"{str(tmp_path / 'noplots')!r}])")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                       cwd=ROOT, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "Across rounds" in p.stdout and "`plot` extra" in p.stderr
    assert not (tmp_path / "noplots").exists()


def test_test_sh_small_matrix_under_nohup(stack_env, variants, tmp_path):
    out = tmp_path / "output.txt"
    out.write_text("an earlier run\n")
    emnist = Path(sys.executable).parent / "emnist"
    env = {**os.environ, "STACKS": str(variants / "emnist128*.yml"), "ROUNDS": "1",
           "OUTPUT": str(out), "RESULTS": str(tmp_path / "r.jsonl"), "EMNIST": str(emnist),
           "BENCH_ARGS": f"--target-accuracy {TARGET} --timeout 180",
           "OPENFAAS_URL": stack_env["url"]}
    p = subprocess.run(["nohup", str(ROOT / "test.sh")], env=env, stdin=subprocess.DEVNULL,
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, timeout=300,
                       start_new_session=True)
    text = out.read_text()
    assert p.returncode == 0, text[-3000:]
    assert text.startswith("an earlier run\n")  # appended, not truncated
    assert "test.sh: 2 variants x 1 rounds" in text and "done (exit 0)" in text
    assert "2 runs recorded" in text and "Across rounds" in text
    assert len(load_records(tmp_path / "r.jsonl")[0]) == 2
    assert (tmp_path / "plots" / "time-vs-workers.png").exists()
