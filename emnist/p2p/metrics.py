"""Per-peer metrics as JSON lines, one file per peer: ``<dir>/peer-<rank>.jsonl``.

Record kinds (field ``kind``):

- ``start``: the peer's configuration.
- ``step``: one synchronous step: ``compute_s`` (gradient of the step's minibatches: local, or
  the fan-out to emnist-grad), ``send_s`` (compress, encode, publish), ``recv_s`` (waiting for
  and decoding the others' gradients), ``update_s`` (average, apply), ``bytes_sent``, ``loss``
  and ``params_crc`` (crc32c of the parameters after the update: equal on every peer).
- ``epoch``: the same phases summed over the epoch plus ``val_s`` and ``barrier_s``,
  ``loss``, ``val_loss`` (over all peers' validation parts), ``test_accuracy``, ``lr``,
  ``peak_rss_mb`` and ``t`` (seconds since the peer started training).
- ``result``: how the peer ended.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path
from typing import Any

PHASES = ("compute_s", "send_s", "recv_s", "update_s", "val_s", "barrier_s")


def peak_rss_mb() -> float:
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024


class MetricsWriter:
    def __init__(self, directory: str | Path | None, rank: int) -> None:
        self.path = Path(directory) / f"peer-{rank}.jsonl" if directory else None
        self._f = None
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._f = open(self.path, "a", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record, separators=(",", ":")) + "\n")
            if record.get("kind") != "step":
                self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()
            self._f = None


def read_run(directory: str | Path) -> dict[int, list[dict[str, Any]]]:
    """Every peer's records of a run directory, by rank."""
    out: dict[int, list[dict[str, Any]]] = {}
    for path in sorted(Path(directory).glob("peer-*.jsonl")):
        rank = int(path.stem.split("-", 1)[1])
        records = []
        for line in path.read_text(encoding="utf-8").splitlines():
            if line.strip():
                try:
                    records.append(json.loads(line))
                except ValueError:
                    continue  # a line cut short by a killed peer
        out[rank] = records
    return out
