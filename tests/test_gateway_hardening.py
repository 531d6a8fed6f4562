"""The local gateway against three attacks from issue 19, each on the real gateway process over
loopback HTTP: slow clients holding every connection (slowloris), X-Callback-Url naming hosts
the operator did not allow (every spelling of loopback, a name with a bad address, a name that
changes address after the call was queued), and large async bodies kept in the gateway's
memory while they wait in the queue."""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import resource
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from tests.gateway_tools import CallbackReceiver, GatewayProcess, wait_for, write_stack

ECHO = """
def handle(event, context):
    return {"statusCode": 200, "body": {"got": event.body.decode("latin-1")[:100]}}
"""
# Waits (bounded) until the test creates the release file, then records the body's checksum:
# calls queued behind it stay queued as long as the test needs.
HOLD = """
import hashlib, os, time
from pathlib import Path

def handle(event, context):
    release = Path(os.environ["HOLD_RELEASE"])
    deadline = time.monotonic() + 120
    while not release.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    digest = hashlib.sha256(event.body).hexdigest()
    (Path(os.environ["HOLD_OUT"]) / digest).write_text(str(len(event.body)))
    return {"statusCode": 200, "body": digest}
"""


@pytest.fixture()
def stack(tmp_path: Path) -> Path:
    (tmp_path / "out").mkdir()
    return write_stack(tmp_path, {
        "echo": (ECHO, ""),
        "hold": (HOLD, f"""
            environment:
              HOLD_RELEASE: {tmp_path / "release"}
              HOLD_OUT: {tmp_path / "out"}
              exec_timeout: 150s
        """),
    })


@pytest.fixture()
def start(tmp_path: Path, stack: Path) -> Iterator[Callable[..., GatewayProcess]]:
    """``start(*args, env=...)``: the gateway (one queue worker) on the test's stack, stopped
    at the end. Settings a test varies go through the environment where the old gateway
    would still start (it ignores unknown variables), so a test fails on what the gateway
    does, not on an unknown flag."""
    procs: list[GatewayProcess] = []

    def run(*args: str, env: dict[str, str] | None = None) -> GatewayProcess:
        home = tmp_path / f"gw{len(procs)}"
        home.mkdir()
        procs.append(GatewayProcess(home, "--queue-workers", "1", *args, env=env, stack=stack))
        return procs[-1]

    yield run
    for proc in procs:
        proc.stop()


def port_of(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


# -- slow clients ---------------------------------------------------------------------------


def raise_nofile() -> int:
    """Lift this process's soft open-file limit to the hard one (hundreds of sockets)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


class Slowloris(threading.Thread):
    """``count`` loopback connections that each send one more header line every ``interval``
    seconds and never finish their request, reconnecting when the server closes one, for
    ``seconds`` (and at most ``20 * count`` connections in all); then it closes them."""

    def __init__(self, port: int, count: int, seconds: float, interval: float = 1.0) -> None:
        super().__init__(daemon=True)
        self.port, self.count, self.seconds, self.interval = port, count, seconds, interval
        self.lifetimes: list[float] = []  # connections the server closed: how long they lived
        self.open_ages: list[float] = []  # connections still open at the end: their age
        self.connects = 0
        self.ready = threading.Event()

    def _connect(self, conns: dict[socket.socket, float]) -> None:
        while len(conns) < self.count and self.connects < 20 * self.count:
            self.connects += 1
            try:
                s = socket.create_connection(("127.0.0.1", self.port), timeout=2)
                s.sendall(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n")
            except OSError:
                continue
            s.setblocking(False)
            conns[s] = time.monotonic()

    def run(self) -> None:
        conns: dict[socket.socket, float] = {}
        end = time.monotonic() + self.seconds
        try:
            self._connect(conns)
            self.ready.set()
            while time.monotonic() < end:
                tick = time.monotonic()
                for s, born in list(conns.items()):
                    if self._closed_by_server(s):
                        self.lifetimes.append(time.monotonic() - born)
                        s.close()
                        del conns[s]
                self._connect(conns)
                time.sleep(max(0.0, self.interval - (time.monotonic() - tick)))
            now = time.monotonic()
            self.open_ages = [now - born for born in conns.values()]
        finally:
            self.ready.set()
            for s in conns:
                s.close()

    @staticmethod
    def _closed_by_server(s: socket.socket) -> bool:
        try:
            s.recv(4096)  # an answer (408) or EOF: the server is done with this one
            return True
        except BlockingIOError:
            pass
        except OSError:
            return True
        try:
            s.send(b"X-Slow: 1\r\n")
        except BlockingIOError:
            pass
        except OSError:
            return True
        return False


def probe(url: str, path: str) -> tuple[int | str, float]:
    """One well-behaved request on a fresh connection: (status or error, seconds)."""
    start = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port_of(url), timeout=5)
    try:
        conn.request("GET" if path != "/function/echo" else "POST", path, body=b"hi")
        resp = conn.getresponse()
        resp.read()
        status = resp.status
    except (OSError, http.client.HTTPException) as e:
        status = repr(e)
    finally:
        conn.close()
    return status, time.monotonic() - start


def probe_during(gw: GatewayProcess, load: Slowloris, every: float = 0.25
                 ) -> tuple[list[tuple[str, int | str, float]], list[int]]:
    """Run ``load``; meanwhile probe /healthz, /function and /system in turn, and count the
    gateway's open file descriptors. Returns the probes and the descriptor counts."""
    paths = ["/healthz", "/function/echo", "/system/functions"]
    results: list[tuple[str, int | str, float]] = []
    fds: list[int] = []
    load.start()
    assert load.ready.wait(60), "the slow clients did not connect"
    while load.is_alive():
        path = paths[len(results) % len(paths)]
        status, seconds = probe(gw.url, path)
        results.append((path, status, seconds))
        fds.append(len(os.listdir(f"/proc/{gw.proc.pid}/fd")))
        time.sleep(every)
    load.join()
    return results, fds


def test_slow_clients_are_cut_off_and_others_still_served(
        start: Callable[..., GatewayProcess]) -> None:
    """400 connections trickling header lines (more than the old limit of 256): every probe of
    /healthz, /function and /system is answered 200 within 3 s, and each slow connection is
    closed by the server soon after the request deadline (2 s) passes."""
    assert raise_nofile() > 600
    gateway = start(env={"EMNIST_GATEWAY_REQUEST_TIMEOUT": "2"})
    load = Slowloris(port_of(gateway.url), 400, seconds=10)
    results, _ = probe_during(gateway, load)
    failed = [r for r in results if r[1] != 200 or r[2] > 3.0]
    assert len(results) >= 10 and not failed, f"{len(failed)} of {len(results)}: {failed[:5]}"
    assert len(load.lifetimes) >= 400, "the server did not close the slow connections"
    assert max(load.lifetimes + load.open_ages) < 7.0  # deadline + maintenance + detection


def test_at_the_connection_limit_the_slowest_are_closed(
        start: Callable[..., GatewayProcess]) -> None:
    """300 slow connections against a limit of 128 (deadline 60 s: it plays no part): the
    server keeps accepting, closing connections whose request stays incomplete, so every probe
    is still answered and the gateway's descriptors stay near the limit."""
    assert raise_nofile() > 600
    gateway = start(env={"EMNIST_GATEWAY_MAX_CONNECTIONS": "128"})
    baseline = len(os.listdir(f"/proc/{gateway.proc.pid}/fd"))
    load = Slowloris(port_of(gateway.url), 300, seconds=8)
    results, fds = probe_during(gateway, load)
    failed = [r for r in results if r[1] != 200 or r[2] > 3.0]
    assert len(results) >= 5 and not failed, f"{len(failed)} of {len(results)}: {failed[:5]}"
    assert max(fds) <= baseline + 128 + 16, (baseline, max(fds))
    assert load.lifetimes, "no slow connection was closed to make room"


# -- callbacks ------------------------------------------------------------------------------


def invocations(gw: GatewayProcess, name: str) -> int:
    r = requests.get(f"{gw.url}/system/function/{name}", timeout=10)
    return int(r.json()["invocationCount"])


def drain(gw: GatewayProcess) -> None:
    """Wait until the (one-worker, first-in first-out) queue has run everything queued so far:
    queue a call to echo and wait for it to have run."""
    before = invocations(gw, "echo")
    assert requests.post(f"{gw.url}/async-function/echo", timeout=10).status_code == 202
    wait_for(lambda: invocations(gw, "echo") > before, 30, "the queue to drain")


LOOPBACK_SPELLINGS = ["2130706433", "0x7f000001", "0177.0.0.1", "127.1", "[::1]",
                      "[::ffff:127.0.0.1]", "0.0.0.0", "localhost", "127.0.0.1"]


def test_callbacks_to_any_spelling_of_loopback_are_refused_by_default(
        start: Callable[..., GatewayProcess]) -> None:
    """With no --callback-host, every spelling of a loopback address (to a listening recorder,
    to memcached's and Redis's ports, to the gateway itself) is refused with 400, and nothing
    is POSTed."""
    gateway = start()
    receiver = CallbackReceiver()
    try:
        rport = port_of(receiver.url.rsplit("/", 1)[0])
        urls = [f"http://{h}:{rport}/cb" for h in LOOPBACK_SPELLINGS]
        urls += ["http://127.0.0.1:11211/", "http://127.0.0.1:6379/",
                 f"http://127.0.0.1:{port_of(gateway.url)}/system/functions"]
        for url in urls:
            r = requests.post(f"{gateway.url}/async-function/echo", data=b"secret",
                              headers={"X-Callback-Url": url}, timeout=10)
            assert r.status_code == 400, (url, r.status_code)
            assert r.text.startswith("X-Callback-Url: host not allowed"), (url, r.text)
        drain(gateway)
        assert receiver.received.empty()
    finally:
        receiver.close()


def test_an_allowed_callback_host_gets_the_answer_and_nothing_else(
        start: Callable[..., GatewayProcess]) -> None:
    """EMNIST_CALLBACK_HOSTS=127.0.0.1:<recorder>: the recorder gets the call's answer (the
    feature works), while another port and other addresses stay refused."""
    receiver = CallbackReceiver()
    rport = port_of(receiver.url.rsplit("/", 1)[0])
    try:
        gw = start(env={"EMNIST_CALLBACK_HOSTS": f"127.0.0.1:{rport}"})
        for url in (f"http://127.0.0.1:{port_of(gw.url)}/healthz", "http://127.0.0.1:11211/",
                    f"http://[::1]:{rport}/cb", f"http://10.255.255.1:{rport}/cb"):
            r = requests.post(f"{gw.url}/async-function/echo",
                              headers={"X-Callback-Url": url}, timeout=10)
            assert r.status_code == 400 and "host not allowed" in r.text, (url, r.text)
        for url in (receiver.url, f"http://2130706433:{rport}/cb"):  # the same address
            r = requests.post(f"{gw.url}/async-function/echo", data=b"ping",
                              headers={"X-Callback-Url": url}, timeout=10)
            assert r.status_code == 202, (url, r.text)
            headers, body = receiver.received.get(timeout=20)
            assert headers["X-Function-Status"] == "200"
            assert headers["X-Call-Id"] == r.headers["X-Call-Id"]
            assert json.loads(body) == {"got": "ping"}
        drain(gw)
        assert receiver.received.empty()
    finally:
        receiver.close()


def test_callback_hosts_come_from_the_operator_only(tmp_path: Path, stack: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`emnist up` allows no callback host unless told (--callback-host adds one), and the
    gateway refuses to start on a malformed --callback-host instead of ignoring it."""
    from emnist.cli.stack import callback_env

    monkeypatch.delenv("EMNIST_CALLBACK_HOSTS", raising=False)
    assert callback_env() == {"EMNIST_CALLBACK_HOSTS": ""}
    assert callback_env(["127.0.0.1:9000", "cb.example"]) == {
        "EMNIST_CALLBACK_HOSTS": "127.0.0.1:9000,cb.example"}
    proc = subprocess.run(
        [sys.executable, "-m", "emnist.gateway.server", "--stack", str(stack), "--port", "0",
         "--state-dir", str(tmp_path / "state"), "--callback-host", "127.0.0.1:http"],
        capture_output=True, text=True, timeout=60, cwd=Path(__file__).resolve().parents[1])
    assert proc.returncode == 1
    assert "callback host '127.0.0.1:http' is not HOST[:PORT]" in proc.stderr
    assert "Traceback" not in proc.stderr


def _unshare_works() -> bool:
    if shutil.which("unshare") is None:
        return False
    try:
        return subprocess.run(["unshare", "--mount", "true"], timeout=10,
                              capture_output=True).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.fixture()
def own_hosts(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A hosts file the next GatewayProcess resolves with (its own mount namespace with the
    file bind-mounted on /etc/hosts); rewriting the file changes what the gateway resolves."""
    assert _unshare_works(), "needs unshare --mount (root, as the netns tests already are)"
    hosts = tmp_path / "hosts"
    wrapper = tmp_path / "python-in-ns"
    wrapper.write_text(
        "#!/bin/sh\n"
        f"exec unshare --mount sh -c 'mount --bind {hosts} /etc/hosts && exec \"$0\" \"$@\"' "
        f"{sys.executable} \"$@\"\n")
    wrapper.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(wrapper))  # GatewayProcess runs this
    return hosts


def test_callback_names_are_checked_on_every_address_and_again_at_delivery(
        start: Callable[..., GatewayProcess], tmp_path: Path, own_hosts: Path) -> None:
    """EMNIST_CALLBACK_HOSTS=127.0.0.1:<recorder>: a name resolving to that address and to
    another is refused; a name resolving to it is accepted, and when the name moves to another
    address before the queued call runs (DNS rebinding), nothing is POSTed."""
    receiver = CallbackReceiver()
    rport = port_of(receiver.url.rsplit("/", 1)[0])
    own_hosts.write_text("127.0.0.1 localhost\n127.0.0.1 cb-good cb-moving cb-mixed\n"
                         "10.255.255.1 cb-mixed\n")
    release = tmp_path / "release"
    try:
        gw = start(env={"EMNIST_CALLBACK_HOSTS": f"127.0.0.1:{rport}"})

        def queue(host: str, fn: str = "echo") -> requests.Response:
            return requests.post(f"{gw.url}/async-function/{fn}", data=b"x", timeout=10,
                                 headers={"X-Callback-Url": f"http://{host}:{rport}/cb"})

        r = queue("cb-mixed")
        assert r.status_code == 400 and "host not allowed" in r.text, r.text
        assert queue("cb-good").status_code == 202
        headers, _ = receiver.received.get(timeout=20)
        assert headers["X-Function-Name"] == "echo"
        assert queue("cb-moving", "hold").status_code == 202  # runs once released
        own_hosts.write_text("127.0.0.1 localhost\n10.255.255.1 cb-moving\n")
        release.touch()
        wait_for(lambda: "callback refused" in gw.log_path.read_text(), 30,
                 "the delivery-time refusal in the gateway's log")
        drain(gw)
        assert receiver.received.empty()
    finally:
        receiver.close()


# -- queued bodies --------------------------------------------------------------------------


def rss(pid: int) -> int:
    """Resident memory of ``pid`` in bytes (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def test_queued_async_bodies_do_not_stay_in_the_gateways_memory(
        start: Callable[..., GatewayProcess], tmp_path: Path) -> None:
    """24 bodies of 8 MiB queued behind a call that blocks: the gateway's resident memory grows
    by far less than the 192 MiB queued, and once released every call reaches the function
    with its exact body."""
    gateway = start()
    url = f"{gateway.url}/async-function/hold"
    assert requests.post(url, data=b"first", timeout=10).status_code == 202
    wait_for(lambda: invocations(gateway, "hold") == 1, 30, "the blocking call to start")
    before = rss(gateway.proc.pid)
    digests = {hashlib.sha256(b"first").hexdigest()}
    size, count, peak = 8 << 20, 24, before
    with requests.Session() as http:
        for _ in range(count):
            body = os.urandom(size)
            digests.add(hashlib.sha256(body).hexdigest())
            r = http.post(url, data=body, timeout=60)
            assert r.status_code == 202, r.text
            peak = max(peak, rss(gateway.proc.pid))
    grown = peak - before
    assert grown < 48 << 20, f"the gateway grew by {grown >> 20} MiB for {count * size >> 20}"
    (tmp_path / "release").touch()
    out = tmp_path / "out"
    wait_for(lambda: len(list(out.iterdir())) >= count + 1, 120, "every queued call to run")
    assert {p.name for p in out.iterdir()} == digests
    assert {p.read_text() for p in out.iterdir()} == {str(size), str(len(b"first"))}
