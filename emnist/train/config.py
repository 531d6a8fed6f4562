"""One validated training configuration, fed by the stack file's environment and the request.

The original's environment names stay valid (alpha, iterations, hidden_size, ...). Values from
the environment are strings and are parsed; values from a JSON request must already have the
right JSON type. Every failure names the field, so a handler can answer 400 with it.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

EXECUTION_TYPES = (1, 2, 3)  # 1: one function does all; 2: one call per pass; 3: setup + loops
ALGORITHMS = ("downpour", "averaging")
UPDATE_MODES = ("atomic", "overwrite")


class ConfigError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def default_data_location() -> str:
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return str(Path(cache) / "emnist" / "shards")


@dataclass(frozen=True)
class TrainConfig:
    alpha: float = 0.2
    iterations: int = 20
    hidden_size: int = 100
    pixels_per_image: int = 784
    num_labels: int | None = None  # None: the dataset's class count
    dropout_percent: float = 0.0  # a fraction in [0, 1), the original's name
    batch_size: int = 100
    number_of_workers: int | None = None  # None: emnist-train's replica count
    store_url: str = "memcached://127.0.0.1:11211"
    n_fetch: int = 10
    n_push: int = 10
    target_accuracy: float = 0.85
    dataset: str = "fashion-mnist"
    dataset_dir: str | None = None  # None: the dataset's default location
    data_location: str = ""  # where shards are written; "" means default_data_location()
    execution_type: int = 3
    algorithm: str = "downpour"
    update: str = "atomic"
    overlap: bool = False  # exchange on a thread while the next minibatches compute
    push_threshold: float = 0.0  # sparse pushes: send a chunk once its delta's RMS reaches this
    push_top_k: int = 0  # sparse pushes: send at most the k chunks of largest delta (0: all)
    local_store_url: str = ""  # a node-local tier (memcached://... or local://) in front
    sync_interval: float = 0.05  # seconds between the tier's background syncs
    average_every: int = 10  # averaging: minibatches between rounds
    barrier_timeout: float = 30.0  # averaging: seconds to wait for the others at a round
    max_seconds: float = 0.0  # wall-clock limit since setup (0: none)
    patience: int = 0  # early stopping: passes without a better validation loss (0: off)
    min_delta: float = 0.0  # early stopping: what counts as better
    lease_seconds: float = 10.0  # a worker whose heartbeat is older is taken over
    checkpoint_url: str = ""  # a directory, file:///dir or redis://... ("" : none)
    checkpoint_every: int = 1  # passes between checkpoints
    chunk_bytes: int = 384 * 1024  # the 784-100-47 model (333 KB) in one chunk
    seed: int = 0

    def __post_init__(self) -> None:
        positive = ("alpha", "iterations", "hidden_size", "pixels_per_image", "batch_size",
                    "n_fetch", "n_push", "chunk_bytes", "sync_interval", "average_every",
                    "barrier_timeout", "lease_seconds", "checkpoint_every")
        for name in positive:
            if getattr(self, name) <= 0:
                raise ConfigError(name, f"must be > 0, got {getattr(self, name)}")
        for name in ("num_labels", "number_of_workers"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(name, f"must be >= 1, got {value}")
        if not 0.0 <= self.dropout_percent < 1.0:
            raise ConfigError("dropout_percent", f"must be in [0, 1), got {self.dropout_percent}")
        if not 0.0 < self.target_accuracy <= 1.0:
            raise ConfigError("target_accuracy", f"must be in (0, 1], got {self.target_accuracy}")
        for name in ("seed", "push_threshold", "push_top_k", "max_seconds", "patience",
                     "min_delta"):
            if getattr(self, name) < 0:
                raise ConfigError(name, f"must be >= 0, got {getattr(self, name)}")
        if self.chunk_bytes % 4 or self.chunk_bytes > 900 * 1024:
            raise ConfigError("chunk_bytes", "must be a multiple of 4 and at most 921600 "
                              "(memcached's item limit is 1 MB)")
        choices = {"execution_type": EXECUTION_TYPES, "algorithm": ALGORITHMS,
                   "update": UPDATE_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"must be one of {list(allowed)}, got "
                                  f"{getattr(self, name)!r}")
        from emnist.data import DATASETS  # local: keeps config importable without data deps
        if self.dataset not in DATASETS:
            raise ConfigError("dataset", f"unknown dataset {self.dataset!r}; "
                              f"known: {', '.join(DATASETS)}")
        schemes = ("memcached://", "memcached+binary://", "redis://")
        if not self.store_url.startswith(schemes):
            raise ConfigError("store_url", f"must start with one of {', '.join(schemes)}")
        if self.local_store_url and not self.local_store_url.startswith((*schemes, "local://")):
            raise ConfigError("local_store_url", "must be a store URL or local://")

    @property
    def shard_location(self) -> str:
        return self.data_location or default_data_location()

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_sources(cls, env: Mapping[str, str] | None = None,
                     request: Mapping[str, Any] | None = None,
                     ignore: tuple[str, ...] = ()) -> TrainConfig:
        """Defaults < environment (strings) < request (JSON values). Unknown request keys fail."""
        values: dict[str, Any] = {}
        for f in fields(cls):
            raw = (env or {}).get(f.name)
            if raw is not None and raw != "":
                values[f.name] = _parse_env(f.name, _kind(f.name), raw)
        for name, raw in (request or {}).items():
            if name in ignore:
                continue
            if name not in FIELD_KINDS:
                raise ConfigError(name, f"unknown field; known: {', '.join(sorted(FIELD_KINDS))}")
            values[name] = _check_json(name, _kind(name), raw)
        return cls(**values)


FIELD_KINDS: dict[str, tuple[type, bool]] = {}  # name -> (type, optional)
for _f in fields(TrainConfig):
    _t = str(_f.type)
    _types = {"int": int, "float": float, "str": str, "bool": bool}
    FIELD_KINDS[_f.name] = (_types[_t.split(" ")[0]], "None" in _t)


def _kind(name: str) -> tuple[type, bool]:
    return FIELD_KINDS[name]


def _parse_env(name: str, kind: tuple[type, bool], raw: str) -> Any:
    typ, _ = kind
    if typ is bool:
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, f"environment value {raw!r} is not a boolean (true/false)")
    try:
        return typ(raw)
    except ValueError:
        raise ConfigError(name, f"environment value {raw!r} is not a {typ.__name__}") from None


def _check_json(name: str, kind: tuple[type, bool], raw: Any) -> Any:
    typ, optional = kind
    if raw is None and optional:
        return None
    if typ is float and isinstance(raw, int) and not isinstance(raw, bool):
        return float(raw)
    if not isinstance(raw, typ) or (isinstance(raw, bool) and typ is not bool):
        raise ConfigError(name, f"must be of type {typ.__name__}, got {raw!r}")
    return raw
