"""Attacks on the local gateway, each reproduced against the real server over real HTTP and
seen refused: code execution through a deploy's environment or process, browser-origin and
DNS-rebinding requests, unbounded bodies/queues/replicas/log queries, bad callback URLs, and
answers that would leak tracebacks or server paths."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.gateway_tools import ROOT, GatewayProcess, raw, wait_for, write_stack

DUMP = """
import os, time

def handle(event, context):
    if event.query.get("sleep"):
        time.sleep(float(event.query["sleep"]))
    return {"statusCode": int(event.query.get("status", 200)), "body": dict(os.environ)}
"""
BROKEN = "raise ImportError('cannot load the model from /srv/secret/place')\n"
JSON = {"Content-Type": "application/json"}
# The documented trick: a warnings filter naming the category "antigravity.x" makes Python
# import antigravity at start-up, which opens a web browser: $BROWSER, i.e. any command.
TRICK = {"PYTHONWARNINGS": "ignore::antigravity.x", "BROWSER": "/bin/sh -c 'touch {marker}' %s"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[GatewayProcess]:
    tmp = tmp_path_factory.mktemp("sec")
    stack = write_stack(tmp, {
        "dump": (DUMP, "environment:\n  GREETING: hi\n  exec_timeout: 30s\n"),
        "broken": (BROKEN, ""),
    })
    proc = GatewayProcess(tmp, "--replicas", "broken=0", "--max-body", "4096",
                          "--queue-max", "2", "--queue-workers", "1", "--max-replicas", "3",
                          stack=stack)
    yield proc
    proc.stop()


def deploy(gw: GatewayProcess, method: str = "POST", **fields: Any) -> requests.Response:
    body = {"service": "dump", "image": "test/dump:1", **fields}
    return requests.request(method, gw.url + "/system/functions", json=body, timeout=60)


def dump_env(gw: GatewayProcess) -> dict[str, str]:
    r = requests.get(gw.url + "/function/dump", timeout=30)
    assert r.status_code == 200, r.text
    return r.json()


def names(gw: GatewayProcess) -> set[str]:
    return {f["name"] for f in requests.get(gw.url + "/system/functions", timeout=10).json()}


# -- code execution through a deploy ------------------------------------------------------------


def test_the_trick_runs_a_command_in_plain_python(tmp_path: Path) -> None:
    """The payload is real: given to Python directly, it runs a shell command."""
    marker = tmp_path / "ran"
    env = {"PATH": os.environ["PATH"],
           **{k: v.format(marker=marker) for k, v in TRICK.items()}}
    subprocess.run([sys.executable, "-c", "pass"], env=env, timeout=30,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for(marker.exists, 10, "the browser command to run")


@pytest.mark.parametrize("method, service", [("POST", "evil"), ("PUT", "dump")])
def test_deploy_with_pythonwarnings_browser_is_refused(gw: GatewayProcess, tmp_path: Path,
                                                       method: str, service: str) -> None:
    marker = tmp_path / "ran"
    env_vars = {k: v.format(marker=marker) for k, v in TRICK.items()}
    before = dump_env(gw)["HOSTNAME"]
    r = deploy(gw, method, service=service, envVars=env_vars)
    assert r.status_code == 400 and "PYTHONWARNINGS" in r.text, r.text
    assert "evil" not in names(gw)
    after = dump_env(gw)  # the old replica still serves, untouched
    assert after["HOSTNAME"] == before and "BROWSER" not in after
    assert not marker.exists(), "a command ran"


@pytest.mark.parametrize("name", [
    "PATH", "PYTHONPATH", "PYTHONSTARTUP", "PYTHONHOME", "LD_PRELOAD", "LD_LIBRARY_PATH",
    "BROWSER", "HOME", "HTTP_PROXY", "https_proxy", "EMNIST_SECRETS_DIR", "EMNIST_HOST_ALIASES",
    "OPENFAAS_URL", "HOSTNAME", "fprocess", "upstream_url", "SSL_CERT_FILE",
])
def test_provider_variables_are_refused(gw: GatewayProcess, name: str) -> None:
    r = deploy(gw, "PUT", envVars={name: "/tmp/x"})
    assert r.status_code == 400 and name in r.text, r.text
    assert dump_env(gw).get(name) != "/tmp/x"


def test_only_the_functions_own_settings_may_be_deployed(gw: GatewayProcess) -> None:
    r = deploy(gw, "PUT", envVars={"FOO": "1"})
    assert r.status_code == 400 and "FOO" in r.text
    r = deploy(gw, "PUT", envVars={"1BAD": "x"})
    assert r.status_code == 400 and "1BAD" in r.text
    allowed = {"GREETING": "changed", "seed": "3", "OMP_NUM_THREADS": "1",
               "exec_timeout": "20s", "allowed_store_urls": "memcached://127.0.0.1:1"}
    assert deploy(gw, "PUT", envVars=allowed).status_code == 202
    env = dump_env(gw)
    assert {k: env[k] for k in allowed} == allowed


def test_env_process_cannot_change_what_runs(gw: GatewayProcess, tmp_path: Path) -> None:
    marker = tmp_path / "ran"
    r = deploy(gw, "PUT", envProcess=f"/bin/sh -c 'touch {marker}'")
    assert r.status_code == 400 and "envProcess" in r.text
    # the template's own process (what faas-cli sends for python3-http) is fine
    assert deploy(gw, "PUT", envProcess="python index.py").status_code == 202
    assert not marker.exists()


def test_a_stack_naming_a_provider_variable_does_not_start(tmp_path: Path) -> None:
    stack = write_stack(tmp_path, {"f": (DUMP, "environment:\n  LD_PRELOAD: /tmp/evil.so\n")})
    proc = subprocess.run(
        [sys.executable, "-m", "emnist.gateway.server", "--stack", str(stack), "--port", "0",
         "--state-dir", str(tmp_path / "state")],
        cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "LD_PRELOAD" in proc.stderr


# -- browsers, DNS rebinding, content types -----------------------------------------------------


def test_cross_origin_text_plain_post_is_refused(gw: GatewayProcess, tmp_path: Path) -> None:
    """What any web page can send without a CORS preflight: refused before it is read."""
    marker = tmp_path / "ran"
    body = json.dumps({"service": "evil", "image": "test/dump:1",
                       "envVars": {k: v.format(marker=marker) for k, v in TRICK.items()}})
    for path in ("/system/functions", "/function/dump", "/async-function/dump", "/healthz"):
        status, _, _, text = raw(gw.url, "POST", path, body.encode(),
                                 {"Content-Type": "text/plain", "Origin": "http://evil.example"})
        assert status == 403, (path, text)
    assert "evil" not in names(gw) and not marker.exists()


@pytest.mark.parametrize("headers", [
    {"Origin": "null"}, {"Origin": "http://127.0.0.1:1"}, {"Origin": "https://evil.example"},
    {"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
])
def test_browser_requests_are_refused(gw: GatewayProcess, headers: dict[str, str]) -> None:
    assert raw(gw.url, "GET", "/system/functions", headers=headers)[0] == 403
    assert raw(gw.url, "GET", "/function/dump", headers=headers)[0] == 403


def test_the_gateways_own_origin_is_allowed(gw: GatewayProcess) -> None:
    port = gw.url.rsplit(":", 1)[1]
    for origin in (gw.url, f"http://localhost:{port}"):
        assert raw(gw.url, "GET", "/system/functions",
                   headers={"Origin": origin, "Sec-Fetch-Site": "same-origin"})[0] == 200


def test_dns_rebinding_host_is_refused(gw: GatewayProcess) -> None:
    port = gw.url.rsplit(":", 1)[1]
    for path in ("/healthz", "/system/functions", "/function/dump"):
        assert raw(gw.url, "GET", path, headers={"Host": f"evil.example:{port}"})[0] == 403
    for host in (f"localhost:{port}", f"127.0.0.1:{port}", "gateway.openfaas:8080"):
        assert raw(gw.url, "GET", "/healthz", headers={"Host": host})[0] == 200, host


@pytest.mark.parametrize("method, path, body", [
    ("POST", "/system/functions", {"service": "dump", "image": "test/dump:1"}),
    ("PUT", "/system/functions", {"service": "dump", "image": "test/dump:1"}),
    ("DELETE", "/system/functions", {"functionName": "dump"}),
    ("POST", "/system/scale-function/dump", {"serviceName": "dump", "replicas": 0}),
    ("POST", "/system/secrets", {"name": "s1", "value": "v"}),
    ("PUT", "/system/secrets", {"name": "s1", "value": "v"}),
    ("DELETE", "/system/secrets", {"name": "s1"}),
])
def test_json_endpoints_need_a_json_content_type(gw: GatewayProcess, method: str, path: str,
                                                 body: dict[str, Any]) -> None:
    # no Content-Type at all is how the real gateway asks for a scale (scale from zero,
    # /system/alert): accepted there (test_gateway_queue), refused everywhere else
    untyped = (None,) if "scale-function" not in path else ()
    for ctype in ("text/plain", "application/x-www-form-urlencoded", *untyped):
        headers = {"Content-Type": ctype} if ctype else {}
        status, _, _, text = raw(gw.url, method, path, json.dumps(body).encode(), headers)
        assert status == 415 and b"application/json" in text
    assert "dump" in names(gw)
    assert requests.get(gw.url + "/system/function/dump", timeout=10).json()["replicas"] == 1


def test_non_loopback_host_needs_a_password(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENFAAS_PASSWORD"}
    proc = subprocess.run(
        [sys.executable, "-m", "emnist.gateway.server", "--stack", str(ROOT / "emnist.yml"),
         "--host", "0.0.0.0", "--port", "0", "--state-dir", str(tmp_path / "state")],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1 and "password" in proc.stderr


# -- bounds -------------------------------------------------------------------------------------


def test_bodies_are_limited(gw: GatewayProcess) -> None:
    assert requests.post(gw.url + "/function/dump", data=b"x" * 4000, timeout=30).ok
    for path in ("/function/dump", "/system/functions"):
        r = requests.post(gw.url + path, data=b"x" * 5000, headers=JSON, timeout=30)
        assert r.status_code == 413, path
    r = requests.post(gw.url + "/function/dump", data=iter([b"x" * 1000] * 10), timeout=30)
    assert r.status_code == 413  # chunked: counted as it arrives


def test_a_huge_declared_body_is_refused_without_reading_it(gw: GatewayProcess) -> None:
    host, port = gw.url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(b"POST /function/dump HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                  b"Content-Length: 1073741824\r\n\r\n")
        answer = s.recv(200)  # no body sent: the answer comes from the headers alone
    assert answer.startswith(b"HTTP/1.1 413 "), answer


def test_the_async_queue_is_bounded(gw: GatewayProcess) -> None:
    """--queue-max 2 counts queued and running calls: the third is 429 until one finishes."""
    url = gw.url + "/async-function/dump?sleep=1"
    assert [requests.post(url, timeout=10).status_code for _ in range(2)] == [202, 202]
    r = requests.post(url, timeout=10)
    assert r.status_code == 429 and "queue is full" in r.text
    wait_for(lambda: requests.post(gw.url + "/async-function/dump", timeout=10)
             .status_code == 202, 20, "the queue to drain")


def test_replicas_are_bounded(gw: GatewayProcess) -> None:
    r = requests.post(gw.url + "/system/scale-function/dump", json={"replicas": 4}, timeout=30)
    assert r.status_code == 400 and "at most 3" in r.text
    r = deploy(gw, "PUT", labels={"com.openfaas.scale.min": "10"})
    assert r.status_code == 400 and "com.openfaas.scale.min" in r.text
    assert requests.get(gw.url + "/system/function/dump", timeout=10).json()["replicas"] == 1


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "gopher://127.0.0.1:70/", "ftp://x/", "http://", "not a url",
    "http://user:pw@127.0.0.1:1/", "http://127.0.0.1:99999/", "http://x/" + "a" * 3000,
])
def test_callback_urls_are_checked(gw: GatewayProcess, url: str) -> None:
    r = requests.post(gw.url + "/async-function/dump", headers={"X-Callback-Url": url},
                      timeout=10)
    assert r.status_code == 400 and "X-Callback-Url" in r.text


@pytest.mark.parametrize("query", ["tail=1000000000", "tail=abc", "since=yesterday",
                                   "name=" + "a" * 300, "instance=" + "b" * 300,
                                   "since=" + "1" * 100])
def test_log_queries_are_bounded(gw: GatewayProcess, query: str) -> None:
    url = gw.url + "/system/logs?" + ("" if query.startswith("name=") else "name=dump&") + query
    r = requests.get(url, timeout=10)
    assert r.status_code == 400, r.text


def test_secret_names_are_names(gw: GatewayProcess) -> None:
    for name in ("../x", "a/b", "..", "UPPER", ""):
        r = requests.post(gw.url + "/system/secrets", json={"name": name, "value": "v"},
                          timeout=10)
        assert r.status_code == 400, name


# -- no tracebacks, no server paths -------------------------------------------------------------


def _clean(text: str, tmp: Path) -> bool:
    return not any(s in text for s in ("Traceback", 'File "', str(tmp), str(ROOT), "/srv/"))


def test_answers_carry_no_traceback_or_server_path(gw: GatewayProcess) -> None:
    tmp = gw.ready_file.parent
    r = requests.post(gw.url + "/system/scale-function/broken", json={"replicas": 1},
                      timeout=60)
    assert r.status_code == 500 and "broken" in r.text and _clean(r.text, tmp), r.text
    answers = [
        requests.post(gw.url + "/system/functions", json={"service": "x", "image": "no/such:1"},
                      timeout=10),
        requests.post(gw.url + "/system/functions", data=b'{"service": ', headers=JSON,
                      timeout=10),
        requests.post(gw.url + "/system/functions", data=b'{"service": NaN}', headers=JSON,
                      timeout=10),
        requests.get(gw.url + "/system/nothing-here", timeout=10),
        requests.patch(gw.url + "/system/functions", timeout=10),
        requests.get(gw.url + "/function/dump?status=x", timeout=10),
    ]
    assert [a.status_code for a in answers] == [400, 400, 400, 404, 405, 500]
    for a in answers:
        assert _clean(a.text, tmp) and "<html" not in a.text.lower(), a.text
    assert answers[-1].text == "Internal Server Error"



def test_an_absolute_form_target_reaches_the_function_path(gw: GatewayProcess) -> None:
    """``GET http://host/function/x/p`` (proxy form) is routed by its path, never garbled."""
    host, port = gw.url.rsplit("/", 1)[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(b"GET http://127.0.0.1/function/dump?status=201 HTTP/1.1\r\n"
                  b"Host: 127.0.0.1\r\nConnection: close\r\n\r\n")
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    assert data.startswith(b"HTTP/1.1 201 Created\r\n"), data[:200]


def test_every_documented_function_setting_is_deployable() -> None:
    """The allow-list's own names (training fields, policy, watchdog, threads) are never
    mistaken for provider variables; case matters as it does to the interpreter."""
    from emnist.gateway.validate import SAFE_ENV, provider_only

    assert not [name for name in SAFE_ENV if provider_only(name)]
    assert provider_only("PYTHONPATH") and not provider_only("pythonpath")
    assert provider_only("http_proxy") and provider_only("HTTPS_PROXY")
