"""Which process a state file names: its pid, the command line it was launched with and its
start time, so `emnist down` signals only a process `emnist up` started (a pid alone may long
since belong to something else after a crash or a reboot)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from emnist.wait import wait_until

__all__ = ["identity", "matches", "read_record", "write_record"]


def identity(pid: int) -> dict[str, Any] | None:
    """``{"pid", "cmdline", "start"}`` of a live process from /proc, or None (gone, a zombie,
    or not readable)."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    if not cmdline:  # a zombie (or a kernel thread): nothing to signal
        return None
    # the fields after "(comm)": state is field 3, starttime (clock ticks since boot) field 22
    fields = stat.rpartition(")")[2].split()
    return {"pid": pid, "cmdline": cmdline.rstrip(b"\0").decode(errors="replace").split("\0"),
            "start": int(fields[19])}


def write_record(path: Path, pid: int, launched: list[str], timeout: float = 5.0,
                 **extra: Any) -> None:
    """Record the process ``launched`` (its argv) as ``pid``, with its start time.

    Right after exec the kernel may show an empty command line for a moment, so this waits
    (up to ``timeout``) until the process shows ``launched``; ProcessLookupError if it never
    does (it exited, or it is not what was launched).
    """
    argv = [str(a) for a in launched]
    ident = wait_until(lambda: (i := identity(pid)) and i["cmdline"] == argv and i, timeout,
                       f"pid {pid} does not run {argv[0]}", interval=0.01,
                       error=ProcessLookupError)
    record = {"pid": pid, "cmdline": argv, "start": ident["start"], **extra}
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(record))
    os.replace(tmp, path)


def read_record(path: Path) -> dict[str, Any] | None:
    """A record written by :func:`write_record`, or None if it is missing or unreadable."""
    try:
        rec = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    ok = (isinstance(rec, dict) and isinstance(rec.get("pid"), int) and rec["pid"] > 0
          and isinstance(rec.get("cmdline"), list) and isinstance(rec.get("start"), int))
    return rec if ok else None


def matches(record: dict[str, Any]) -> bool:
    """True when ``record``'s pid is still the process it describes (same argv, same start)."""
    now = identity(record["pid"])
    return (now is not None and now["cmdline"] == record["cmdline"]
            and now["start"] == record["start"])
