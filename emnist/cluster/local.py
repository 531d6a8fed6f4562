"""The embedded default: a local memcached and the local gateway as background processes.

State (pids, URLs, logs) lives in the cache directory (:func:`emnist.paths.cache_dir`) so
`emnist down` can stop what `emnist up` started, and nothing else: each process is recorded
with its command line and start time, and a record that no longer matches its pid is stale.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

import requests

from emnist.cluster import procs
from emnist.gateway.stack import StackError, load_stack
from emnist.gateway.state import CALLBACK_TIMEOUT, DEFAULT_MAX_REPLICAS, function_timeout
from emnist.paths import cache_dir
from emnist.wait import wait_until

LOOPBACK = ("127.0.0.1", "localhost", "::1")


class LocalStackError(RuntimeError):
    pass


def home() -> Path:
    path = cache_dir()
    path.mkdir(parents=True, exist_ok=True)
    return path


def is_loopback(url: str) -> bool:
    """True for a URL on this machine's loopback (the local stack the CLI may manage)."""
    return urlsplit(url if "://" in url else f"//{url}").hostname in LOOPBACK


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
    if host not in LOOPBACK:
        raise LocalStackError(f"memcached at {host}:{port} is not reachable (the local stack "
                              "starts memcached only on 127.0.0.1)")
    binary = shutil.which("memcached")
    if binary is None:
        raise LocalStackError("memcached is not installed: run `sudo apt-get install memcached` "
                              "(Debian/Ubuntu package `memcached`), or pass --store URL")
    state = home()
    pidfile = state / "memcached.pid"
    pidfile.unlink(missing_ok=True)
    args = [binary, "-d", "-l", host, "-p", str(port), "-m", str(memory_mb), "-P", str(pidfile)]
    if os.geteuid() == 0:
        args += ["-u", "root"]
    subprocess.run(args, check=True)
    wait_until(lambda: port_open(host, port) and pidfile.exists() and pidfile.stat().st_size,
               10, f"memcached did not start on {host}:{port}", error=LocalStackError)
    procs.write_record(state / "memcached.proc.json", int(pidfile.read_text()), args)
    return f"started memcached on {host}:{port}"


# the gateway's queue flags and the environment variables that set them instead
QUEUE_ENV = {"--queue-workers": "EMNIST_GATEWAY_QUEUE_WORKERS",
             "--upstream-timeout": "EMNIST_GATEWAY_UPSTREAM_TIMEOUT",
             "--ack-wait": "EMNIST_GATEWAY_ACK_WAIT"}
ACK_MARGIN = 10.0  # seconds between the last call's callback and its ack_wait


def queue_args(stack: Path, env: Mapping[str, str] | None = None,
               workers: int = DEFAULT_MAX_REPLICAS) -> list[str]:
    """The local gateway's async settings as docs/deploy.md tells operators to set OpenFaaS
    CE's, so that a run's workers train at once and each call is delivered once: a
    queue-worker per replica a function may have here (``workers``), the upstream timeout
    above the stack's longest function timeout (the watchdog answers first), ``ack_wait``
    above that plus a callback. A setting the environment gives (:data:`QUEUE_ENV`, e.g.
    ``EMNIST_GATEWAY_QUEUE_WORKERS=1`` for CE's own defaults) is left to it."""
    env = os.environ if env is None else env
    try:
        functions = load_stack(stack, env).functions.values()
    except StackError as e:
        raise LocalStackError(f"{stack}: {e}") from None
    upstream = math.ceil(max((function_timeout(fn.environment) for fn in functions),
                             default=0.0)) + 1.0
    values = {"--queue-workers": workers, "--upstream-timeout": f"{upstream:g}",
              "--ack-wait": f"{upstream + CALLBACK_TIMEOUT + ACK_MARGIN:g}"}
    return [x for flag, value in values.items() if not env.get(QUEUE_ENV[flag])
            for x in (flag, str(value))]


CONTAINERS_RECORD = "containers.json"  # the container stack `up` started (its network)


def container_stack_env(stack: Path, port: int, store: str | None, user: str = "",
                        echo: Callable[[str], None] = print) -> dict[str, str]:
    """Start the cluster around container replicas (:mod:`.containerstack`) and return the
    gateway's environment for them: podman's settings, the runtime, the network, the relay's
    socket. The store is the stack's default (memcached.openfaas-fn) unless ``store`` names
    another one the containers can reach (a loopback address cannot be)."""
    from . import containerstack as cs
    from .baseimages import container_env

    if store and is_loopback(store):
        raise LocalStackError(f"--store {store}: containers cannot reach this machine's "
                              "loopback; the container runtime starts its own store "
                              "(memcached.openfaas-fn), leave --store out")
    state = home()
    env = container_env(os.environ, state / "shim")
    try:
        images = sorted({fn.image for fn in load_stack(stack, env).functions.values()})
    except StackError as e:
        raise LocalStackError(f"{stack}: {e}") from None
    missing = cs.missing_images(images, env)
    if missing:
        raise LocalStackError(f"no image {', '.join(missing)}: build them first (`emnist build "
                              "--podman --base-images`, with the same REGISTRY and TAG)")
    network = cs.network_name(port)
    sock = cs.socket_path(state, network)
    (state / CONTAINERS_RECORD).write_text(json.dumps({"network": network}))
    for line in cs.infra_up(network, sock.parent, env, echo=echo):
        echo(line)
    env.update({"EMNIST_GATEWAY_RUNTIME": "container", "EMNIST_GATEWAY_NETWORK": network,
                "EMNIST_GATEWAY_UNIX_SOCKET": str(sock),
                "EMNIST_GATEWAY_CONTAINER_USER": user})
    if store:
        env["STORE_URL"] = store
    return env


def start_gateway(stack: Path, port: int, env: dict[str, str], replicas: list[str],
                  timeout: float = 60, allowed_hosts: Iterable[str] = ()) -> dict:
    """Start the local gateway in the background and wait until its replicas are healthy:
    its queues set by :func:`queue_args`, answering to ``allowed_hosts`` besides loopback
    (the names a gateway or proxy in front of it uses)."""
    state_dir = home()
    ready = state_dir / "gateway.json"
    ready.unlink(missing_ok=True)
    log_path = state_dir / "gateway.log"
    args = [sys.executable, "-m", "emnist.gateway.server", "--stack", str(stack),
            "--port", str(port), "--ready-file", str(ready),
            *queue_args(stack, {**os.environ, **env})]
    for r in replicas:
        args += ["--replicas", r]
    for host in allowed_hosts:
        args += ["--allowed-host", host]
    if env.get("EMNIST_GATEWAY_UNIX_SOCKET"):
        args += ["--unix-socket", env["EMNIST_GATEWAY_UNIX_SOCKET"]]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env={**os.environ, **env},
                                start_new_session=True, cwd=stack.parent)

    def is_ready() -> bool:
        if proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise LocalStackError(f"the gateway exited with {proc.returncode}:\n{tail}")
        return ready.exists() and ready.stat().st_size > 0

    try:
        wait_until(is_ready, timeout, f"the gateway did not become ready in {timeout:.0f}s "
                   f"(log: {log_path})", error=LocalStackError)
        procs.write_record(state_dir / "gateway.proc.json", proc.pid, args)
    except BaseException:
        if proc.poll() is None:  # ours for sure (we hold it): never leave it unrecorded
            _terminate(proc.pid)
        raise
    return json.loads(ready.read_text())


# what each managed process leaves behind: its record, and the file it writes itself
MANAGED = {"gateway": ("gateway.proc.json", "gateway.json"),
           "memcached": ("memcached.proc.json", "memcached.pid")}


def managed_pid(name: str) -> int | None:
    """The pid of the ``name`` process `up` started, if its record still matches it."""
    rec = procs.read_record(home() / MANAGED[name][0])
    return rec["pid"] if rec and procs.matches(rec) else None


def stop_all() -> list[str]:
    """Stop the gateway (which stops its replicas) and the memcached that `up` started.

    A process is signalled only when its record still matches it (same pid, command line and
    start time); a stale record is removed with a message and nothing is killed.
    """
    done = []
    state = home()
    for name, (record_name, own_name) in MANAGED.items():
        record, own = state / record_name, state / own_name
        if not record.exists() and not own.exists():
            continue
        rec = procs.read_record(record)
        if rec is not None and procs.matches(rec):
            _terminate(rec["pid"])
            done.append(f"stopped {name} (pid {rec['pid']})")
        else:
            pid = _pid_in(own)
            if rec is not None:
                why = f"pid {rec['pid']} is no longer the {name} `emnist up` started"
            elif pid:
                why = f"nothing records pid {pid} as the {name} `emnist up` started"
            else:
                why = f"no {name} process is recorded"
            done.append(f"stale {name} state in {state} ({why}): removed it, stopped nothing")
        record.unlink(missing_ok=True)
        own.unlink(missing_ok=True)
    done += _stop_containers(state)
    return done


def _stop_containers(state: Path) -> list[str]:
    """Remove the container stack `up --runtime container` started (after its gateway)."""
    record = state / CONTAINERS_RECORD
    try:
        network = json.loads(record.read_text())["network"]
    except (OSError, ValueError, KeyError, TypeError):
        return []
    from . import containerstack as cs
    from .baseimages import BaseImageError, container_env

    try:
        done = cs.remove_stack(str(network), container_env(os.environ, state / "shim"))
    except (BaseImageError, cs.ContainerStackError, OSError) as e:
        return [f"could not remove the containers of {network}: {e}"]
    record.unlink(missing_ok=True)
    shutil.rmtree(cs.socket_path(state, str(network)).parent, ignore_errors=True)
    return done


def _pid_in(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
        pid = json.loads(text)["pid"] if path.suffix == ".json" else int(text)
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return pid if isinstance(pid, int) and pid > 0 else None


def _gone(pid: int) -> bool:
    try:
        if os.waitpid(pid, os.WNOHANG)[0]:  # our own child: reap it
            return True
    except ChildProcessError:
        pass  # not our child; init reaps it
    return procs.identity(pid) is None


def _terminate(pid: int, grace: float = 10) -> None:
    """SIGTERM, then SIGKILL after ``grace`` seconds (the caller checked it is ours)."""
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        return
    try:
        wait_until(lambda: _gone(pid), grace, f"pid {pid} ignored SIGTERM")
    except TimeoutError:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
