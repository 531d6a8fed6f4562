"""Replica log lines: a bounded buffer that ``/system/logs`` reads and follows.

Lines are shaped like faas-provider's ``logs.Message``; timestamps are RFC3339Nano in UTC.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass
from datetime import datetime, timezone

__all__ = ["NAMESPACE", "LogBuffer", "LogLine", "format_timestamp", "parse_timestamp"]

NAMESPACE = "openfaas-fn"


def format_timestamp(t_ns: int) -> str:
    """RFC3339Nano in UTC, the timestamp format of OpenFaaS log messages."""
    secs, ns = divmod(t_ns, 1_000_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(secs)) + f".{ns:09d}Z"


def parse_timestamp(text: str) -> int:
    """Nanoseconds since the epoch from an RFC3339 timestamp (any precision, any offset)."""
    s = text.strip().replace("z", "Z")
    frac_ns = 0
    if "." in s:
        head, rest = s.split(".", 1)
        digits = ""
        while rest and rest[0].isdigit():
            digits, rest = digits + rest[0], rest[1:]
        frac_ns = int((digits + "000000000")[:9]) if digits else 0
        s = head + rest
    if s.endswith("Z"):
        s = s[:-1] + "+00:00"
    dt = datetime.fromisoformat(s)
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=timezone.utc)
    return int(dt.timestamp()) * 1_000_000_000 + frac_ns


@dataclass
class LogLine:
    """One line a replica printed, shaped like faas-provider's logs.Message."""

    name: str
    namespace: str
    instance: str
    timestamp: str
    text: str
    stream: str = "stdout"
    t_ns: int = 0
    seq: int = 0

    def to_dict(self) -> dict[str, str]:
        """The JSON object sent on ``/system/logs``."""
        return {"name": self.name, "namespace": self.namespace, "instance": self.instance,
                "timestamp": self.timestamp, "text": self.text}


class LogBuffer:
    """Bounded, thread-safe log store that readers can follow by sequence number."""

    def __init__(self, limit: int = 10000) -> None:
        self._lines: deque[LogLine] = deque(maxlen=max(1, limit))
        self._cond = threading.Condition()
        self._seq = 0

    @property
    def cursor(self) -> int:
        """Sequence number of the newest line; pass it to :meth:`wait` to get later ones."""
        with self._cond:
            return self._seq

    def append(self, line: LogLine) -> None:
        with self._cond:
            self._seq += 1
            line.seq = self._seq
            self._lines.append(line)
            self._cond.notify_all()

    def write(self, name: str, instance: str, text: str, stream: str = "stdout") -> None:
        """Append one line printed now by ``instance`` of function ``name``."""
        t_ns = time.time_ns()
        self.append(LogLine(name=name, namespace=NAMESPACE, instance=instance,
                            timestamp=format_timestamp(t_ns), text=text, stream=stream,
                            t_ns=t_ns))

    def lines(self, since: int | None = None, tail: int | None = None,
              instance: str | None = None) -> list[LogLine]:
        """Lines newer than ``since`` (ns since epoch), for ``instance``, the last ``tail``."""
        with self._cond:
            out = [ln for ln in self._lines
                   if (since is None or ln.t_ns >= since)
                   and (not instance or ln.instance == instance)]
        if tail is not None and tail >= 0:
            out = out[len(out) - tail:] if tail else []
        return out

    def wait(self, after: int, timeout: float) -> list[LogLine]:
        """Lines with a sequence number above ``after``, waiting up to ``timeout`` for one."""
        with self._cond:
            self._cond.wait_for(lambda: self._seq > after, timeout=timeout)
            return [ln for ln in self._lines if ln.seq > after]
