"""What one simulated run trains and how: the real run's settings plus the simulator's bounds.

The training fields mean what they mean in ``emnist.train.config.TrainConfig`` (Downpour and
averaging) and ``emnist.p2p.peer.PeerConfig`` (p2p); ``train_config()`` builds the real
TrainConfig, so ``pass_order`` and the seeds come from the real code.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from typing import Any

from emnist.p2p import compress
from emnist.train.config import ALGORITHMS, UPDATE_MODES, ConfigError, TrainConfig

SIM_ALGORITHMS = (*ALGORITHMS, "p2p")
MAX_WORKERS = 100_000


class SimConfigError(ValueError):
    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field = field_name


@dataclass(frozen=True)
class SimConfig:
    algorithm: str = "downpour"
    workers: int = 1
    model: str = "mlp"
    hidden_size: int = 100
    dropout_percent: float = 0.0  # the MLP's dropout
    model_dropout: float | None = None  # a torch model's (None: its published rate)
    dataset: str = "fashion-mnist"
    dataset_dir: str | None = None
    data_location: str = ""  # shards / split directory root ("" : the real default)
    seed: int = 0
    batch_size: int = 100
    alpha: float = 0.2  # Downpour / averaging learning rate
    iterations: int = 20  # passes (epochs for p2p), at most
    target_accuracy: float = 0.85
    n_fetch: int = 10
    n_push: int = 10
    update: str = "atomic"
    push_threshold: float = 0.0
    push_top_k: int = 0
    chunk_bytes: int = 384 * 1024
    average_every: int = 10
    barrier_timeout: float = 30.0
    tiered: bool = False  # a node-local tier in front of the store (local_store_url)
    sync_interval: float = 0.0  # tier sync interval (0: the cost file's)
    servers: int = 0  # store servers (0: the cost file's)
    # p2p
    lr: float = 0.3
    sync_every: int = 1  # minibatches per synchronous step (0: one step per epoch)
    compression: str = "none"
    qsgd_levels: int = 127
    topk_ratio: float = 0.01
    serverless: bool = False
    grad_parallel: int = 0  # serverless calls in flight per peer (0: min(sync_every, 16))
    patience: int = 3
    lr_patience: int = 2
    lr_factor: float = 0.5
    min_lr: float = 1e-3
    min_delta: float = 1e-4
    val_fraction: float = 1 / 12
    # the simulator's own bounds
    max_steps: int = 0  # minibatches per worker, at most (0: no limit)
    samples: int = 0  # training samples over all workers, at most (0: no limit)
    eval_samples: int = 0  # evaluate on the first N test images (0: all); time is for all
    max_events: int = 20_000_000  # stop the clock after this many events (0: never)
    max_memory_gb: float = 8.0  # refuse runs whose parameter copies would need more
    spread: bool = True  # compute time spread and drift on/off
    timing_seed: int = 0  # seeds the spread and drift only (the training seed is ``seed``)
    note: str = ""

    def __post_init__(self) -> None:
        if self.algorithm not in SIM_ALGORITHMS:
            raise SimConfigError("algorithm", f"must be one of {', '.join(SIM_ALGORITHMS)}")
        ints = {"workers": (1, MAX_WORKERS), "hidden_size": (1, 1_000_000),
                "batch_size": (1, 65_536), "iterations": (1, 100_000),
                "n_fetch": (1, 1_000_000), "n_push": (1, 1_000_000),
                "push_top_k": (0, 1_000_000), "chunk_bytes": (4, 900 * 1024),
                "average_every": (1, 1_000_000), "servers": (0, 10_000),
                "sync_every": (0, 1_000_000), "qsgd_levels": (1, 127),
                "grad_parallel": (0, 10_000), "patience": (1, 100_000),
                "lr_patience": (1, 100_000), "max_steps": (0, 10**9), "samples": (0, 10**12),
                "eval_samples": (0, 10**9), "seed": (0, 2**32 - 1),
                "timing_seed": (0, 2**32 - 1), "max_events": (0, 10**12)}
        for name, (lo, hi) in ints.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
                raise SimConfigError(name, f"must be an integer in [{lo}, {hi}], got {v!r}")
        nums = {"dropout_percent": (0, 1), "alpha": (0, 100), "target_accuracy": (0, 1),
                "push_threshold": (0, 1e6), "barrier_timeout": (0, 86_400),
                "sync_interval": (0, 3600), "lr": (0, 100), "topk_ratio": (0, 1),
                "lr_factor": (0, 1), "min_lr": (0, 100), "min_delta": (0, 1e6),
                "val_fraction": (0, 0.5), "max_memory_gb": (0, 1e5)}
        for name, (lo, hi) in nums.items():
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or not lo <= v <= hi:
                raise SimConfigError(name, f"must be a number in [{lo}, {hi}], got {v!r}")
        if self.dropout_percent >= 1:
            raise SimConfigError("dropout_percent", "must be below 1")
        if self.update not in UPDATE_MODES:
            raise SimConfigError("update", f"must be one of {', '.join(UPDATE_MODES)}")
        if self.compression not in compress.NAMES:
            raise SimConfigError("compression", f"must be one of {', '.join(compress.NAMES)}")
        if self.chunk_bytes % 4:
            raise SimConfigError("chunk_bytes", "must be a multiple of 4")
        if self.serverless and self.algorithm != "p2p":
            raise SimConfigError("serverless", "serverless gradients are a p2p variant")
        if self.algorithm == "p2p" and self.dropout_percent:
            raise SimConfigError("dropout_percent", "p2p peers train without dropout")
        try:
            self.train_config()  # the real config's own checks (model, dataset, ...)
        except ConfigError as e:
            raise SimConfigError(e.field, str(e).split(": ", 1)[-1]) from None

    def train_config(self) -> TrainConfig:
        """The real TrainConfig of this run (Downpour / averaging)."""
        return TrainConfig(alpha=self.alpha, iterations=self.iterations,
                           hidden_size=self.hidden_size, dropout_percent=self.dropout_percent,
                           batch_size=self.batch_size, number_of_workers=self.workers,
                           n_fetch=self.n_fetch, n_push=self.n_push,
                           # p2p's 0 (no target) is not a TrainConfig value
                           target_accuracy=(self.target_accuracy if self.algorithm != "p2p"
                                            else self.target_accuracy or 1.0),
                           dataset=self.dataset,
                           dataset_dir=self.dataset_dir, data_location=self.data_location,
                           algorithm=self.algorithm if self.algorithm != "p2p" else "downpour",
                           update=self.update, push_threshold=self.push_threshold,
                           push_top_k=self.push_top_k, average_every=self.average_every,
                           barrier_timeout=self.barrier_timeout, chunk_bytes=self.chunk_bytes,
                           seed=self.seed, model=self.model, model_dropout=self.model_dropout)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SimConfig:
        names = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise SimConfigError(unknown[0], "unknown field")
        return cls(**d)
