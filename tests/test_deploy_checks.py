"""`emnist deploy --target k8s` checks before it acts: the kube context and the cluster first,
no unpullable placeholder images, only what kubectl said it applied, Redis's password on no
command line, and the store key created once through the gateway's secrets API.

No cluster exists here: a stand-in `kubectl` first on PATH records every argv and stdin and
answers as each test configures it (a real process boundary). The functions' side is the real
local gateway, or a recorder that proves no request reached it.
"""

from __future__ import annotations

import json
import os
import secrets
import stat
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import redis
import yaml
from click.testing import CliRunner

from emnist.cli import main
from emnist.cluster import k8s
from emnist.gateway.client import GatewayClient
from tests.gateway_tools import GatewayProcess
from tests.kubectl import kubectl_calls
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]
MANIFESTS = ROOT / "deploy" / "k8s"
STACK = ROOT / "emnist.yml"
REGISTRY = "ghcr.io/lab"
STORE_KEY = "emnist-store-key"
REFUSED = ("The connection to the server 10.0.0.1:6443 was refused - did you specify the "
           "right host or port?")


def _kubectl(tmp_path: Path, *, context: str | None = "lab-cluster", readyz: str = "",
             drop: tuple[str, ...] = (), actions: dict[str, str] | None = None,
             queue_workers: str = "") -> Path:
    """A `kubectl` that appends {argv, stdin} to calls.jsonl. `config current-context` prints
    ``context`` (None: fails as kubectl does when none is set); `get --raw /readyz` fails with
    ``readyz`` when given; `get secret` says NotFound; `apply -f -` prints one
    ``kind[.group]/name ACTION`` line per object read from stdin, except the refs in ``drop``."""
    bindir = tmp_path / "bin"
    bindir.mkdir(parents=True, exist_ok=True)
    conf = tmp_path / "kubectl.json"
    conf.write_text(json.dumps({"context": context, "readyz": readyz, "drop": list(drop),
                                "actions": actions or {}, "queue_workers": queue_workers}))
    script = bindir / "kubectl"
    script.write_text(f"""#!{sys.executable}
import json, sys
import yaml
args = sys.argv[1:]
stdin = sys.stdin.read() if args[-2:] == ["-f", "-"] else None
with open({str(tmp_path / "calls.jsonl")!r}, "a") as f:
    f.write(json.dumps({{"argv": args, "stdin": stdin}}) + "\\n")
conf = json.load(open({str(conf)!r}))
if args[:2] == ["config", "current-context"]:
    if conf["context"] is None:
        sys.exit("error: current-context is not set")
    print(conf["context"])
elif args[:3] == ["get", "--raw", "/readyz"]:
    if conf["readyz"]:
        sys.exit(conf["readyz"])
    print("ok", end="")
elif args[:2] == ["get", "secret"]:
    sys.exit(f'Error from server (NotFound): secrets "{{args[2]}}" not found')
elif args[:3] == ["get", "deployment", "queue-worker"]:
    if not conf["queue_workers"]:
        sys.exit('Error from server (NotFound): deployments.apps "queue-worker" not found')
    print(conf["queue_workers"], end="")
elif args[:1] == ["apply"]:
    for d in yaml.safe_load_all(stdin):
        if not d:
            continue
        api, kind = d["apiVersion"], d["kind"].lower()
        ref = (f"{{kind}}.{{api.split('/')[0]}}" if "/" in api else kind) + "/" + \\
            d["metadata"]["name"]
        if ref not in conf["drop"]:
            print(ref, conf["actions"].get(ref, "created"))
""")
    script.chmod(script.stat().st_mode | stat.S_IEXEC)
    return bindir


def _deploy(tmp_path: Path, gateway: str, *args: str, env: dict | None = None, **kubectl):
    bindir = _kubectl(tmp_path, **kubectl)
    return CliRunner().invoke(main, ["--gateway", gateway, "deploy", "--target", "k8s", "-f",
                                     str(STACK), "--manifests", str(MANIFESTS), *args],
                              env={"PATH": f"{bindir}:{os.environ['PATH']}", "REGISTRY": None,
                                   "STORE_KEY_SECRET": None, "EMNIST_STORE_PASSWORD": None,
                                   "DATA_LOCATION": None, "DATA_ROOTS": None,
                                   "EMNIST_DATA_URL": None, "EMNIST_S3_ENDPOINT": None,
                                   **(env or {})})


@pytest.fixture
def recorder():
    """An HTTP server standing where the gateway would be, recording every request."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def _any(self) -> None:
            seen.append(f"{self.command} {self.path}")
            self.send_response(500)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_GET = do_POST = do_PUT = do_DELETE = _any

        def log_message(self, *a) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def gateway(tmp_path):
    """The real local gateway serving emnist.yml, standing in for the cluster's OpenFaaS."""
    (tmp_path / "gw").mkdir()
    gw = GatewayProcess(tmp_path / "gw", env={"TRAIN_REPLICAS": "1", "GRAD_REPLICAS": "1",
                                              "STORE_KEY_SECRET": ""}, stack=STACK)
    try:
        yield gw
    finally:
        gw.stop()


def _error_line(output: str) -> str:
    errors = [ln for ln in output.splitlines() if ln.startswith("Error")]
    assert len(errors) == 1, output
    return errors[0]


# -- before anything: the context and the cluster ------------------------------------------

def test_a_cluster_that_does_not_answer_stops_the_deploy_naming_the_context(tmp_path,
                                                                            recorder):
    url, seen = recorder
    r = _deploy(tmp_path, url, "--registry", REGISTRY, "--store-password", "pw-1",
                readyz=REFUSED)
    assert r.exit_code == 1, r.output
    line = _error_line(r.output)
    assert "'lab-cluster'" in line and "does not answer" in line and "10.0.0.1:6443" in line
    assert "Traceback" not in r.output
    assert [c["argv"][:3] for c in kubectl_calls(tmp_path)] == [["config", "current-context"],
                                                          ["get", "--raw", "/readyz"]]
    assert seen == []  # not one request to the gateway


def test_no_kube_context_stops_the_deploy_before_anything(tmp_path, recorder):
    url, seen = recorder
    r = _deploy(tmp_path, url, "--registry", REGISTRY, "--store-password", "pw-1",
                context=None)
    assert r.exit_code == 1, r.output
    assert "no kube context is set" in _error_line(r.output)
    assert [c["argv"] for c in kubectl_calls(tmp_path)] == [["config", "current-context"]]
    assert seen == []


def test_the_readyz_check_carries_a_short_request_timeout(tmp_path, recorder):
    url, _ = recorder
    _deploy(tmp_path, url, "--registry", REGISTRY, "--store-password", "pw-1", readyz=REFUSED)
    [_, ready] = kubectl_calls(tmp_path)
    [flag] = [a for a in ready["argv"] if a.startswith("--request-timeout=")]
    assert flag == f"--request-timeout={k8s.CHECK_TIMEOUT}s"


# -- images a cluster cannot pull ------------------------------------------------------------

@pytest.mark.parametrize("registry", [None, "docker.io/emnist"])
def test_placeholder_images_are_a_usage_error_before_any_side_effect(tmp_path, recorder,
                                                                     registry):
    url, seen = recorder
    extra = ["--registry", registry] if registry else []
    r = _deploy(tmp_path, url, "--store-password", "pw-1", *extra)
    assert r.exit_code == 2, r.output
    assert "--registry" in r.output and "docker.io/emnist/emnist-train:latest" in r.output
    assert kubectl_calls(tmp_path) == [] and seen == []
    # a dry run still prints, and says the same
    r = _deploy(tmp_path, url, "--store-password", "pw-1", "--dry-run", *extra)
    assert r.exit_code == 0, r.output
    assert "# note: docker.io/emnist/emnist-setup:latest cannot be pulled by a cluster: pass " \
           "--registry" in r.output
    assert kubectl_calls(tmp_path) == [] and seen == []


# -- only what kubectl applied ----------------------------------------------------------------

def _listed(output: str) -> list[str]:
    """The lines under `applied to kube context ...:`."""
    lines = output.splitlines()
    [i] = [n for n, ln in enumerate(lines) if ln.startswith("applied to kube context")]
    out = []
    for ln in lines[i + 1:]:
        if not ln.startswith("  "):
            break
        out.append(ln.strip())
    return out


def test_the_output_lists_exactly_what_kubectl_reported(tmp_path, gateway):
    actions = {"statefulset.apps/redis": "configured", "service/memcached": "unchanged"}
    r = _deploy(tmp_path, gateway.url, "--registry", REGISTRY, "--no-s3", "--store-password",
                "pw-1", actions=actions)
    assert r.exit_code == 0, r.output
    apply = [c for c in kubectl_calls(tmp_path) if c["argv"][0] == "apply"]
    [call] = apply
    sent = [d for d in yaml.safe_load_all(call["stdin"]) if d]
    expected = [f"{k8s.object_ref(d)} {actions.get(k8s.object_ref(d), 'created')}"
                for d in sent]
    assert _listed(r.output) == expected and len(expected) == 8
    assert "applied to kube context lab-cluster (8 objects):" in r.output
    fn = GatewayClient(gateway.url).get_function("emnist-train")
    assert fn["image"] == f"{REGISTRY}/emnist-train:latest"


def test_objects_kubectl_did_not_report_fail_the_deploy_before_the_functions(tmp_path,
                                                                            recorder):
    url, seen = recorder
    r = _deploy(tmp_path, url, "--registry", REGISTRY, "--no-s3", "--store-password", "pw-1",
                drop=("statefulset.apps/redis",))
    assert r.exit_code == 1, r.output
    assert "statefulset.apps/redis" not in "\n".join(_listed(r.output))
    assert len(_listed(r.output)) == 7
    line = _error_line(r.output)
    assert "did not report 1 of the 8 objects sent (statefulset.apps/redis)" in line
    assert seen == []  # no function deployed, not even the store key asked for


# -- Redis's password: never on a command line ----------------------------------------------

PASSWORD = "pw $HOME 'q' `id` x-" + secrets.token_hex(8)  # shell-hostile, Redis-quotable


def _argv_strings(workload: dict) -> list[str]:
    spec = workload["spec"]["template"]["spec"]
    return [a for c in [*spec.get("initContainers", []), *spec["containers"]]
            for a in [*c.get("command", []), *c.get("args", [])]]


def test_the_password_is_on_no_kubectl_argv_and_in_no_container_command(tmp_path, gateway):
    r = _deploy(tmp_path, gateway.url, "--registry", REGISTRY, "--no-s3", "--store-password",
                PASSWORD)
    assert r.exit_code == 0, r.output
    assert PASSWORD not in r.output
    calls = kubectl_calls(tmp_path)
    assert calls and not any(PASSWORD in a for c in calls for a in c["argv"])
    [apply] = [c for c in calls if c["argv"][0] == "apply"]
    sent = [d for d in yaml.safe_load_all(apply["stdin"]) if d]
    holders = [d for d in sent if PASSWORD in json.dumps(d)]
    assert [(d["kind"], d["metadata"]["name"]) for d in holders] == [("Secret", k8s.SECRET_NAME)]
    workloads = [d for d in sent if d["kind"] in ("StatefulSet", "Deployment", "DaemonSet")]
    assert not any(PASSWORD in a for w in workloads for a in _argv_strings(w))
    [sts] = [d for d in workloads if d["metadata"]["name"] == "redis"]
    assert not any("requirepass" in a and "$(" in a for a in _argv_strings(sts))


def test_a_password_redis_cannot_read_from_its_config_is_refused_up_front(tmp_path, recorder):
    url, seen = recorder
    r = _deploy(tmp_path, url, "--registry", REGISTRY, "--store-password", 'pw"x')
    assert r.exit_code == 2 and "double quote" in r.output, r.output
    assert kubectl_calls(tmp_path) == [] and seen == []


def test_the_redis_container_script_starts_redis_with_the_password_from_a_private_file(
        tmp_path):
    """The container's own command (sh -c SCRIPT) with the Secret's value in its env, the
    config directory and /data moved to temp dirs, and a `redis-server` first on PATH that
    records its argv and runs the real one on a free port."""
    sent = k8s.render(k8s.load_manifests(MANIFESTS), password=PASSWORD)
    [sts] = [d for d in sent if d["kind"] == "StatefulSet" and d["metadata"]["name"] == "redis"]
    [c] = sts["spec"]["template"]["spec"]["containers"]
    [auth] = [m["mountPath"] for m in c["volumeMounts"] if m["name"] == "auth"]
    [vol] = [v for v in sts["spec"]["template"]["spec"]["volumes"] if v["name"] == "auth"]
    assert vol["emptyDir"]["medium"] == "Memory"  # the file never reaches a disk
    confdir, data = tmp_path / "auth", tmp_path / "data"
    confdir.mkdir()
    data.mkdir()
    argv = [a.replace(auth, str(confdir)).replace("--dir /data", f"--dir {data}")
            for a in [*c["command"], *c["args"]]]
    port = free_port()
    bindir = tmp_path / "bin"
    bindir.mkdir()
    wrapper = bindir / "redis-server"
    wrapper.write_text(f"""#!/bin/sh
printf '%s\\n' "$@" > {tmp_path / "argv.txt"}
exec /usr/bin/redis-server "$@" --port {port} --save ''
""")
    wrapper.chmod(0o755)
    [ref] = [e["valueFrom"]["secretKeyRef"] for e in c["env"] if e["name"] == "REDIS_PASSWORD"]
    [secret] = [d for d in sent if d["kind"] == "Secret" and d["metadata"]["name"] == ref["name"]]
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "REDIS_PASSWORD": secret["stringData"][ref["key"]]}
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        client = redis.Redis(port=port, password=PASSWORD, socket_timeout=5)
        deadline = time.monotonic() + 20
        while True:
            try:
                assert client.ping()
                break
            except redis.ConnectionError:
                assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
                assert time.monotonic() < deadline, "redis-server did not start"
                time.sleep(0.05)
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, password="wrong", socket_timeout=5).ping()
        with pytest.raises(redis.RedisError, match="(?i)auth"):  # no password: refused
            redis.Redis(port=port, socket_timeout=5).get("x")
        conf = confdir / "redis.conf"
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
        recorded = (tmp_path / "argv.txt").read_text()
        assert recorded.split("\n")[0] == str(conf)
        assert "--appendonly\nyes" in recorded
        assert PASSWORD not in recorded
        cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()  # the exec'd redis-server
        environ = Path(f"/proc/{proc.pid}/environ").read_bytes()
        assert b"redis-server" in cmdline and PASSWORD.encode() not in cmdline + environ
        assert client.config_get("appendonly") == {"appendonly": "yes"}
    finally:
        proc.terminate()
        proc.wait(timeout=20)


# -- the store key: created once, through the gateway -----------------------------------------

def _secret_names(url: str) -> list[str]:
    gw = GatewayClient(url)
    resp = gw.session.get(url + "/system/secrets", auth=gw.auth, timeout=10)
    assert resp.ok, resp.text
    return [s["name"] for s in resp.json()]


def test_the_store_key_secret_is_created_once_and_the_functions_use_it(tmp_path, gateway):
    assert STORE_KEY not in _secret_names(gateway.url)
    r = _deploy(tmp_path / "one", gateway.url, "--registry", REGISTRY, "--no-s3",
                "--store-password", "pw-1")
    assert r.exit_code == 0, r.output
    assert f"created the OpenFaaS secret {STORE_KEY}" in r.output
    assert STORE_KEY in _secret_names(gateway.url)
    stored = tmp_path / "gw" / "state" / "secrets" / STORE_KEY
    first = stored.read_bytes()
    assert len(first) >= 32
    assert first.decode() not in r.output
    gw = GatewayClient(gateway.url)
    for name in ("emnist-setup", "emnist-train"):
        fn = gw.get_function(name)
        assert STORE_KEY in fn["secrets"] and fn["envVars"]["store_key_secret"] == STORE_KEY
    r = _deploy(tmp_path / "two", gateway.url, "--registry", REGISTRY, "--no-s3",
                "--store-password", "pw-1")
    assert r.exit_code == 0, r.output
    assert "created the OpenFaaS secret" not in r.output
    assert stored.read_bytes() == first  # the key that sealed documents is kept


@pytest.mark.parametrize("queue_workers, note", [
    ("1", "runs 1 replica(s) for 2 train workers"),  # emnist.yml's TRAIN_REPLICAS default
    ("", "could not read the queue-worker Deployment"),
    ("4", None),
])
def test_the_deploy_checks_the_queue_workers_against_the_train_workers(tmp_path, gateway,
                                                                      queue_workers, note):
    r = _deploy(tmp_path, gateway.url, "--registry", REGISTRY, "--no-s3", "--store-password",
                "pw-1", queue_workers=queue_workers, env={"TRAIN_REPLICAS": None})
    assert r.exit_code == 0, r.output
    asked = [c["argv"] for c in kubectl_calls(tmp_path) if c["argv"][:2] == ["get", "deployment"]]
    assert asked == [["get", "deployment", "queue-worker", "-n", "openfaas", "-o",
                      "jsonpath={.spec.replicas}"]]
    if note is None:
        assert "note: " not in r.output
    else:
        assert note in r.output and "queue-worker" in r.output
