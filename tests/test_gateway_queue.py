"""OpenFaaS CE's async semantics on the local gateway, and requests shaped as the real
gateway sends them, each against real gateway processes over HTTP on loopback.

The probe function records every delivery's start and end (with its X-Call-Id and its
delivery number) in a file, and waits either until a call tagged ``await`` has started or
until a release file exists, both bounded by ``max`` seconds: the tests watch the file and
release calls instead of sleeping."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.gateway_tools import (
    ROOT,
    CallbackReceiver,
    GatewayProcess,
    raw,
    wait_for,
    write_stack,
)
from tests.servers import free_port

PROBE = """
import fcntl, json, os, time

DIR = os.environ["PROBE_DIR"]


def _events():
    try:
        with open(os.path.join(DIR, "events.jsonl")) as f:
            return [json.loads(line) for line in f if line.strip()]
    except FileNotFoundError:
        return []


def _record(kind, call, tag, delivery=0, **extra):
    with open(os.path.join(DIR, "events.jsonl"), "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        f.seek(0)
        if kind == "start":
            seen = [json.loads(line) for line in f if line.strip()]
            delivery = 1 + sum(e["call"] == call and e["event"] == "start" for e in seen)
        f.write(json.dumps({"event": kind, "call": call, "tag": tag, "delivery": delivery,
                            "t": time.time(), **extra}) + "\\n")
    return delivery


def handle(event, context):
    q = event.query
    call, tag = event.headers.get("X-Call-Id", ""), q.get("tag", "")
    delivery = _record("start", call, tag)
    deadline = time.monotonic() + float(q.get("max", "20"))
    saw = None
    if q.get("await"):
        while time.monotonic() < deadline and not saw:
            saw = any(e["tag"] == q["await"] and e["event"] == "start" for e in _events())
            time.sleep(0.01)
    if q.get("hold"):
        while time.monotonic() < deadline and not os.path.exists(os.path.join(DIR, q["hold"])):
            time.sleep(0.01)
    _record("end", call, tag, delivery, saw=saw)
    return {"statusCode": 200, "body": {"tag": tag, "call": call, "delivery": delivery}}
"""
SETTINGS = "environment:\n  PROBE_DIR: {dir}\n  exec_timeout: 60s\n"
PASSWORD = "gw-secret"  # the gateway's basic-auth password in the scale tests


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("queue")
    (tmp / "probe-dir").mkdir()
    settings = SETTINGS.format(dir=tmp / "probe-dir")
    return write_stack(tmp, {
        "probe": (PROBE, settings),
        "named": (PROBE, settings + "annotations:\n  com.openfaas.queue: slow\n"),
        "orphan": (PROBE, settings + "annotations:\n  com.openfaas.queue: nobody\n"),
    })


def probe_dir(stack: Path) -> Path:
    return stack.parent / "probe-dir"


def events(stack: Path, tag: str) -> list[dict[str, Any]]:
    path = probe_dir(stack) / "events.jsonl"
    lines = path.read_text().splitlines() if path.exists() else []
    return [e for e in map(json.loads, lines) if e["tag"] == tag]


def first(stack: Path, tag: str, kind: str, delivery: int = 1) -> dict[str, Any] | None:
    return next((e for e in events(stack, tag) if e["event"] == kind
                 and e["delivery"] == delivery), None)


def release(stack: Path, name: str) -> None:
    (probe_dir(stack) / name).touch()


def call_async(gw: str, tag: str, fn: str = "probe", headers: dict[str, str] | None = None,
               **query: Any) -> str:
    r = requests.post(f"{gw}/async-function/{fn}", params={"tag": tag, **query},
                      headers=headers, timeout=10)
    assert r.status_code == 202, r.text
    return r.headers["X-Call-Id"]


def gateway(tmp: Path, stack: Path, *args: str, **env: str) -> Iterator[GatewayProcess]:
    """``python -m emnist.gateway.server`` for the probe stack with ``args``."""
    gw = GatewayProcess(tmp, *args, stack=stack, env=env)
    try:
        yield gw
    finally:
        gw.stop()


@pytest.fixture(scope="module")
def ce(tmp_path_factory: pytest.TempPathFactory, stack: Path) -> Iterator[GatewayProcess]:
    """The gateway with no queue flags: CE's defaults."""
    yield from gateway(tmp_path_factory.mktemp("ce"), stack)


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory, stack: Path) -> Iterator[GatewayProcess]:
    """Two queue-workers, a short ack_wait, callbacks to loopback allowed."""
    yield from gateway(tmp_path_factory.mktemp("two"), stack, "--queue-workers", "2",
                       "--ack-wait", "0.6", EMNIST_CALLBACK_HOSTS="127.0.0.1")


# -- queue-workers: one call at a time each ------------------------------------------------------


def test_two_queue_workers_start_two_long_calls_together(two: GatewayProcess,
                                                         stack: Path) -> None:
    a, b = f"a-{uuid.uuid4()}", f"b-{uuid.uuid4()}"
    call_async(two.url, a, **{"await": b, "max": 10})
    call_async(two.url, b, **{"await": a, "max": 10})
    ends = wait_for(lambda: (first(stack, a, "end"), first(stack, b, "end")) if
                    first(stack, a, "end") and first(stack, b, "end") else None, 20,
                    "both calls to end")
    assert ends[0]["saw"] and ends[1]["saw"]  # each saw the other start while it ran
    starts = first(stack, a, "start"), first(stack, b, "start")
    assert abs(starts[0]["t"] - starts[1]["t"]) < 1.0


def test_ces_default_single_queue_worker_runs_calls_one_after_the_other(
        ce: GatewayProcess, stack: Path) -> None:
    """With no flags (CE's one queue-worker), b waits for a: a's bounded wait for b to start
    runs out, and b starts only after a ended."""
    a, b = f"a-{uuid.uuid4()}", f"b-{uuid.uuid4()}"
    call_async(ce.url, a, **{"await": b, "max": 1.5})
    call_async(ce.url, b)
    b_end = wait_for(lambda: first(stack, b, "end"), 20, "b to run")
    a_end = first(stack, a, "end")
    assert a_end is not None and a_end["saw"] is False
    assert first(stack, b, "start")["t"] >= a_end["t"] and b_end["delivery"] == 1


# -- at-least-once: redelivery after ack_wait ----------------------------------------------------


def test_a_call_outlasting_ack_wait_is_delivered_again_while_the_first_runs(
        two: GatewayProcess, stack: Path) -> None:
    """ack_wait 0.6s: the held call is delivered to the idle queue-worker while its first
    delivery still runs, with the same request (X-Call-Id, query); each delivery posts its
    own callback, as CE's queue-worker does."""
    receiver = CallbackReceiver()
    tag = f"held-{uuid.uuid4()}"
    try:
        call_id = call_async(two.url, tag, headers={"X-Callback-Url": receiver.url},
                             hold=f"{tag}.go", max=20)
        second = wait_for(lambda: first(stack, tag, "start", 2), 10, "a second delivery")
        assert first(stack, tag, "end") is None  # the first delivery is still running
        assert {e["call"] for e in events(stack, tag)} == {call_id}
        assert second["t"] > first(stack, tag, "start")["t"]
        release(stack, f"{tag}.go")
        got: dict[int, dict[str, str]] = {}

        def callbacks() -> bool:
            while not receiver.received.empty():
                headers, body = receiver.received.get()
                got[json.loads(body)["delivery"]] = headers
            return {1, 2} <= set(got)

        wait_for(callbacks, 20, "a callback from each delivery")
        for headers in (got[1], got[2]):
            assert headers["X-Call-Id"] == call_id and headers["X-Function-Status"] == "200"
            assert headers["X-Function-Name"] == "probe"
    finally:
        release(stack, f"{tag}.go")
        receiver.close()


# -- the gateway's upstream timeout --------------------------------------------------------------


@pytest.fixture(scope="module")
def cut(tmp_path_factory: pytest.TempPathFactory, stack: Path) -> Iterator[GatewayProcess]:
    yield from gateway(tmp_path_factory.mktemp("cut"), stack, "--upstream-timeout", "0.5",
                       EMNIST_CALLBACK_HOSTS="127.0.0.1")


def test_the_upstream_timeout_gives_502_while_the_function_goes_on(cut: GatewayProcess,
                                                                     stack: Path) -> None:
    tag = f"cut-{uuid.uuid4()}"
    started = time.monotonic()
    r = requests.get(f"{cut.url}/function/probe", params={"tag": tag, "hold": f"{tag}.go"},
                     timeout=30)
    assert r.status_code == 502 and "upstream timeout" in r.text
    assert time.monotonic() - started < 10  # not the function's own 60s
    assert first(stack, tag, "start") and first(stack, tag, "end") is None
    release(stack, f"{tag}.go")
    wait_for(lambda: first(stack, tag, "end"), 10, "the cut call to finish on its own")


def test_the_upstream_timeout_cuts_a_queued_call_too(cut: GatewayProcess, stack: Path) -> None:
    receiver = CallbackReceiver()
    tag = f"cutq-{uuid.uuid4()}"
    try:
        call_async(cut.url, tag, headers={"X-Callback-Url": receiver.url}, hold=f"{tag}.go")
        headers, _ = receiver.received.get(timeout=20)
        assert headers["X-Function-Status"] == "502"
        assert first(stack, tag, "start") and first(stack, tag, "end") is None
    finally:
        release(stack, f"{tag}.go")
        receiver.close()
    wait_for(lambda: first(stack, tag, "end"), 10, "the cut call to finish on its own")


# -- named queues (com.openfaas.queue) -----------------------------------------------------------


@pytest.fixture(scope="module")
def named(tmp_path_factory: pytest.TempPathFactory, stack: Path) -> Iterator[GatewayProcess]:
    yield from gateway(tmp_path_factory.mktemp("named"), stack, "--queue", "slow=1")


def test_a_named_queue_does_not_wait_behind_the_default_one(named: GatewayProcess,
                                                            stack: Path) -> None:
    busy, queued, other = (f"{t}-{uuid.uuid4()}" for t in ("busy", "queued", "other"))
    try:
        call_async(named.url, busy, hold=f"{busy}.go")
        wait_for(lambda: first(stack, busy, "start"), 10, "the default queue's call to start")
        call_async(named.url, queued)  # behind `busy` on the default queue
        call_async(named.url, other, fn="named")  # annotated com.openfaas.queue: slow
        wait_for(lambda: first(stack, other, "end"), 10, "the named queue's call to run")
        assert first(stack, busy, "end") is None and not events(stack, queued)
    finally:
        release(stack, f"{busy}.go")
    wait_for(lambda: first(stack, queued, "end"), 20, "the default queue to go on")


def test_a_queue_nobody_serves_is_refused(named: GatewayProcess) -> None:
    r = requests.post(f"{named.url}/async-function/orphan", timeout=10)
    assert r.status_code == 500 and "--queue nobody=N" in r.text


# -- requests as the real gateway sends them -----------------------------------------------------
# gateway/plugin/external.go (GetReplicas, SetReplicas) through Go's http.Client with
# DisableKeepAlives: request line, Host, User-Agent, Content-Length, the request's headers
# (Authorization from the basic-auth injector), then the transport's Accept-Encoding and
# Connection; no Content-Type. The provider is addressed by a name (functions_provider_url).

GET_REPLICAS = (
    b"GET /system/function/probe?namespace=openfaas-fn HTTP/1.1\r\n"
    b"Host: emnist-provider:8085\r\n"
    b"User-Agent: Go-http-client/1.1\r\n"
    b"Authorization: Basic YWRtaW46Z3ctc2VjcmV0\r\n"
    b"Accept-Encoding: gzip\r\n"
    b"Connection: close\r\n"
    b"\r\n")
SET_REPLICAS = (
    b"POST /system/scale-function/probe?namespace=openfaas-fn HTTP/1.1\r\n"
    b"Host: emnist-provider:8085\r\n"
    b"User-Agent: Go-http-client/1.1\r\n"
    b"Content-Length: 36\r\n"
    b"Authorization: Basic YWRtaW46Z3ctc2VjcmV0\r\n"
    b"Accept-Encoding: gzip\r\n"
    b"Connection: close\r\n"
    b"\r\n"
    b'{"serviceName":"probe","replicas":1}')


def send(url: str, request: bytes) -> tuple[int, bytes]:
    """``request``'s exact bytes over a socket; (status, body) of the answer."""
    host, port = url.rsplit("/", 1)[-1].rsplit(":", 1)
    with socket.create_connection((host, int(port)), timeout=30) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), body


def with_header(request: bytes, line: bytes) -> bytes:
    """``request`` with one more header line after Host (a browser's, say)."""
    first_line, rest = request.split(b"\r\n", 1)
    host, rest = rest.split(b"\r\n", 1)
    return b"\r\n".join([first_line, host, line, rest])


@dataclass
class Up:
    url: str
    home: Path  # EMNIST_HOME: where `emnist up` records the gateway it started


@pytest.fixture(scope="module")
def up(tmp_path_factory: pytest.TempPathFactory, stack: Path) -> Iterator[Up]:
    """`emnist up --allowed-host emnist-provider` with a password, on a free port."""
    home = tmp_path_factory.mktemp("up-home")
    url = f"http://127.0.0.1:{free_port()}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("OPENFAAS_", "EMNIST_G"))}
    env.update(EMNIST_HOME=str(home), OPENFAAS_PASSWORD=PASSWORD)
    cli = [sys.executable, "-m", "emnist.cli", "--gateway", url]
    r = subprocess.run([*cli, "up", "--stack", str(stack), "--store",
                        "memcached://127.0.0.1:11211", "--allowed-host", "emnist-provider"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    try:
        assert r.returncode == 0, r.stdout + r.stderr
        yield Up(url, home)
    finally:
        subprocess.run([*cli, "down"], cwd=ROOT, env=env, capture_output=True, timeout=60)


def replicas(up: Up) -> int:
    return requests.get(f"{up.url}/system/function/probe", auth=("admin", PASSWORD),
                        timeout=10).json()["replicas"]


def test_up_configures_its_queue_as_operators_are_told(up: Up) -> None:
    """A queue-worker per replica a function may have (every worker of a run at once), the
    upstream timeout above the stack's exec_timeout (60s), ack_wait above that."""
    pid = json.loads((up.home / "gateway.json").read_text())["pid"]
    args = [a.decode() for a in Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")]
    value = {flag: args[args.index(flag) + 1] for flag in
             ("--queue-workers", "--upstream-timeout", "--ack-wait", "--allowed-host")}
    assert value["--queue-workers"] == "64" and value["--allowed-host"] == "emnist-provider"
    assert 60 < float(value["--upstream-timeout"]) < float(value["--ack-wait"])


def test_the_real_gateways_scale_from_zero_requests_are_answered(up: Up) -> None:
    requests.post(f"{up.url}/system/scale-function/probe", json={"replicas": 0},
                  auth=("admin", PASSWORD), timeout=60).raise_for_status()
    status, body = send(up.url, GET_REPLICAS)
    assert status == 200 and json.loads(body)["availableReplicas"] == 0
    status, body = send(up.url, SET_REPLICAS)
    assert status == 202, body
    assert replicas(up) == 1


def test_browser_shaped_scale_requests_are_still_refused(up: Up, ce: GatewayProcess) -> None:
    before = replicas(up)
    body = SET_REPLICAS.replace(b'"replicas":1', b'"replicas":3')
    for line, code in ((b"Origin: http://evil.example", 403),
                       (b"Sec-Fetch-Site: cross-site", 403),
                       (b"Sec-Fetch-Site: same-origin", 415),  # a page never sends it untyped
                       (b"Content-Type: text/plain", 415),
                       (b"Content-Type: application/x-www-form-urlencoded", 415)):
        status, text = send(up.url, with_header(body, line))
        assert status == code, (line, text)
    assert replicas(up) == before
    # a provider not told the name refuses it (DNS rebinding guard): hence --allowed-host
    assert send(ce.url, GET_REPLICAS)[0] == 403
    assert raw(ce.url, "GET", "/healthz")[0] == 200
