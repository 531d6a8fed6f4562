"""A network namespace with only loopback, for programs that bind every interface.

The real of-watchdog listens on all interfaces and on a fixed metrics port (8081), so each one
runs in a namespace of its own (``ip netns``), with whatever it talks to (memcached, the local
gateway) started inside too. Tests reach it through a :class:`Probe`: a small Python process in
the same namespace that performs HTTP requests read as JSON lines from its stdin.
"""

from __future__ import annotations

import base64
import json
import os
import secrets
import signal
import subprocess
import sys
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

PROBE = textwrap.dedent("""
    import base64, http.client, json, sys
    conns = {}
    for line in sys.stdin:
        req = json.loads(line)
        key = (req["host"], req["port"])
        for attempt in (1, 2):
            conn = conns.get(key) or http.client.HTTPConnection(*key, timeout=req["timeout"])
            conns[key] = conn
            try:
                conn.request(req["method"], req["path"], base64.b64decode(req["body"]),
                             req["headers"])
                resp = conn.getresponse()
                body = resp.read()
                out = {"status": resp.status, "headers": dict(resp.getheaders()),
                       "body": base64.b64encode(body).decode()}
                break
            except (ConnectionError, http.client.HTTPException, OSError) as e:
                conn.close()
                conns.pop(key, None)
                out = {"status": 0, "error": type(e).__name__ + ": " + str(e)}
        sys.stdout.write(json.dumps(out) + "\\n")
        sys.stdout.flush()
""")


class Netns:
    """``with Netns() as ns: ns.popen([...])``: a fresh namespace, removed with what ran in it."""

    def __init__(self) -> None:
        self.name = "emnist-" + secrets.token_hex(4)
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> Netns:
        subprocess.run(["ip", "netns", "add", self.name], check=True)
        subprocess.run(["ip", "netns", "exec", self.name, "ip", "link", "set", "lo", "up"],
                       check=True)
        return self

    def popen(self, args: Sequence[str], *, env: Mapping[str, str] | None = None,
              cwd: str | os.PathLike[str] | None = None, **kw: Any) -> subprocess.Popen:
        proc = subprocess.Popen(["ip", "netns", "exec", self.name, *args],
                                env=None if env is None else dict(env), cwd=cwd,
                                start_new_session=True, **kw)
        self.procs.append(proc)
        return proc

    def probe(self) -> Probe:
        proc = self.popen([sys.executable, "-u", "-c", PROBE], stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True)
        return Probe(proc)

    def __exit__(self, *exc: object) -> None:
        for proc in reversed(self.procs):
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        # anything still in the namespace (a watchdog's fprocess) goes too
        pids = subprocess.run(["ip", "netns", "pids", self.name], capture_output=True,
                              text=True).stdout.split()
        for pid in pids:
            try:
                os.kill(int(pid), signal.SIGKILL)
            except ProcessLookupError:
                pass
        subprocess.run(["ip", "netns", "del", self.name], check=False)


class Probe:
    """HTTP from inside the namespace: ``probe.request("POST", 8080, "/", b"{}")``."""

    def __init__(self, proc: subprocess.Popen) -> None:
        self.proc = proc

    def request(self, method: str, port: int, path: str, body: bytes = b"",
                headers: Mapping[str, str] | None = None, timeout: float = 60.0,
                host: str = "127.0.0.1") -> dict[str, Any]:
        """``{"status", "headers", "body": bytes}`` (status 0 and ``error`` if it failed)."""
        line = json.dumps({"method": method, "host": host, "port": port, "path": path,
                           "body": base64.b64encode(body).decode(),
                           "headers": dict(headers or {}), "timeout": timeout})
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        out = json.loads(self.proc.stdout.readline())
        if "body" in out:
            out["body"] = base64.b64decode(out["body"])
        return out

    def wait_ok(self, port: int, path: str, deadline_s: float = 30.0,
                ok: Sequence[int] = (200,)) -> None:
        """Poll ``GET path`` until its status is in ``ok`` (a server starting in the namespace)."""
        import time

        deadline = time.monotonic() + deadline_s
        while True:
            if self.request("GET", port, path, timeout=2.0)["status"] in ok:
                return
            assert time.monotonic() < deadline, f"nothing healthy on :{port}{path}"
            time.sleep(0.05)

