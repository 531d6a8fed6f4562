"""Where the dashboard's data comes from, defined once; the dashboard only reads.

- Downpour and averaging runs: emnist-setup's GET through the gateway (``?runs=1``: the run
  index with states; ``?run_id=ID&detail=1``: the run, worker and result documents). The
  dashboard never opens the store itself, so it works for a cluster whose store the user's
  machine cannot reach.
- p2p runs: the metrics files ``<p2p dir>/<run id>/peer-<rank>.jsonl`` (emnist.p2p.metrics),
  written on the machine that ran the peers (``emnist p2p run`` defaults to the cache's
  ``p2p-runs/``).
- Benchmark suites: results files (JSON lines of emnist.bench.suite; default
  ``results/bench-suite.jsonl``).

Everything read is bounded: the listings, the records per file, the size of what is parsed.
Files are parsed again only when their size or modification time changed.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from emnist.gateway.client import GatewayClient, GatewayError
from emnist.paths import cache_dir
from emnist.store.keys import valid_run_id

__all__ = ["DEFAULT_RESULTS", "SETUP", "SourceError", "Sources", "default_bench_files",
           "default_p2p_dir"]

SETUP = "emnist-setup"
MAX_P2P_RUNS = 100  # newest metrics directories listed
MAX_PEERS = 256
MAX_RECORDS = 100_000  # non-step records kept per metrics file
MAX_BENCH_RECORDS = 1000  # newest records of a results file
MAX_FILE_BYTES = 512 << 20  # larger files are not parsed
CACHE_FILES = 256
DEFAULT_RESULTS = "results/bench-suite.jsonl"  # `emnist bench run`'s default


def default_p2p_dir() -> Path:
    """Where `emnist p2p run` writes metrics by default."""
    return cache_dir() / "p2p-runs"


def default_bench_files() -> list[Path]:
    """`emnist bench run`'s default results file, relative to the current directory."""
    return [Path(DEFAULT_RESULTS).resolve()]


class SourceError(Exception):
    """What the dashboard answers when data cannot be had: ``status`` and a message that is
    safe to show (no server path, no exception text from a library)."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class _FileCache:
    """Parsed files by path, reparsed when (size, mtime) changes; LRU-bounded, thread-safe."""

    def __init__(self, parse: Callable[[Path], Any], size: int = CACHE_FILES) -> None:
        self.parse, self.size = parse, size
        self._items: OrderedDict[Path, tuple[tuple[int, int], Any]] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, path: Path) -> Any:
        st = path.stat()
        if st.st_size > MAX_FILE_BYTES:
            raise SourceError(413, f"{path.name} is larger than {MAX_FILE_BYTES >> 20} MiB")
        stamp = (st.st_size, st.st_mtime_ns)
        with self._lock:
            hit = self._items.get(path)
            if hit is not None and hit[0] == stamp:
                self._items.move_to_end(path)
                return hit[1]
        value = self.parse(path)
        with self._lock:
            self._items[path] = (stamp, value)
            self._items.move_to_end(path)
            while len(self._items) > self.size:
                self._items.popitem(last=False)
        return value


def _peer_records(path: Path) -> list[dict[str, Any]]:
    """A peer's start, epoch and result records (step records are skipped unparsed)."""
    out: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            if '"kind":"step"' in line or not line.strip():
                continue
            try:
                rec = json.loads(line)
            except ValueError:
                continue  # a line cut short by a killed peer
            if isinstance(rec, dict) and rec.get("kind") in ("start", "epoch", "result"):
                out.append(rec)
                if len(out) > MAX_RECORDS:
                    del out[: len(out) - MAX_RECORDS]
    return out


def _bench_records(path: Path) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict) and "stack" in rec:
                out.append(rec)
    return out[-MAX_BENCH_RECORDS:]


def _suite_name(path: Path) -> str:
    name = "".join(c if c.isalnum() or c in "-_" else "-" for c in path.stem)[:64]
    return name or "suite"


class Sources:
    """The dashboard's readers: the gateway (for store runs), a p2p metrics directory and
    benchmark results files. ``gateway`` is built on first use (the gateway's own /ui knows
    its URL only once it listens)."""

    def __init__(self, gateway: GatewayClient | Callable[[], GatewayClient],
                 p2p_dir: str | Path | None = None,
                 bench_files: Sequence[str | Path] = ()) -> None:
        self._gateway = gateway
        self.p2p_dir = Path(p2p_dir).expanduser() if p2p_dir else None
        self.bench: dict[str, Path] = {}
        for p in bench_files:
            path = Path(p).expanduser().resolve()
            name, n = _suite_name(path), 2
            while name in self.bench:
                name, n = f"{_suite_name(path)}-{n}", n + 1
            self.bench[name] = path
        self._peers = _FileCache(_peer_records)
        self._bench = _FileCache(_bench_records, 16)

    @property
    def gateway(self) -> GatewayClient:
        if not isinstance(self._gateway, GatewayClient):
            self._gateway = self._gateway()
        return self._gateway

    # -- Downpour / averaging runs: emnist-setup's GET --------------------------------------

    def _setup_get(self, query: dict[str, str]) -> dict[str, Any]:
        try:
            resp = self.gateway.invoke(SETUP, None, method="GET", query=query, timeout=30,
                                       check=False)
        except GatewayError as e:
            raise SourceError(502, f"the gateway cannot be reached ({e.message})") from None
        try:
            body = resp.json()
        except ValueError:
            body = None
        if resp.status_code == 200 and isinstance(body, dict):
            return body
        message = body.get("error") if isinstance(body, dict) else None
        if resp.status_code == 404 and message is None:
            raise SourceError(502, f"{SETUP} is not deployed on the gateway")
        status = 404 if resp.status_code == 404 else 502
        text = str(message or resp.text.strip() or f"HTTP {resp.status_code}")[:300]
        raise SourceError(status, f"{SETUP} answered {resp.status_code}: {text}")

    def store_runs(self, limit: int = 50) -> list[dict[str, Any]]:
        """The run index (newest first), with each run's state."""
        runs = self._setup_get({"runs": "1", "limit": str(limit)}).get("runs")
        return [r for r in runs if isinstance(r, dict)] if isinstance(runs, list) else []

    def store_run(self, run_id: str) -> dict[str, Any]:
        """emnist-setup's detailed status of one run."""
        _check_id(run_id)
        return self._setup_get({"run_id": run_id, "detail": "1"})

    # -- p2p runs: metrics files ------------------------------------------------------------

    def p2p_runs(self) -> list[dict[str, Any]]:
        """The newest metrics directories: run id, peers, modification time."""
        if self.p2p_dir is None or not self.p2p_dir.is_dir():
            return []
        found = []
        for d in self.p2p_dir.iterdir():
            if valid_run_id(d.name) and d.is_dir():
                files = list(d.glob("peer-*.jsonl"))[:MAX_PEERS]
                if files:
                    found.append({"run_id": d.name, "peers": len(files),
                                  "mtime": max(f.stat().st_mtime for f in files)})
        found.sort(key=lambda r: r["mtime"], reverse=True)
        return found[:MAX_P2P_RUNS]

    def p2p_run(self, run_id: str) -> dict[int, list[dict[str, Any]]]:
        """Every peer's records of a run, by rank."""
        _check_id(run_id)
        d = self.p2p_dir / run_id if self.p2p_dir else None
        if d is None or not d.is_dir():
            raise SourceError(404, f"no p2p run {run_id}")
        out: dict[int, list[dict[str, Any]]] = {}
        for path in sorted(d.glob("peer-*.jsonl"))[:MAX_PEERS]:
            rank = path.stem.split("-", 1)[1]
            if rank.isascii() and rank.isdigit():
                out[int(rank)] = self._peers.get(path)
        if not out:
            raise SourceError(404, f"no p2p run {run_id}")
        return out

    # -- benchmark suites: results files ----------------------------------------------------

    def bench_suites(self) -> list[dict[str, Any]]:
        out = []
        for name, path in self.bench.items():
            if path.is_file():
                records = self._bench.get(path)
                out.append({"suite": name, "records": len(records),
                            "mtime": path.stat().st_mtime, "records_list": records})
        return out

    def bench_suite(self, name: str) -> list[dict[str, Any]]:
        path = self.bench.get(name)
        if path is None or not path.is_file():
            raise SourceError(404, f"no benchmark suite {name[:64]}")
        return self._bench.get(path)


def _check_id(run_id: str) -> None:
    if not valid_run_id(run_id):
        raise SourceError(400, "id: not a valid run id (1-64 letters, digits, '-' or '_')")
