"""ModelSpec: which network a run trains, as JSON-able fields every worker rebuilds it from.

A run's config carries ``spec.to_dict()``; workers, peers and functions call
``ModelSpec.from_dict`` (which validates every field: the dict may come from a request) and
``build_model(spec)``, so every process trains the same network on the same input conversion.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from emnist.data.normalize import stats_for

__all__ = ["MODEL_NAMES", "TORCH_MODELS", "ModelSpec", "canonical_name"]

TORCH_MODELS: tuple[str, ...] = ("lenet5", "cnn", "mobilenet_v3_small", "squeezenet1_1", "vgg11")
MODEL_NAMES: tuple[str, ...] = ("mlp", *TORCH_MODELS)
# names that the separator rule below does not already map (the p2p seed's --model_str values
# "squeezenet1.1", "vgg11" and "mobilenet v3 small" need no entry)
_ALIASES = {"lenet_5": "lenet5", "lenet": "lenet5", "mobilenetv3_small": "mobilenet_v3_small"}

MAX_CLASSES = 100_000
MAX_HIDDEN = 1_000_000
MIN_SIDE, MAX_SIDE = 8, 512


def canonical_name(name: str) -> str:
    """Registry name for ``name``: case-insensitive; spaces, dots and dashes act as '_'."""
    if not isinstance(name, str):
        raise ValueError(f"model name must be a string, got {type(name).__name__}")
    key = re.sub(r"[\s.\-]+", "_", name.strip().lower())
    key = _ALIASES.get(key, key)
    if key not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; known: {', '.join(MODEL_NAMES)} "
                         "(aliases: squeezenet1.1, mobilenet v3 small, lenet-5)")
    return key


def _int(name: str, value: Any, lo: int, hi: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ValueError(f"model {name} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _stats(name: str, value: Any, channels: int) -> tuple[float, ...] | None:
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not hasattr(value, "__len__") or len(value) != channels:
        raise ValueError(f"model {name} must be a list of {channels} numbers, got {value!r}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v):
            raise ValueError(f"model {name} values must be finite numbers, got {v!r}")
        out.append(float(v))
    if name == "std" and any(v <= 0 for v in out):
        raise ValueError(f"model std values must be > 0, got {value!r}")
    return tuple(out)


@dataclass(frozen=True)
class ModelSpec:
    """A network and its input: name, image shape, classes and the model's own arguments.

    ``hidden`` is the MLP's hidden width (None: 100) and must be None for other models.
    ``dropout`` None means the architecture's published rate (MLP 0, MobileNetV3 0.2,
    SqueezeNet/VGG/cnn 0.5; LeNet-5 has no dropout layer and accepts only None or 0).
    ``mean``/``std`` (per channel, pixels in [0, 1]) normalise inputs; None means x / 255.
    """

    name: str = "mlp"
    channels: int = 1
    height: int = 28
    width: int = 28
    classes: int = 47
    hidden: int | None = None
    dropout: float | None = None
    mean: tuple[float, ...] | None = None
    std: tuple[float, ...] | None = None

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        set_(self, "name", canonical_name(self.name))
        set_(self, "channels", _int("channels", self.channels, 1, 3))
        if self.channels == 2:
            raise ValueError("model channels must be 1 or 3, got 2")
        set_(self, "height", _int("height", self.height, MIN_SIDE, MAX_SIDE))
        set_(self, "width", _int("width", self.width, MIN_SIDE, MAX_SIDE))
        set_(self, "classes", _int("classes", self.classes, 2, MAX_CLASSES))
        if self.hidden is not None:
            if self.name != "mlp":
                raise ValueError(f"model hidden applies to mlp only, not {self.name}")
            _int("hidden", self.hidden, 1, MAX_HIDDEN)
        d = self.dropout
        if d is not None:
            if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
                raise ValueError(f"model dropout must be in [0, 1), got {d!r}")
            if self.name == "lenet5" and d != 0:
                raise ValueError("lenet5 has no dropout layer: leave model dropout unset or 0")
            set_(self, "dropout", float(d))
        set_(self, "mean", _stats("mean", self.mean, self.channels))
        set_(self, "std", _stats("std", self.std, self.channels))
        if (self.mean is None) != (self.std is None):
            raise ValueError("model mean and std go together: give both or neither")

    @property
    def inputs(self) -> int:
        return self.channels * self.height * self.width

    @property
    def is_torch(self) -> bool:
        return self.name in TORCH_MODELS

    def to_dict(self) -> dict[str, Any]:
        """JSON-able fields (tuples become lists)."""
        out = asdict(self)
        for k in ("mean", "std"):
            if out[k] is not None:
                out[k] = list(out[k])
        return out

    @classmethod
    def from_dict(cls, doc: Mapping[str, Any]) -> ModelSpec:
        """Validated spec from a config/request mapping; unknown keys are an error."""
        if not isinstance(doc, Mapping):
            raise ValueError(f"model spec must be an object, got {type(doc).__name__}")
        known = {f.name for f in fields(cls)}
        extra = sorted(set(doc) - known)
        if extra:
            raise ValueError(f"unknown model spec field(s): {', '.join(map(str, extra))}")
        return cls(**dict(doc))

    @classmethod
    def for_dataset(cls, name: str, dataset: str, classes: int, **overrides: Any) -> ModelSpec:
        """The spec for ``name`` on ``dataset``: its image shape and, for torch models, its
        normalisation constants (the MLP keeps x / 255 so its results stay as before)."""
        st = stats_for(dataset)
        base: dict[str, Any] = {"name": name, "classes": classes}
        if st is not None:
            base.update(channels=st.channels, height=st.height, width=st.width)
            if canonical_name(name) != "mlp":
                base.update(mean=st.mean, std=st.std)
        base.update(overrides)
        return cls(**base)
