"""The one publish-directory helper: build a directory under a temporary name, then rename it
into place atomically, so a reader never sees a half-written one.

Two processes preparing the same directory at once (two setup replicas, two peers) both build
it; the first rename wins and the second keeps the winner's identical copy. A complete copy is
recognised by the caller's ``is_complete`` check; anything else in the way (a stale or damaged
copy) is moved aside and replaced.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path

__all__ = ["publish_dir", "temp_dir_for"]


def temp_dir_for(final: Path) -> Path:
    """A fresh temporary directory beside ``final`` (same filesystem, so rename is atomic),
    readable by other users (mkdtemp's 0700 would hide it from replicas running as others)."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
    tmp.chmod(0o755)
    return tmp


def publish_dir(tmp: Path, final: Path, is_complete: Callable[[Path], bool]) -> None:
    """Rename ``tmp`` to ``final``; keep a concurrent publisher's complete copy; ``tmp`` is
    gone afterwards either way."""
    try:
        try:
            os.rename(tmp, final)
            return
        except OSError:
            if is_complete(final):
                return  # a concurrent caller published an identical set
        aside = final.with_name(f".stale-{final.name}-{uuid.uuid4().hex[:8]}")
        try:
            os.rename(final, aside)
        except FileNotFoundError:
            pass
        try:
            os.rename(tmp, final)
        except OSError:
            if not is_complete(final):
                raise
        finally:
            shutil.rmtree(aside, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
