"""Proxy a call to one replica, and run async calls from a bounded queue.

The hot path is plain ``http.client`` over keep-alive connections kept per replica (at most
``POOL_PER_REPLICA`` idle ones), with Nagle off and headers and body in one send, so the
gateway adds well under a millisecond to a call (``emnist bench gateway`` measures it).
"""

from __future__ import annotations

import http.client
import logging
import queue
import select
import socket
import subprocess
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from .supervisor import NoReplicaError, Replica, ReplicaSet

__all__ = ["HOP_BY_HOP", "RESPONSE_SKIP", "AsyncQueue", "QueueFull", "Upstream",
           "UpstreamError", "UpstreamTimeout", "forward"]

log = logging.getLogger("emnist.gateway")

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "trailers", "transfer-encoding",
                        "upgrade", "host", "content-length"})
RESPONSE_SKIP = HOP_BY_HOP | {"date", "server", "x-duration-seconds", "x-call-id"}
POOL_PER_REPLICA = 16
CONNECT_TIMEOUT = 5.0


@dataclass
class Upstream:
    """What a replica answered."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes
    duration: float
    instance: str = ""


class UpstreamError(RuntimeError):
    """The replica could not be reached or broke the connection (502)."""


class UpstreamTimeout(UpstreamError):
    """The replica did not answer within the function's timeout (504)."""


def _connect(replica: Replica) -> http.client.HTTPConnection:
    conn = http.client.HTTPConnection("127.0.0.1", replica.port, timeout=CONNECT_TIMEOUT)
    conn.connect()
    conn.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return conn


def _idle(replica: Replica) -> http.client.HTTPConnection | None:
    """A pooled connection the replica has not closed meanwhile (readable idle = EOF)."""
    while True:
        try:
            conn = replica.pool.pop()
        except IndexError:
            return None
        sock = conn.sock
        if sock is not None:
            try:
                readable, _, _ = select.select([sock], [], [], 0)
            except (OSError, ValueError):
                readable = [sock]
            if not readable:
                return conn
        conn.close()


def _release(replica: Replica, conn: http.client.HTTPConnection, reusable: bool) -> None:
    if reusable and not replica.stopping and len(replica.pool) < POOL_PER_REPLICA:
        replica.pool.append(conn)
    else:
        conn.close()


def _once(replica: Replica, method: str, target: str, headers: Iterable[tuple[str, str]],
          body: bytes, timeout: float) -> Upstream:
    conn = _idle(replica) or _connect(replica)
    ok = False
    try:
        conn.sock.settimeout(timeout)
        start = time.perf_counter()
        conn.putrequest(method, target, skip_host=True, skip_accept_encoding=True)
        conn.putheader("Host", f"127.0.0.1:{replica.port}")
        for k, v in headers:
            conn.putheader(k, v)
        conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)  # one send: headers and body together (no Nagle stall)
        resp = conn.getresponse()
        data = resp.read()
        out = Upstream(resp.status, resp.getheaders(), data, time.perf_counter() - start,
                       replica.hostname)
        ok = not resp.will_close
        return out
    finally:
        _release(replica, conn, ok)


def _dead(proc: subprocess.Popen[bytes], wait: float = 0.5) -> bool:
    try:
        proc.wait(timeout=wait)
        return True
    except subprocess.TimeoutExpired:
        return False


def forward(rs: ReplicaSet, method: str, target: str, headers: list[tuple[str, str]],
            body: bytes, timeout: float) -> Upstream:
    """Send one call to the least busy replica of ``rs``.

    A call is retried on another replica (twice at most) only when it surely did not run: the
    replica refused the connection, or it was dead (e.g. killed with a connection open).
    """
    for attempt in range(3):
        with rs.pick() as replica:
            try:
                return _once(replica, method, target, headers, body, timeout)
            except TimeoutError as e:
                raise UpstreamTimeout(f"no answer within {timeout:g}s") from e
            except (OSError, http.client.HTTPException) as e:
                dead = _dead(replica.process)
                if attempt < 2 and (dead or isinstance(e, ConnectionRefusedError)):
                    log.warning("replica %s of %s unreachable (%s); retrying elsewhere",
                                replica.hostname, rs.name, type(e).__name__)
                    if dead:
                        rs.mark_dead(replica)  # so the retry waits for its replacement
                    continue
                raise UpstreamError(type(e).__name__) from e
    raise NoReplicaError(f"no reachable replica of {rs.name}")


class QueueFull(RuntimeError):
    """The async queue holds its maximum of calls or bytes (429)."""


class AsyncQueue:
    """A bounded queue of async calls run by ``workers`` threads (OpenFaaS's queue-worker)."""

    def __init__(self, run: Callable[..., None], workers: int, max_items: int,
                 max_bytes: int) -> None:
        self._run = run
        self._items: queue.Queue[tuple[tuple[Any, ...], int] | None] = queue.Queue()
        self._max_items, self._max_bytes = max(1, max_items), max(1, max_bytes)
        self._count = self._bytes = 0
        self._lock = threading.Lock()
        self._closed = False
        self._threads = [threading.Thread(target=self._loop, daemon=True, name=f"queue-{i}")
                         for i in range(max(1, workers))]
        for t in self._threads:
            t.start()

    def submit(self, args: tuple[Any, ...], nbytes: int) -> None:
        """Queue ``run(*args)``; raise :class:`QueueFull` beyond the bounds."""
        with self._lock:
            if self._closed:
                raise QueueFull("the gateway is shutting down")
            if self._count >= self._max_items or self._bytes + nbytes > self._max_bytes:
                raise QueueFull(f"the async queue is full ({self._count} calls, "
                                f"{self._bytes} bytes queued)")
            self._count += 1
            self._bytes += nbytes
        self._items.put((args, nbytes))

    @property
    def pending(self) -> int:
        with self._lock:
            return self._count

    def close(self) -> None:
        """Drop queued calls and stop the workers (running calls finish on their own)."""
        with self._lock:
            self._closed = True
        while True:
            try:
                self._items.get_nowait()
            except queue.Empty:
                break
        for _ in self._threads:
            self._items.put(None)

    def _loop(self) -> None:
        while True:
            item = self._items.get()
            if item is None:
                return
            args, nbytes = item
            try:
                self._run(*args)
            except Exception:  # noqa: BLE001 - one failed call must not stop the worker
                log.exception("async call failed")
            finally:
                with self._lock:
                    self._count -= 1
                    self._bytes -= nbytes
