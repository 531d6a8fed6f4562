"""One validated training configuration, fed by the stack file's environment and the request.

The original's environment names stay valid (alpha, iterations, hidden_size, ...). Values from
the environment are strings and are parsed; values from a JSON request must already have the
right JSON type. Every failure names the field, so a handler can answer 400 with it.

Every number is finite and inside its documented range (``LIMITS``: e.g. hidden_size <=
1,000,000, batch_size <= 65,536, iterations <= 100,000, number_of_workers <= 100,000); on top,
``from_request`` applies the operator's policy (emnist.policy): the places a request may name,
the model size cap ``max_params`` (for every model, counted before anything is allocated)
and the worker cap ``max_workers``.

The network: ``model`` names it (``mlp``, the default numpy MLP, or a torch model such as
``lenet5``; aliases resolve through ``emnist.models.canonical_name``). Its arguments come from
the other fields: ``hidden_size`` and ``dropout_percent`` are the MLP's (a torch model ignores
``hidden_size`` and refuses a ``dropout_percent``); ``model_dropout`` is a torch model's
dropout (None: the architecture's published rate). ``model_spec`` turns them into the
``ModelSpec`` the run document records, so every worker builds the same network.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import TYPE_CHECKING, Any

from emnist import policy
from emnist.paths import cache_dir
from emnist.store.kv import DEFAULT_STORE_URL

if TYPE_CHECKING:
    from emnist.models import ModelSpec

EXECUTION_TYPES = (1, 2, 3)  # 1: one function does all; 2: one call per pass; 3: setup + loops
ALGORITHMS = ("downpour", "averaging")  # what every path runs, the simulator included
# the real workers also run synchronous all-reduce SGD (emnist.train.allreduce); the simulator
# (emnist.sim, which takes ALGORITHMS) does not model it yet
TRAIN_ALGORITHMS = (*ALGORITHMS, "allreduce")
UPDATE_MODES = ("atomic", "overwrite")


# name: (lowest, highest, lowest excluded); every number is finite and inside its range.
LIMITS: dict[str, tuple[float, float, bool]] = {
    "alpha": (0, 100, True),
    "iterations": (1, 100_000, False),
    "hidden_size": (1, 1_000_000, False),  # and the model within max_params (emnist.policy)
    "pixels_per_image": (1, 1 << 20, False),
    "num_labels": (1, 100_000, False),
    "dropout_percent": (0, 1, False),  # below 1 (checked on its own)
    "batch_size": (1, 65_536, False),
    "number_of_workers": (1, policy.HARD_MAX_WORKERS, False),  # and within max_workers
    "n_fetch": (1, 1_000_000, False),
    "n_push": (1, 1_000_000, False),
    "target_accuracy": (0, 1, True),
    "push_threshold": (0, 1e6, False),
    "push_top_k": (0, 1_000_000, False),
    "sync_interval": (0, 3600, True),
    "average_every": (1, 1_000_000, False),
    "barrier_timeout": (0, 86_400, True),
    "momentum": (0, 0.9999, False),
    "warmup_steps": (0, 100_000_000, False),
    "max_seconds": (0, 30 * 86_400, False),
    "slice_seconds": (0, 86_400, False),
    "patience": (0, 100_000, False),
    "min_delta": (0, 1e6, False),
    "lease_seconds": (0, 86_400, True),
    "checkpoint_every": (1, 100_000, False),
    "chunk_bytes": (4, 900 * 1024, False),
    "seed": (0, 2**32 - 1, False),
}  # model_dropout (optional, in [0, 1), torch models only) is checked with the model
TEXT_FIELDS = ("model", "store_url", "dataset", "dataset_dir", "data_location", "algorithm",
               "update", "local_store_url", "checkpoint_url")
MAX_TEXT = 4096


class ConfigError(ValueError):
    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def default_data_location() -> str:
    return str(cache_dir() / "shards")


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
    store_url: str = DEFAULT_STORE_URL
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
    barrier_timeout: float = 30.0  # averaging, allreduce: seconds to wait at a round
    momentum: float = 0.9  # allreduce: SGD momentum, in [0, 0.9999]
    warmup_steps: int | None = None  # allreduce: rounds of lr warm-up (None: half a pass)
    scale_lr: bool = True  # allreduce: lr = alpha x workers (the linear scaling rule)
    max_seconds: float = 0.0  # wall-clock limit since setup (0: none)
    slice_seconds: float = 0.0  # an invocation trains this long, then hands on (0: to the end)
    patience: int = 0  # early stopping: passes without a better validation loss (0: off)
    min_delta: float = 0.0  # early stopping: what counts as better
    lease_seconds: float = 10.0  # a worker whose heartbeat is older is taken over
    checkpoint_url: str = ""  # a directory, file:///dir or redis://... ("" : none)
    checkpoint_every: int = 1  # passes between checkpoints
    chunk_bytes: int = 384 * 1024  # the 784-100-47 model (333 KB) in one chunk
    seed: int = 0
    model: str = "mlp"  # the network (emnist.models.MODEL_NAMES or an alias)
    model_dropout: float | None = None  # a torch model's dropout (None: its published rate)

    def __post_init__(self) -> None:
        for name, (low, high, low_open) in LIMITS.items():
            value = getattr(self, name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(name, f"must be a number, got {show(value)}")
            if not math.isfinite(value) or not (low < value if low_open else low <= value) \
                    or value > high:
                raise ConfigError(name, f"must be {_range(low, high, low_open)}, got "
                                  f"{show(value)}")
        for name in TEXT_FIELDS:
            value = getattr(self, name)
            if value is not None and (not isinstance(value, str) or len(value) > MAX_TEXT):
                raise ConfigError(name, f"must be a string of at most {MAX_TEXT} characters")
        if self.dropout_percent >= 1.0:
            raise ConfigError("dropout_percent", f"must be in [0, 1), got "
                              f"{show(self.dropout_percent)}")
        if self.chunk_bytes % 4:
            raise ConfigError("chunk_bytes", "must be a multiple of 4 and at most 921600 "
                              "(memcached's item limit is 1 MB)")
        choices = {"execution_type": EXECUTION_TYPES, "algorithm": TRAIN_ALGORITHMS,
                   "update": UPDATE_MODES}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(name, f"must be one of {json.dumps(list(allowed))}, got "
                                  f"{show(getattr(self, name))}")
        from emnist.data import DATASETS  # local: keeps config importable without data deps
        from emnist.data.generated import GEN_PREFIX, generated_samples
        try:
            generated = generated_samples(self.dataset) is not None
        except ValueError as e:
            raise ConfigError("dataset", str(e)) from None
        if self.dataset not in DATASETS and not generated:
            raise ConfigError("dataset", f"unknown dataset {show(self.dataset)}; "
                              f"known: {', '.join(DATASETS)} or {GEN_PREFIX}<N> (N samples "
                              "generated from fashion-mnist, e.g. 1300k)")
        schemes = ("memcached://", "memcached+binary://", "redis://")
        if not self.store_url.startswith(schemes):
            raise ConfigError("store_url", f"must start with one of {', '.join(schemes)}")
        if self.local_store_url and not self.local_store_url.startswith((*schemes, "local://")):
            raise ConfigError("local_store_url", "must be a store URL or local://")
        if self.algorithm == "allreduce" and self.local_store_url:
            raise ConfigError("local_store_url", "allreduce meets the other workers in the "
                              "global store every minibatch; a node-local tier cannot be "
                              "used with it")
        self._check_model()

    def _check_model(self) -> None:
        from emnist.models import MODEL_NAMES, canonical_name  # local: no torch import here

        try:
            object.__setattr__(self, "model", canonical_name(self.model))
        except ValueError:
            raise ConfigError("model", f"unknown model {show(self.model)}; known: "
                              f"{', '.join(MODEL_NAMES)} (aliases: squeezenet1.1, "
                              "mobilenet v3 small, lenet-5)") from None
        if self.model == "mlp":
            if self.model_dropout is not None:
                raise ConfigError("model_dropout", "is a torch model's dropout; the mlp's is "
                                  "dropout_percent")
            return
        d = self.model_dropout
        if d is not None and (isinstance(d, bool) or not isinstance(d, int | float)
                              or not math.isfinite(d) or not 0 <= d < 1):
            raise ConfigError("model_dropout", f"must be a number in [0, 1), got {show(d)}")
        if self.dropout_percent:
            raise ConfigError("dropout_percent", f"is the mlp's hidden-layer dropout; "
                              f"{self.model}'s is model_dropout")
        try:
            self.model_spec()
        except ValueError as e:
            raise ConfigError("model_dropout" if "dropout" in str(e) else "model",
                              str(e)) from None

    def model_spec(self, classes: int | None = None,
                   image_shape: tuple[int, int, int] | None = None) -> ModelSpec:
        """The network this config trains on ``classes`` (default: num_labels, else the
        dataset's) images of ``image_shape`` (default: the dataset's known shape).

        The MLP keeps x / 255 (its results stay as before); torch models get the dataset's
        normalisation constants (``ModelSpec.for_dataset``).
        """
        from emnist.models import ModelSpec

        classes = classes or self.num_labels or dataset_classes(self.dataset)
        over: dict[str, Any] = {}
        if image_shape is not None:
            over.update(zip(("channels", "height", "width"), image_shape, strict=True))
        if self.model == "mlp":
            over.update(hidden=self.hidden_size, dropout=self.dropout_percent)
        elif self.model_dropout is not None:
            over["dropout"] = self.model_dropout
        return ModelSpec.for_dataset(self.model, self.dataset, classes, **over)

    @property
    def num_params(self) -> int:
        """The model's size (nothing allocated): from num_labels, else the dataset's known
        class count. The MLP's comes from pixels_per_image, as it always did."""
        classes = self.num_labels or dataset_classes(self.dataset)
        if self.model == "mlp":
            return (self.pixels_per_image + 1) * self.hidden_size \
                + (self.hidden_size + 1) * classes
        from emnist.models import TorchMissing, param_count

        try:
            return param_count(self.model_spec(classes))
        except TorchMissing as e:
            raise ConfigError("model", str(e)) from None

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
        if values.get("dataset_dir") == "":
            values["dataset_dir"] = None  # "" is no directory (not the current one)
        return cls(**values)

    @classmethod
    def from_request(cls, env: Mapping[str, str], request: Mapping[str, Any] | None = None,
                     ignore: tuple[str, ...] = ()) -> TrainConfig:
        """``from_sources`` under the operator's policy (emnist.policy): a request may name
        only the stores and places the environment allows, and no config may exceed the
        environment's ``max_params`` and ``max_workers``."""
        own = cls.from_sources(env)
        cfg = cls.from_sources(env, request, ignore)
        given = {k for k in (request or {}) if k not in ignore}
        if "store_url" in given:
            policy.check_store_url(env, "store_url", cfg.store_url, own.store_url)
        if "local_store_url" in given and cfg.local_store_url:
            policy.check_store_url(env, "local_store_url", cfg.local_store_url,
                                   own.local_store_url, extra_schemes=("local",))
        if "checkpoint_url" in given and cfg.checkpoint_url:
            policy.check_checkpoint_url(env, cfg.checkpoint_url, own.checkpoint_url)
        if "data_location" in given and cfg.data_location:
            policy.check_data_location(env, "data_location", cfg.data_location,
                                       own.data_location)
        if "dataset_dir" in given and cfg.dataset_dir is not None:
            policy.check_data_location(env, "dataset_dir", cfg.dataset_dir, own.dataset_dir)
        cfg.check_caps(env)
        return cfg

    def check_caps(self, env: Mapping[str, str], workers: int | None = None) -> None:
        """The model size and worker count against the operator's caps (before allocating)."""
        cap = policy.max_params(env)
        if self.num_params > cap:
            field = "hidden_size" if self.model == "mlp" else "model"
            raise ConfigError(field, f"the model ({self.model}) would have {self.num_params} "
                              f"parameters, more than max_params ({cap}) in the function's "
                              "environment")
        workers = workers if workers is not None else self.number_of_workers
        top = policy.max_workers(env)
        if workers is not None and workers > top:
            raise ConfigError("number_of_workers", f"at most {top} (max_workers in the "
                              f"function's environment), got {workers}")


FIELD_KINDS: dict[str, tuple[type, bool]] = {}  # name -> (type, optional)
for _f in fields(TrainConfig):
    _t = str(_f.type)
    _types = {"int": int, "float": float, "str": str, "bool": bool}
    FIELD_KINDS[_f.name] = (_types[_t.split(" ")[0]], "None" in _t)


def _kind(name: str) -> tuple[type, bool]:
    return FIELD_KINDS[name]


def _parse_env(name: str, kind: tuple[type, bool], raw: str) -> Any:
    typ, _ = kind
    text = raw.strip()
    if typ is bool:
        if text.lower() in ("1", "true", "yes", "on"):
            return True
        if text.lower() in ("0", "false", "no", "off"):
            return False
        raise ConfigError(name, f"environment value {show(raw)} is not a boolean (true/false)")
    if typ is str:
        return raw
    try:
        value = typ(text)
    except (ValueError, OverflowError):
        raise ConfigError(name, f"environment value {show(raw)} is not "
                          f"{_TYPE_NAMES[typ]}") from None
    if typ is float and not math.isfinite(value):
        raise ConfigError(name, f"environment value {show(raw)} is not a finite number")
    return value


def _check_json(name: str, kind: tuple[type, bool], raw: Any) -> Any:
    typ, optional = kind
    if raw is None and optional:
        return None
    if typ is float and isinstance(raw, int) and not isinstance(raw, bool):
        try:
            return float(raw)
        except OverflowError:
            raise ConfigError(name, "is too large") from None
    if not isinstance(raw, typ) or (isinstance(raw, bool) and typ is not bool):
        raise ConfigError(name, f"must be {_TYPE_NAMES[typ]}, got {json_kind(raw)}")
    return raw


_TYPE_NAMES = {int: "an integer", float: "a number", str: "a string", bool: "a boolean"}


def json_kind(value: Any) -> str:
    """What a JSON value is, in JSON's words (never a Python repr)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return show(value)
    return {str: "a string", list: "an array", dict: "an object"}.get(type(value), "a value")


def show(value: Any, limit: int = 40) -> str:
    """A value as JSON text, cut short (for messages: never a Python repr, never unbounded)."""
    try:
        text = json.dumps(value, allow_nan=False)
    except (TypeError, ValueError):
        text = "a non-finite number" if isinstance(value, float) else "a value"
    return text if len(text) <= limit else text[:limit] + "..."


def _range(low: float, high: float, low_open: bool) -> str:
    return f"> {show(low)} and <= {show(high)}" if low_open else \
        f"between {show(low)} and {show(high)}"


def dataset_classes(name: str) -> int:
    """The class count of a known dataset (10 when the name is not an EMNIST split)."""
    from emnist.data import EMNIST_SPLITS
    return EMNIST_SPLITS.get(name[len("emnist-"):], 10) if name.startswith("emnist-") else 10
