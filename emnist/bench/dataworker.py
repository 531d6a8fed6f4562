"""One real train worker in a process of its own, reporting what its data cost: how long its
shard took to arrive (S3 or a directory into the node's cache, verified, memory-mapped, every
page touched; the test set timed apart) and the process's peak resident memory (``VmHWM``
from /proc), then the worker's result. Used by ``emnist bench data`` and the memory test.

``python -m emnist.bench.dataworker STORE_URL RUN_ID WORKER``: one JSON line on stdout. The
data URL, S3 endpoint and keys come from the environment, as in a function.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import time
from typing import Any

__all__ = ["peak_rss", "run"]


def _status(field: str) -> int:
    """A /proc/self/status memory field in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def peak_rss() -> int:
    """This process's peak resident set size (VmHWM), bytes."""
    return _status("VmHWM")


def run(store_url: str, run_id: str, worker: int) -> dict[str, Any]:
    import numpy as np

    from emnist.data.cache import open_set
    from emnist.store import ParameterStore, open_kv
    from emnist.train.run import train_worker

    kv = open_kv(store_url)
    state = ParameterStore(kv, run_id).get_doc("run")
    base_rss = peak_rss()
    t0 = time.perf_counter()
    reader = open_set(state["shard_dir"])
    shard = reader.shard(worker)
    checksum = int(np.add.reduce(shard.x, axis=None, dtype=np.uint64))  # every page, read
    load = time.perf_counter() - t0
    t0 = time.perf_counter()
    test_x, test_y = reader.test()
    test_load = time.perf_counter() - t0
    shard_bytes = int(shard.x.nbytes + shard.y.nbytes)
    test_bytes = int(test_x.nbytes + test_y.nbytes)
    stats = reader.stats
    del shard, test_x, test_y, reader
    t1 = time.perf_counter()
    st, record = train_worker(kv, run_id, worker, socket.gethostname())
    return {"worker": worker, "shard_bytes": shard_bytes,
            "test_bytes": test_bytes, "load_seconds": load,
            "load_mb_s": shard_bytes / 1e6 / load if load else None,
            "test_load_seconds": test_load,
            "downloaded": stats.downloaded, "cached": stats.cached, "checksum": checksum,
            "rss_before_data": base_rss,
            "peak_rss": peak_rss(), "train_seconds": time.perf_counter() - t1,
            "accuracy": st.accuracy, "iterations": st.iteration, "samples": st.samples,
            "curve": st.curve, "pid": os.getpid()}


if __name__ == "__main__":
    print(json.dumps(run(sys.argv[1], sys.argv[2], int(sys.argv[3]))), flush=True)
