"""A run document read back from the store, checked before anything uses it.

The run document steers every worker: its config (the places ``store_url``,
``local_store_url``, ``checkpoint_url``, ``data_location``, ``dataset_dir``), where its shards
are (``shard_dir``), the network (``model``) and the sizes (``workers``, ``num_params``,
``steps_per_pass``). The store is not trusted: the document may be forged (or, where a store
key is configured, its seal is checked first: emnist.store.signing). So a function checks it
as it checks a request: the type of every field, every number against the operator's caps
before anything is allocated or looped over, and, given the function's environment, every
place against its policy: the function's own environment decides, never the document.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from emnist import policy
from emnist.store.codec import CorruptValue
from emnist.train.config import MAX_TEXT, ConfigError, TrainConfig

__all__ = ["MAX_STEPS", "RunRefused", "checked_run", "checked_places"]

MAX_STEPS = 1 << 30  # minibatches per pass (a pass is cut to its shard's batches anyway)
MAX_RESTORES = 100


class RunRefused(CorruptValue):
    """A run document that is malformed, over a cap, or names a place the policy refuses;
    the reason names the field, never its value."""


def _int(doc: Mapping[str, Any], name: str, low: int, high: int) -> int:
    value = doc.get(name)
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise ValueError(f"{name}: must be a whole number in {low}..{high}")
    return value


def _check_fields(doc: Mapping[str, Any], env: Mapping[str, str], report: bool) -> None:
    _int(doc, "workers", 1, policy.max_workers(env))
    started = doc.get("started")
    if isinstance(started, bool) or not isinstance(started, int | float) \
            or not math.isfinite(started):
        raise ValueError("started: must be a finite number")
    if not report or "num_params" in doc:
        _int(doc, "num_params", 1, policy.max_params(env))
    if not report or "steps_per_pass" in doc:
        _int(doc, "steps_per_pass", 1, MAX_STEPS)
    if (not report or "shard_dir" in doc) and not (
            isinstance(doc.get("shard_dir"), str) and len(doc["shard_dir"]) <= MAX_TEXT):
        raise ValueError(f"shard_dir: must be a string of at most {MAX_TEXT} characters")
    if doc.get("num_classes") is not None:
        _int(doc, "num_classes", 1, 100_000)
    shape = doc.get("image_shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) == 3 and all(
            isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 4096 for v in shape)):
        raise ValueError("image_shape: must be three whole numbers")
    if doc.get("model") is not None and not isinstance(doc["model"], dict):
        raise ValueError("model: must be an object")
    restores = doc.get("restores")
    if restores is not None and not (isinstance(restores, list)
                                     and len(restores) <= MAX_RESTORES):
        raise ValueError(f"restores: must be a list of at most {MAX_RESTORES}")


def checked_run(key: str, run_id: str, doc: Any, env: Mapping[str, str] | None = None,
                report: bool = False) -> tuple[dict[str, Any], TrainConfig]:
    """``doc`` (the run document at ``key``) and its config, if the document is a run
    document of ``run_id`` within the caps (``env``'s, else the defaults) and, with ``env``,
    names only places its policy allows; else :class:`RunRefused` naming the field. With
    ``report`` (a status page: it opens nothing and sizes its answer by ``workers`` alone)
    the sizes and places a worker needs may be absent and the places are not checked."""
    caps = env or {}
    try:
        if not isinstance(doc, dict):
            raise ValueError("not a JSON object")
        if doc.get("run_id") != run_id:
            raise ValueError("run_id: the document is another run's")
        _check_fields(doc, caps, report)
        config = doc.get("config")
        if not isinstance(config, dict):
            raise ValueError("config: must be an object")
        try:
            cfg = TrainConfig(**config)
        except TypeError:
            raise ValueError("config: has unknown or missing fields") from None
        except ConfigError as e:
            raise ValueError(f"config.{e}") from None
    except ValueError as e:
        raise RunRefused(key, f"not a valid run document: {e}") from None
    if env is not None and not report:
        checked_places(key, doc, cfg, env)
    return {**doc, "config": cfg.to_dict()}, cfg  # every field present, as checked


def checked_places(key: str, doc: Mapping[str, Any], cfg: TrainConfig,
                   env: Mapping[str, str]) -> None:
    """Every place the run document names, through ``env``'s policy as a request's would go:
    the function's own settings, or what its allow-lists name."""
    own = TrainConfig.from_sources(env)
    try:
        policy.check_store_url(env, "store_url", cfg.store_url, own.store_url)
        if cfg.local_store_url:
            policy.check_store_url(env, "local_store_url", cfg.local_store_url,
                                   own.local_store_url, extra_schemes=("local",))
        if cfg.checkpoint_url:
            policy.check_checkpoint_url(env, cfg.checkpoint_url, own.checkpoint_url)
        if cfg.data_location:
            policy.check_data_location(env, "data_location", cfg.data_location,
                                       own.data_location)
        if cfg.dataset_dir is not None:
            policy.check_data_location(env, "dataset_dir", cfg.dataset_dir, own.dataset_dir)
        policy.check_stored_location(env, "shard_dir", doc["shard_dir"], own.shard_location)
    except policy.PolicyError as e:
        raise RunRefused(key, f"its {e.field} is a place this function's policy does not "
                         "allow (the function's environment decides, not the store)") from None
