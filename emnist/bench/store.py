"""`emnist bench store`: what a full fetch and an atomic push cost, per backend and chunk size,
next to the raw loopback ceiling (a plain TCP echo of the same bytes).

Each measurement warms up first, then times single operations (p50/p99) and reports MB/s from
the mean; the echo server runs in its own process so it does not share our GIL. Big vectors
(``--vector-mb 6,515``: a MobileNetV3-small-sized and a VGG11-sized one) take fewer
repetitions (about 2 GB moved per figure, at least 3) and move in the store's bounded batches;
a 515 MB vector needs a memcached started with ``-m 1024`` or more.
"""

from __future__ import annotations

import secrets
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from statistics import mean
from typing import Any

import numpy as np

from emnist.model import MLPShape
from emnist.store import ParameterStore, StoreError, open_kv

REFERENCE = MLPShape(784, 100, 47).num_params  # the study's model, float32

COLUMNS = [("backend", "backend", ""), ("vector_bytes", "vector", ",d"),
           ("chunk_bytes", "chunk", ",d"), ("fetch_p50_ms", "fetch p50 ms", ".3f"),
           ("fetch_p99_ms", "fetch p99 ms", ".3f"), ("push_p50_ms", "push p50 ms", ".3f"),
           ("push_p99_ms", "push p99 ms", ".3f"), ("fetch_mb_per_s", "fetch MB/s", ",.0f"),
           ("push_mb_per_s", "push MB/s", ",.0f"),
           ("raw_ceiling_mb_per_s", "raw TCP MB/s", ",.0f"),
           ("fetch_vs_raw", "fetch/raw", ".0%"), ("reps", "reps", "")]
MOVED_PER_FIGURE = 2e9  # bytes: big vectors take fewer repetitions


def reps_for(nbytes: int, reps: int) -> tuple[int, int]:
    """(repetitions, warm-ups) for a vector of ``nbytes``: ``reps`` for small ones."""
    n = max(3, min(reps, int(MOVED_PER_FIGURE // max(nbytes, 1))))
    return n, min(20, max(1, n // 10))

ECHO = """
import socket, sys
srv = socket.socket()
srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
srv.bind(("127.0.0.1", 0)); srv.listen(1)
print(srv.getsockname()[1], flush=True)
conn, _ = srv.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
buf = bytearray(1 << 24)
while True:
    n = conn.recv_into(buf)
    if not n:
        break
    conn.sendall(memoryview(buf)[:n])
"""


def _timed(op: Callable[[], Any], reps: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        op()
    out = []
    for _ in range(reps):
        t = time.perf_counter()
        op()
        out.append(time.perf_counter() - t)
    return out


def raw_echo(nbytes: int, reps: int, warmup: int = 20) -> list[float]:
    """Round trips of ``nbytes`` through a TCP echo server on loopback."""
    proc = subprocess.Popen([sys.executable, "-c", ECHO], stdout=subprocess.PIPE, text=True)
    try:
        port = int(proc.stdout.readline())
        sock = socket.create_connection(("127.0.0.1", port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        payload, buf = bytes(nbytes), bytearray(nbytes)
        view = memoryview(buf)

        def trip() -> None:
            # send from a thread: a payload bigger than the socket buffers would otherwise
            # block both ends (the echo waits for us to read what it sends back)
            sender = threading.Thread(target=sock.sendall, args=(payload,))
            sender.start()
            got = 0
            while got < nbytes:
                got += sock.recv_into(view[got:])
            sender.join()

        times = _timed(trip, reps, warmup)
        sock.close()
        return times
    finally:
        proc.terminate()
        proc.wait(10)


def _ms(xs: list[float], q: float) -> float:
    return float(np.percentile(xs, q) * 1e3)


def measure(url: str, num_params: int, chunk_bytes: int, reps: int,
            warmup: int = 20) -> dict[str, Any]:
    kv = open_kv(url)
    run = "bench-" + secrets.token_hex(4)
    ps = ParameterStore(kv, run, chunk_bytes=chunk_bytes)
    ps.init(np.random.default_rng(0).random(num_params, dtype=np.float32))
    out = np.empty(num_params, dtype=np.float32)
    delta = np.full(num_params, 1e-7, dtype=np.float32)
    try:
        fetch = _timed(lambda: ps.fetch(out), reps, warmup)
        push = _timed(lambda: ps.push(delta, out=out), reps, warmup)
    finally:
        ps.delete(["layout"])
        kv.close()
    nbytes = 4 * num_params
    return {"backend": url.split("://", 1)[0], "url": kv.url, "vector_bytes": nbytes,
            "chunk_bytes": chunk_bytes, "chunks": len(ps.keys), "reps": reps,
            "fetch_p50_ms": _ms(fetch, 50), "fetch_p99_ms": _ms(fetch, 99),
            "push_p50_ms": _ms(push, 50), "push_p99_ms": _ms(push, 99),
            "fetch_mb_per_s": nbytes / mean(fetch) / 1e6,
            "push_mb_per_s": nbytes / mean(push) / 1e6}


def bench_store(urls: list[str], chunk_sizes: list[int], vectors: list[int], reps: int,
                echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    records = []
    ceilings = {}
    for n in vectors:
        r, w = reps_for(4 * n, reps)
        raw = raw_echo(4 * n, r, w)
        ceilings[n] = (_ms(raw, 50), 4 * n / mean(raw) / 1e6)
    for url in urls:
        try:
            open_kv(url).get_many(["emnist:bench:probe"])
        except StoreError as e:
            echo(f"skipping {url}: {e}")
            continue
        for n in vectors:
            for chunk in chunk_sizes:
                echo(f"{url} vector {4 * n:,} B chunk {chunk:,} B ...")
                r = measure(url, n, chunk, *reps_for(4 * n, reps))
                r["raw_p50_ms"], r["raw_ceiling_mb_per_s"] = ceilings[n]
                r["fetch_vs_raw"] = r["fetch_mb_per_s"] / r["raw_ceiling_mb_per_s"]
                records.append(r)
    return records


def default_urls() -> list[str]:
    urls = ["memcached://127.0.0.1:11211"]
    try:
        import pylibmc  # noqa: F401
        urls.append("memcached+binary://127.0.0.1:11211")
    except ImportError:
        pass
    return urls + ["redis://127.0.0.1:6379/0"]
