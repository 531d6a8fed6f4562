"""The one place store keys are built: every key of a run lives under ``emnist:{run}:``."""

from __future__ import annotations

import re

PREFIX = "emnist"
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def valid_run_id(run_id: str) -> bool:
    return isinstance(run_id, str) and bool(_RUN_ID.match(run_id))


def index_key(name: str) -> str:
    """A store-wide document outside every run (e.g. ``emnist:runs``, the run index): two
    parts, where every run key has at least three."""
    if not name.isidentifier():
        raise ValueError(f"invalid index name {name!r}")
    return f"{PREFIX}:{name}"


def key_for(run_id: str, *parts: object) -> str:
    if not valid_run_id(run_id):
        raise ValueError(f"invalid run id {run_id!r}: use 1-64 letters, digits, '-' or '_'")
    return ":".join([PREFIX, run_id, *map(str, parts)])
