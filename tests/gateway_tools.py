"""Helpers for the gateway tests: the real local gateway as a process on a free port, stack
files written for a test, and raw HTTP requests (status line, reason phrase and all)."""

from __future__ import annotations

import http.client
import json
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = Path(__file__).parent / "fixtures" / "gateway"
STACK = FIXTURES / "stack.yml"


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "condition") -> Any:
    """Poll ``predicate`` until it returns something truthy, failing after ``timeout``."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


def pid_alive(pid: int) -> bool:
    """True if ``pid`` runs and is not a zombie (Linux /proc, else kill(0))."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
    except OSError:
        try:
            os.kill(pid, 0)
            return True
        except ProcessLookupError:
            return False


def children(pid: int) -> set[int]:
    """Direct child pids of ``pid`` (Linux /proc scan)."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                out.add(int(entry.name))
    return out


class GatewayProcess:
    """``python -m emnist.gateway.server`` started on port 0 for a test."""

    def __init__(self, tmp: Path, *args: str, env: dict[str, str] | None = None,
                 stack: Path = STACK) -> None:
        self.ready_file = tmp / "ready.json"
        self.log_path = tmp / "gateway.log"
        full_env = {k: v for k, v in os.environ.items()
                    if k not in ("OPENFAAS_PASSWORD", "OPENFAAS_URL")}
        full_env.update(env or {})
        self.log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "emnist.gateway.server", "--stack", str(stack),
             "--port", "0", "--ready-file", str(self.ready_file),
             "--state-dir", str(tmp / "state"), *args],
            cwd=ROOT, env=full_env, stdout=self.log, stderr=subprocess.STDOUT,
        )
        try:
            wait_for(lambda: self.ready_file.exists() or self.proc.poll() is not None,
                     timeout=30, what="gateway ready file")
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited: {self.log_path.read_text()}")
            info = json.loads(self.ready_file.read_text())
        except BaseException:
            self.stop()
            raise
        self.url: str = info["url"]
        assert info["pid"] == self.proc.pid

    def replica_pids(self) -> set[int]:
        return children(self.proc.pid)

    def stop(self, sig: int = signal.SIGTERM) -> set[int]:
        """Stop the gateway; returns the replica pids it had (all must be gone after)."""
        pids = self.replica_pids() if self.proc.poll() is None else set()
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()
        return pids




def write_stack(tmp: Path, functions: Mapping[str, tuple[str, str]]) -> Path:
    """A stack file in ``tmp`` with one function per entry: name -> (handler.py source, extra
    YAML lines for the function, e.g. ``environment:`` / ``labels:``)."""
    lines = ["version: 1.0", "provider:", "  name: openfaas", "functions:"]
    for name, (code, extra) in functions.items():
        (tmp / name).mkdir(parents=True, exist_ok=True)
        (tmp / name / "handler.py").write_text(textwrap.dedent(code))
        lines += [f"  {name}:", "    lang: python3-http", f"    handler: ./{name}",
                  f"    image: test/{name}:1"]
        lines += ["    " + ln for ln in textwrap.dedent(extra).splitlines() if ln.strip()]
    path = tmp / "stack.yml"
    path.write_text("\n".join(lines) + "\n")
    return path


def raw(url: str, method: str, path: str, body: bytes | None = None,
        headers: Mapping[str, str] | None = None, timeout: float = 30
        ) -> tuple[int, str, dict[str, str], bytes]:
    """One request with http.client: (status, reason phrase, headers, body)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=dict(headers or {}))
        resp = conn.getresponse()
        return resp.status, resp.reason, dict(resp.getheaders()), resp.read()
    finally:
        conn.close()


class CallbackReceiver:
    """A tiny HTTP server on port 0 that records every POST it gets."""

    def __init__(self) -> None:
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        received: queue.Queue[tuple[dict[str, str], bytes]] = queue.Queue()
        self.received = received

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                received.put((dict(self.headers.items()), body))
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/cb"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def replica_urls(gw: GatewayProcess, function: str) -> list[str]:
    """URLs of ``function``'s replica processes, read from their command lines (Linux /proc)."""
    urls = []
    for pid in children(gw.proc.pid):
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        except OSError:
            continue
        hostname = next((e[9:].decode() for e in env if e.startswith(b"HOSTNAME=")), "")
        if b"--port" in args and hostname.startswith(function + "-"):
            urls.append(f"http://127.0.0.1:{int(args[args.index(b'--port') + 1])}")
    return urls
