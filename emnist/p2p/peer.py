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

The network is any model of ``emnist.models`` (``model``: the MLP by default, or lenet5, cnn,
mobilenet_v3_small, squeezenet1_1, vgg11; the seed's names such as ``squeezenet1.1`` resolve),
built from the split's dataset (image shape, classes, normalisation). Dropout masks come from
(seed, rank, step, batch), so a minibatch's gradient is the same bits whether the peer or
``emnist-grad`` computes it. Batch-norm statistics are never exchanged: before validating, a
peer re-estimates them for the current parameters from the first ``CALIB_IMAGES`` images of
its own training partition (the same rule with and without serverless gradients).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterable
from contextlib import closing
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from crc32c import crc32c

from emnist.data import shard_sizes
from emnist.models import Model, ModelSpec, build_model, canonical_name
from emnist.p2p import compress, messages
from emnist.p2p.broker import Broker, open_broker
from emnist.p2p.messages import BadMessage, Message
from emnist.p2p.metrics import MetricsWriter, peak_rss_mb
from emnist.p2p.split import Partition, load_partition
from emnist.store import codec
from emnist.store.keys import valid_run_id
from emnist.train.config import ConfigError

log = logging.getLogger("emnist.p2p")
CALIB_IMAGES = 2048  # training images a peer re-estimates batch-norm statistics from
BARRIER_BYTES = 1 << 20  # a barrier message, at most


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
    model: str = "mlp"  # a name of emnist.models (aliases accepted, stored canonical)
    hidden: int = 100  # the MLP's hidden width
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
    frame_bytes: int = messages.MAX_FRAME  # a message bigger than this travels in frames

    def __post_init__(self) -> None:
        try:
            object.__setattr__(self, "model", canonical_name(self.model))
        except ValueError as e:
            raise ConfigError("model", str(e)) from None
        if not 4096 <= self.frame_bytes <= 256 << 20:
            raise ConfigError("frame_bytes", f"must be in [4096, {256 << 20}], got "
                                             f"{self.frame_bytes}")
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


def model_spec(cfg: PeerConfig, manifest: dict[str, Any]) -> ModelSpec:
    """The network every peer (and emnist-grad) builds for this split."""
    return split_spec(cfg.model, cfg.hidden, manifest)


def split_spec(model: str, hidden: int, manifest: dict[str, Any]) -> ModelSpec:
    """``model`` (the MLP with ``hidden`` units) for a split's dataset, classes and images
    (the simulated peers build theirs with this too)."""
    extra = {"hidden": hidden} if model == "mlp" else {}
    try:
        spec = ModelSpec.for_dataset(model, str(manifest["dataset"]),
                                     classes=int(manifest["num_classes"]), **extra)
    except ValueError as e:
        raise ConfigError("model", str(e)) from None
    if spec.inputs != manifest["features"]:
        raise ConfigError("model", f"{spec.name} takes {spec.channels}x{spec.height}x"
                                   f"{spec.width} images, the split's have {manifest['features']} "
                                   "values")
    return spec


def has_dropout(spec: ModelSpec) -> bool:
    """Whether the network draws dropout masks (seeding them costs ~10 us a minibatch)."""
    if spec.name in ("mlp", "lenet5"):
        return bool(spec.dropout)
    return spec.dropout is None or spec.dropout > 0


def dropout_key(seed: int, rank: int, step: int, batch: int) -> list[int]:
    """The seed of one minibatch's dropout masks: the same wherever it is computed."""
    return [seed, rank, step, batch]


class LocalGradients:
    """The peer computes its minibatches' gradients itself (batch b = rows [bB, (b+1)B))."""

    def __init__(self, part: Partition, model: Model, batch_size: int, seed: int = 0,
                 rank: int = 0) -> None:
        self.x, self.y, self.b = part.train_x, part.train_y, batch_size
        self.model, self.seed, self.rank = model, seed, rank
        self.dropout = has_dropout(model.spec)
        self.acc = np.zeros(model.num_params, dtype=np.float32)

    def compute(self, params: np.ndarray, step: int,
                batches: np.ndarray) -> tuple[np.ndarray, float]:
        """The mean gradient (a buffer reused by the next call) and the mean loss."""
        self.acc[:] = 0.0
        loss = 0.0
        for b in batches:
            if self.dropout:
                self.model.rng = np.random.default_rng(dropout_key(self.seed, self.rank, step,
                                                                   int(b)))
            rows = slice(int(b) * self.b, (int(b) + 1) * self.b)
            batch_loss, g = self.model.loss_and_grad(params, self.x[rows], self.y[rows])
            self.acc += g
            loss += batch_loss
        self.acc *= np.float32(1.0 / len(batches))
        return self.acc, loss / len(batches)

    def close(self) -> None:
        pass


def collect(broker: Broker, topic: str, want: set[int], deadline: float,
            accept: Callable[[Message], Any],
            max_bytes: int = 1 << 30) -> tuple[dict[int, Any], int]:
    """Read ``topic`` until every rank in ``want`` has sent one acceptable message or the
    deadline passes; returns ({rank: accept(msg)}, refused). A message that fails
    ``accept`` (BadMessage) is logged as an error and skipped: the wait goes on. Framed
    messages are reassembled (``messages.Assembler``); none may exceed ``max_bytes``."""
    got: dict[int, Any] = {}
    refused = 0
    if not want:
        return got, refused
    asm = messages.Assembler(max_bytes, want, topic)
    with closing(broker.receive(topic, deadline)) as stream:
        for raw in stream:
            try:
                whole = asm.feed(raw)
                if whole is None:
                    continue  # a frame of a message still arriving
                msg = messages.unpack(whole, topic)
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
        self.spec = model_spec(cfg, man)
        self.model = build_model(self.spec, seed=cfg.seed)
        self.n = self.model.num_params
        self.batches = min(man["train_sizes"]) // cfg.batch_size  # equal on every peer
        if self.batches < 1:
            raise ConfigError("batch_size", f"larger than a peer's partition ({cfg.data})")
        self.k = cfg.sync_every or self.batches
        if self.k > self.batches:
            raise ConfigError("sync_every", f"{self.k} minibatches per step, but a peer has "
                                            f"only {self.batches}")
        self.steps_per_epoch = self.batches // self.k
        self.params = self.model.init_params(cfg.seed)  # the same on every peer
        self.calib = self.part.train_x[:CALIB_IMAGES]
        self._total = np.zeros(self.n, dtype=np.float32)
        self.max_bytes = 0  # set per compressor below: what a gradient message may take
        self.comp = compress.make(cfg.compression, seed=cfg.seed * 1009 + cfg.rank + 1,
                                  levels=cfg.qsgd_levels, ratio=cfg.topk_ratio)
        self.max_bytes = self.comp.max_bytes(self.n) + messages.HEADROOM
        sizes = shard_sizes(len(self.part.test_y), cfg.size)  # this peer's slice of the test set
        start = sum(sizes[:cfg.rank])
        self.test = slice(start, start + sizes[cfg.rank])
        self.broker = broker or open_broker(cfg.broker_url, cfg.run_id, cfg.rank, cfg.size)
        if source is None:
            if cfg.serverless:
                from emnist.p2p.serverless import ServerlessGradients
                source = ServerlessGradients(cfg, self.spec, self.n)
            else:
                source = LocalGradients(self.part, self.model, cfg.batch_size, cfg.seed,
                                        cfg.rank)
        self.source = source
        self.present = set(range(cfg.size))
        self.metrics = MetricsWriter(cfg.metrics_dir, cfg.rank)
        self.lr = cfg.lr
        self.step_no = 0
        self.refused = 0
        self.missing: list[int] = []
        self.publish_s, self.sent = 0.0, 0

    # -- exchange ----------------------------------------------------------------------------

    def exchange(self, topic: str, frames: Iterable[bytes], accept: Callable[[Message], Any],
                 max_bytes: int) -> dict:
        """Publish ``frames`` (one message) on ``topic`` to the others, then collect theirs."""
        others = self.present - {self.cfg.rank}
        t0 = time.perf_counter()
        self.sent = 0
        for frame in frames:
            self.sent += self.broker.publish(topic, frame, sorted(others))
        self.publish_s = time.perf_counter() - t0
        first = self.step_no == 0
        wait = self.cfg.start_timeout if first else self.cfg.timeout
        got, refused = collect(self.broker, topic, others, time.monotonic() + wait, accept,
                               max_bytes)
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
        frames = messages.gradient_frames(cfg.run_id, step, epoch, cfg.rank, self.comp, parts,
                                          self.n, loss, cfg.frame_bytes)
        t2 = time.perf_counter()

        def accept(msg: Message) -> np.ndarray:
            messages.check(msg, run=cfg.run_id, kind="grad", size=cfg.size, step=step,
                           epoch=epoch)
            return messages.read_gradient(msg, self.comp, self.n)

        got = self.exchange(f"g.{step}", frames, accept, self.max_bytes)
        got[cfg.rank] = own
        t3 = time.perf_counter()
        peers = len(got)
        total = self._total
        total[:] = 0.0
        for r in sorted(got):  # a fixed order: every peer computes the same bits
            total += got[r]
        del got, own  # the others' gradients (views into their messages) go now
        total *= np.float32(1.0 / peers)
        total *= np.float32(self.lr)  # lr * (sum / n), as one expression: the same bits
        self.params -= total
        t4 = time.perf_counter()
        self.step_no += 1
        # send: compress + encode + publish; receive: the wait for and decoding of the others
        return {"kind": "step", "rank": cfg.rank, "epoch": epoch, "step": step,
                "compute_s": t1 - t0, "send_s": (t2 - t1) + self.publish_s,
                "recv_s": (t3 - t2) - self.publish_s, "update_s": t4 - t3,
                "bytes_sent": self.sent, "loss": loss,
                "peers": peers, "params_crc": crc32c(self.params.data)}

    # -- epoch end ---------------------------------------------------------------------------

    def _evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[int, float]:
        """(correct, summed cross-entropy) in eval mode, in slices of the model's batch."""
        correct, total = 0, 0.0
        batch = getattr(self.model, "default_batch", 256)
        for i in range(0, len(y), batch):
            z = np.array(self.model.logits(self.params, self.model.prepare(x[i:i + batch])),
                         dtype=np.float32)
            yb = y[i:i + batch]
            correct += int((z.argmax(axis=1) == yb).sum())
            z -= z.max(axis=1, keepdims=True)
            logp = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
            total += float(-logp[np.arange(len(z)), yb].sum())
        return correct, total

    def validate(self) -> dict[str, float]:
        part = self.part
        if self.model.needs_calibration:  # batch-norm statistics for these parameters
            self.model.calibrate(self.params, self.calib)
        _, val_sum = self._evaluate(part.val_x, part.val_y)
        tx, ty = part.test_x[self.test], part.test_y[self.test]
        correct, _ = self._evaluate(tx, ty)
        return {"val_sum": val_sum, "val_n": len(part.val_y), "correct": correct,
                "test_n": len(ty)}

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

        got = self.exchange(f"b.{epoch}", [data], accept, BARRIER_BYTES)
        got[cfg.rank] = stats
        return got

    # -- the loop ----------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        self.metrics.write({"kind": "start", "config": asdict(cfg), "params": self.n,
                            "model": self.spec.to_dict(),
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
