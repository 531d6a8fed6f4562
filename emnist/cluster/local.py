"""The embedded default: a local memcached and the local gateway as background processes.

State (pids, URLs, logs) lives in ``$EMNIST_HOME`` (default ``~/.cache/emnist``) so `emnist
down` can stop what `emnist up` started, and nothing else.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

import requests


class LocalStackError(RuntimeError):
    pass


def home() -> Path:
    path = Path(os.environ.get("EMNIST_HOME") or Path.home() / ".cache" / "emnist")
    path.mkdir(parents=True, exist_ok=True)
    return path


def port_open(host: str, port: int, timeout: float = 0.5) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def gateway_alive(url: str) -> bool:
    try:
        return requests.get(url.rstrip("/") + "/healthz", timeout=2).ok
    except requests.RequestException:
        return False


def ensure_memcached(url: str, memory_mb: int = 256) -> str | None:
    """Start memcached for a loopback ``memcached://`` URL that nothing answers yet.

    Returns a message saying what was done, or None when nothing was needed.
    """
    parts = urlsplit(url)
    if parts.scheme != "memcached" or "," in parts.netloc:
        return None
    host, port = parts.hostname or "127.0.0.1", parts.port or 11211
    if port_open(host, port):
        return None
    if host not in ("127.0.0.1", "localhost", "::1"):
        raise LocalStackError(f"memcached at {host}:{port} is not reachable")
    binary = shutil.which("memcached")
    if binary is None:
        raise LocalStackError("memcached is not installed: run `sudo apt-get install memcached` "
                              "(Debian/Ubuntu package `memcached`), or pass --store URL")
    pidfile = home() / "memcached.pid"
    args = [binary, "-d", "-l", host, "-p", str(port), "-m", str(memory_mb), "-P", str(pidfile)]
    if os.geteuid() == 0:
        args += ["-u", "root"]
    subprocess.run(args, check=True)
    _wait(lambda: port_open(host, port), 10, f"memcached did not start on {host}:{port}")
    return f"started memcached on {host}:{port}"


def start_gateway(stack: Path, port: int, env: dict[str, str], replicas: list[str],
                  timeout: float = 60) -> dict:
    """Start the local gateway in the background and wait until its replicas are healthy."""
    state_dir = home()
    ready = state_dir / "gateway.json"
    ready.unlink(missing_ok=True)
    log = open(state_dir / "gateway.log", "ab")
    args = [sys.executable, "-m", "emnist.gateway.server", "--stack", str(stack),
            "--port", str(port), "--ready-file", str(ready)]
    for r in replicas:
        args += ["--replicas", r]
    proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                            env={**os.environ, **env}, start_new_session=True,
                            cwd=stack.parent)

    def is_ready() -> bool:
        if proc.poll() is not None:
            tail = (state_dir / "gateway.log").read_text(errors="replace")[-2000:]
            raise LocalStackError(f"the gateway exited with {proc.returncode}:\n{tail}")
        return ready.exists() and ready.stat().st_size > 0

    _wait(is_ready, timeout, f"the gateway did not become ready in {timeout:.0f}s "
          f"(log: {state_dir / 'gateway.log'})")
    return json.loads(ready.read_text())


def stop_all() -> list[str]:
    """Stop the gateway (which stops its replicas) and the memcached that `up` started."""
    done = []
    state = home()
    for name, path in (("gateway", state / "gateway.json"), ("memcached", state / "memcached.pid")):
        if not path.exists():
            continue
        text = path.read_text().strip()
        pid = json.loads(text)["pid"] if path.suffix == ".json" else int(text or 0)
        if pid and _terminate(pid):
            done.append(f"stopped {name} (pid {pid})")
        path.unlink(missing_ok=True)
    return done


def _terminate(pid: int, grace: float = 10) -> bool:
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return False
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        try:
            if os.waitpid(pid, os.WNOHANG)[0]:  # our own child: reap it
                return True
        except ChildProcessError:
            pass  # not our child; init reaps it
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    return True


def _wait(ok, timeout: float, message: str) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if time.monotonic() > deadline:
            raise LocalStackError(message)
        time.sleep(0.05)
