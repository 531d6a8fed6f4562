"""The Kubernetes path for S3 data: deploy/k8s/minio.yaml, the Secrets `emnist deploy` makes,
the stack's S3 wiring, and the functions' S3 loader reading exactly what the deployment gives.

No cluster exists here. What stands in, and how faithfully:
- the API server: kubernetes-validate (strict schemas) and a stand-in `kubectl` on PATH;
- faas-netes' secret mount: a directory with one file per key of the Secret, as faas-netes
  projects each key of each listed secret into /var/openfaas/secrets/<key>;
- cluster DNS: the provider's host aliases (minio.openfaas-fn:9000 -> a loopback port);
- MinIO: moto's S3 server behind a proxy that records how each request was signed;
- the NetworkPolicy's enforcement: an evaluator of the matchLabels rules used here.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import stat
import subprocess
import sys
import threading
import urllib.request
from pathlib import Path

import boto3
import kubernetes_validate
import pytest
import yaml
from click.testing import CliRunner

from emnist.cli import main
from emnist.cluster import k8s, objectstore
from emnist.data.cache import open_set
from emnist.data.idx import DataError
from emnist.data.prepared import prepare_set
from emnist.data.s3 import DEFAULT_ACCESS_SECRET, DEFAULT_SECRET_SECRET, s3_settings
from emnist.gateway.client import GatewayClient, deploy_request
from emnist.gateway.stack import load_stack
from emnist.hostaliases import ALIASES_ENV, format_aliases
from emnist.policy import PolicyError, check_data_location
from emnist.secrets import SECRETS_DIR_ENV
from tests.gateway_tools import GatewayProcess
from tests.s3server import moto_server
from tests.tcpproxy import PipeProxy

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "deploy" / "k8s"
STACK = ROOT / "emnist.yml"
VERSION = kubernetes_validate.latest_version()
FNS = k8s.FUNCTIONS_NAMESPACE
S3_FUNCTIONS = ("emnist-setup", "emnist-train", "emnist-grad")


def _minio_objs() -> list[dict]:
    return [m for m in k8s.load_manifests(MANIFESTS) if objectstore.is_minio(m)]


def _one(objs: list[dict], kind: str, name: str, namespace: str | None = None) -> dict:
    [m] = [m for m in objs if m["kind"] == kind and m["metadata"]["name"] == name
           and (namespace is None or m["metadata"].get("namespace") == namespace)]
    return m


def _plan(data_url: str = objectstore.DEFAULT_DATA_URL, ns: str = FNS) -> objectstore.S3Plan:
    return objectstore.S3Plan(data_url, objectstore.minio_endpoint(ns), minio=True)


def _rendered(ns: str = FNS, plan: objectstore.S3Plan | None = None,
              root: tuple[str, str] | None = None, keys: tuple[str, str] | None = None,
              password: str = "pw-x") -> list[dict]:
    """What `emnist deploy --target k8s` applies: the store and S3 Secrets, then deploy/k8s."""
    plan = plan or _plan(ns=ns)
    root, keys = root or objectstore.generate_root(), keys or objectstore.generate_keys()
    extra = [objectstore.root_secret(*root, ns), objectstore.keys_secret(*keys, FNS)]
    if ns != FNS:
        extra.append(objectstore.keys_secret(*keys, ns))
    objs = k8s.render(k8s.load_manifests(MANIFESTS), namespace=ns, password=password,
                      secrets=extra)
    return objectstore.configure(objs, plan)


def _containers(m: dict) -> list[dict]:
    return m["spec"]["template"]["spec"]["containers"]


def _secret_refs(m: dict) -> set[tuple[str, str]]:
    return {(e["valueFrom"]["secretKeyRef"]["name"], e["valueFrom"]["secretKeyRef"]["key"])
            for c in _containers(m) for e in c.get("env", []) if "valueFrom" in e}


# -- the manifests --------------------------------------------------------------------------

def test_minio_is_a_pinned_non_root_statefulset_on_a_pvc_with_probes_behind_a_service():
    objs = _minio_objs()
    assert {(m["kind"], m["metadata"]["name"]) for m in objs} == {
        ("StatefulSet", "minio"), ("Service", "minio"), ("Job", objectstore.SETUP_JOB),
        ("NetworkPolicy", "emnist-minio")}
    sts, svc = _one(objs, "StatefulSet", "minio"), _one(objs, "Service", "minio")
    [claim] = sts["spec"]["volumeClaimTemplates"]
    [c] = _containers(sts)
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in c["volumeMounts"]
    assert c["args"][:2] == ["server", "/data"]
    assert c["readinessProbe"]["httpGet"]["path"] == "/minio/health/ready"
    assert c["livenessProbe"]["httpGet"]["path"] == "/minio/health/live"
    assert {p["containerPort"] for p in c["ports"]} == {objectstore.MINIO_PORT}
    assert c["resources"]["requests"] and c["resources"]["limits"]["memory"]
    # the Service reaches these pods on the port the functions' endpoint names
    labels = sts["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"].items() <= labels.items()
    assert svc["spec"]["ports"][0]["port"] == objectstore.MINIO_PORT
    assert objectstore.minio_endpoint("ns1") == \
        f"http://{svc['metadata']['name']}.ns1:{objectstore.MINIO_PORT}"
    for w in (sts, _one(objs, "Job", objectstore.SETUP_JOB)):
        pod = w["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True and \
            pod["securityContext"]["runAsUser"] != 0
        for c in _containers(w):
            assert re.fullmatch(r"minio/(minio|mc):RELEASE\.\d{4}-\d\d-\d\dT[\d-]+Z", c["image"])
            sc = c["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["readOnlyRootFilesystem"]
            assert sc["capabilities"]["drop"] == ["ALL"]
            assert c["resources"]["limits"]["memory"]
    env = {e["name"]: e for e in _containers(sts)[0]["env"]}
    assert env["MINIO_BROWSER"]["value"] == "off"  # only the S3 API listens


def test_every_rendered_object_validates_and_every_secret_reference_is_rendered():
    for ns in (FNS, "emnist-stores"):
        objs = _rendered(ns)
        for m in objs:
            kubernetes_validate.validate(m, VERSION, strict=True)
        secrets_ = {(m["metadata"]["namespace"], m["metadata"]["name"], k)
                    for m in objs if m["kind"] == "Secret" for k in m["stringData"]}
        for m in objs:
            if m["kind"] in ("StatefulSet", "Job", "Deployment", "DaemonSet"):
                for name, key in _secret_refs(m):
                    assert (m["metadata"]["namespace"], name, key) in secrets_, (m["kind"],
                                                                                 name, key)
        # OpenFaaS mounts secrets from the functions' namespace only: the keys are there
        keys = _one(objs, "Secret", objectstore.KEYS_SECRET, FNS)
        assert set(keys["stringData"]) == {DEFAULT_ACCESS_SECRET, DEFAULT_SECRET_SECRET}


def test_render_puts_generated_credentials_only_in_secrets_and_redact_hides_them():
    root, keys = objectstore.generate_root(), objectstore.generate_keys()
    assert len(keys[0]) <= 20 and 8 <= len(keys[1]) <= 40 and 8 <= len(root[1]) <= 40
    objs = _rendered("emnist-stores", root=root, keys=keys, password="pw-" + "7" * 20)
    values = [*root, *keys, "pw-" + "7" * 20]
    for m in objs:
        text = k8s.to_yaml([m])
        for v in values:
            assert (v in text) == (m["kind"] == "Secret" and v in m["stringData"].values())
    shown = k8s.to_yaml([k8s.redact(m) for m in objs])
    assert not any(v in shown for v in values) and shown.count("<redacted>") == 7


def test_the_setup_job_creates_the_bucket_of_the_data_url():
    objs = _rendered(plan=_plan("s3://lab-data/emnist/sets"))
    env = {e["name"]: e.get("value") for e in _containers(
        _one(objs, "Job", objectstore.SETUP_JOB))[0]["env"]}
    assert env["EMNIST_BUCKET"] == "lab-data"
    assert env["MINIO_URL"] == f"http://minio:{objectstore.MINIO_PORT}"  # its own namespace
    # the file on disk is untouched (render works on copies)
    assert _containers(_one(_minio_objs(), "Job", objectstore.SETUP_JOB))[0]["env"][1][
        "value"] == "emnist"


def _fake_mc(tmp_path: Path, attach_error: str) -> Path:
    """An `mc` that records its argv; `alias set` fails once (MinIO not up yet) and
    `admin policy attach` fails with ``attach_error`` (when not empty)."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    mc = bindir / "mc"
    mc.write_text(f"""#!{sys.executable}
import json, os, sys
args = sys.argv[1:]
log = {str(tmp_path / "mc.jsonl")!r}
n = sum(1 for _ in open(log)) if os.path.exists(log) else 0
with open(log, "a") as f:
    f.write(json.dumps(args) + "\\n")
rest = args[3:]  # after --config-dir DIR --quiet
if rest[:2] == ["alias", "set"] and n == 0:
    sys.exit("mc: <ERROR> Unable to initialize new alias: connection refused")
if rest[:3] == ["admin", "policy", "attach"] and {attach_error!r}:
    print({attach_error!r}, file=sys.stderr); sys.exit(1)
""")
    mc.chmod(mc.stat().st_mode | stat.S_IEXEC)
    return bindir


def _run_job_script(tmp_path: Path, attach_error: str) -> tuple[subprocess.CompletedProcess,
                                                                list[list[str]], dict]:
    keys = ("emnist-" + secrets.token_hex(6), secrets.token_urlsafe(30))
    objs = _rendered(plan=_plan("s3://lab-data/sets"), root=("root-u", "root-pw-123456"),
                     keys=keys)
    job = _one(objs, "Job", objectstore.SETUP_JOB)
    [c] = _containers(job)
    by_name = {(m["metadata"]["name"]): m["stringData"] for m in objs if m["kind"] == "Secret"}
    env = {"PATH": f"{_fake_mc(tmp_path, attach_error)}:/usr/bin:/bin"}
    for e in c["env"]:  # what the kubelet gives the container: values and secretKeyRefs
        ref = e.get("valueFrom", {}).get("secretKeyRef")
        env[e["name"]] = by_name[ref["name"]][ref["key"]] if ref else e["value"]
    env["HOME"] = str(tmp_path)  # the emptyDir at /tmp
    proc = subprocess.run([*c["command"], c["args"][0]], env=env, capture_output=True,
                          text=True, timeout=60)
    log = tmp_path / "mc.jsonl"
    calls = [json.loads(x) for x in log.read_text().splitlines()] if log.exists() else []
    return proc, calls, {"keys": keys, "env": env}


def test_the_setup_job_script_waits_makes_bucket_user_and_bucket_only_policy(tmp_path):
    proc, calls, ctx = _run_job_script(tmp_path, "mc: <ERROR> Unable to attach policy: The "
                                                 "specified policy change is already in effect.")
    assert proc.returncode == 0, proc.stderr
    assert all(c[:3] == ["--config-dir", f"{tmp_path}/.mc", "--quiet"] for c in calls)
    steps = [c[3:] for c in calls]
    alias = ["alias", "set", "emnist", "http://minio:9000", "root-u", "root-pw-123456"]
    assert steps == [alias, alias,  # retried until MinIO answered
                     ["mb", "--ignore-existing", "emnist/lab-data"],
                     ["admin", "policy", "create", "emnist", "emnist-data",
                      f"{tmp_path}/emnist-data.json"],
                     ["admin", "user", "add", "emnist", *ctx["keys"]],
                     ["admin", "policy", "attach", "emnist", "emnist-data", "--user",
                      ctx["keys"][0]]]
    policy = json.loads((tmp_path / "emnist-data.json").read_text())
    resources = {r for s in policy["Statement"] for r in s["Resource"]}
    assert resources == {"arn:aws:s3:::lab-data", "arn:aws:s3:::lab-data/*"}
    actions = {a for s in policy["Statement"] for a in s["Action"]}
    assert {"s3:GetObject", "s3:PutObject", "s3:ListBucket", "s3:DeleteObject",
            "s3:AbortMultipartUpload"} <= actions and not any("*" in a for a in actions)
    assert ctx["keys"][1] not in proc.stdout + proc.stderr  # the secret key is never logged


def test_the_setup_job_script_fails_on_any_other_attach_error(tmp_path):
    proc, calls, _ = _run_job_script(tmp_path, "mc: <ERROR> Unable to attach: access denied")
    assert proc.returncode == 1 and "access denied" in proc.stderr


# -- the NetworkPolicy: an evaluator of the matchLabels rules these manifests use ------------

def _labels_match(selector: dict, labels: dict) -> bool:
    assert set(selector) <= {"matchLabels"}, "the evaluator knows matchLabels only"
    return selector.get("matchLabels", {}).items() <= labels.items()


def admitted(policies: list[dict], dst_ns: str, dst_labels: dict, src_ns: str,
             src_labels: dict, port: int) -> bool:
    """Whether Kubernetes admits a TCP connection from a pod (src) to a pod (dst) on ``port``:
    allowed when no Ingress policy selects dst, else when any rule of one that does matches."""
    selecting = [p for p in policies if p["metadata"]["namespace"] == dst_ns
                 and "Ingress" in p["spec"]["policyTypes"]
                 and _labels_match(p["spec"]["podSelector"], dst_labels)]
    if not selecting:
        return True
    ns_labels = {"kubernetes.io/metadata.name": src_ns}  # the label every namespace carries
    for p in selecting:
        for rule in p["spec"].get("ingress", []):
            ports = rule.get("ports")
            if ports and not any(x.get("protocol", "TCP") == "TCP" and x["port"] == port
                                 for x in ports):
                continue
            for peer in rule.get("from", []):
                ns_ok = (_labels_match(peer["namespaceSelector"], ns_labels)
                         if "namespaceSelector" in peer else src_ns == dst_ns)
                pod_ok = _labels_match(peer.get("podSelector", {}), src_labels)
                if ns_ok and pod_ok:
                    return True
    return False


def test_only_function_pods_and_the_setup_job_reach_minios_s3_port():
    function = {"faas_function": "emnist-train"}
    for ns in (FNS, "emnist-stores"):
        objs = _rendered(ns)
        pols = [m for m in objs if m["kind"] == "NetworkPolicy"]
        sts = _one(objs, "StatefulSet", "minio")
        minio = sts["spec"]["template"]["metadata"]["labels"]
        job = _one(objs, "Job", objectstore.SETUP_JOB)["spec"]["template"]["metadata"]["labels"]
        redis = _one(objs, "StatefulSet", "redis")["spec"]["template"]["metadata"]["labels"]

        def ok(src_ns: str, src: dict, port: int = objectstore.MINIO_PORT, pols=pols, ns=ns,
               minio=minio) -> bool:
            return admitted(pols, ns, minio, src_ns, src, port)

        assert ok(FNS, function) and ok(FNS, {})  # any pod of openfaas-fn: the functions
        assert ok(ns, job)  # the setup Job, in the stores' namespace
        assert not ok("openfaas", {"app": "gateway"})  # not even the OpenFaaS gateway
        assert not ok("default", function) and not ok("kube-system", {})
        assert not ok("openfaas", job)  # the Job's labels count in its own namespace only
        if ns != FNS:
            assert not ok(ns, redis)  # other store pods do not reach MinIO
        # nothing else listens; the policy would refuse other ports from outside anyway
        assert not ok("openfaas", {}, 9001) and not ok("default", {}, 6379)
    # the evaluator is real: without the policies everything is admitted
    assert admitted([], FNS, minio, "default", {}, objectstore.MINIO_PORT)


# -- emnist deploy --target k8s ---------------------------------------------------------------

def _kubectl(tmp_path: Path, missing: tuple[str, ...] = ()) -> Path:
    """A stand-in `kubectl` recording argv and stdin; `get secret NAME` fails NotFound (like
    kubectl, exit 1) for the names in ``missing``; a context is set, the cluster answers and
    `apply` reports each object it read as created; everything else succeeds."""
    bindir = tmp_path / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    script = bindir / "kubectl"
    script.write_text(f"""#!{sys.executable}
import json, sys
args = sys.argv[1:]
stdin = sys.stdin.read() if args[-2:] == ["-f", "-"] else None
with open({str(tmp_path / "calls.jsonl")!r}, "a") as f:
    f.write(json.dumps({{"argv": args, "stdin": stdin}}) + "\\n")
if args[:2] == ["get", "secret"] and args[2] in {list(missing)!r}:
    sys.exit(f'Error from server (NotFound): secrets "{{args[2]}}" not found')
if args[:2] == ["get", "secret"]:
    print(f"secret/{{args[2]}}")
if args[:2] == ["config", "current-context"]:
    print("lab")
if args[:1] == ["apply"]:
    import yaml
    for d in (d for d in yaml.safe_load_all(stdin) if d):
        api = d["apiVersion"]
        group = "." + api.split("/")[0] if "/" in api else ""
        print(f'{{d["kind"].lower()}}{{group}}/{{d["metadata"]["name"]}} created')
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bindir


def _calls(tmp_path: Path) -> list[dict]:
    path = tmp_path / "calls.jsonl"
    return [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []


def _deploy(tmp_path: Path, *args: str, gateway: str = "http://127.0.0.1:9",
            env: dict | None = None, missing: tuple[str, ...] = ()):
    bindir = _kubectl(tmp_path, missing)
    return CliRunner().invoke(main, ["--gateway", gateway, "deploy", "--target", "k8s", "-f",
                                     str(STACK), "--manifests", str(MANIFESTS), *args],
                              env={"PATH": f"{bindir}:{os.environ['PATH']}",
                                   "DATA_LOCATION": None, "DATA_ROOTS": None,
                                   "EMNIST_DATA_URL": None, "EMNIST_S3_ENDPOINT": None,
                                   **(env or {})})


def _dry_run_parts(output: str) -> tuple[list[dict], list[dict]]:
    manifest_text, _, rest = output.partition("# PUT ")
    docs = [d for d in yaml.safe_load_all(manifest_text) if d]
    bodies = [json.loads(chunk.split("\n", 1)[1].rsplit("\ndry run:", 1)[0])
              for chunk in ("# PUT " + rest).split("# PUT ")[1:]]
    return docs, bodies


def test_dry_run_shows_minio_redacted_and_functions_with_endpoint_secret_and_data_url(
        tmp_path):
    access, secret_key = "AKIA" + secrets.token_hex(6), secrets.token_urlsafe(30)
    r = _deploy(tmp_path, "--dry-run", "--store-password", "pw-" + secrets.token_hex(4),
                "--data-url", "s3://lab-data/sets",
                env={"EMNIST_S3_ACCESS_KEY": access, "EMNIST_S3_SECRET_KEY": secret_key})
    assert r.exit_code == 0, r.output
    assert _calls(tmp_path) == []  # a dry run never calls kubectl
    assert access not in r.output and secret_key not in r.output
    docs, bodies = _dry_run_parts(r.output)
    keys = _one(docs, "Secret", objectstore.KEYS_SECRET, FNS)
    assert keys["stringData"] == {DEFAULT_ACCESS_SECRET: "<redacted>",
                                  DEFAULT_SECRET_SECRET: "<redacted>"}
    assert _one(docs, "Secret", objectstore.ROOT_SECRET)["stringData"] == {
        "root-user": "<redacted>", "root-password": "<redacted>"}
    assert {("StatefulSet", "minio"), ("Job", objectstore.SETUP_JOB)} <= {
        (d["kind"], d["metadata"]["name"]) for d in docs}
    assert f"kubectl delete job {objectstore.SETUP_JOB} -n {FNS} --ignore-not-found" in r.output
    by_name = {b["service"]: b for b in bodies}
    assert set(by_name) == set(S3_FUNCTIONS)
    for name in S3_FUNCTIONS:
        b = by_name[name]
        assert b["secrets"][0] == objectstore.KEYS_SECRET  # the NAME, never a value
        assert b["secrets"][1:] == ([] if name == "emnist-grad" else ["emnist-store-key"])
        assert b["envVars"]["s3_endpoint_url"] == "http://minio.openfaas-fn:9000"
        assert "s3://lab-data/sets" in b["envVars"]["data_roots"].split(",")
        assert access not in json.dumps(b) and secret_key not in json.dumps(b)
    for name in ("emnist-setup", "emnist-train"):
        assert by_name[name]["envVars"]["data_location"] == "s3://lab-data/sets"


def test_no_s3_and_an_external_endpoint(tmp_path):
    r = _deploy(tmp_path / "a", "--dry-run", "--no-s3", "--store-password", "pw-1")
    assert r.exit_code == 0, r.output
    docs, bodies = _dry_run_parts(r.output)
    assert not any(objectstore.is_minio(d) or d["metadata"]["name"].startswith(
        ("emnist-s3", "emnist-minio")) for d in docs)
    assert all(b.get("secrets", []) in ([], ["emnist-store-key"]) and
               b["envVars"]["s3_endpoint_url"] == "" for b in bodies)
    # an external S3: no MinIO, the functions get its endpoint; keys must exist or be given
    r = _deploy(tmp_path / "b", "--dry-run", "--s3-endpoint", "https://s3.example.org",
                "--store-password", "pw-1")
    assert r.exit_code == 0, r.output
    docs, bodies = _dry_run_parts(r.output)
    assert not any(objectstore.is_minio(d) for d in docs)
    assert not any(d["kind"] == "Secret" and d["metadata"]["name"] == "emnist-minio-root"
                   for d in docs)
    assert f"Secret {objectstore.KEYS_SECRET} must exist" in r.output
    assert {b["envVars"]["s3_endpoint_url"] for b in bodies} == {"https://s3.example.org"}
    r = _deploy(tmp_path / "c", "--s3-endpoint", "https://s3.example.org", "--store-password",
                "pw-1", "--registry", "ghcr.io/lab", missing=(objectstore.KEYS_SECRET,))
    assert r.exit_code == 2 and "--s3-access-key" in r.output and "Traceback" not in r.output
    for bad, says in ((["--data-url", "/srv/sets"], "must be s3://bucket/prefix"),
                      (["--data-url", "s3://A_B/x"], "--data-url"),
                      (["--s3-endpoint", "s3.example.org"], "http(s)://"),
                      (["--no-s3", "--s3-endpoint", "https://x"], "drop --no-s3"),
                      (["--s3-access-key", "only-half"], "both")):
        r = _deploy(tmp_path / "d", "--dry-run", *bad)
        assert r.exit_code == 2 and says in r.output, (bad, r.output)


@pytest.fixture
def local_gateway(tmp_path):
    """The real local gateway (a stand-in for OpenFaaS) with the secret emnist-s3 created,
    as faas-netes refuses a function whose secret does not exist (and so does it)."""
    (tmp_path / "gw").mkdir()
    gw = GatewayProcess(tmp_path / "gw", env={"TRAIN_REPLICAS": "1", "GRAD_REPLICAS": "1"},
                        stack=STACK)
    try:
        req = urllib.request.Request(f"{gw.url}/system/secrets", method="POST",
                                     data=json.dumps({"name": objectstore.KEYS_SECRET,
                                                      "value": "x"}).encode(),
                                     headers={"Content-Type": "application/json"})
        urllib.request.urlopen(req, timeout=10).close()
        yield gw
    finally:
        gw.stop()


def test_deploy_generates_missing_secrets_reruns_the_job_and_deploys_wired_functions(
        tmp_path, local_gateway):
    r = _deploy(tmp_path, "--store-password", "pw-for-redis", "--registry", "ghcr.io/lab",
                gateway=local_gateway.url, env={"TRAIN_REPLICAS": "1", "GRAD_REPLICAS": "1"},
                missing=(objectstore.ROOT_SECRET, objectstore.KEYS_SECRET))
    assert r.exit_code == 0, r.output
    calls = _calls(tmp_path)
    argv = [c["argv"] for c in calls]
    assert argv[:2] == [["config", "current-context"],
                        ["get", "--raw", "/readyz", f"--request-timeout={k8s.CHECK_TIMEOUT}s"]]
    assert argv[2:] == [["get", "secret", objectstore.ROOT_SECRET, "-n", FNS, "-o", "name"],
                    ["get", "secret", objectstore.KEYS_SECRET, "-n", FNS, "-o", "name"],
                    ["delete", "job", objectstore.SETUP_JOB, "-n", FNS, "--ignore-not-found"],
                    ["apply", "-f", "-"],
                    ["get", "deployment", "queue-worker", "-n", "openfaas", "-o",
                     "jsonpath={.spec.replicas}"]]  # after the functions: the queue's width
    applied = [d for d in yaml.safe_load_all(calls[-2]["stdin"]) if d]
    root = _one(applied, "Secret", objectstore.ROOT_SECRET)["stringData"]
    keys = _one(applied, "Secret", objectstore.KEYS_SECRET)["stringData"]
    generated = [*root.values(), *keys.values()]
    assert all(len(v) >= 8 for v in generated)
    assert not any(v in r.output for v in generated)  # only on kubectl's stdin
    assert "generated the functions' S3 keys" in r.output
    gw = GatewayClient(local_gateway.url)
    for name in S3_FUNCTIONS:
        fn = gw.get_function(name)
        assert fn["secrets"][0] == objectstore.KEYS_SECRET
        assert fn["envVars"]["s3_endpoint_url"] == "http://minio.openfaas-fn:9000"
        assert not any(v in json.dumps(fn) for v in generated)
    assert gw.get_function("emnist-train")["envVars"]["data_location"] == \
        objectstore.DEFAULT_DATA_URL
    # a second deploy keeps existing Secrets (no new keys) but runs the Job again
    r = _deploy(tmp_path / "again", "--store-password", "pw-for-redis", "--registry",
                "ghcr.io/lab", gateway=local_gateway.url,
                env={"TRAIN_REPLICAS": "1", "GRAD_REPLICAS": "1"})
    assert r.exit_code == 0, r.output
    calls = _calls(tmp_path / "again")
    assert [c["argv"][:2] for c in calls] == [["config", "current-context"], ["get", "--raw"],
                                              ["get", "secret"], ["get", "secret"],
                                              ["delete", "job"], ["apply", "-f"],
                                              ["get", "deployment"]]
    applied = [d for d in yaml.safe_load_all(calls[-2]["stdin"]) if d]
    assert [d["metadata"]["name"] for d in applied if d["kind"] == "Secret"] == [
        k8s.SECRET_NAME]


def test_faas_cli_reads_the_same_secret_and_endpoint_from_the_stack(tmp_path):
    """The real faas-cli 0.18.12 (`generate`: the Function objects it would deploy)."""
    from tests.openfaas_tools import faas_cli

    plan = _plan("s3://lab-data/sets")
    env = objectstore.stack_env(plan, {})
    rc, out, err = faas_cli("generate", "-f", str(STACK), config_dir=tmp_path, env=env)
    assert rc == 0, err
    fns = {d["metadata"]["name"]: d["spec"] for d in yaml.safe_load_all(out) if d}
    for name in S3_FUNCTIONS:
        assert fns[name]["secrets"] == [objectstore.KEYS_SECRET]
        assert fns[name]["environment"]["s3_endpoint_url"] == plan.endpoint
    assert fns["emnist-train"]["environment"]["data_location"] == "s3://lab-data/sets"
    rc, out, err = faas_cli("generate", "-f", str(STACK), config_dir=tmp_path,
                            env={"S3_SECRET": "", "S3_ENDPOINT_URL": ""})
    assert rc == 0, err
    assert all("secrets" not in d["spec"] for d in yaml.safe_load_all(out) if d)


# -- the wiring: what the deployment mounts and sets is what emnist.data.s3 reads ------------

class RecordingProxy(PipeProxy):
    """TCP proxy to the S3 server recording the bytes clients send (request heads carry the
    SigV4 ``Credential=<access key>/...``): MinIO would check that signature."""

    def __init__(self, upstream: str) -> None:
        self.sent, self.lock = bytearray(), threading.Lock()
        super().__init__(upstream)

    def on_data(self, data: bytes, up: bool, sent: int) -> bool:
        if up:
            with self.lock:
                self.sent += data[:4096]  # heads, not bodies
        return True

    def credentials(self) -> set[str]:
        with self.lock:
            return set(re.findall(rb"Credential=([^/]+)/", bytes(self.sent)))


def _function_env(fn_name: str, stack_env: dict, secret: dict, node: Path,
                  aliases: dict) -> dict[str, str]:
    """A function pod's environment as the deployment makes it: the deploy request's envVars
    (from the stack), the Secret's keys as files in the secrets mount (faas-netes projects
    each key to /var/openfaas/secrets/<key>), and the cluster's DNS (host aliases)."""
    spec = load_stack(STACK, stack_env).functions[fn_name]
    body = deploy_request(spec)
    mount = node / "secrets"
    mount.mkdir(parents=True)
    assert body["secrets"] == [secret["metadata"]["name"]]
    for key, value in secret["stringData"].items():
        (mount / key).write_text(value)
    return {**body["envVars"], SECRETS_DIR_ENV: str(mount), ALIASES_ENV: format_aliases(aliases),
            "EMNIST_HOME": str(node / "home")}


def test_functions_reach_s3_with_exactly_what_the_deployment_provides(tmp_path):
    bucket = "emnist-" + secrets.token_hex(4)
    plan = _plan(f"s3://{bucket}/sets")
    keys = objectstore.generate_keys()
    objs = _rendered(plan=plan, keys=keys)
    secret = _one(objs, "Secret", objectstore.KEYS_SECRET, FNS)
    job_env = {e["name"]: e.get("value") for e in _containers(
        _one(objs, "Job", objectstore.SETUP_JOB))[0]["env"]}
    stack_env = {"PATH": os.environ["PATH"], **objectstore.stack_env(plan, {})}
    with moto_server() as endpoint:
        proxy = RecordingProxy(endpoint)
        try:
            # the setup Job's part: the bucket it names (moto accepts any administrator)
            boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                         aws_access_key_id="root", aws_secret_access_key="root-secret"
                         ).create_bucket(Bucket=job_env["EMNIST_BUCKET"])
            dns = {f"minio.{FNS}:{objectstore.MINIO_PORT}": proxy.addr}
            envs = {n: _function_env(n, stack_env, secret, tmp_path / n, dns)
                    for n in S3_FUNCTIONS}
            for name, env in envs.items():
                assert keys[0] not in json.dumps(env) and keys[1] not in json.dumps(env)
                s = s3_settings(env)
                assert (s.endpoint_url, s.access_key, s.secret_key) == (
                    f"http://{proxy.addr}", *keys), name
            setup, train = envs["emnist-setup"], envs["emnist-train"]
            # setup prepares the set at its own data_location (the policy allows it) ...
            where = check_data_location(setup, "data_location", setup["data_location"],
                                        setup["data_location"])
            ps = prepare_set("synthetic", 2, where, env=setup)
            assert ps.url.startswith(f"s3://{bucket}/sets/")
            # ... and a train pod on another node streams its own shard, no shared volume
            shard = open_set(ps.url, train).shard(1)
            assert shard.x.shape[0] > 0 and not (tmp_path / "emnist-setup" / "home" /
                                                 "sets").exists()
            assert proxy.credentials() == {keys[0].encode()}  # every request signed so
            # a request may name a place under the data root, never another bucket
            check_data_location(train, "data_location", f"s3://{bucket}/sets/other",
                                train["data_location"])
            with pytest.raises(PolicyError):
                check_data_location(train, "data_location", "s3://someone-else/sets",
                                    train["data_location"])
            # without the mounted secret the same function has no keys to sign with
            (Path(train[SECRETS_DIR_ENV]) / DEFAULT_SECRET_SECRET).unlink()
            assert s3_settings(train).access_key is None
        finally:
            proxy.sock.close()


def test_a_half_mounted_secret_is_a_clear_error(tmp_path):
    mount = tmp_path / "secrets"
    mount.mkdir()
    (mount / DEFAULT_ACCESS_SECRET).write_text("k")
    env = {SECRETS_DIR_ENV: str(mount), "s3_access_key_secret": DEFAULT_ACCESS_SECRET,
           "s3_secret_key_secret": DEFAULT_SECRET_SECRET}
    with pytest.raises(DataError, match="not mounted"):
        s3_settings(env)
