"""`emnist bench gateway`: what the local gateway adds to a synchronous call.

One run starts the local gateway with a no-op function (one replica), then times N calls made
straight to that replica and N calls through ``/function/noop``, interleaved in rounds so both
paths see the same machine load. Both use one keep-alive connection with TCP_NODELAY, so the
difference is the gateway's own cost (its HTTP server, routing, the proxy hop).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

__all__ = ["COLUMNS", "invoke_overhead", "local_noop_gateway", "run"]

COLUMNS = [("path", "path", ""), ("calls", "calls", ",d"), ("p50_ms", "p50 ms", ".3f"),
           ("p99_ms", "p99 ms", ".3f"), ("mean_ms", "mean ms", ".3f")]

NOOP_HANDLER = 'def handle(event, context):\n    return {"statusCode": 200, "body": "ok"}\n'
NOOP_STACK = """version: 1.0
provider:
  name: openfaas
functions:
  noop:
    lang: python3-http
    handler: ./noop
    image: emnist/noop:bench
"""


class _Conn:
    """One keep-alive HTTP/1.1 connection with Nagle off (what a fast client does)."""

    def __init__(self, url: str) -> None:
        parts = urlsplit(url)
        self.path = parts.path or "/"
        self.conn = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port or 80,
                                               timeout=30)
        self.conn.connect()
        self.conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def call(self, body: bytes) -> float:
        start = time.perf_counter()
        self.conn.request("POST", self.path, body=body,
                          headers={"Content-Type": "text/plain"})
        resp = self.conn.getresponse()
        resp.read()
        elapsed = time.perf_counter() - start
        if resp.status != 200:
            raise RuntimeError(f"{self.path} answered {resp.status}")
        return elapsed

    def close(self) -> None:
        self.conn.close()


def _quantile(sorted_values: list[float], q: float) -> float:
    idx = min(len(sorted_values) - 1, max(0, round(q * (len(sorted_values) - 1))))
    return sorted_values[idx]


def _summary(path: str, times: list[float]) -> dict[str, Any]:
    s = sorted(times)
    return {"path": path, "calls": len(s), "p50_ms": _quantile(s, 0.5) * 1e3,
            "p99_ms": _quantile(s, 0.99) * 1e3, "mean_ms": sum(s) / len(s) * 1e3}


def invoke_overhead(gateway_url: str, direct_url: str, *, calls: int = 2000, rounds: int = 20,
                    warmup: int = 200, body: bytes = b"x") -> list[dict[str, Any]]:
    """Time ``calls`` sync calls on each path, interleaved in ``rounds``; one record per path
    plus an ``overhead`` record (gateway minus direct, per statistic)."""
    direct, through = _Conn(direct_url), _Conn(gateway_url)
    try:
        for _ in range(warmup):
            direct.call(body)
            through.call(body)
        times: dict[str, list[float]] = {"direct": [], "gateway": []}
        per_round = max(1, calls // max(1, rounds))
        for r in range(max(1, rounds)):
            order = [("direct", direct), ("gateway", through)]
            if r % 2:
                order.reverse()  # neither path always runs first in a round
            for name, conn in order:
                times[name].extend(conn.call(body) for _ in range(per_round))
    finally:
        direct.close()
        through.close()
    d, g = _summary("direct", times["direct"]), _summary("gateway", times["gateway"])
    overhead = {"path": "overhead", "calls": g["calls"]}
    overhead.update({k: g[k] - d[k] for k in ("p50_ms", "p99_ms", "mean_ms")})
    return [d, g, overhead]


def _replica_port(gateway_pid: int) -> int:
    """The --port of the gateway's (only) replica process, read from /proc (Linux)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            if int(stat.rsplit(")", 1)[1].split()[1]) != gateway_pid:
                continue
            args = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"emnist.gateway.watchdog" in args and b"--port" in args:
            return int(args[args.index(b"--port") + 1])
    raise RuntimeError("no replica process found under the gateway")


@contextmanager
def local_noop_gateway(timeout: float = 60.0) -> Iterator[tuple[str, str]]:
    """A local gateway running only ``noop`` (one replica): yields (gateway URL, replica URL)."""
    with tempfile.TemporaryDirectory(prefix="emnist-bench-gw-") as tmp:
        root = Path(tmp)
        (root / "noop").mkdir()
        (root / "noop" / "handler.py").write_text(NOOP_HANDLER)
        (root / "stack.yml").write_text(NOOP_STACK)
        with local_gateway(root / "stack.yml", root, timeout=timeout) as (url, pid):
            yield url + "/function/noop", f"http://127.0.0.1:{_replica_port(pid)}/"


@contextmanager
def local_gateway(stack: Path, state: Path, env: dict[str, str] | None = None,
                  timeout: float = 60.0) -> Iterator[tuple[str, int]]:
    """``emnist.gateway.server`` on a free port for ``stack`` (its state under ``state``,
    ``env`` added to this environment): yields (gateway URL, its pid); stopped after."""
    ready = state / "ready.json"
    full = {k: v for k, v in os.environ.items() if k not in ("OPENFAAS_PASSWORD",)}
    full.update(env or {})
    proc = subprocess.Popen(
        [sys.executable, "-m", "emnist.gateway.server", "--stack", str(stack),
         "--port", "0", "--ready-file", str(ready), "--state-dir", str(state / "state")],
        env=full, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
        cwd=stack.parent)
    try:
        deadline = time.monotonic() + timeout
        while not (ready.exists() and ready.stat().st_size):
            if proc.poll() is not None:
                err = proc.stderr.read().decode(errors="replace") if proc.stderr else ""
                raise RuntimeError(f"the gateway exited with {proc.returncode}: {err[-500:]}")
            if time.monotonic() > deadline:
                raise RuntimeError("the gateway did not become ready")
            time.sleep(0.05)
        yield json.loads(ready.read_text())["url"], proc.pid
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def run(calls: int = 2000, rounds: int = 20, warmup: int = 200) -> list[dict[str, Any]]:
    """Start a no-op local gateway and measure both paths side by side (records for a table)."""
    with local_noop_gateway() as (gateway_url, direct_url):
        return invoke_overhead(gateway_url, direct_url, calls=calls, rounds=rounds,
                               warmup=warmup)


if __name__ == "__main__":
    for record in run(*(int(a) for a in sys.argv[1:4])):
        print(json.dumps(record))
