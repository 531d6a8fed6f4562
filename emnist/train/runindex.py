"""The run index: the newest runs set up in a store, so a dashboard can list them.

memcached cannot list keys, so setup records every run it starts in one bounded document,
``emnist:runs`` (the newest ``INDEX_MAX`` entries, each a few fixed fields), updated with the
KV's atomic ``update_many`` so concurrent setups lose no entry. :func:`list_runs` answers
emnist-setup's ``GET ?runs=1``: the entries, newest first, with each run's state read in one
round trip (bounded by ``KEY_BUDGET`` keys; runs past it are reported ``unknown``). The index
is advisory: a damaged one is started afresh, never trusted, and so is each entry (anyone who
reaches the store can write it): one whose fields do not have their types and bounds
(``valid_entry``) is dropped before its numbers size anything.
"""

from __future__ import annotations

import math
import time
from typing import Any

from emnist.policy import HARD_MAX_WORKERS
from emnist.store import KV, CorruptValue, codec
from emnist.store.keys import index_key, key_for, valid_run_id

__all__ = ["INDEX_MAX", "LIST_MAX", "index_entry", "list_runs", "read_index", "record_run",
           "valid_entry"]

INDEX_MAX = 200  # entries kept (~40 KB: far below memcached's 1 MB item limit)
LIST_MAX = 100  # most runs one GET ?runs=1 answers
KEY_BUDGET = 2048  # most store keys one listing reads
RUNS = index_key("runs")


def model_name(config: dict[str, Any], num_classes: int | None) -> str:
    """What the run trains: the config's ``model`` if it names one, else the MLP's shape."""
    model = config.get("model")
    if isinstance(model, str) and model and model != "mlp":  # the mlp: its shape says more
        return model[:64]
    return f"mlp {config.get('pixels_per_image')}-{config.get('hidden_size')}-{num_classes}"


def index_entry(state: dict[str, Any]) -> dict[str, Any]:
    """The index's line for a run document (fixed fields, bounded strings)."""
    cfg = state.get("config", {})
    return {"run_id": state["run_id"], "algorithm": str(cfg.get("algorithm", ""))[:32],
            "model": model_name(cfg, state.get("num_classes")),
            "dataset": str(cfg.get("dataset", ""))[:64], "workers": int(state["workers"]),
            "execution_type": cfg.get("execution_type"), "started": state.get("started")}


_TEXT = {"algorithm": 32, "model": 200, "dataset": 64}  # longest index_entry writes


def valid_entry(e: Any) -> bool:
    """True for an index entry as ``index_entry`` writes it: a run id, a worker count within
    the hard cap, bounded strings, and numbers that are finite."""
    if not isinstance(e, dict) or not valid_run_id(e.get("run_id")):
        return False
    workers, started, et = e.get("workers"), e.get("started"), e.get("execution_type")
    return (isinstance(workers, int) and not isinstance(workers, bool)
            and 1 <= workers <= HARD_MAX_WORKERS
            and (started is None or (isinstance(started, int | float)
                                     and not isinstance(started, bool)
                                     and math.isfinite(started)))
            and (et is None or (isinstance(et, int) and not isinstance(et, bool)
                                and 1 <= et <= 3))
            and all(isinstance(e.get(k, ""), str) and len(e.get(k, "")) <= most
                    for k, most in _TEXT.items()))


def _decode(key: str, old: bytes | None) -> list[dict[str, Any]]:
    if old is None:
        return []
    try:
        doc = codec.decode_doc(key, old)
    except CorruptValue:
        return []  # advisory: a damaged index is started afresh
    runs = doc.get("runs") if isinstance(doc, dict) else None
    return [e for e in runs[-INDEX_MAX:] if valid_entry(e)] if isinstance(runs, list) else []


def record_run(kv: KV, state: dict[str, Any]) -> None:
    """Add a run (its run document) to the index, atomically; the oldest entries drop out."""
    entry = index_entry(state)

    def add(key: str, old: bytes | None) -> bytes:
        runs = [e for e in _decode(key, old) if e["run_id"] != entry["run_id"]]
        return codec.encode_doc({"runs": (runs + [entry])[-INDEX_MAX:]})

    kv.update_many([RUNS], add)


def read_index(kv: KV) -> list[dict[str, Any]]:
    """The index's entries, oldest first."""
    return _decode(RUNS, kv.get_many([RUNS]).get(RUNS))


def _state(entry: dict[str, Any], docs: dict[str, Any], now: float) -> dict[str, Any]:
    run_id, n = entry["run_id"], entry["workers"]
    if key_for(run_id, "run") not in docs:
        return {"state": "lost", "elapsed": None}  # the store forgot it (restart, eviction)
    results = [docs.get(key_for(run_id, f"result:{w}")) for w in range(n)]
    results = [r for r in results if isinstance(r, dict)]
    started = entry.get("started") or 0
    done = len(results) == n
    finished = [r["finished"] for r in results if isinstance(r.get("finished"), int | float)]
    return {"state": "done" if done else "running", "finished_workers": len(results),
            "elapsed": (max(finished) if done and finished else now) - started,
            "reached": any(r.get("reached") for r in results),
            "accuracy": max((r["accuracy"] for r in results
                             if isinstance(r.get("accuracy"), int | float)), default=None),
            "stop": docs.get(key_for(run_id, "stop"))}


def list_runs(kv: KV, limit: int = 50) -> list[dict[str, Any]]:
    """The newest ``limit`` runs, newest first, each with its state (running, done, lost;
    unknown past the key budget)."""
    entries = list(reversed(read_index(kv)))[:max(1, min(limit, LIST_MAX))]
    keys: list[str] = []
    counted: set[str] = set()
    for e in entries:
        if len(keys) + 2 + e["workers"] > KEY_BUDGET:  # before any name is made
            break
        names = ["run", "stop"] + [f"result:{w}" for w in range(e["workers"])]
        keys += [key_for(e["run_id"], n) for n in names]
        counted.add(e["run_id"])
    got = kv.get_many(keys) if keys else {}
    docs: dict[str, Any] = {}
    for k, v in got.items():
        try:
            docs[k] = codec.decode_doc(k, v)
        except CorruptValue:
            docs[k] = None  # present but unreadable: counts as present, shows nothing
    now = time.time()
    return [{**e, **(_state(e, docs, now) if e["run_id"] in counted
                     else {"state": "unknown", "elapsed": None})} for e in entries]
