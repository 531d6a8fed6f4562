"""The gateway's HTTP server: waitress, hardened against clients that hold connections open.

Waitress reads every request in its event loop and hands only complete ones to a worker, so a
slow client costs a connection slot, not a thread. Its defaults still let a few hundred slow
clients lock everyone out (slowloris): at ``connection_limit`` it stops accepting, and it only
closes connections that are *idle*, never one that trickles a byte now and then. Here:

- the connection limit is high (bounded by the process's open-file limit minus a reserve for
  replicas, pooled upstream sockets and spooled bodies) and the loop uses ``poll`` (no
  ``select`` ``FD_SETSIZE`` ceiling);
- every request must arrive complete (head and body) within ``request_timeout`` of its first
  byte (the first request of a connection: of the connection), else the connection is closed
  with a best-effort 408;
- when the limit is reached anyway, connections whose request is still incomplete well after
  it began (then the longest idle ones) are closed to make room, so a well-behaved client is
  still accepted and served.

Memory per connection is bounded by waitress's buffers: at most ``MAX_HEADER`` of request head
and ``inbuf_overflow`` (512 KiB) of body in memory, the rest of a body spilling to a temporary
file; times the connection limit, that bounds what slow clients can hold.
"""

from __future__ import annotations

import heapq
import logging
import resource
import time
from collections.abc import Callable
from typing import Any

from waitress.adjustments import Adjustments
from waitress.channel import HTTPChannel
from waitress.server import TcpWSGIServer, UnixWSGIServer
from waitress.task import ThreadedTaskDispatcher

__all__ = ["DEFAULT_MAX_CONNECTIONS", "DEFAULT_REQUEST_TIMEOUT", "MAX_HEADER",
           "GuardedServer", "GuardedUnixServer", "add_unix_socket", "connection_limit",
           "make_server"]

log = logging.getLogger("emnist.gateway")

DEFAULT_MAX_CONNECTIONS = 1024
DEFAULT_REQUEST_TIMEOUT = 60.0
MAX_HEADER = 64 * 1024
_FD_RESERVE_MIN = 256
SHED_AFTER = 0.5  # seconds: when full, a request still incomplete after this marks a slow client
ACCEPT_BATCH = 64
LOOP_TIMEOUT = 0.25  # seconds: how late a full server may notice that connections became sheddable
_TIMEOUT_TEXT = b"the whole request did not arrive in time\n"
_TIMEOUT_ANSWER = (b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\n"
                   b"Content-Type: text/plain\r\nContent-Length: %d\r\n\r\n%s"
                   % (len(_TIMEOUT_TEXT), _TIMEOUT_TEXT))


def connection_limit(wanted: int) -> int:
    """At most ``wanted`` connections, and never more than open files allow: the soft
    RLIMIT_NOFILE is raised to the hard one, and a quarter (at least 256) stays in reserve."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = 65536 if hard == resource.RLIM_INFINITY else hard
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, target), hard))
            soft = max(soft, target)
        except (ValueError, OSError):
            pass
    reserve = max(_FD_RESERVE_MIN, soft // 4)
    return max(16, min(wanted, soft - reserve))


class DeadlineChannel(HTTPChannel):
    """A waitress channel that remembers since when it waits for its current request."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # the first request is due within the deadline of the connection itself
        self.request_started: float | None = self.creation_time

    def received(self, data: bytes) -> bool:
        before = self.request
        result = super().received(data)
        if self.request is None:
            self.request_started = None  # nothing partial: idle (waitress's channel_timeout)
        elif self.request is not before and (before is not None or self.request_started is None):
            self.request_started = time.time()
        return bool(result)

    def expire(self) -> None:
        """Close now, telling the client why if its socket takes it (no task is running)."""
        try:
            self.socket.send(_TIMEOUT_ANSWER)
        except OSError:
            pass
        self.handle_close()


class _Guard:
    """The request deadline and the shedding described in the module, for a waitress server."""

    channel_class = DeadlineChannel

    def __init__(self, *args: Any, request_timeout: float, **kwargs: Any) -> None:
        self.request_timeout = request_timeout
        self.dropped = 0  # connections closed for missing the deadline or shed when full
        self._warned = 0.0
        super().__init__(*args, **kwargs)

    def maintenance(self, now: float) -> None:
        super().maintenance(now)  # idle connections: channel_timeout
        cutoff = now - self.request_timeout
        for channel in list(self.active_channels.values()):
            started = getattr(channel, "request_started", None)
            if started is not None and started < cutoff and not channel.requests:
                self._drop(channel)

    def readable(self) -> bool:
        now = time.time()
        dropped_before = self.dropped
        if now >= self.next_channel_cleanup:
            self.next_channel_cleanup = now + self.adj.cleanup_interval
            self.maintenance(now)
        if not self.accepting:
            return False
        if len(self._map) >= self.adj.connection_limit:
            self._shed(now)
        # A connection closed during this loop turn may still get a (stale) poll event in it:
        # accepting now could give its descriptor number to a new connection, which that event
        # would then close. Accept on the next turn instead.
        return self.dropped == dropped_before and len(self._map) < self.adj.connection_limit

    def handle_accept(self) -> None:
        """Accept every pending connection there is room for, not one per loop turn: a client
        queued behind slow ones gets in as soon as they are closed."""
        for _ in range(ACCEPT_BATCH):
            before = len(self._map)
            if before >= self.adj.connection_limit:
                return
            super().handle_accept()
            if len(self._map) == before:  # nothing pending (or a failed accept)
                return

    def _shed(self, now: float) -> None:
        """Full: make room if some connection may go.

        A well-behaved client sends its whole request as soon as it connects, so a connection
        still short of a complete request ``SHED_AFTER`` seconds after it began is a slow one:
        all such are closed. Failing those, the longest-idle keep-alive connections go. Never
        one being served, and never one too young to have shown which kind it is."""
        slow, idle = [], []
        for channel in self.active_channels.values():
            if channel.requests or channel.will_close:
                continue
            started = getattr(channel, "request_started", None)
            if started is not None:
                if now - started >= SHED_AFTER:
                    slow.append(channel)
            elif now - channel.last_activity >= SHED_AFTER:
                idle.append(channel)
        victims = slow or heapq.nsmallest(max(1, self.adj.connection_limit // 16), idle,
                                          key=lambda c: c.last_activity)
        for channel in victims:
            self._drop(channel)
        if victims and time.monotonic() - self._warned > 60:  # an attack must not flood the log
            self._warned = time.monotonic()
            log.warning("connection limit %d reached: closing the slowest connections",
                        self.adj.connection_limit)

    def _drop(self, channel: HTTPChannel) -> None:
        self.dropped += 1
        if isinstance(channel, DeadlineChannel):
            channel.expire()
        else:
            channel.handle_close()


class GuardedServer(_Guard, TcpWSGIServer):
    """A waitress TCP server with :class:`_Guard`."""


class GuardedUnixServer(_Guard, UnixWSGIServer):
    """A waitress unix-socket server with :class:`_Guard` (the container runtime's relay
    reaches the gateway through one, so the gateway still listens on loopback only)."""


def add_unix_socket(server: GuardedServer, app: Callable[..., Any], path: str,
                    request_timeout: float = DEFAULT_REQUEST_TIMEOUT) -> GuardedUnixServer:
    """Serve ``app`` on the unix socket ``path`` (mode 0600) as well, from ``server``'s event
    loop and worker threads (``server.run()`` serves both)."""
    old = server.adj
    adj = Adjustments(
        unix_socket=path, unix_socket_perms="600", threads=old.threads,
        connection_limit=old.connection_limit, asyncore_use_poll=True, cleanup_interval=1,
        max_request_body_size=old.max_request_body_size,
        max_request_header_size=old.max_request_header_size,
        channel_request_lookahead=old.channel_request_lookahead, ident=old.ident,
        clear_untrusted_proxy_headers=old.clear_untrusted_proxy_headers,
        send_bytes=old.send_bytes)
    adj.asyncore_loop_timeout = LOOP_TIMEOUT
    return GuardedUnixServer(app, server._map, dispatcher=server.task_dispatcher, adj=adj,
                             request_timeout=request_timeout)


def make_server(app: Callable[..., Any], *, host: str, port: int, threads: int,
                max_body: int, request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
                max_connections: int = DEFAULT_MAX_CONNECTIONS, **adjustments: Any
                ) -> GuardedServer:
    """A :class:`GuardedServer` bound to ``host:port`` (its first address) serving ``app``."""
    adj = Adjustments(
        host=host, port=port, threads=threads, connection_limit=connection_limit(max_connections),
        asyncore_use_poll=True, cleanup_interval=1, max_request_body_size=max_body,
        max_request_header_size=MAX_HEADER, **adjustments)
    adj.asyncore_loop_timeout = LOOP_TIMEOUT  # set after: Adjustments would round it to 0
    dispatcher = ThreadedTaskDispatcher()
    dispatcher.set_thread_count(adj.threads)
    return GuardedServer(app, {}, dispatcher=dispatcher, adj=adj, sockinfo=adj.listen[0],
                         request_timeout=request_timeout)
