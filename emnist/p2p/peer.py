"""One peer of peer-to-peer synchronous SGD: no parameter server, gradients over a broker.

Every peer starts from the same seeded parameters. At each synchronous step a peer computes
the mean gradient of its next ``sync_every`` minibatches (``sync_every=0``: the whole
partition, one exchange per pass as in the original), publishes it (compressed) on the step's
topic, collects every other present peer's gradient for the same (run, step), sums all of them
in rank order, divides by their count and takes the step. Every peer decodes the same bytes
and adds in the same order, so all peers hold bit-identical parameters after every step.

After each epoch every peer validates on its own held-out part and on its slice of the test
set and meets the others at a barrier that exchanges those numbers, so early stopping
(validation loss, ``patience``), learning-rate reduction on plateau and the target check are
decided identically everywhere. A missing peer makes the others fail with :class:`PeerTimeout`
after ``timeout`` seconds, or, with ``allow_missing``, go on without it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from crc32c import crc32c

from emnist.data import shard_sizes
from emnist.model import MLP, MLPShape, init_params, to_float
from emnist.p2p import compress, messages
from emnist.p2p.broker import Broker, open_broker
from emnist.p2p.messages import BadMessage, Message
from emnist.p2p.metrics import MetricsWriter, peak_rss_mb
from emnist.p2p.split import Partition, load_partition
from emnist.store import codec
from emnist.store.keys import valid_run_id
from emnist.train.config import ConfigError

log = logging.getLogger("emnist.p2p")


class PeerTimeout(RuntimeError):
    """Other peers' messages did not arrive in time (a peer died or hangs)."""


@dataclass(frozen=True)
class PeerConfig:
    run_id: str
    rank: int
    size: int
    data: str  # split directory or http(s) URL prefix (see split.py)
    broker_url: str = "redis://127.0.0.1:6379/0"
    compression: str = "none"
    qsgd_levels: int = 127
    topk_ratio: float = 0.01
    batch_size: int = 100
    sync_every: int = 1  # minibatches per synchronous step; 0 = one step per epoch
    lr: float = 0.3
    hidden: int = 100
    epochs: int = 20
    target_accuracy: float = 0.0  # 0: no target, run to early stopping or `epochs`
    patience: int = 3
    lr_patience: int = 2
    lr_factor: float = 0.5
    min_lr: float = 1e-3
    min_delta: float = 1e-4
    timeout: float = 60.0  # seconds to wait for the other peers at any step or barrier
    start_timeout: float = 120.0  # ... at the first step (peers start at different times)
    allow_missing: bool = False
    seed: int = 0
    metrics_dir: str | None = None
    # serverless: each minibatch's gradient computed by the emnist-grad function
    serverless: bool = False
    gateway: str = "http://127.0.0.1:8080"
    store_url: str = "memcached://127.0.0.1:11211"
    function: str = "emnist-grad"

    def __post_init__(self) -> None:
        if not valid_run_id(self.run_id):
            raise ConfigError("run_id", "use 1-64 letters, digits, '-' or '_'")
        if self.size < 1:
            raise ConfigError("size", f"must be >= 1, got {self.size}")
        if not 0 <= self.rank < self.size:
            raise ConfigError("rank", f"must be in 0..{self.size - 1}, got {self.rank}")
        if self.compression not in compress.NAMES:
            raise ConfigError("compression", f"must be one of {list(compress.NAMES)}")
        for name in ("batch_size", "hidden", "epochs", "patience", "lr_patience"):
            if getattr(self, name) < 1:
                raise ConfigError(name, f"must be >= 1, got {getattr(self, name)}")
        for name in ("lr", "timeout", "start_timeout"):
            if not getattr(self, name) > 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        if self.sync_every < 0:
            raise ConfigError("sync_every", f"must be >= 0 (0 = epoch), got {self.sync_every}")
        if not 0.0 <= self.target_accuracy <= 1.0:
            raise ConfigError("target_accuracy", "must be in [0, 1]")
        if not 0.0 < self.lr_factor <= 1.0:
            raise ConfigError("lr_factor", "must be in (0, 1]")


class GradientSource(Protocol):
    def compute(self, params: np.ndarray, step: int,
                batches: np.ndarray) -> tuple[np.ndarray, float]: ...
    def close(self) -> None: ...


class LocalGradients:
    """The peer computes its minibatches' gradients itself (batch b = rows [bB, (b+1)B))."""

    def __init__(self, part: Partition, shape: MLPShape, batch_size: int) -> None:
        self.x, self.y, self.b = part.train_x, part.train_y, batch_size
        self.model = MLP(shape)
        self.acc = np.zeros(shape.num_params, dtype=np.float32)

    def compute(self, params: np.ndarray, step: int,
                batches: np.ndarray) -> tuple[np.ndarray, float]:
        self.acc[:] = 0.0
        loss = 0.0
        for b in batches:
            rows = slice(int(b) * self.b, (int(b) + 1) * self.b)
            batch_loss, g = self.model.loss_and_grad(params, to_float(self.x[rows]), self.y[rows])
            self.acc += g
            loss += batch_loss
        return self.acc * np.float32(1.0 / len(batches)), loss / len(batches)

    def close(self) -> None:
        pass


def collect(broker: Broker, topic: str, want: set[int], deadline: float,
            accept: Callable[[Message], Any]) -> tuple[dict[int, Any], int]:
    """Read ``topic`` until every rank in ``want`` has sent one acceptable message or the
    deadline passes; returns ({rank: accept(msg)}, refused). A message that fails
    ``accept`` (BadMessage) is logged as an error and skipped: the wait goes on."""
    got: dict[int, Any] = {}
    refused = 0
    if not want:
        return got, refused
    with closing(broker.receive(topic, deadline)) as stream:
        for raw in stream:
            try:
                msg = messages.unpack(raw, topic)
                value = accept(msg)
                if msg.sender not in want:
                    raise BadMessage(f"sender {msg.sender} is not a peer this step waits for")
                if msg.sender in got:
                    raise BadMessage(f"a second message from peer {msg.sender}")
            except BadMessage as e:
                refused += 1
                log.error("refused a message on %s: %s", topic, e)
                continue
            got[msg.sender] = value
            if want <= got.keys():
                break
    return got, refused


class Peer:
    def __init__(self, cfg: PeerConfig, broker: Broker | None = None,
                 source: GradientSource | None = None) -> None:
        self.cfg = cfg
        self.part = load_partition(cfg.data, cfg.rank)
        man = self.part.manifest
        if man["peers"] != cfg.size:
            raise ConfigError("size", f"{cfg.data} is split for {man['peers']} peers, "
                                      f"not {cfg.size}")
        self.shape = MLPShape(man["features"], cfg.hidden, man["num_classes"])
        self.n = self.shape.num_params
        self.batches = min(man["train_sizes"]) // cfg.batch_size  # equal on every peer
        if self.batches < 1:
            raise ConfigError("batch_size", f"larger than a peer's partition ({cfg.data})")
        self.k = cfg.sync_every or self.batches
        if self.k > self.batches:
            raise ConfigError("sync_every", f"{self.k} minibatches per step, but a peer has "
                                            f"only {self.batches}")
        self.steps_per_epoch = self.batches // self.k
        self.params = init_params(self.shape, cfg.seed)  # the same on every peer
        self.model = MLP(self.shape)
        self.comp = compress.make(cfg.compression, seed=cfg.seed * 1009 + cfg.rank + 1,
                                  levels=cfg.qsgd_levels, ratio=cfg.topk_ratio)
        sizes = shard_sizes(len(self.part.test_y), cfg.size)  # this peer's slice of the test set
        start = sum(sizes[:cfg.rank])
        self.test = slice(start, start + sizes[cfg.rank])
        self.broker = broker or open_broker(cfg.broker_url, cfg.run_id, cfg.rank, cfg.size)
        if source is None:
            if cfg.serverless:
                from emnist.p2p.serverless import ServerlessGradients
                source = ServerlessGradients(cfg, self.shape)
            else:
                source = LocalGradients(self.part, self.shape, cfg.batch_size)
        self.source = source
        self.present = set(range(cfg.size))
        self.metrics = MetricsWriter(cfg.metrics_dir, cfg.rank)
        self.lr = cfg.lr
        self.step_no = 0
        self.refused = 0
        self.missing: list[int] = []
        self.publish_s, self.sent = 0.0, 0

    # -- exchange ----------------------------------------------------------------------------

    def exchange(self, topic: str, data: bytes, accept: Callable[[Message], Any]) -> dict:
        """Publish ``data`` on ``topic`` to the others, then collect theirs."""
        others = self.present - {self.cfg.rank}
        t0 = time.perf_counter()
        self.sent = self.broker.publish(topic, data, sorted(others))
        self.publish_s = time.perf_counter() - t0
        first = self.step_no == 0
        wait = self.cfg.start_timeout if first else self.cfg.timeout
        got, refused = collect(self.broker, topic, others, time.monotonic() + wait, accept)
        self.refused += refused
        missing = others - got.keys()
        if missing:
            who = ", ".join(map(str, sorted(missing)))
            if not self.cfg.allow_missing:
                raise PeerTimeout(f"run {self.cfg.run_id}: peer {self.cfg.rank} timed out after "
                                  f"{wait:g}s on {topic}: nothing from peer(s) {who} (dead?); "
                                  "--allow-missing goes on without them")
            log.warning("%s: no message from peer(s) %s within %gs: going on without them",
                        topic, who, wait)
            self.present -= missing
            self.missing += sorted(missing)
        self.broker.finished(topic)
        return got

    def step(self, epoch: int, batches: np.ndarray) -> dict[str, Any]:
        cfg, step = self.cfg, self.step_no
        t0 = time.perf_counter()
        grad, loss = self.source.compute(self.params, step, batches)
        t1 = time.perf_counter()
        parts = self.comp.compress(grad)
        own = self.comp.decompress(parts, self.n)  # exactly what the others will decode
        data = messages.gradient(cfg.run_id, step, epoch, cfg.rank, self.comp, parts, self.n,
                                 loss)
        t2 = time.perf_counter()

        def accept(msg: Message) -> np.ndarray:
            messages.check(msg, run=cfg.run_id, kind="grad", size=cfg.size, step=step,
                           epoch=epoch)
            return messages.read_gradient(msg, self.comp, self.n)

        got = self.exchange(f"g.{step}", data, accept)
        got[cfg.rank] = own
        t3 = time.perf_counter()
        total = np.zeros(self.n, dtype=np.float32)
        for r in sorted(got):  # a fixed order: every peer computes the same bits
            total += got[r]
        self.params -= np.float32(self.lr) * (total * np.float32(1.0 / len(got)))
        t4 = time.perf_counter()
        self.step_no += 1
        # send: compress + encode + publish; receive: the wait for and decoding of the others
        return {"kind": "step", "rank": cfg.rank, "epoch": epoch, "step": step,
                "compute_s": t1 - t0, "send_s": (t2 - t1) + self.publish_s,
                "recv_s": (t3 - t2) - self.publish_s, "update_s": t4 - t3,
                "bytes_sent": self.sent, "loss": loss,
                "peers": len(got), "params_crc": crc32c(self.params.data)}

    # -- epoch end ---------------------------------------------------------------------------

    def validate(self) -> dict[str, float]:
        p, part = self.params, self.part
        nv = len(part.val_y)
        val_sum = self.model.loss(p, part.val_x, part.val_y) * nv if nv else 0.0
        tx, ty = part.test_x[self.test], part.test_y[self.test]
        correct = round(self.model.accuracy(p, tx, ty) * len(ty))
        return {"val_sum": val_sum, "val_n": nv, "correct": correct, "test_n": len(ty)}

    def barrier(self, epoch: int, stats: dict[str, float]) -> dict[int, dict[str, float]]:
        cfg = self.cfg
        data = messages.pack({"run": cfg.run_id, "kind": "barrier", "epoch": epoch,
                              "sender": cfg.rank, "step": self.step_no, "stats": stats})

        def accept(msg: Message) -> dict[str, float]:
            messages.check(msg, run=cfg.run_id, kind="barrier", size=cfg.size, epoch=epoch,
                           step=self.step_no)
            s = msg.meta.get("stats")
            if not isinstance(s, dict) or set(s) != set(stats):
                raise BadMessage(f"barrier stats {s!r} malformed")
            return s

        got = self.exchange(f"b.{epoch}", data, accept)
        got[cfg.rank] = stats
        return got

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.metrics.write({"kind": "start", "config": asdict(cfg), "params": self.n,
                            "batches": self.batches, "steps_per_epoch": self.steps_per_epoch,
                            "time": time.time()})
        rng = np.random.default_rng(cfg.seed + 1 + cfg.rank)
        best, bad, plateau = float("inf"), 0, 0
        start = time.perf_counter()
        reason, acc, epoch = "max-epochs", 0.0, 0
        try:
            for epoch in range(1, cfg.epochs + 1):
                order = rng.permutation(self.batches)
                sums = dict.fromkeys(("compute_s", "send_s", "recv_s", "update_s"), 0.0)
                sent, loss = 0, 0.0
                for s in range(self.steps_per_epoch):
                    rec = self.step(epoch, order[s * self.k:(s + 1) * self.k])
                    self.metrics.write(rec)
                    for key in sums:
                        sums[key] += rec[key]
                    sent += rec["bytes_sent"]
                    loss += rec["loss"]
                t0 = time.perf_counter()
                stats = self.validate()
                t1 = time.perf_counter()
                got = self.barrier(epoch, stats)
                t2 = time.perf_counter()
                ranks = sorted(got)
                val_loss = sum(got[r]["val_sum"] for r in ranks) / max(
                    1, sum(got[r]["val_n"] for r in ranks))
                acc = sum(got[r]["correct"] for r in ranks) / max(
                    1, sum(got[r]["test_n"] for r in ranks))
                self.metrics.write({
                    "kind": "epoch", "rank": cfg.rank, "epoch": epoch, "steps": self.step_no,
                    **sums, "val_s": t1 - t0, "barrier_s": t2 - t1, "bytes_sent": sent,
                    "loss": loss / self.steps_per_epoch, "val_loss": val_loss,
                    "test_accuracy": acc, "lr": self.lr, "peers": len(got),
                    "peak_rss_mb": peak_rss_mb(), "t": t2 - start})
                log.info("epoch %d: loss %.4f val_loss %.4f test acc %.4f lr %g (%.2fs)",
                         epoch, loss / self.steps_per_epoch, val_loss, acc, self.lr,
                         t2 - start)
                if cfg.target_accuracy and acc >= cfg.target_accuracy:
                    reason = "target"
                    break
                if val_loss < best - cfg.min_delta:
                    best, bad, plateau = val_loss, 0, 0
                else:
                    bad, plateau = bad + 1, plateau + 1
                if bad >= cfg.patience:
                    reason = "early-stopping"
                    break
                if plateau >= cfg.lr_patience and self.lr > cfg.min_lr:
                    self.lr, plateau = max(self.lr * cfg.lr_factor, cfg.min_lr), 0
                    log.info("validation loss plateaued: learning rate now %g", self.lr)
            result = {"kind": "result", "rank": cfg.rank, "run_id": cfg.run_id,
                      "reason": reason, "epochs": epoch, "steps": self.step_no,
                      "test_accuracy": acc, "reached": reason == "target",
                      "t": time.perf_counter() - start, "refused": self.refused,
                      "missing": self.missing, "params_crc": crc32c(self.params.data)}
            self.metrics.write(result)
            if cfg.metrics_dir:
                Path(cfg.metrics_dir, f"params-{cfg.rank}.emns").write_bytes(
                    codec.encode(self.params, clock=self.step_no))
            return result
        except PeerTimeout as e:
            self.metrics.write({"kind": "result", "rank": cfg.rank, "run_id": cfg.run_id,
                                "reason": "timeout", "error": str(e), "epochs": epoch,
                                "steps": self.step_no, "reached": False,
                                "t": time.perf_counter() - start})
            raise

    def close(self) -> None:
        self.source.close()
        self.broker.close()
        self.metrics.close()


def run_peer(cfg: PeerConfig) -> dict[str, Any]:
    """Run one peer to the end; prints its result as one JSON line."""
    peer = Peer(cfg)
    try:
        result = peer.run()
    finally:
        peer.close()
    print(json.dumps({"p2p_result": result}), flush=True)
    return result
