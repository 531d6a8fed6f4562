"""Round-trip counters every KV backend keeps (``kv.io``): how many requests it made and the
largest one, so big-vector batching is checked by counting, not by timing."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field


@dataclass
class IOStats:
    trips: int = 0  # requests sent and answered (a pipeline or a transaction step is one)
    values_max: int = 0  # most values moved in one round trip
    bytes_max: int = 0  # most value bytes moved in one round trip (sent + received)
    bytes_sent: int = 0
    bytes_received: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def trip(self, values: int, sent: int = 0, received: int = 0) -> None:
        with self._lock:
            self.trips += 1
            self.values_max = max(self.values_max, values)
            self.bytes_max = max(self.bytes_max, sent + received)
            self.bytes_sent += sent
            self.bytes_received += received

    def reset(self) -> None:
        with self._lock:
            self.trips = self.values_max = self.bytes_max = 0
            self.bytes_sent = self.bytes_received = 0

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return {"trips": self.trips, "values_max": self.values_max, "bytes_max": self.bytes_max,
                    "bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received}


def nbytes(values: Iterable[bytes | None] | Mapping[str, bytes]) -> int:
    """Total length of some values (a mapping's values)."""
    if isinstance(values, Mapping):
        values = values.values()
    return sum(len(v) for v in values if v is not None)
