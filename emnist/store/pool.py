"""Clients that are not thread-safe (pymemcache, pylibmc), lent to one thread at a time.

A store handle is shared by every thread of a process (training loop, overlapped exchange,
lease saver, tier syncer, the replica's request threads), so each command borrows a client of
its own for its duration. Not pymemcache's PooledClient: its ``close()`` closes the clients
other threads are using, and HashClient's failure bookkeeping is not thread-safe; one pool of
whole clients (single-server, hashed or pylibmc alike) covers every backend.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Pool(Generic[T]):
    def __init__(self, make: Callable[[], T], close: Callable[[T], None], keep: int = 16) -> None:
        self._make, self._close, self._keep = make, close, keep
        self._idle: deque[T] = deque()  # append/pop are atomic: no lock on the hot path

    def take(self) -> T:
        try:
            return self._idle.pop()  # the most recently used: its connection is warm
        except IndexError:
            return self._make()

    def give(self, client: T) -> None:
        """Back to the pool after a command that completed."""
        if len(self._idle) < self._keep:
            self._idle.append(client)
        else:
            self._close(client)

    def drop(self, client: T, broken: bool = False) -> None:
        """After a failed command: its connection may hold half a reply. After a ``broken``
        connection the idle ones go too: it usually means a restarted server (stale sockets)."""
        self._close(client)
        if broken:
            self.clear()

    def clear(self) -> None:
        """Close the idle clients; clients lent out stay with their threads, and the pool
        stays usable (it connects again on demand)."""
        while True:
            try:
                client = self._idle.pop()
            except IndexError:
                return
            self._close(client)
