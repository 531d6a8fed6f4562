"""Proxy a call to one replica (the async queues are :mod:`.queue`).

The hot path writes the request and reads the response over keep-alive sockets kept per
replica (at most ``POOL_PER_REPLICA`` idle ones), Nagle off, headers and body in one send. The
upstream is always one of our own replicas (waitress), so a small HTTP/1.1 response reader
replaces ``http.client``, whose email-based header parsing was most of the gateway's own
cost per call (``emnist bench gateway`` measures what the gateway adds).
"""

from __future__ import annotations

import logging
import os
import select
import socket
import subprocess
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import BinaryIO

from .supervisor import NoReplicaError, Replica, ReplicaSet

__all__ = ["HOP_BY_HOP", "RESPONSE_SKIP", "GatewayTimeout", "Payload", "Upstream",
           "UpstreamError", "UpstreamTimeout", "forward"]

log = logging.getLogger("emnist.gateway")

HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                        "proxy-connection", "te", "trailer", "trailers", "transfer-encoding",
                        "upgrade", "host", "content-length"})
RESPONSE_SKIP = HOP_BY_HOP | {"date", "server", "x-duration-seconds", "x-call-id"}
POOL_PER_REPLICA = 16
CONNECT_TIMEOUT = 5.0
MAX_HEAD = 64 * 1024
MAX_HEADERS = 200
# a call's body: bytes, or a file sent with sendfile (a queued async body spilled to disk)
Payload = bytes | BinaryIO


def _safe_header(text: str) -> bool:
    """No CR, LF or NUL: nothing a header could smuggle into the upstream request."""
    return "\r" not in text and "\n" not in text and "\0" not in text


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


class GatewayTimeout(UpstreamError):
    """The gateway's upstream timeout cut the call (502; the function goes on running).

    The OpenFaaS gateway proxies with ``context.WithTimeout(upstream_timeout)`` and answers
    ``502 Bad Gateway`` to any error of that request, the timeout included
    (gateway/handlers/forwarding_proxy.go ``forwardRequest``); the pod is not told."""


class _Conn:
    """A keep-alive connection to one replica, with the bytes read past the last response."""

    __slots__ = ("buf", "sock")

    def __init__(self, host: str, port: int) -> None:
        self.sock = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = bytearray()

    def close(self) -> None:
        self.sock.close()

    def fill(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise ConnectionResetError("the replica closed the connection")
        self.buf += chunk

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            self.fill()
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_line(self) -> bytes:
        while (idx := self.buf.find(b"\r\n")) < 0:
            if len(self.buf) > MAX_HEAD:
                raise UpstreamError("response line too long")
            self.fill()
        out = bytes(self.buf[:idx])
        del self.buf[:idx + 2]
        return out

    def read_to_eof(self) -> bytes:
        while True:
            chunk = self.sock.recv(65536)
            if not chunk:
                out = bytes(self.buf)
                self.buf.clear()
                return out
            self.buf += chunk


def _idle(replica: Replica) -> _Conn | None:
    """A pooled connection the replica has not closed meanwhile (readable idle = EOF)."""
    while True:
        try:
            conn = replica.pool.pop()
        except IndexError:
            return None
        try:  # poll, not select: descriptors above FD_SETSIZE are normal under load
            poller = select.poll()
            poller.register(conn.sock, select.POLLIN)
            readable = bool(poller.poll(0))
        except (OSError, ValueError):
            readable = True
        if not readable and not conn.buf:
            return conn
        conn.close()


def _release(replica: Replica, conn: _Conn, reusable: bool) -> None:
    if reusable and not replica.stopping and len(replica.pool) < POOL_PER_REPLICA:
        replica.pool.append(conn)
    else:
        conn.close()


def _head(method: str, target: str, port: int, headers: Iterable[tuple[str, str]],
          length: int) -> bytes:
    lines = [f"{method} {target} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in headers if _safe_header(k + v)]
    lines.append(f"Content-Length: {length}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")


def _request(method: str, target: str, port: int, headers: Iterable[tuple[str, str]],
             body: bytes) -> bytes:
    """The request's bytes, headers and body in one buffer (one send: no Nagle stall)."""
    return _head(method, target, port, headers, len(body)) + body


def _send(sock: socket.socket, method: str, target: str, port: int,
          headers: Iterable[tuple[str, str]], body: Payload) -> None:
    """Send the request; a file body goes from the disk with sendfile, never all in memory."""
    if isinstance(body, bytes):
        sock.sendall(_request(method, target, port, headers, body))
        return
    size = os.fstat(body.fileno()).st_size
    sock.sendall(_head(method, target, port, headers, size))
    if size:
        sock.sendfile(body, 0, size)


def _response(conn: _Conn, method: str) -> tuple[int, list[tuple[str, str]], bytes, bool]:
    """Read one HTTP/1.1 response from our own replica: (status, headers, body, keep-alive).

    Replicas are this project's waitress servers: a status line, headers, then a body framed
    by Content-Length or chunked (or, failing both, the end of the connection)."""
    while True:
        status_line = conn.read_line().decode("latin-1")
        version, _, rest = status_line.partition(" ")
        try:
            status = int(rest[:3])
        except ValueError:
            raise UpstreamError("malformed status line") from None
        lines = []
        while line := conn.read_line():
            lines.append(line.decode("latin-1"))
            if len(lines) > MAX_HEADERS:
                raise UpstreamError("too many response headers")
        if not 100 <= status < 200:
            break  # 1xx answers are interim: the real one follows
    headers: list[tuple[str, str]] = []
    length: int | None = None
    chunked = False
    keep = version == "HTTP/1.1"
    for line in lines:
        name, sep, value = line.partition(":")
        if not sep:
            continue
        name, value = name.strip(), value.strip()
        lower = name.lower()
        if lower == "content-length" and value.isdigit():
            length = int(value)
        elif lower == "transfer-encoding":
            chunked = "chunked" in value.lower()
        elif lower == "connection":
            keep = keep and "close" not in value.lower()
        headers.append((name, value))
    if method == "HEAD" or status in (204, 304):
        body = b""
    elif chunked:
        parts = []
        while size := int(conn.read_line().split(b";", 1)[0] or b"0", 16):
            parts.append(conn.read_exact(size))
            conn.read_line()
        while conn.read_line():  # trailers
            pass
        body = b"".join(parts)
    elif length is not None:
        body = conn.read_exact(length)
    else:
        body, keep = conn.read_to_eof(), False
    return status, headers, body, keep


def _once(replica: Replica, method: str, target: str, headers: Iterable[tuple[str, str]],
          body: Payload, timeout: float) -> Upstream:
    conn = _idle(replica) or _Conn(replica.host, replica.port)
    keep = False
    try:
        conn.sock.settimeout(timeout)
        start = time.perf_counter()
        _send(conn.sock, method, target, replica.port, headers, body)
        status, out_headers, data, keep = _response(conn, method)
        return Upstream(status, out_headers, data, time.perf_counter() - start,
                        replica.hostname)
    except ValueError as e:  # a chunk size that is not hex
        raise UpstreamError("malformed response") from e
    finally:
        _release(replica, conn, keep)


def _dead(proc: subprocess.Popen[bytes], wait: float = 0.5) -> bool:
    try:
        proc.wait(timeout=wait)
        return True
    except subprocess.TimeoutExpired:
        return False


def forward(rs: ReplicaSet, method: str, target: str, headers: list[tuple[str, str]],
            body: Payload, timeout: float) -> Upstream:
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
            except OSError as e:
                dead = _dead(replica.process)
                if attempt < 2 and (dead or isinstance(e, ConnectionRefusedError)):
                    log.warning("replica %s of %s unreachable (%s); retrying elsewhere",
                                replica.hostname, rs.name, type(e).__name__)
                    if dead:
                        rs.mark_dead(replica)  # so the retry waits for its replacement
                    continue
                raise UpstreamError(type(e).__name__) from e
    raise NoReplicaError(f"no reachable replica of {rs.name}")

