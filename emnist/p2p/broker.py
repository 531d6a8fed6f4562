"""Message brokers for peers: Redis Streams (default) and RabbitMQ (pika, the original's choice).

A broker is opened per peer with the run id and the peer's rank. Messages travel on *topics*
named by the run and the step (``g.12``: step 12's gradients; ``b.3``: epoch 3's barrier), so a
late message can never be read as another step's:

- Redis: one stream per topic, ``emnist:p2p:{run}:{topic}``; every peer reads the whole stream.
  Streams expire after ``ttl`` seconds, a peer deletes the previous topic's stream once it has
  everything of the current one (by then every peer has finished the previous), and
  :meth:`cleanup` deletes what is left of the run.
- RabbitMQ: one topic exchange per run, ``emnist.p2p.{run}``, one queue per peer,
  ``emnist.p2p.{run}.{rank}``, and the routing key ``{topic}.{rank}`` (see
  :class:`RabbitBroker` for why not a queue per step); :meth:`cleanup` deletes the queues
  (and so the auto-delete exchange), and queues nobody uses expire anyway (``x-expires``).

Bytes in, bytes out: what a message means is :mod:`.messages`' business.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from urllib.parse import urlsplit

from emnist.store.keys import valid_run_id
from emnist.store.kv import redact


class BrokerError(RuntimeError):
    """The broker could not be reached or refused an operation."""


class Broker:
    url: str

    def publish(self, topic: str, data: bytes, dests: Iterable[int]) -> int:
        """Send ``data`` to ``dests`` on ``topic``; returns the bytes that left this peer."""
        raise NotImplementedError

    def receive(self, topic: str, deadline: float) -> Iterator[bytes]: ...
    def finished(self, topic: str) -> None: ...
    def cleanup(self) -> None: ...
    def close(self) -> None: ...


class RedisBroker(Broker):
    READ_COUNT = 8  # entries per XREAD: with 8 MiB frames, at most 64 MiB per reply

    def __init__(self, url: str, run: str, rank: int, ttl: int = 3600) -> None:
        import redis

        self.url, self.run, self.rank, self.ttl = redact(url), run, rank, ttl
        self._redis_error = redis.RedisError
        self.r = redis.Redis.from_url(url, socket_timeout=30, socket_connect_timeout=10)
        self._last: dict[str, bytes | str] = {}
        self._me = str(rank).encode()
        self._prev: str | None = None

    def key(self, topic: str) -> str:
        return f"emnist:p2p:{self.run}:{topic}"

    def _call(self, op, *args, **kw):
        try:
            return op(*args, **kw)
        except self._redis_error as e:
            raise BrokerError(f"redis broker at {self.url}: {e}") from None

    def publish(self, topic: str, data: bytes, dests: Iterable[int] = ()) -> int:
        pipe = self.r.pipeline(transaction=False)
        pipe.xadd(self.key(topic), {"s": self.rank, "m": data})
        pipe.expire(self.key(topic), self.ttl)
        self._call(pipe.execute)
        return len(data)  # one copy to the stream, however many read it

    def receive(self, topic: str, deadline: float) -> Iterator[bytes]:
        key = self.key(topic)
        last = self._last.get(topic, "0-0")
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            got = self._call(self.r.xread, {key: last}, count=self.READ_COUNT,
                             block=max(1, int(min(left, 1.0) * 1000)))
            for _, entries in got or ():
                for entry_id, fields in entries:
                    last = self._last[topic] = entry_id
                    if fields.get(b"s") != self._me:  # every peer reads the whole stream
                        yield fields.get(b"m", b"")

    def finished(self, topic: str) -> None:
        if self._prev is not None:
            self._call(self.r.delete, self.key(self._prev))
            self._last.pop(self._prev, None)
        self._prev = topic

    def cleanup(self) -> None:
        keys = list(self._call(self.r.scan_iter, match=self.key("*"), count=1000))
        if keys:
            self._call(self.r.delete, *keys)

    def close(self) -> None:
        self.r.close()


class RabbitBroker(Broker):
    """One topic exchange per run, one queue per (run, peer), one routing key per (topic, peer).

    Declaring a queue costs RabbitMQ ~6 ms (measured here), so a queue per step (~3 declares
    per peer per step) made a step ~40 ms; instead every queue and binding is declared once per
    run, by whichever peer comes first (so nothing is unroutable before its receiver looks),
    and the step lives in the routing key ``{topic}.{rank}``: a message is delivered to the
    step that its key names, a late one to nobody (dropped once that step is finished).
    """

    MAX_PENDING_TOPICS = 16

    def __init__(self, url: str, run: str, rank: int, size: int,
                 expires_s: float = 600) -> None:
        try:
            import pika
        except ImportError:
            raise BrokerError("amqp:// brokers need pika: pip install 'emnist[rabbitmq]' "
                              "(the `rabbitmq` extra)") from None
        self.url, self.run, self.rank, self.size = redact(url), run, rank, size
        self._errors = (pika.exceptions.AMQPError,)
        self._args = {"x-expires": int(expires_s * 1000)}
        self.exchange = f"emnist.p2p.{run}"
        params = pika.URLParameters(url)
        params.heartbeat = 600
        params.blocked_connection_timeout = 60
        params.connection_attempts = 3
        params.retry_delay = 1
        try:
            self.conn = pika.BlockingConnection(params)
            self.ch = self.conn.channel()
        except self._errors as e:
            raise BrokerError(f"rabbitmq broker at {self.url}: {type(e).__name__} {e}") from None
        self._ready = False
        self._gen = None
        self._pending: dict[str, list[bytes]] = {}
        self._done: set[str] = set()

    def queue(self, rank: int) -> str:
        return f"emnist.p2p.{self.run}.{rank}"

    def _call(self, op, *args, **kw):
        try:
            return op(*args, **kw)
        except self._errors as e:
            raise BrokerError(f"rabbitmq broker at {self.url}: {type(e).__name__} {e}") from None

    def _setup(self) -> None:
        if self._ready:
            return
        self._call(self.ch.exchange_declare, self.exchange, exchange_type="topic",
                   auto_delete=True)
        for r in range(self.size):
            self._call(self.ch.queue_declare, self.queue(r), arguments=self._args)
            self._call(self.ch.queue_bind, self.queue(r), self.exchange, routing_key=f"*.*.{r}")
        self._gen = self.ch.consume(self.queue(self.rank), auto_ack=True, inactivity_timeout=0.1)
        self._ready = True

    def publish(self, topic: str, data: bytes, dests: Iterable[int]) -> int:
        self._setup()
        sent = 0
        for d in dests:
            self._call(self.ch.basic_publish, self.exchange, f"{topic}.{d}", data)
            sent += len(data)
        return sent

    def receive(self, topic: str, deadline: float) -> Iterator[bytes]:
        self._setup()
        while self._pending.get(topic):
            yield self._pending[topic].pop(0)
        while time.monotonic() < deadline:
            method, _props, body = self._call(next, self._gen)
            if method is None:
                continue
            got = method.routing_key.rsplit(".", 1)[0]
            if got == topic:
                yield body
            elif got not in self._done:  # an early message: a peer is one topic ahead
                self._pending.setdefault(got, []).append(body)
                while len(self._pending) > self.MAX_PENDING_TOPICS:
                    self._pending.pop(next(iter(self._pending)))

    def finished(self, topic: str) -> None:
        self._pending.pop(topic, None)
        self._done.add(topic)

    def cleanup(self) -> None:
        """Delete the run's queues (all peers') and so its exchange (auto-delete)."""
        if self._gen is not None:
            self._call(self.ch.cancel)
            self._gen = None
        for r in range(self.size):
            self._call(self.ch.queue_delete, self.queue(r))
        self._ready = False

    def close(self) -> None:
        try:
            if self.conn.is_open:
                self.conn.close()
        except self._errors:
            pass


def open_broker(url: str, run: str, rank: int, size: int) -> Broker:
    """``redis://host:port/db`` (streams) or ``amqp://user:pw@host:port/vhost`` (RabbitMQ)."""
    if not valid_run_id(run):
        raise ValueError(f"invalid run id {run!r}: use 1-64 letters, digits, '-' or '_'")
    scheme = urlsplit(url).scheme
    if scheme in ("redis", "rediss", "unix"):
        return RedisBroker(url, run, rank)
    if scheme in ("amqp", "amqps"):
        return RabbitBroker(url, run, rank, size)
    raise BrokerError(f"unknown broker URL scheme {scheme!r} in {redact(url)!r}: use "
                      "redis://host:port/db or amqp://user:password@host:port/vhost")
