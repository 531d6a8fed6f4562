"""The local OpenFaaS gateway: stack parsing, and the real server + replicas over real HTTP."""

from __future__ import annotations

import json
import os
import re
import signal
import threading
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import requests

from emnist.gateway.client import GatewayClient, GatewayError, deploy_request
from emnist.gateway.server import function_timeout, load_auth
from emnist.gateway.stack import (
    FunctionSpec,
    StackError,
    load_stack,
    parse_duration,
    substitute,
)
from emnist.gateway.supervisor import ReplicaError, ReplicaSet
from tests.gateway_tools import CallbackReceiver, GatewayProcess, pid_alive, wait_for

FIXTURES = Path(__file__).parent / "fixtures" / "gateway"
STACK = FIXTURES / "stack.yml"
ROOT = Path(__file__).resolve().parents[1]
JSON = {"Content-Type": "application/json"}
HOSTNAME_RE = re.compile(r"^[a-z0-9-]+-[0-9a-f]{5}-[a-z0-9]{5}$")


# -- helpers ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    gw = GatewayProcess(tmp_path_factory.mktemp("gw"), env={"EMNIST_TEST_GREETING": "bonjour",
                                                           # the callback tests' recorder
                                                           "EMNIST_CALLBACK_HOSTS": "127.0.0.1"})
    yield gw
    pids = gw.stop()
    assert pids, "the gateway had no replica processes"
    assert gw.proc.returncode == 0, gw.log_path.read_text()
    wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "replicas to exit")
    assert not gw.ready_file.exists()


@pytest.fixture(scope="module")
def client(gateway: GatewayProcess) -> GatewayClient:
    return GatewayClient(gateway.url, auth=None)


@pytest.fixture(scope="module")
def http() -> Iterator[requests.Session]:
    with requests.Session() as s:
        s.trust_env = False
        yield s


def echo(client: GatewayClient, **query: Any) -> dict[str, Any]:
    return client.invoke("echo", b"", method="GET", query=query).json()


# -- stack file ---------------------------------------------------------------------------------


def test_substitute_like_faas_cli() -> None:
    env = {"A": "1", "EMPTY": ""}
    assert substitute("${A} ${A:-x} ${B:-dflt} ${B} ${EMPTY:-e} ${EMPTY-e}", env) == \
        "1 1 dflt  e "
    assert substitute("$A stays, ${B-unset}", env) == "$A stays, unset"


def test_load_stack_fixture() -> None:
    stack = load_stack(STACK, env={"EMNIST_TEST_GREETING": "hi", "EMNIST_TEST_REGISTRY": "r"})
    assert stack.gateway == "http://127.0.0.1:8080"
    assert set(stack.functions) == {"echo", "env"}
    fn = stack.functions["env"]
    assert fn.handler == (FIXTURES / "env").resolve() and fn.handler.is_absolute()
    assert fn.image == "r/env:test" and fn.lang == "python3-http"
    # environment_file overrides environment, as in faas-cli; values are strings
    assert fn.environment == {"GREETING": "hi", "SHARED": "from-file", "COUNT": "3",
                              "FROM_FILE": "yes"}
    assert fn.labels == {"com.openfaas.scale.min": "1", "team": "tests"}
    assert fn.limits == {"memory": "128Mi"} and fn.requests == {}
    default = load_stack(STACK, env={})
    assert default.functions["env"].environment["GREETING"] == "hello"
    assert default.functions["echo"].image == "localhost:5000/echo:test"


def test_deploy_request_like_faas_cli() -> None:
    fn = load_stack(STACK, env={}).functions["env"]
    body = deploy_request(fn)
    assert body["service"] == "env" and body["image"] == "localhost:5000/env:test"
    assert body["envVars"]["SHARED"] == "from-file"
    assert body["labels"]["team"] == "tests" and body["annotations"] == {"topic": "fixtures"}
    assert body["limits"] == {"memory": "128Mi"}
    assert "requests" not in body and "secrets" not in body
    assert body["readOnlyRootFilesystem"] is False
    json.dumps(body)


def _write_stack(tmp_path: Path, text: str) -> Path:
    (tmp_path / "fn").mkdir(exist_ok=True)
    path = tmp_path / "stack.yml"
    path.write_text(text)
    return path


GOOD_FN = "  f:\n    lang: python3-http\n    handler: ./fn\n    image: f:1\n"


@pytest.mark.parametrize("text, message", [
    ("version: 1.0\nprovider: {name: faas}\nfunctions:\n" + GOOD_FN, "provider.name"),
    ("version: 2.0\nprovider: {name: openfaas}\nfunctions:\n" + GOOD_FN, "version"),
    ("version: 1.0\nfunctions:\n" + GOOD_FN, "provider"),
    ("version: 1.0\nprovider: {name: openfaas}\nfunctions: [a]\n", "functions"),
    ("version: 1.0\nprovider: {name: openfaas}\nfunctions:\n  f:\n    lang: python3-http\n"
     "    handler: ./fn\n", "function 'f': field 'image'"),
    ("version: 1.0\nprovider: {name: openfaas}\nfunctions:\n  f:\n    lang: python3-http\n"
     "    handler: ./nope\n    image: f:1\n", "function 'f': field 'handler'"),
    ("version: 1.0\nprovider: {name: openfaas}\nfunctions:\n" + GOOD_FN + "    environment: [1]\n",
     "function 'f': field 'environment'"),
    ("version: 1.0\nprovider: {name: openfaas}\nfunctions:\n" + GOOD_FN
     + "    environment_file: [missing.yml]\n", "function 'f': field 'environment_file'"),
    ("version: 1.0\nprovider: {name: openfaas}\nfunctions:\n" + GOOD_FN
     + "    limits: {gpu: 1}\n", "function 'f': field 'limits'"),
    ("version: 1.0\nprovider: {name: openfaas}\nfunctions:\n  Bad_Name:\n    lang: x\n",
     "DNS-1123"),
    ("version: 1.0\nprovider: {name: openfaas\n", "not valid YAML"),
])
def test_stack_errors(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(StackError, match=re.escape(message)):
        load_stack(_write_stack(tmp_path, text), env={})


def test_stack_missing_file(tmp_path: Path) -> None:
    with pytest.raises(StackError, match="cannot read stack file"):
        load_stack(tmp_path / "absent.yml")


def test_environment_file_needs_environment_key(tmp_path: Path) -> None:
    (tmp_path / "env.yml").write_text("FOO: bar\n")
    text = ("version: 1.0\nprovider: {name: openfaas}\nfunctions:\n" + GOOD_FN
            + "    environment_file: [env.yml]\n")
    with pytest.raises(StackError, match="must contain an 'environment:' map"):
        load_stack(_write_stack(tmp_path, text), env={})


@pytest.mark.parametrize("text, seconds", [
    ("10m", 600), ("30s", 30), ("1h5m", 3900), ("1.5h", 5400), ("300ms", 0.3),
    ("2h45m30.5s", 9930.5), ("0", 0), ("45", 45), ("1m30s", 90), ("-5s", -5), (12, 12),
])
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["10x", "m", "1h 5m", "abc", "", "1.2.3s", "5 s"])
def test_parse_duration_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        parse_duration(text)


def test_function_timeout() -> None:
    assert function_timeout({}) == 300
    assert function_timeout({"exec_timeout": "10m", "write_timeout": "30s"}) >= 600
    assert function_timeout({"write_timeout": "bogus"}) == 300


def test_load_auth(tmp_path: Path) -> None:
    assert load_auth(None, env={}) is None
    assert load_auth(None, env={"OPENFAAS_PASSWORD": "pw"}) == ("admin", "pw")
    (tmp_path / "basic-auth-password").write_text("secret\n")
    assert load_auth(tmp_path, env={}) == ("admin", "secret")
    (tmp_path / "basic-auth-user").write_text("alice\n")
    assert load_auth(tmp_path, env={}) == ("alice", "secret")
    assert load_auth(tmp_path / "basic-auth-password", env={}) == ("alice", "secret")


def test_replica_set_reports_a_crashing_handler(tmp_path: Path) -> None:
    (tmp_path / "handler.py").write_text("raise ImportError('no such thing: xyzzy')\n")
    spec = FunctionSpec(name="broken", lang="python3-http", handler=tmp_path, image="b:1")
    rs = ReplicaSet(spec, {}, start_timeout=20)
    try:
        with pytest.raises(ReplicaError, match="xyzzy") as err:
            rs.scale(1)
        assert "broken" in str(err.value) and rs.replicas == []
    finally:
        rs.stop()


def test_replica_set_in_process(tmp_path: Path) -> None:
    spec = load_stack(STACK, env={}).functions["echo"]
    rs = ReplicaSet(spec, {"EXTRA": "1"}, log_limit=5)
    try:
        rs.scale(2)
        assert len(rs.replicas) == 2 and rs.available == 2
        with rs.pick() as a, rs.pick() as b:
            assert a is not b and a.inflight == b.inflight == 1  # least in-flight first
        for r in rs.replicas:
            assert requests.get(r.url + "/_/health", timeout=5).text == "OK"
            requests.get(r.url + "/x", timeout=5)
        wait_for(lambda: len(rs.logs()) >= 2, 5, "replica logs")
        assert len(rs.logs(tail=1)) == 1 and rs.logs(since="2999-01-01T00:00:00Z") == []
        pids = [r.pid for r in rs.replicas]
    finally:
        rs.stop()
    assert rs.replicas == [] and not any(pid_alive(p) for p in pids)


# -- the gateway over HTTP ----------------------------------------------------------------------


def test_health_info_namespaces(gateway: GatewayProcess, http: requests.Session) -> None:
    r = http.get(gateway.url + "/healthz")
    assert r.status_code == 200 and r.text == "OK"
    info = http.get(gateway.url + "/system/info").json()
    assert info["provider"]["provider"] == "emnist-local"
    assert info["provider"]["orchestration"] == "process"
    assert set(info["provider"]["version"]) == {"sha", "release"}
    assert set(info["version"]) == {"sha", "release"} and isinstance(info["arch"], str)
    assert http.get(gateway.url + "/system/namespaces").json() == ["openfaas-fn"]


def test_list_and_describe(client: GatewayClient) -> None:
    functions = {f["name"]: f for f in client.list_functions()}
    assert {"echo", "env"} <= set(functions)
    env = functions["env"]
    for key, typ in [("name", str), ("image", str), ("namespace", str), ("envVars", dict),
                     ("labels", dict), ("annotations", dict), ("limits", dict),
                     ("invocationCount", int), ("replicas", int), ("availableReplicas", int),
                     ("createdAt", str)]:
        assert isinstance(env[key], typ), key
    assert env["namespace"] == "openfaas-fn" and env["replicas"] >= 1
    assert env["envVars"]["GREETING"] == "bonjour"
    echo_status = functions["echo"]
    assert "labels" not in echo_status and "secrets" not in echo_status  # omitempty
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d+Z$", echo_status["createdAt"])
    assert client.get_function("env")["name"] == "env"
    assert client.get_function("nope") is None


def test_invoke_passes_everything_through(gateway: GatewayProcess,
                                          http: requests.Session) -> None:
    for prefix in ("/function/echo", "/function/echo.openfaas-fn"):
        started = time.perf_counter()
        r = http.post(gateway.url + prefix + "/a/b%20c?x=1&x=2&y=z", data=b"payload\x00",
                      headers={"X-Test": "yes", "Content-Type": "application/x-thing"})
        elapsed = time.perf_counter() - started
        assert r.status_code == 200, r.text
        got = r.json()
        assert got["method"] == "POST" and got["path"] == "/a/b c"
        assert got["query"] == {"x": ["1", "2"], "y": ["z"]}
        assert got["body"] == "payload\x00"
        assert got["headers"]["X-Test"] == "yes"
        assert got["headers"]["Content-Type"] == "application/x-thing"
        assert got["headers"]["X-Call-Id"] == r.headers["X-Call-Id"]
        uuid.UUID(r.headers["X-Call-Id"])
        # the gateway's own measure of the call lies within what the client saw
        assert 0 < float(r.headers["X-Duration-Seconds"]) <= elapsed
        assert r.headers["X-Echo"] == "1" and r.headers["Content-Type"] == "application/json"
        assert HOSTNAME_RE.match(got["hostname"]) and got["hostname"].startswith("echo-")
        assert got["openfaas_url"] == gateway.url
    root = http.get(gateway.url + "/function/echo").json()
    assert root["method"] == "GET" and root["path"] == "/"
    assert http.put(gateway.url + "/function/echo/", data="x").json()["method"] == "PUT"
    assert http.get(gateway.url + "/function/echo?status=201").status_code == 201


def test_handler_error_is_500(gateway: GatewayProcess, client: GatewayClient,
                              http: requests.Session) -> None:
    r = http.get(gateway.url + "/function/echo?raise=1")
    # like the template's Flask: a generic 500; the exception goes to the logs, not the caller
    assert r.status_code == 500 and r.text == "Internal Server Error"
    assert "asked to fail" not in r.text and "Traceback" not in r.text
    wait_for(lambda: any("asked to fail" in m["text"] for m in client.logs("echo")), 10,
             "the traceback in the function's logs")
    assert http.get(gateway.url + "/function/echo").status_code == 200


def test_unknown_function_404(gateway: GatewayProcess, http: requests.Session) -> None:
    r = http.get(gateway.url + "/function/nope")
    assert r.status_code == 404
    assert r.text == "error finding function nope.openfaas-fn: not found"
    assert http.get(gateway.url + "/function/echo.other-ns").status_code == 404
    assert http.post(gateway.url + "/async-function/nope").status_code == 404
    assert http.get(gateway.url + "/system/function/nope").status_code == 404


def test_environment_reaches_handler(client: GatewayClient, gateway: GatewayProcess) -> None:
    env = client.invoke("env").json()
    assert env["GREETING"] == "bonjour"  # ${EMNIST_TEST_GREETING:-hello} from the environment
    assert env["SHARED"] == "from-file" and env["FROM_FILE"] == "yes" and env["COUNT"] == "3"
    assert env["OPENFAAS_URL"] == gateway.url
    assert HOSTNAME_RE.match(env["HOSTNAME"]) and env["HOSTNAME"].startswith("env-")
    assert env["MY_SECRET"] is None  # the gateway's own environment does not leak


def test_scale_up_spreads_calls_then_down(client: GatewayClient,
                                          gateway: GatewayProcess) -> None:
    client.scale("echo", 3)
    status = client.get_function("echo")
    assert status["replicas"] == 3 and status["availableReplicas"] == 3
    with ThreadPoolExecutor(12) as pool:
        answers = list(pool.map(lambda _: echo(client, sleep="0.2"), range(12)))
    pids = {a["pid"] for a in answers}
    hostnames = {a["hostname"] for a in answers}
    assert len(pids) == 3 and len(hostnames) == 3
    client.scale("echo", 1)
    status = client.get_function("echo")
    assert status["replicas"] == 1 and status["availableReplicas"] == 1
    survivors = {p for p in pids if pid_alive(p)}
    assert len(survivors) == 1
    assert {echo(client)["pid"] for _ in range(5)} == survivors


def test_scale_to_zero_then_scale_from_zero(client: GatewayClient) -> None:
    client.scale("env", 0)
    status = client.get_function("env")
    assert status["replicas"] == 0 and status["availableReplicas"] == 0
    assert client.invoke("env").json()["GREETING"] == "bonjour"  # scales back to 1
    assert client.get_function("env")["availableReplicas"] == 1


def test_scale_bad_requests(gateway: GatewayProcess, http: requests.Session) -> None:
    url = gateway.url + "/system/scale-function/echo"
    assert http.post(url, data=b"{not json", headers=JSON).status_code == 400
    assert http.post(url, data=b'{"replicas": 1}',  # declared as something else than JSON
                     headers={"Content-Type": "text/plain"}).status_code == 415
    assert http.post(url, json={"serviceName": "echo", "replicas": -1}).status_code == 400
    assert http.post(url, json={"serviceName": "echo", "replicas": "2"}).status_code == 400
    assert http.post(url, json=[1]).status_code == 400
    assert http.post(gateway.url + "/system/scale-function/nope",
                     json={"serviceName": "nope", "replicas": 1}).status_code == 404


def test_async_invocation_calls_back(client: GatewayClient, gateway: GatewayProcess,
                                     http: requests.Session) -> None:
    receiver = CallbackReceiver()
    try:
        r = http.post(gateway.url + "/async-function/echo.openfaas-fn/job?n=1&sleep=0.2",
                      data=b"async!", headers={"X-Callback-Url": receiver.url})
        assert r.status_code == 202 and r.content == b""
        call_id = r.headers["X-Call-Id"]
        uuid.UUID(call_id)
        headers, body = receiver.received.get(timeout=10)
        assert headers["X-Function-Status"] == "200"
        assert headers["X-Call-Id"] == call_id and headers["X-Function-Name"] == "echo"
        assert float(headers["X-Duration-Seconds"]) >= 0.2  # it includes the handler's sleep
        got = json.loads(body)
        assert got["body"] == "async!" and got["path"] == "/job"
        assert got["query"] == {"n": ["1"], "sleep": ["0.2"]}
        assert got["headers"]["X-Call-Id"] == call_id
        second = client.invoke_async("echo", {"k": 1}, callback_url=receiver.url)
        headers, body = receiver.received.get(timeout=10)
        assert headers["X-Call-Id"] == second and json.loads(json.loads(body)["body"]) == {"k": 1}
    finally:
        receiver.close()


def test_logs(client: GatewayClient, gateway: GatewayProcess, http: requests.Session) -> None:
    marker = uuid.uuid4().hex
    hostname = client.invoke(f"echo/{marker}", method="GET").json()["hostname"]

    def find() -> list[dict[str, Any]]:
        return [m for m in client.logs("echo") if marker in m["text"]]

    lines = wait_for(find, 10, "the handler's print in the logs")
    assert set(lines[0]) == {"name", "namespace", "instance", "timestamp", "text"}
    assert lines[0]["name"] == "echo" and lines[0]["namespace"] == "openfaas-fn"
    assert lines[0]["instance"] == hostname
    assert re.match(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{9}Z$", lines[0]["timestamp"])
    assert len(list(client.logs("echo", tail=1))) == 1
    assert len(list(client.logs("echo", tail=0))) == len(list(client.logs("echo"))) > 1
    assert list(client.logs("echo", instance="echo-00000-nopod")) == []
    assert list(client.logs("echo", since="2999-01-01T00:00:00Z")) == []
    assert http.get(gateway.url + "/system/logs").status_code == 400
    assert http.get(gateway.url + "/system/logs?name=nope").status_code == 404
    assert http.get(gateway.url + "/system/logs?name=echo&tail=x").status_code == 400


def test_logs_follow_streams_new_lines(client: GatewayClient) -> None:
    marker = uuid.uuid4().hex
    seen: list[dict[str, Any]] = []
    follower = GatewayClient(client.url, auth=None)

    def follow() -> None:
        for message in follower.logs("echo", tail=1, follow=True):
            seen.append(message)
            if marker in message["text"]:
                return

    t = threading.Thread(target=follow, daemon=True)
    t.start()

    def invoked_and_seen() -> bool:
        client.invoke(f"echo/{marker}", method="GET")
        return any(marker in m["text"] for m in seen)

    wait_for(invoked_and_seen, 10, "a followed log line")
    t.join(5)
    assert not t.is_alive()
    follower.session.close()


def test_deploy_put_then_post_update_and_delete(client: GatewayClient, gateway: GatewayProcess,
                                                http: requests.Session) -> None:
    echo_image = client.get_function("echo")["image"]
    spec = {"service": "echo2", "image": echo_image, "namespace": "openfaas-fn",
            "envVars": {"seed": "1"}, "labels": {"a": "b"}}
    assert http.put(gateway.url + "/system/functions", json=spec).status_code == 404
    client.deploy(spec)  # PUT (404) then POST, like faas-cli
    status = client.get_function("echo2")
    assert status["image"] == echo_image and status["labels"] == {"a": "b"}
    assert status["availableReplicas"] == 1
    first = client.invoke("echo2", method="GET").json()
    assert first["hostname"].startswith("echo2-")
    # update in place: new env, new replicas, same count
    client.deploy({**spec, "envVars": {"GREETING": "updated"}, "service": "env2",
                   "image": client.get_function("env")["image"]})
    assert client.invoke("env2").json()["GREETING"] == "updated"
    before = client.invoke("env2").json()["HOSTNAME"]
    client.deploy({"service": "env2", "image": client.get_function("env")["image"],
                   "envVars": {"GREETING": "again"}})
    after = client.invoke("env2").json()
    assert after["GREETING"] == "again" and after["HOSTNAME"] != before
    # errors
    r = http.post(gateway.url + "/system/functions", json={"service": "x", "image": "who:1"})
    assert r.status_code == 400 and "is not in the gateway's stack" in r.text
    assert http.post(gateway.url + "/system/functions", data=b"{",
                     headers=JSON).status_code == 400
    assert http.post(gateway.url + "/system/functions", json={"image": "x"}).status_code == 400
    with pytest.raises(GatewayError) as err:
        client.deploy({"service": "x", "image": "unknown:1"})
    assert err.value.status == 400
    # delete
    pid = first["pid"]
    client.delete("echo2")
    client.delete("env2")
    assert client.get_function("echo2") is None
    assert http.get(gateway.url + "/function/echo2").status_code == 404
    wait_for(lambda: not pid_alive(pid), 10, "the deleted function's replica to exit")
    r = http.delete(gateway.url + "/system/functions", json={"functionName": "echo2"})
    assert r.status_code == 404
    assert http.delete(gateway.url + "/system/functions", data=b"[",
                       headers=JSON).status_code == 400


def test_killed_replica_is_replaced(client: GatewayClient) -> None:
    old = echo(client)
    os.kill(old["pid"], signal.SIGKILL)
    pids = set()
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        answer = echo(client)  # every call must succeed while the replica is replaced
        pids.add(answer["pid"])
        if answer["pid"] != old["pid"]:
            break
    assert pids - {old["pid"]}, "no new replica served the calls"
    wait_for(lambda: client.get_function("echo")["availableReplicas"] == 1, 10, "1 replica")


def test_basic_auth_guards_system_only(tmp_path: Path) -> None:
    secrets_dir = tmp_path / "secrets"
    secrets_dir.mkdir()
    (secrets_dir / "basic-auth-password").write_text("s3cret\n")
    gw = GatewayProcess(tmp_path, "--basic-auth-file", str(secrets_dir), "--replicas", "env=0")
    try:
        url = gw.url
        with requests.Session() as s:
            s.trust_env = False
            r = s.get(url + "/system/functions")
            assert r.status_code == 401
            assert r.headers["WWW-Authenticate"] == 'Basic realm="Restricted"'
            r = s.get(url + "/system/functions", headers={"Authorization": "Bearer "})
            assert r.status_code == 401
            assert s.get(url + "/system/info", auth=("admin", "wrong")).status_code == 401
            assert s.get(url + "/system/functions", auth=("admin", "s3cret")).status_code == 200
            assert s.get(url + "/healthz").status_code == 200
            assert s.get(url + "/function/echo").status_code == 200
            assert s.post(url + "/async-function/echo").status_code == 202
        authed = GatewayClient(url, auth=("admin", "s3cret"))
        assert authed.get_function("env")["replicas"] == 0
        with pytest.raises(GatewayError) as err:
            GatewayClient(url, auth=("admin", "nope")).list_functions()
        assert err.value.status == 401
        pids = gw.replica_pids()
        assert len(pids) == 1
    finally:
        pids = gw.stop(signal.SIGKILL)  # no clean-up: replicas must notice on their own
    wait_for(lambda: not any(pid_alive(p) for p in pids), 10, "orphaned replicas to exit")


def test_unreachable_gateway_error() -> None:
    from emnist.gateway.supervisor import free_port

    c = GatewayClient(f"http://127.0.0.1:{free_port()}", auth=None, timeout=2)
    assert not c.healthy()
    with pytest.raises(GatewayError, match="emnist up"):
        c.list_functions()
