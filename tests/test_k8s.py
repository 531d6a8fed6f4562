"""deploy/k8s manifests against the Kubernetes schemas; deploy --dry-run; kubectl fallbacks.

No cluster exists here: the kubectl fallbacks run a stand-in `kubectl` placed first on PATH
that records its argv (a real process boundary) and answers like kubectl would.
"""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from emnist.cli import main
from emnist.cluster import k8s, objectstore
from emnist.gateway.client import deploy_request
from emnist.gateway.stack import load_stack
from tests.kubectl import fake_kubectl, kubectl_calls

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "deploy" / "k8s"
VERSION = kubernetes_validate.latest_version()


def _objs(kind: str, objs=None) -> list[dict]:
    return [m for m in (objs or k8s.load_manifests(MANIFESTS)) if m["kind"] == kind]


def _one(kind: str, name: str, objs=None) -> dict:
    [m] = [m for m in _objs(kind, objs) if m["metadata"]["name"] == name]
    return m


@pytest.mark.parametrize("path", sorted(MANIFESTS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_manifest_validates_against_its_kubernetes_schema(path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for doc in docs:
        kubernetes_validate.validate(doc, VERSION, strict=True)  # raises on any schema error
        assert doc["kind"] != "Secret", "secrets are created at deploy time, never committed"


def test_the_validator_is_real():
    bad = _one("Service", "memcached-local")
    bad = {**bad, "spec": {**bad["spec"], "ports": [{"port": "eleven"}]}}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(bad, VERSION, strict=True)
    with pytest.raises(kubernetes_validate.ValidationError):  # strict: unknown fields fail
        kubernetes_validate.validate({**_one("Service", "memcached"), "spek": {}}, VERSION,
                                     strict=True)


def _pod_labels(workload: dict) -> dict:
    return workload["spec"]["template"]["metadata"]["labels"]


def _selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.items())


def test_design_fields_the_stores_depend_on():
    objs = k8s.load_manifests(MANIFESTS)
    # global memcached: Deployment + Service that selects it (emnist.yml's STORE_URL default)
    dep, svc = _one("Deployment", "memcached"), _one("Service", "memcached")
    assert _selects(svc["spec"]["selector"], _pod_labels(dep))
    assert _selects(dep["spec"]["selector"]["matchLabels"], _pod_labels(dep))
    assert svc["spec"]["ports"][0]["port"] == 11211
    assert svc["metadata"]["namespace"] == "openfaas-fn"
    assert "memcached.openfaas-fn:11211" in (ROOT / "emnist.yml").read_text()
    # node-local memcached: a DaemonSet behind a Service that stays on the caller's node
    ds, local = _one("DaemonSet", "memcached-local"), _one("Service", "memcached-local")
    assert local["spec"]["internalTrafficPolicy"] == "Local"
    assert _selects(local["spec"]["selector"], _pod_labels(ds))
    assert not _selects(svc["spec"]["selector"], _pod_labels(ds))  # global != node-local
    assert not _selects(local["spec"]["selector"], _pod_labels(dep))
    assert "nodeSelector" not in ds["spec"]["template"]["spec"]  # no co-location asked for
    # Redis with persistence, password from the Secret
    sts = _one("StatefulSet", "redis")
    assert sts["spec"]["volumeClaimTemplates"][0]["spec"]["resources"]["requests"]["storage"]
    c = sts["spec"]["template"]["spec"]["containers"][0]
    [script] = c["args"]  # redis-server reads the password from a file, never from argv
    assert c["command"] == ["sh", "-c"] and "--appendonly yes" in script
    assert "--requirepass" not in script and "$(" not in script
    assert {"name": "data", "mountPath": "/data"} in c["volumeMounts"]
    ref = c["env"][0]["valueFrom"]["secretKeyRef"]
    assert (ref["name"], ref["key"]) == (k8s.SECRET_NAME, k8s.SECRET_NAME)
    assert _selects(_one("Service", "redis")["spec"]["selector"], _pod_labels(sts))
    # NetworkPolicy: every store pod selected; ingress only from the functions' namespace
    pol = _one("NetworkPolicy", "emnist-stores", objs)
    sel = pol["spec"]["podSelector"]["matchLabels"]
    for w in (dep, ds, sts):
        assert _selects(sel, _pod_labels(w))
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    [rule] = pol["spec"]["ingress"]
    assert rule["from"] == [{"namespaceSelector": {"matchLabels": {
        "kubernetes.io/metadata.name": "openfaas-fn"}}}]
    assert {p["port"] for p in rule["ports"]} == {11211, 6379}


def test_render_moves_namespace_adds_secret_and_keeps_policy_on_functions_ns():
    objs = k8s.render(k8s.load_manifests(MANIFESTS), namespace="emnist-stores",
                      password="pw-9f3e1c")
    assert objs[0]["kind"] == "Secret" and objs[0]["stringData"] == {
        k8s.SECRET_NAME: "pw-9f3e1c"}
    for m in objs:
        kubernetes_validate.validate(m, VERSION, strict=True)
        assert m["metadata"]["namespace"] == "emnist-stores"
    pol = _one("NetworkPolicy", "emnist-stores", objs)
    assert pol["spec"]["ingress"][0]["from"][0]["namespaceSelector"]["matchLabels"] == \
        {"kubernetes.io/metadata.name": "openfaas-fn"}
    assert "pw-9f3e1c" not in k8s.to_yaml([k8s.redact(m) for m in objs])


def test_deploy_dry_run_prints_manifests_and_gateway_requests_without_a_cluster(tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("very-secret-pw\n")
    bindir = fake_kubectl(tmp_path)  # present, but a dry run must not call it
    r = CliRunner().invoke(main, ["--gateway", "http://127.0.0.1:9", "deploy", "--target",
                                  "k8s", "--dry-run", "-f", str(ROOT / "emnist.yml"),
                                  "--manifests", str(MANIFESTS), "--store-password-file",
                                  str(pw)],
                           env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    assert r.exit_code == 0, r.output
    assert kubectl_calls(tmp_path) == []
    assert "very-secret-pw" not in r.output and "<redacted>" in r.output
    manifest_text, _, rest = r.output.partition("# PUT ")
    docs = [d for d in yaml.safe_load_all(manifest_text) if d]
    shown = {(d["kind"], d["metadata"]["name"]) for d in docs}
    assert shown == {("Secret", k8s.SECRET_NAME), ("Secret", "emnist-minio-root"),
                     ("Secret", "emnist-s3")} | {
        (m["kind"], m["metadata"]["name"]) for m in k8s.load_manifests(MANIFESTS)}
    plan = objectstore.S3Plan(objectstore.DEFAULT_DATA_URL,
                              objectstore.minio_endpoint("openfaas-fn"), minio=True)
    stack = load_stack(ROOT / "emnist.yml", {**os.environ, "STORE_KEY_SECRET": "emnist-store-key",
                                             **objectstore.stack_env(plan, os.environ)})
    for fn in stack.functions.values():
        assert json.dumps(deploy_request(fn), indent=2, sort_keys=True) in r.output
    assert r.output.count("# PUT http://127.0.0.1:9/system/functions") == len(stack.functions)
    assert "nothing was changed" in r.output


def test_scale_above_five_uses_kubectl_and_says_so(tmp_path):
    bindir = fake_kubectl(tmp_path, {"scale": "deployment.apps/emnist-train scaled\n"})
    r = CliRunner().invoke(main, ["--gateway", "http://127.0.0.1:9", "scale", "emnist-train",
                                  "-r", "7", "--no-wait", "--kubectl"],
                           env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    assert r.exit_code == 0, r.output
    assert [c["argv"] for c in kubectl_calls(tmp_path)] == [
        ["scale", "deployment", "emnist-train", "-n", "openfaas-fn", "--replicas", "7"]]
    assert "kubectl scale deployment emnist-train -n openfaas-fn --replicas 7" in r.output
    assert "emnist-train: 7 replicas (via kubectl)" in r.output


def test_when_kubectl_is_used_for_scaling():
    real, local = "openfaas-ce", k8s.LOCAL_PROVIDER
    assert k8s.scale_with_kubectl(6, real, None) and not k8s.scale_with_kubectl(5, real, None)
    assert not k8s.scale_with_kubectl(12, local, None)  # the local gateway scales to any count
    assert not k8s.scale_with_kubectl(12, real, False) and k8s.scale_with_kubectl(2, local, True)


def test_kubectl_missing_is_one_line_naming_it(tmp_path):
    r = CliRunner().invoke(main, ["--gateway", "http://127.0.0.1:9", "scale", "emnist-train",
                                  "-r", "7", "--no-wait", "--kubectl"],
                           env={"PATH": str(tmp_path)})
    assert r.exit_code == 1
    last = r.output.strip().splitlines()[-1]
    assert last.startswith("Error: kubectl is not installed") and "Traceback" not in r.output


def test_logs_fall_back_to_kubectl_per_pod_with_pod_and_node(tmp_path):
    pods = {"items": [{"metadata": {"name": "emnist-train-7d9f-abcde"},
                       "spec": {"nodeName": "node-a"}},
                      {"metadata": {"name": "emnist-train-7d9f-fghij"},
                       "spec": {"nodeName": "node-b"}}]}
    rec = {"worker_id": 1, "iterations": 4, "accuracy": 0.81, "run_id": "r1"}
    log = ("2026-11-23T20:00:00.000000000Z 2026/11/23 20:00:00 stdout: Worker ID: 1 "
           "Iterations: 4 Time: 2.345 Name: emnist-train-7d9f-fghij\n"
           "2026-11-23T20:00:00.100000000Z 2026/11/23 20:00:00 stdout: "
           + json.dumps({"emnist_result": rec}) + "\n")
    bindir = fake_kubectl(tmp_path, {"get pods": json.dumps(pods), "logs": log})
    out_csv = tmp_path / "rows.csv"
    r = CliRunner().invoke(main, ["--gateway", "http://127.0.0.1:9", "logs", "emnist-train",
                                  "--kubectl", "--tail", "100", "--csv", str(out_csv)],
                           env={"PATH": f"{bindir}:{os.environ['PATH']}"})
    assert r.exit_code == 0, r.output
    argv = [c["argv"] for c in kubectl_calls(tmp_path)]
    assert argv[0] == ["get", "pods", "-n", "openfaas-fn", "-l", "faas_function=emnist-train",
                       "-o", "json"]
    assert argv[1:] == [["logs", p["metadata"]["name"], "-n", "openfaas-fn", "--timestamps",
                         "--tail", "100"] for p in pods["items"]]
    rows = list(csv.DictReader(out_csv.open()))
    # the stand-in prints the same log for both pods: one row per pod, each with its node
    assert [(x["pod"], x["node"], x["iterations"], x["seconds"]) for x in rows] == [
        ("emnist-train-7d9f-abcde", "node-a", "4", "2.345"),
        ("emnist-train-7d9f-fghij", "node-b", "4", "2.345")]
    assert all(x["run_id"] == "r1" and x["accuracy"] == "0.81" for x in rows)
