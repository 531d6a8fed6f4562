"""The one cache-directory rule: where emnist keeps its state, shards, splits and datasets.

``$EMNIST_HOME``, else ``$XDG_CACHE_HOME/emnist``, else ``~/.cache/emnist``. Read from an env
mapping you can pass in (tests), never created here: callers that write make what they need.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

__all__ = ["HOME_ENV", "cache_dir"]

HOME_ENV = "EMNIST_HOME"


def cache_dir(env: Mapping[str, str] | None = None) -> Path:
    """The emnist cache directory (not created)."""
    env = os.environ if env is None else env
    if env.get(HOME_ENV):
        return Path(env[HOME_ENV]).expanduser()
    if env.get("XDG_CACHE_HOME"):
        return Path(env["XDG_CACHE_HOME"]).expanduser() / "emnist"
    return Path.home() / ".cache" / "emnist"
