"""OpenFaaS fidelity of the local gateway, checked with the real faas-cli 0.18.12 where it
applies: basic auth, secrets (API, per-function mounts, the gateway's own credentials for the
functions that ask), /system/info in both shapes, Go reason phrases, of-watchdog's
exec_timeout/max_inflight, async errors in the function's logs, host aliases, and
`faas-cli deploy -f emnist.yml` from a shell with no STORE_URL."""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from emnist.hostaliases import parse_aliases
from tests.gateway_tools import (
    ROOT,
    CallbackReceiver,
    GatewayProcess,
    raw,
    replica_urls,
    wait_for,
    write_stack,
)
from tests.openfaas_tools import faas_cli, faas_login

PASSWORD = "s3cret-pw"
USER = "alice"
UPSTREAM_INDEX_SHA256 = "bf9b7941619f6731717ca8d5ab6447fff0b9d17e69e48f15553cb161a6ff77fc"
PROBE = """
import os, time
from emnist.gateway.client import GatewayClient, auth_from_env
from emnist.secrets import read_secret, secrets_dir

def handle(event, context):
    q = event.query
    if q.get("sleep"):
        time.sleep(float(q["sleep"]))
    d = secrets_dir()
    names = sorted(os.listdir(d)) if d.is_dir() else []
    out = {"names": names, "values": {n: read_secret(n) for n in names},
           "modes": {n: os.stat(d / n).st_mode & 0o777 for n in names},
           "auth": list(auth_from_env() or []) or None,
           "aliases": os.environ.get("EMNIST_HOST_ALIASES"),
           "openfaas_url": os.environ.get("OPENFAAS_URL")}
    if q.get("lookup"):
        out["replicas"] = GatewayClient().replicas(q["lookup"])
    return {"statusCode": int(q.get("status", 200)), "body": out}
"""


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("fidelity")
    stack = write_stack(tmp, {
        "sec": (PROBE, "annotations:\n  emnist/gateway-auth: 'true'\n"),
        "plain": (PROBE, "environment:\n  exec_timeout: 30s\n"),
        "slow": (PROBE, "environment:\n  exec_timeout: 1s\n"),
        "limited": (PROBE, "environment:\n  max_inflight: 1\n  exec_timeout: 30s\n"),
        "capped": (PROBE, "environment:\n  exec_timeout: 30s\n  write_timeout: 1s\n"),
    })
    proc = GatewayProcess(tmp, "--store", "memcached://127.0.0.1:11299",
                          "--alias", "minio.openfaas:9000=127.0.0.1:9999", stack=stack,
                          env={"OPENFAAS_PASSWORD": PASSWORD, "OPENFAAS_USER": USER,
                               "EMNIST_CALLBACK_HOSTS": "127.0.0.1"})  # the recorder
    yield proc
    proc.stop()


@pytest.fixture()
def cfg(tmp_path: Path) -> Path:
    path = tmp_path / "openfaas-config"
    path.mkdir()
    return path


@pytest.fixture()
def admin(gw: GatewayProcess) -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.trust_env = False
        s.auth = (USER, PASSWORD)
        yield s


def probe(gw: GatewayProcess, name: str, **query: Any) -> dict[str, Any]:
    r = requests.get(gw.url + f"/function/{name}", params=query, timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


# -- basic auth ---------------------------------------------------------------------------------


def test_basic_auth_like_openfaas(gw: GatewayProcess) -> None:
    for auth in (None, ("admin", PASSWORD), (USER, "wrong")):
        r = requests.get(gw.url + "/system/functions", auth=auth, timeout=10)
        assert r.status_code == 401 and r.text == "invalid credentials"
        assert r.headers["WWW-Authenticate"] == 'Basic realm="Restricted"'
    r = requests.get(gw.url + "/system/info", headers={"Authorization": "Bearer"}, timeout=10)
    assert r.status_code == 401  # what faas-cli sends before `faas-cli login`
    assert requests.get(gw.url + "/system/functions", auth=(USER, PASSWORD),
                        timeout=10).status_code == 200  # OPENFAAS_USER names the user
    assert requests.get(gw.url + "/healthz", timeout=10).status_code == 200
    assert requests.get(gw.url + "/function/plain", timeout=30).status_code == 200


def test_faas_cli_needs_login_then_works(gw: GatewayProcess, cfg: Path) -> None:
    rc, out, err = faas_cli("list", config_dir=cfg, gateway=gw.url)
    assert rc != 0 and "unauthorized" in (out + err).lower()
    faas_login(cfg, gw.url, PASSWORD, USER)
    rc, out, err = faas_cli("list", config_dir=cfg, gateway=gw.url)
    assert rc == 0, err
    assert {"sec", "plain", "slow", "limited"} <= {ln.split()[0] for ln in out.splitlines()[1:]}
    rc, out, err = faas_cli("describe", "sec", config_dir=cfg, gateway=gw.url)
    assert rc == 0 and "sec" in out and "Replicas" in out, out + err
    _, out, err = faas_cli("version", config_dir=cfg, gateway=gw.url)  # rc 1: no internet
    provider = out[out.index("Provider"):]
    assert "name:          emnist-local" in provider, out + err
    assert "orchestration: process" in provider


# -- secrets ------------------------------------------------------------------------------------


def test_faas_cli_secret_create_list_remove(gw: GatewayProcess, cfg: Path,
                                            admin: requests.Session) -> None:
    faas_login(cfg, gw.url, PASSWORD, USER)
    rc, out, err = faas_cli("secret", "create", "cli-secret", "--from-literal", "hush",
                            config_dir=cfg, gateway=gw.url)
    assert rc == 0 and "202" in out, out + err
    rc, out, err = faas_cli("secret", "list", config_dir=cfg, gateway=gw.url)
    assert rc == 0 and "cli-secret" in out.split(), out + err
    listed = admin.get(gw.url + "/system/secrets", timeout=10).json()
    assert {"name": "cli-secret", "namespace": "openfaas-fn"} in listed
    assert "hush" not in json.dumps(listed)  # values are never returned
    rc, out, err = faas_cli("secret", "update", "cli-secret", "--from-literal", "hush2",
                            config_dir=cfg, gateway=gw.url)
    assert rc == 0, out + err
    rc, out, err = faas_cli("secret", "remove", "cli-secret", config_dir=cfg, gateway=gw.url)
    assert rc == 0, out + err
    assert "cli-secret" not in [s["name"] for s in admin.get(gw.url + "/system/secrets").json()]


def test_secrets_api_statuses(gw: GatewayProcess, admin: requests.Session) -> None:
    url = gw.url + "/system/secrets"
    assert admin.post(url, json={"name": "dup", "value": "1"}).status_code == 202
    assert admin.post(url, json={"name": "dup", "value": "1"}).status_code == 409
    assert admin.put(url, json={"name": "nope", "value": "1"}).status_code == 404
    assert admin.delete(url, json={"name": "dup"}).status_code == 202
    assert admin.delete(url, json={"name": "dup"}).status_code == 404
    raw_value = "AAECAw=="  # rawValue is base64 bytes, as faas-provider's types.Secret
    assert admin.post(url, json={"name": "bin", "rawValue": raw_value}).status_code == 202
    assert admin.post(url, json={"name": "bad", "rawValue": "%%%"}).status_code == 400
    assert admin.post(url, json={"name": "basic-auth-password", "value": "x"}).status_code == 400
    files = gw.ready_file.parent / "state" / "secrets"
    assert (files / "bin").read_bytes() == b"\x00\x01\x02\x03"
    assert stat.S_IMODE((files / "bin").stat().st_mode) == 0o600
    assert stat.S_IMODE(files.stat().st_mode) == 0o700
    admin.delete(url, json={"name": "bin"})


def test_a_function_sees_only_the_secrets_it_lists(gw: GatewayProcess,
                                                   admin: requests.Session) -> None:
    url = gw.url + "/system/secrets"
    for name, value in (("s-one", "first"), ("s-two", "second")):
        assert admin.post(url, json={"name": name, "value": value}).status_code == 202
    spec = {"service": "plain", "image": "test/plain:1", "secrets": ["s-one"],
            "envVars": {"exec_timeout": "30s"}}
    assert admin.put(gw.url + "/system/functions", json=spec).status_code == 202
    seen = probe(gw, "plain")
    assert seen["names"] == ["s-one"] and seen["values"] == {"s-one": "first"}
    assert seen["modes"] == {"s-one": 0o600} and seen["auth"] is None
    assert admin.put(url, json={"name": "s-one", "value": "changed"}).status_code == 202
    assert probe(gw, "plain")["values"] == {"s-one": "changed"}  # mounts follow updates
    r = admin.put(gw.url + "/system/functions", json={**spec, "secrets": ["missing-one"]})
    assert r.status_code == 400 and "unable to fetch secrets" in r.text
    assert "missing-one" in r.text
    assert admin.get(gw.url + "/system/function/plain").json()["secrets"] == ["s-one"]
    spec["secrets"] = []
    assert admin.put(gw.url + "/system/functions", json=spec).status_code == 202
    assert probe(gw, "plain")["names"] == []


def test_the_gateway_credentials_reach_only_functions_that_ask(gw: GatewayProcess) -> None:
    """emnist-setup's case: a function asks the gateway for a replica count with auth on."""
    sec = probe(gw, "sec", lookup="plain")
    assert sec["names"] == ["basic-auth-password", "basic-auth-user"]
    assert sec["auth"] == [USER, PASSWORD] and sec["replicas"] == 1
    assert probe(gw, "plain")["auth"] is None  # plain lists no secret and no annotation


def test_faas_cli_invoke_needs_no_login(gw: GatewayProcess, cfg: Path) -> None:
    rc, out, err = faas_cli("invoke", "sec", "--query", "lookup=plain", config_dir=cfg,
                            gateway=gw.url, stdin="{}")
    assert rc == 0, out + err
    assert json.loads(out.strip().splitlines()[-1])["replicas"] == 1


# -- shapes and phrases -------------------------------------------------------------------------


def test_system_info_in_both_shapes(gw: GatewayProcess, admin: requests.Session) -> None:
    """A client gets GatewayInfo; a gateway in front of us (X-Forwarded-*) gets ProviderInfo,
    whose fields the OpenFaaS gateway reads with string type assertions."""
    info = admin.get(gw.url + "/system/info").json()
    assert info["provider"]["provider"] == "emnist-local" and isinstance(info["arch"], str)
    assert set(info["version"]) == {"sha", "release"}
    proxied = admin.get(gw.url + "/system/info", headers={
        "X-Forwarded-For": "10.0.0.1:4242", "X-Forwarded-Host": "gateway:8080"}).json()
    assert set(proxied) == {"provider", "orchestration", "version"}
    assert isinstance(proxied["provider"], str) and isinstance(proxied["orchestration"], str)
    assert all(isinstance(proxied["version"][k], str) for k in ("sha", "release"))


def test_reason_phrases_are_gos(gw: GatewayProcess) -> None:
    auth = {"Authorization": "Basic " + __import__("base64").b64encode(
        f"{USER}:{PASSWORD}".encode()).decode(), "Content-Type": "application/json"}
    body = json.dumps({"service": "plain", "image": "test/plain:1",
                       "envVars": {"exec_timeout": "30s"}}).encode()
    assert raw(gw.url, "PUT", "/system/functions", body, auth)[:2] == (202, "Accepted")
    assert raw(gw.url, "GET", "/system/function/nope", headers=auth)[:2] == (404, "Not Found")
    assert raw(gw.url, "PUT", "/system/functions", body,
               {**auth, "Content-Type": "text/plain"})[:2] == (415, "Unsupported Media Type")
    assert raw(gw.url, "GET", "/function/plain?status=201")[:2] == (201, "Created")
    assert raw(gw.url, "GET", "/function/nope")[:2] == (404, "Not Found")
    assert raw(gw.url, "GET", "/system/functions")[:2] == (401, "Unauthorized")


# -- watchdog behaviour -------------------------------------------------------------------------


def test_exec_timeout_is_504_with_an_empty_body(gw: GatewayProcess) -> None:
    status, reason, headers, body = raw(gw.url, "GET", "/function/slow?sleep=3")
    assert (status, reason, body) == (504, "Gateway Timeout", b"")
    assert float(headers["X-Duration-Seconds"]) >= 0.9
    assert probe(gw, "slow")["names"] == []  # the replica still serves


def test_the_replica_itself_answers_like_of_watchdog(gw: GatewayProcess) -> None:
    """Straight to a replica (no gateway): Go's phrases, 504 with an empty body on
    exec_timeout, and a write_timeout shorter than exec_timeout is a deadline too."""
    (slow,) = replica_urls(gw, "slow")
    assert raw(slow, "GET", "/?status=201")[:2] == (201, "Created")
    status, reason, headers, body = raw(slow, "GET", "/?sleep=3")
    assert (status, reason, body) == (504, "Gateway Timeout", b"")
    assert "X-Duration-Seconds" in headers
    (capped,) = replica_urls(gw, "capped")
    assert raw(capped, "GET", "/?sleep=3")[0] == 504
    assert raw(capped, "GET", "/?sleep=0")[0] == 200


def test_max_inflight_is_429(gw: GatewayProcess) -> None:
    """Two calls at once to a function with max_inflight 1: whichever reaches the replica
    second while the first sleeps is refused with of-watchdog's 429 and text."""
    start = threading.Barrier(2)
    answers: list[tuple[int, str]] = []
    errors: list[BaseException] = []

    def call() -> None:
        try:
            start.wait(10)
            r = requests.get(gw.url + "/function/limited?sleep=3", timeout=60)
            answers.append((r.status_code, r.text))
        except BaseException as e:  # noqa: BLE001 - re-raised on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=call) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(90)
    assert not errors, errors
    assert sorted(code for code, _ in answers) == [200, 429], answers
    refused = next(text for code, text in answers if code == 429)
    assert "Concurrent request limit exceeded. Max concurrent requests: 1" in refused


def test_async_errors_are_in_the_functions_logs(gw: GatewayProcess, cfg: Path) -> None:
    r = requests.post(gw.url + "/async-function/plain?status=503", timeout=10)
    assert r.status_code == 202
    call_id = r.headers["X-Call-Id"]
    faas_login(cfg, gw.url, PASSWORD, USER)

    def logged() -> bool:
        rc, out, err = faas_cli("logs", "plain", "--tail=false", "--instance",
                                config_dir=cfg, gateway=gw.url)
        return rc == 0 and f"async call {call_id} failed: 503" in out

    wait_for(logged, 20, "the async failure in `faas-cli logs`")


def test_callbacks_carry_no_credentials(gw: GatewayProcess) -> None:
    receiver = CallbackReceiver()
    try:
        r = requests.post(gw.url + "/async-function/plain", auth=(USER, PASSWORD), timeout=10,
                          headers={"X-Callback-Url": receiver.url, "Cookie": "session=1"})
        assert r.status_code == 202
        headers, body = receiver.received.get(timeout=20)
        assert headers["X-Function-Status"] == "200"
        lowered = {k.lower() for k in headers}
        assert not lowered & {"authorization", "cookie", "proxy-authorization"}
    finally:
        receiver.close()


def test_replicas_get_the_providers_host_aliases(gw: GatewayProcess) -> None:
    seen = probe(gw, "plain")
    aliases = parse_aliases(seen["aliases"])
    port = gw.url.rsplit(":", 1)[1]
    assert aliases["memcached.openfaas-fn:11211"] == "127.0.0.1:11299"  # --store
    assert aliases["redis.openfaas-fn:6379"] == "127.0.0.1:6379"
    assert aliases["gateway.openfaas:8080"] == f"127.0.0.1:{port}"
    assert aliases["minio.openfaas:9000"] == "127.0.0.1:9999"  # --alias
    assert seen["openfaas_url"] == gw.url


# -- faas-cli deploy -f emnist.yml against the local gateway ------------------------------------


def test_faas_cli_deploy_emnist_yml_with_no_store_url(tmp_path: Path, cfg: Path) -> None:
    """The stack's ${STORE_URL:-memcached://memcached.openfaas-fn:11211} reaches the local
    provider as the cluster name; the provider's aliases make it the local store."""
    proc = GatewayProcess(tmp_path, "--replicas", "emnist-train=0", "--replicas",
                          "emnist-grad=0", "--store", "memcached://127.0.0.1:11211",
                          stack=ROOT / "emnist.yml")
    try:
        env = {"TRAIN_REPLICAS": "1", "GRAD_REPLICAS": "1"}
        rc, out, err = faas_cli("deploy", "-f", "emnist.yml", config_dir=cfg, gateway=proc.url,
                                env=env)
        assert rc == 0 and out.count("202 Accepted") == 3, out + err
        rc, out, err = faas_cli("describe", "emnist-setup", config_dir=cfg, gateway=proc.url)
        assert rc == 0 and "emnist-setup" in out, out + err
        listed = {f["name"]: f for f in requests.get(proc.url + "/system/functions").json()}
        setup = listed["emnist-setup"]
        assert setup["envVars"]["store_url"] == "memcached://memcached.openfaas-fn:11211"
        assert setup["envProcess"] == "python index.py"
        assert listed["emnist-train"]["replicas"] == 1
        rc, out, err = faas_cli("invoke", "emnist-setup", "--method", "GET", "--query",
                                "run_id=no-such-run", config_dir=cfg, gateway=proc.url)
        # 404: the store was reached through the alias and has no such run (502 if not)
        assert rc != 0 and "404" in out + err and "502" not in out + err, out + err
        rc, out, err = faas_cli("remove", "emnist-grad", config_dir=cfg, gateway=proc.url)
        assert rc == 0, out + err
        assert "emnist-grad" not in {f["name"] for f in
                                     requests.get(proc.url + "/system/functions").json()}
    finally:
        proc.stop()


def test_faas_cli_reads_no_developer_state(cfg: Path) -> None:
    """The helper isolates faas-cli: its config lives in the test's directory only."""
    rc, _, _ = faas_cli("version", "--short-version", config_dir=cfg)
    assert rc == 0 and os.listdir(cfg) == []


def test_faas_cli_invoke_emnist_setup_with_auth_on(tmp_path: Path, cfg: Path) -> None:
    """`faas-cli invoke emnist-setup <<< '{}'` with auth on: setup's replica-count lookup
    uses the gateway credentials the local provider mounted for it (emnist.yml asks)."""
    proc = GatewayProcess(tmp_path, "--replicas", "emnist-train=0", "--replicas",
                          "emnist-grad=0", "--store", "memcached://127.0.0.1:11211",
                          stack=ROOT / "emnist.yml", env={"OPENFAAS_PASSWORD": PASSWORD})
    try:
        faas_login(cfg, proc.url, PASSWORD)
        rc, out, err = faas_cli("deploy", "-f", "emnist.yml", config_dir=cfg, gateway=proc.url,
                                env={"TRAIN_REPLICAS": "1", "GRAD_REPLICAS": "0"})
        assert rc == 0, out + err
        cli_cfg = cfg.parent / "not-logged-in"  # invoking needs no login, as on OpenFaaS
        cli_cfg.mkdir()
        rc, out, err = faas_cli("invoke", "emnist-setup", config_dir=cli_cfg,
                                gateway=proc.url, stdin="{}")
        assert rc == 0, out + err
        run = json.loads(out.strip().splitlines()[-1])
        assert run["workers"] == 1 and run["config"]["number_of_workers"] is None
    finally:
        proc.stop()


def test_the_vendored_index_py_differs_from_upstream_only_in_its_comment() -> None:
    """template/python3-http/index.py says what changed: four comment lines after the shebang.
    The rest hashes to upstream's file (python-flask-template at 344a21a62cff, 2226 bytes)."""
    lines = (ROOT / "template" / "python3-http" / "index.py").read_text().splitlines(True)
    assert all(ln.startswith("#") for ln in lines[:5])
    upstream = lines[0] + "".join(lines[5:])
    assert len(upstream) == 2226
    assert hashlib.sha256(upstream.encode()).hexdigest() == UPSTREAM_INDEX_SHA256


def test_faas_cli_invoke_async(gw: GatewayProcess, cfg: Path) -> None:
    receiver = CallbackReceiver()
    try:
        rc, out, err = faas_cli("invoke", "plain", "--async", "--header",
                                f"X-Callback-Url: {receiver.url}", config_dir=cfg,
                                gateway=gw.url, stdin="hello")
        assert rc == 0 and "submitted asynchronously" in out + err, out + err
        headers, body = receiver.received.get(timeout=20)
        assert headers["X-Function-Name"] == "plain" and headers["X-Function-Status"] == "200"
        assert json.loads(body)["names"] == []
    finally:
        receiver.close()
