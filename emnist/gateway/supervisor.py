"""Run and watch a function's replicas, like a Deployment on one machine.

How a replica runs is the runtime's job: :class:`ProcessRuntime` (the fast default) starts
``python -m emnist.gateway.watchdog`` in its own process group, with a pod-like ``HOSTNAME`` and
a minimal environment (nothing leaks from the gateway's own environment except what a Python
process needs); :class:`emnist.gateway.podman.ContainerRuntime` starts the function's real image.
Either way a replica is one child process whose stdout/stderr are the replica's logs, so a
replica that exits is replaced to keep the desired count, and its lines are kept in a bounded
buffer that ``/system/logs`` serves.
"""

from __future__ import annotations

import http.client
import logging
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from .logs import NAMESPACE, LogBuffer, LogLine, format_timestamp, parse_timestamp
from .stack import FunctionSpec

__all__ = [
    "NAMESPACE",
    "LogBuffer",
    "LogLine",
    "NoReplicaError",
    "ProcessRuntime",
    "Replica",
    "ReplicaError",
    "ReplicaSet",
    "format_timestamp",
    "free_port",
    "parse_timestamp",
    "replica_env",
]

PASSTHROUGH_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "LC_CTYPE", "TMPDIR", "SYSTEMROOT",
                   "PYTHONPATH", "VIRTUAL_ENV")
# Kubernetes' rand.String alphabet (no vowels, no confusable characters).
_POD_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])

log = logging.getLogger("emnist.gateway")


class ReplicaError(RuntimeError):
    """A replica did not become healthy (it died or timed out while starting)."""


class NoReplicaError(RuntimeError):
    """No healthy replica could be found in time to serve a call."""


@dataclass(eq=False)
class Replica:
    """One running replica process."""

    name: str
    hostname: str
    port: int
    process: subprocess.Popen[bytes]
    host: str = "127.0.0.1"  # where the gateway reaches it ("" until a container has an address)
    container: str = ""  # the container's name (container runtime)
    started_at: float = field(default_factory=time.time)
    inflight: int = 0
    ready: bool = False
    stopping: bool = False
    stderr_tail: deque[str] = field(default_factory=lambda: deque(maxlen=30))
    readers: list[threading.Thread] = field(default_factory=list)
    pool: deque = field(default_factory=deque)  # idle keep-alive connections (gateway proxy)

    def close_pool(self) -> None:
        while True:
            try:
                self.pool.pop().close()
            except IndexError:
                return

    @property
    def pid(self) -> int:
        return self.process.pid

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def alive(self) -> bool:
        return self.process.poll() is None


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago (bound to port 0, then released)."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def replica_env(spec: FunctionSpec, base_env: Mapping[str, str], hostname: str,
                parent_env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment of one replica: a minimal base, the function's environment, then the
    provider's settings (``base_env``, ``HOSTNAME``), which the function's cannot override."""
    parent = os.environ if parent_env is None else parent_env
    env = {k: parent[k] for k in PASSTHROUGH_ENV if k in parent}
    # The watchdog module (and the project's own package) must be importable in the replica.
    paths = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if _PACKAGE_ROOT not in paths:
        env["PYTHONPATH"] = os.pathsep.join([_PACKAGE_ROOT, *paths])
    env.update(spec.environment)  # validated by the gateway: never PATH, PYTHON*, LD_*, ...
    env.update(base_env)
    env["HOSTNAME"] = hostname
    return env


def _pod_suffix() -> str:
    return "".join(secrets.choice(_POD_ALPHABET) for _ in range(5))


def _signal_group(proc: subprocess.Popen[bytes], sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        try:
            proc.send_signal(sig)
        except ProcessLookupError:
            pass


def healthy(host: str, port: int) -> bool:
    """The watchdog's ``/_/health`` answers 200 (what a Kubernetes readiness probe asks)."""
    conn = http.client.HTTPConnection(host, port, timeout=1.0)
    try:
        conn.request("GET", "/_/health")
        return conn.getresponse().status == 200
    except OSError:
        return False
    finally:
        conn.close()


class ProcessRuntime:
    """Replicas as local processes hosting the handler (the watchdog emulation): fast, and
    only as strict as the developer's machine (shared disk, the dev venv, the caller's user)."""

    kind = "process"

    def spawn(self, spec: FunctionSpec, base_env: Mapping[str, str],
              hostname: str) -> Replica:
        port = free_port()
        cmd = [sys.executable, "-u", "-m", "emnist.gateway.watchdog",
               "--handler", str(spec.handler), "--port", str(port),
               "--parent-pid", str(os.getpid())]
        proc = subprocess.Popen(
            cmd, env=replica_env(spec, base_env, hostname), cwd=str(spec.handler),
            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
            start_new_session=True,
        )
        return Replica(name=spec.name, hostname=hostname, port=port, process=proc)

    def ready(self, replica: Replica) -> bool:
        return healthy(replica.host, replica.port)

    def retry_start(self, stderr_tail: str) -> bool:
        """A replica that lost the free-port race is started again on another port."""
        return "Address already in use" in stderr_tail

    def signal(self, replica: Replica, sig: int) -> None:
        _signal_group(replica.process, sig)


class ReplicaSet:
    """The replicas of one function: scale, pick, restart the dead, collect logs."""

    def __init__(self, spec: FunctionSpec, base_env: Mapping[str, str], log_limit: int = 10000,
                 *, start_timeout: float = 30.0, grace: float = 5.0,
                 echo: IO[str] | None = None, runtime: Any = None) -> None:
        self.runtime = runtime if runtime is not None else ProcessRuntime()
        self.spec = spec
        self.base_env = dict(base_env)
        self.start_timeout = start_timeout
        self.grace = grace
        self.echo = echo
        self.logbuf = LogBuffer(log_limit)
        self.desired = 0
        self.restarts = 0
        self._template_hash = secrets.token_hex(3)[:5]
        self._replicas: list[Replica] = []
        self._lock = threading.Condition()  # guards _replicas, inflight, _rr
        self._scale_lock = threading.RLock()  # serialises topology changes
        self._rr = 0
        self._closed = False
        self._wake = threading.Event()
        self._monitor = threading.Thread(target=self._monitor_loop, daemon=True,
                                         name=f"monitor-{spec.name}")
        self._monitor.start()

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def replicas(self) -> list[Replica]:
        """A snapshot of the current replicas (ready or starting)."""
        with self._lock:
            return list(self._replicas)

    @property
    def available(self) -> int:
        """How many replicas are healthy and can take calls."""
        with self._lock:
            return sum(1 for r in self._replicas if r.ready and r.alive())

    # -- lifecycle ---------------------------------------------------------------------------

    def scale(self, n: int) -> None:
        """Start or stop replicas until ``n`` run; new ones are healthy when this returns."""
        if n < 0:
            raise ValueError("replicas must be >= 0")
        with self._scale_lock:
            if self._closed:
                raise ReplicaError(f"{self.name}: replica set is stopped")
            self.desired = n
            with self._lock:
                surplus = len(self._replicas) - n
                extra: list[Replica] = []
                if surplus > 0:  # stop the least busy, newest ones first
                    by_load = sorted(self._replicas, key=lambda r: (r.inflight, -r.started_at))
                    extra = by_load[:surplus]
                    self._replicas = [r for r in self._replicas if r not in extra]
                    for r in extra:
                        r.stopping = True
                missing = n - len(self._replicas)
            self._terminate(extra)
            if missing > 0:
                self._add(self._start(missing))

    def update(self, spec: FunctionSpec, base_env: Mapping[str, str] | None = None,
               replicas: int | None = None) -> None:
        """Roll out a new spec/env: start the new replicas, then stop the old ones."""
        with self._scale_lock:
            old_spec, old_env, old_hash = self.spec, self.base_env, self._template_hash
            self.spec = spec
            if base_env is not None:
                self.base_env = dict(base_env)
            self._template_hash = secrets.token_hex(3)[:5]
            n = self.desired if replicas is None else replicas
            try:
                fresh = self._start(n) if n > 0 else []
            except Exception:
                self.spec, self.base_env, self._template_hash = old_spec, old_env, old_hash
                raise
            self.desired = n
            with self._lock:
                old = self._replicas
                for r in old:
                    r.stopping = True
                self._replicas = list(fresh)
                self._lock.notify_all()
            self._terminate(old)

    def stop(self) -> None:
        """Stop every replica (SIGTERM, then SIGKILL after the grace period) for good."""
        with self._scale_lock:
            self._closed = True
            self.desired = 0
            with self._lock:
                old = self._replicas
                for r in old:
                    r.stopping = True
                self._replicas = []
                self._lock.notify_all()
            self._wake.set()
            self._terminate(old, drain=False)

    # -- picking -----------------------------------------------------------------------------

    def acquire(self, timeout: float | None = None) -> Replica:
        """Reserve the least busy healthy replica (round-robin among ties)."""
        deadline = time.monotonic() + (self.start_timeout if timeout is None else timeout)
        with self._lock:
            while True:
                # returncode is set by the replica's wait thread: no waitpid() per call
                ready = [r for r in self._replicas
                         if r.ready and not r.stopping and r.process.returncode is None]
                if ready:
                    low = min(r.inflight for r in ready)
                    ties = [r for r in ready if r.inflight == low]
                    chosen = ties[self._rr % len(ties)]
                    self._rr += 1
                    chosen.inflight += 1
                    return chosen
                left = deadline - time.monotonic()
                if left <= 0 or self._closed:
                    raise NoReplicaError(f"no healthy replica of {self.name} available")
                self._lock.wait(min(left, 0.25))

    def release(self, replica: Replica) -> None:
        with self._lock:
            replica.inflight -= 1
            self._lock.notify_all()

    @contextmanager
    def pick(self, timeout: float | None = None) -> Iterator[Replica]:
        """``with rs.pick() as replica:`` counts the call as in flight on that replica."""
        replica = self.acquire(timeout)
        try:
            yield replica
        finally:
            self.release(replica)

    def mark_dead(self, replica: Replica) -> None:
        """Called when a call found the replica unreachable: stop routing to it."""
        if not replica.alive():
            self._on_exit(replica)

    # -- logs --------------------------------------------------------------------------------

    def logs(self, since: int | str | None = None, tail: int | None = None,
             instance: str | None = None) -> list[LogLine]:
        """Buffered log lines, oldest first (``since``: RFC3339 or ns since the epoch)."""
        if isinstance(since, str):
            since = parse_timestamp(since)
        return self.logbuf.lines(since=since, tail=tail, instance=instance)

    # -- internals ---------------------------------------------------------------------------

    def _spawn(self) -> Replica:
        hostname = f"{self.name}-{self._template_hash}-{_pod_suffix()}"
        replica = self.runtime.spawn(self.spec, self.base_env, hostname)
        proc = replica.process
        for pipe, stream in ((proc.stdout, "stdout"), (proc.stderr, "stderr")):
            reader = threading.Thread(target=self._read, args=(replica, pipe, stream),
                                      daemon=True, name=f"log-{hostname}-{stream}")
            reader.start()
            replica.readers.append(reader)
        threading.Thread(target=self._wait_exit, args=(replica,), daemon=True,
                         name=f"wait-{hostname}").start()
        return replica

    def _start(self, count: int) -> list[Replica]:
        """Spawn ``count`` replicas and wait until all answer /_/health."""
        pending = [self._spawn() for _ in range(count)]
        ready: list[Replica] = []
        retries = 3 * count
        deadline = time.monotonic() + self.start_timeout
        try:
            while pending:
                for r in list(pending):
                    if not r.alive():
                        r.process.wait()
                        for reader in r.readers:  # the pipes hold the error message
                            reader.join(timeout=2.0)
                        tail = "\n".join(r.stderr_tail)
                        pending.remove(r)
                        if self.runtime.retry_start(tail) and retries > 0:
                            retries -= 1
                            pending.append(self._spawn())
                            continue
                        raise ReplicaError(
                            f"replica {r.hostname} of {self.name} exited with code "
                            f"{r.process.returncode} while starting; stderr tail:\n{tail}"
                        )
                    if self.runtime.ready(r):
                        r.ready = True
                        pending.remove(r)
                        ready.append(r)
                if pending and time.monotonic() > deadline:
                    tail = "\n".join(pending[0].stderr_tail)
                    raise ReplicaError(
                        f"replica {pending[0].hostname} of {self.name} was not healthy after "
                        f"{self.start_timeout:g}s; stderr tail:\n{tail}"
                    )
                if pending:
                    time.sleep(0.02)
        except BaseException:
            self._terminate(pending + ready, drain=False)
            raise
        return ready

    def _add(self, fresh: list[Replica]) -> None:
        with self._lock:
            self._replicas.extend(fresh)
            self._lock.notify_all()

    def _terminate(self, replicas: list[Replica], drain: bool = True) -> None:
        """Let in-flight calls finish (up to the grace period), SIGTERM, then SIGKILL."""
        if not replicas:
            return
        for r in replicas:
            r.stopping = True
        if drain:
            with self._lock:
                self._lock.wait_for(lambda: all(r.inflight <= 0 for r in replicas),
                                    timeout=self.grace)
        for r in replicas:
            if r.alive():
                self.runtime.signal(r, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        for r in replicas:
            try:
                r.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                self.runtime.signal(r, signal.SIGKILL)
                r.process.wait()
            # Also reap anything the handler started in the replica's process group.
            self.runtime.signal(r, signal.SIGKILL)
            r.close_pool()

    def _read(self, replica: Replica, pipe: IO[bytes], stream: str) -> None:
        for raw in iter(pipe.readline, b""):
            text = raw.decode("utf-8", "replace").rstrip("\r\n")
            self.logbuf.write(self.name, replica.hostname, text, stream)
            if stream == "stderr":
                replica.stderr_tail.append(text)
            if self.echo is not None:
                print(f"{replica.hostname} {stream}: {text}", file=self.echo, flush=True)
        pipe.close()

    def _wait_exit(self, replica: Replica) -> None:
        replica.process.wait()
        self._on_exit(replica)

    def _on_exit(self, replica: Replica) -> None:
        with self._lock:
            if replica not in self._replicas:
                return
            self._replicas.remove(replica)
            self._lock.notify_all()
        replica.close_pool()
        if not replica.stopping:
            log.warning("replica %s of %s exited with code %s; replacing it", replica.hostname,
                        self.name, replica.process.returncode)
            self.restarts += 1
        self._wake.set()

    def _monitor_loop(self) -> None:
        """Keep ``desired`` replicas running; back off if they keep crashing."""
        backoff = 0.0
        while True:
            self._wake.wait(1.0)
            self._wake.clear()
            if self._closed:
                return
            if backoff:
                time.sleep(backoff)
            with self._scale_lock:
                if self._closed:
                    return
                with self._lock:
                    missing = self.desired - len(self._replicas)
                if missing <= 0:
                    backoff = 0.0
                    continue
                try:
                    self._add(self._start(missing))
                    backoff = 0.0
                except ReplicaError as e:
                    backoff = min(30.0, max(1.0, backoff * 2))
                    log.error("%s (retrying in %gs)", e, backoff)
                    self._wake.set()
