"""OpenFaaS CE's async path, emulated: NATS Streaming channels served by queue-workers.

What CE does, from its public sources, and what this module reproduces:

- ``/async-function`` publishes the call to a NATS Streaming channel: ``faas-request``, or the
  one a function's ``com.openfaas.queue`` annotation names (faas gateway
  ``handlers/queue_proxy.go`` ``getQueueName``). The CE queue-worker serves ``faas-request``
  only (nats-queue-worker ``main.go``: ``sharedQueue``); named channels are served by Pro's
  queue-worker chart, here by ``--queue NAME=WORKERS``.
- A queue-worker (chart ``queueWorker.replicas``, default 1) runs ONE call at a time: its
  subscription's handler runs a message to its end before the next (``types.go``
  ``QueueSubscribe`` with ``MaxInflight`` 1); replicas are CE's only concurrency. Calls beyond
  the queue-workers wait in the channel.
- The queue-worker calls the function through the gateway (so the gateway's upstream timeout
  applies), POSTs the answer to ``X-Callback-Url`` (``postResult``: ``X-Call-Id``,
  ``X-Function-Status``, ``X-Function-Name``), then its handler returns and the message is
  acknowledged. NATS Streaming sends a message not acknowledged within ``ack_wait``
  (``readconfig.go`` default 30s; the chart sets 60s) again, "to any other member in the group
  (including itself)" (NATS Streaming docs, Redelivery): an idle queue-worker runs it at once,
  while the first delivery still runs; a busy one runs it after its current call, acknowledged
  meanwhile or not. Every delivery calls the function with the same request (same
  ``X-Call-Id``) and POSTs its own callback.

Kept bounded here: one copy of a message waits for a busy queue-worker at a time (its
ack_wait clock restarts when that copy starts), where NATS would resend every ack_wait.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["DEFAULT_ACK_WAIT", "DEFAULT_QUEUE", "QUEUE_ANNOTATION", "QueueFull",
           "QueueSettings", "Queues", "UnservedQueue", "parse_queue"]

log = logging.getLogger("emnist.gateway")

DEFAULT_QUEUE = "faas-request"  # CE's channel (faas_nats_channel)
QUEUE_ANNOTATION = "com.openfaas.queue"
DEFAULT_ACK_WAIT = 30.0  # the queue-worker's own default; the faas-netes chart sets 60s


class QueueFull(RuntimeError):
    """The async queues hold their maximum of calls or bytes (429)."""


class UnservedQueue(RuntimeError):
    """A call names a queue no queue-worker of this gateway serves."""


def parse_queue(item: str) -> tuple[str, int]:
    """``NAME=WORKERS`` (``--queue``) -> (name, workers >= 1)."""
    name, sep, count = item.partition("=")
    name = name.strip()
    if not sep or not name or not count.strip().isdigit() or int(count) < 1 \
            or len(name) > 253 or not all(c.isalnum() or c in "-_." for c in name):
        raise ValueError(f"queue {item!r} is not NAME=WORKERS (WORKERS >= 1)")
    if name == DEFAULT_QUEUE:
        raise ValueError(f"{DEFAULT_QUEUE} is the default queue: set its workers with "
                         "--queue-workers")
    return name, int(count)


@dataclass(frozen=True)
class QueueSettings:
    """How the gateway's queues are served (the queue-worker Deployments' settings)."""

    workers: int = 1
    ack_wait: float = DEFAULT_ACK_WAIT
    named: Mapping[str, int] = field(default_factory=dict)


@dataclass(eq=False)
class _Message:
    queue: str
    args: tuple[Any, ...]
    nbytes: int
    label: str = ""
    deliveries: int = 0
    held: int = 0  # copies waiting for a queue-worker, plus deliveries running
    acked: bool = False
    due: float | None = None  # when it is redelivered unless acknowledged first


@dataclass(eq=False)
class _Worker:
    index: int
    inbox: deque[_Message] = field(default_factory=deque)  # redeliveries sent to this one
    busy: bool = False

    @property
    def outstanding(self) -> int:
        return int(self.busy) + len(self.inbox)


@dataclass(eq=False)
class _Group:
    """One channel and the queue-workers of its group."""

    name: str
    workers: list[_Worker]
    pending: deque[_Message] = field(default_factory=deque)


class Queues:
    """The gateway's channels and queue-workers, bounded to ``max_items`` calls and
    ``max_bytes`` of bodies held (queued, running or waiting to be redelivered).

    ``run(*args, delivery)`` performs one delivery (``delivery`` counts from 1);
    ``release(*args)`` is called once per call when nothing will deliver it again (finished,
    or dropped by :meth:`close`)."""

    def __init__(self, run: Callable[..., None], settings: QueueSettings, max_items: int,
                 max_bytes: int, release: Callable[..., None] | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._run, self._release, self._clock = run, release, clock
        self.ack_wait = settings.ack_wait
        self._max_items, self._max_bytes = max(1, max_items), max(1, max_bytes)
        self._count = self._bytes = 0
        self._cond = threading.Condition()
        self._closed = False
        self._due: list[tuple[float, int, _Message]] = []
        self._seq = itertools.count()
        sizes = {DEFAULT_QUEUE: max(1, settings.workers), **dict(settings.named)}
        self._groups = {name: _Group(name, [_Worker(i) for i in range(n)])
                        for name, n in sizes.items()}
        self._threads = [
            threading.Thread(target=self._serve, args=(g, w), daemon=True,
                             name=f"queue-worker-{g.name}-{w.index}")
            for g in self._groups.values() for w in g.workers]
        self._threads.append(threading.Thread(target=self._redeliver, daemon=True,
                                              name="queue-ack-wait"))
        for t in self._threads:
            t.start()

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self._groups)

    def workers(self, queue: str) -> int:
        """How many queue-workers serve ``queue`` (0: none)."""
        group = self._groups.get(queue or DEFAULT_QUEUE)
        return len(group.workers) if group else 0

    def check_room(self, nbytes: int) -> None:
        """Raise :class:`QueueFull` if a call of ``nbytes`` would not fit now."""
        with self._cond:
            self._check(nbytes)

    def _check(self, nbytes: int) -> None:
        if self._closed:
            raise QueueFull("the gateway is shutting down")
        if self._count >= self._max_items or self._bytes + nbytes > self._max_bytes:
            raise QueueFull(f"the async queue is full ({self._count} calls, "
                            f"{self._bytes} bytes queued)")

    def submit(self, queue: str, args: tuple[Any, ...], nbytes: int, label: str = "") -> None:
        """Publish a call to ``queue`` ("" for the default; ``label`` names it in logs);
        :class:`QueueFull` beyond the bounds, :class:`UnservedQueue` if no queue-worker here
        serves it."""
        name = queue or DEFAULT_QUEUE
        with self._cond:
            group = self._groups.get(name)
            if group is None:
                raise UnservedQueue(f"queue {name[:253]!r} has no queue-workers here")
            self._check(nbytes)
            self._count += 1
            self._bytes += nbytes
            group.pending.append(_Message(name, args, nbytes, label))
            self._cond.notify_all()

    @property
    def pending(self) -> int:
        """Calls held: queued, running or waiting to be redelivered."""
        with self._cond:
            return self._count

    def close(self) -> None:
        """Drop what waits and stop the queue-workers (running calls finish on their own)."""
        dropped: list[_Message] = []
        with self._cond:
            self._closed = True
            for group in self._groups.values():
                dropped += group.pending
                group.pending.clear()
                for w in group.workers:
                    for msg in w.inbox:
                        msg.held -= 1
                        if msg.held == 0 and msg.deliveries:
                            dropped.append(msg)
                    w.inbox.clear()
            for msg in dropped:
                self._forget(msg)
            self._cond.notify_all()
        for msg in dropped:
            self._released(msg)

    # -- inside --------------------------------------------------------------------------------

    def _forget(self, msg: _Message) -> None:
        self._count -= 1
        self._bytes -= msg.nbytes

    def _released(self, msg: _Message) -> None:
        if self._release is not None:
            try:
                self._release(*msg.args)
            except Exception:  # noqa: BLE001 - a failed release must not stop a worker
                log.exception("releasing an async call failed")

    def _next(self, group: _Group, worker: _Worker) -> _Message | None:
        """The worker's next delivery (a redelivery sent to it first), None when closing."""
        with self._cond:
            while not self._closed:
                if worker.inbox:
                    msg = worker.inbox.popleft()
                    break
                if group.pending:
                    msg = group.pending.popleft()
                    msg.held += 1
                    break
                self._cond.wait()
            else:
                return None
            worker.busy = True
            msg.deliveries += 1
            if not msg.acked:
                msg.due = self._clock() + self.ack_wait
                heapq.heappush(self._due, (msg.due, next(self._seq), msg))
                self._cond.notify_all()  # the ack_wait clock may now expire sooner
            return msg

    def _serve(self, group: _Group, worker: _Worker) -> None:
        while (msg := self._next(group, worker)) is not None:
            try:
                self._run(*msg.args, msg.deliveries)
            except Exception:  # noqa: BLE001 - one failed call must not stop the worker
                log.exception("async call failed")
            with self._cond:  # the queue-worker acknowledges when its handler returns
                worker.busy = False
                msg.held -= 1
                if not msg.acked:
                    msg.acked, msg.due = True, None
                done = msg.held == 0
                if done:
                    self._forget(msg)
                self._cond.notify_all()
            if done:
                self._released(msg)

    def _redeliver(self) -> None:
        """NATS Streaming's ack_wait: an unacknowledged message goes to the group member with
        the fewest unacknowledged messages (an idle queue-worker first)."""
        with self._cond:
            while not self._closed:
                now = self._clock()
                while self._due and (self._due[0][2].due != self._due[0][0]
                                     or self._due[0][2].acked):
                    heapq.heappop(self._due)  # stale: acknowledged or rescheduled
                if not self._due:
                    self._cond.wait()
                    continue
                due, _, msg = self._due[0]
                if due > now:
                    self._cond.wait(due - now)
                    continue
                heapq.heappop(self._due)
                msg.due = None
                group = self._groups[msg.queue]
                target = min(group.workers, key=lambda w: (w.outstanding, w.index))
                target.inbox.append(msg)
                msg.held += 1
                log.warning("async call %s on %s: not acknowledged within ack_wait %gs; "
                            "delivered again (delivery %d)", msg.label, msg.queue,
                            self.ack_wait, msg.deliveries + 1)
                self._cond.notify_all()

