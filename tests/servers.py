"""Real servers for tests: free loopback ports, a memcached of the test's own, and the local
gateway running a stack file on a free port."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from emnist.cluster.local import queue_args
from emnist.gateway.client import GatewayClient

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return
        except OSError:
            assert time.monotonic() < deadline, f"nothing answers on 127.0.0.1:{port}"
            time.sleep(0.02)


def start_memcached(port: int, memory_mb: int = 64) -> subprocess.Popen:
    args = [shutil.which("memcached"), "-l", "127.0.0.1", "-p", str(port), "-m", str(memory_mb)]
    proc = subprocess.Popen(args + (["-u", "root"] if os.geteuid() == 0 else []))
    wait_port(port)
    return proc


@contextmanager
def local_gateway(tmp: Path, env: Mapping[str, str], stack: Path = ROOT / "emnist.yml",
                  timeout: float = 90) -> Iterator[GatewayClient]:
    """``python -m emnist.gateway.server`` on a free port, its queues set as `emnist up` sets
    them (every worker of a run at once; ``env`` may give EMNIST_GATEWAY_QUEUE_WORKERS etc.
    instead); stopped (with its replicas) after."""
    ready = tmp / "ready.json"
    full_env = {**os.environ, **env}
    proc = subprocess.Popen([sys.executable, "-m", "emnist.gateway.server", "--stack",
                             str(stack), "--port", "0", "--ready-file", str(ready),
                             *queue_args(stack, full_env)],
                            env=full_env, cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout
        while not (ready.exists() and ready.stat().st_size):
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.monotonic() < deadline, "gateway not ready"
            time.sleep(0.05)
        yield GatewayClient(json.loads(ready.read_text())["url"])
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(30)


def start_together(procs: list[subprocess.Popen], timeout: float = 120) -> None:
    """Processes that print "ready" then wait for a line on stdin: release them at once,
    then require that each exits 0."""
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    for p in procs:
        assert p.wait(timeout) == 0


def run_to_result(gw: GatewayClient, kv, config: Mapping, timeout: float = 240):
    """emnist-setup with ``config``, then wait for worker 0's result: (run id, its store)."""
    from emnist.store import ParameterStore

    r = gw.invoke("emnist-setup", dict(config), check=False)
    assert r.status_code == 200, r.text
    run_id = r.json()["run_id"]
    store = ParameterStore(kv, run_id)
    deadline = time.monotonic() + timeout
    while store.get_doc("result:0") is None:
        assert time.monotonic() < deadline, "the run did not finish"
        time.sleep(0.05)
    store.attach()
    return run_id, store
