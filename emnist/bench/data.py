"""`emnist bench data`: what the data path costs, side by side in one invocation.

- ``gen``: preparing the generated set (``fashion-mnist-gen-<N>``, 2 shards) into a directory
  and into S3 (generation + multipart upload), and the upload alone (the directory set's files
  PUT through the same S3 code, nothing generated). Target: 1 GB in under 3 minutes.
- ``load``: worker 0's shard from S3 (download in parallel ranges, CRC-32C, memory map, every
  page touched) and from a directory (CRC-32C, map, touch), next to raw reads of the same
  bytes (one plain ranged GET per object, or plain GETs in the worker's ranges; a plain file
  read) and the worker's download with one range per object; interleaved rounds, medians.
  Target: S3 streaming >= 50% of the raw loopback GET rate. (moto serves a range by reading
  the whole object, so on moto many ranges cost many whole reads.)
- ``rss``: peak RSS (VmHWM) of real train workers (emnist.bench.dataworker, one process each,
  all at once) training one pass from S3, at each worker count. Target: shard + 150 MiB.
- ``runs``: 2 Downpour workers per model on the generated set and on Fashion-MNIST's 60k, the
  same budget of samples each; time to the target accuracy and the best accuracy. Workers
  evaluate at the end of each pass over their shard, so the big set is evaluated rarely.

S3 is a moto server this starts on loopback unless an endpoint is given. The machine is shared:
every record carries ``os.getloadavg()`` at its end.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

from emnist.bench.train import ONE_THREAD

__all__ = ["COLUMNS", "PIECES", "RSS_SLACK", "bench_data", "parse_passes"]

PIECES = ("gen", "load", "rss", "runs")
RSS_SLACK = 150 << 20  # a worker's peak RSS target: its shard's bytes + this
TARGET = 0.87
RAW_GET = "S3 raw: one ranged GET per object"
RAW_RANGES = "S3 raw: the worker's ranges (64 MiB, 4 at once)"
S3_LOAD = "S3 -> cache, verified, mapped"
RAW_FILE = "directory raw (plain read)"
RUN_SETTINGS = {"mlp": {}, "lenet5": {"batch_size": 64, "alpha": 0.1}}
COLUMNS = {
    "gen": [("what", "what", ""), ("workers", "workers", ""), ("mb", "MB", ",.0f"),
            ("seconds", "s", ".1f"), ("mb_s", "MB/s", ".1f"),
            ("seconds_per_gb", "s per GB", ".0f"), ("under_3_min_per_gb", "< 3 min/GB", "")],
    "load": [("what", "what", ""), ("mb", "MB", ",.1f"), ("seconds", "s (median)", ".2f"),
             ("mb_s", "MB/s", ".0f"), ("vs_raw", "vs raw", ".0%"),
             ("vs_raw_same_ranges", "vs raw, same ranges", ".0%")],
    "rss": [("workers", "workers", ""), ("worker", "worker", ""),
            ("shard_mb", "shard MB", ",.1f"), ("rss_before_data_mb", "RSS before data MB",
                                                ",.0f"),
            ("peak_rss_mb", "peak RSS MB", ",.0f"), ("bound_mb", "shard + 150 MiB", ",.0f"),
            ("within", "within", ""), ("load_mb_s", "load MB/s", ".0f")],
    "runs": [("model", "model", ""), ("dataset", "dataset", ""),
             ("budget_samples", "budget (samples)", ","), ("passes", "passes", ""),
             ("evaluations", "evals", ""), ("seconds_to_target", f"s to {TARGET}", ".1f"),
             ("samples_to_target", f"samples to {TARGET}", ","),
             ("best_accuracy", "best acc", ".4f"), ("wall_seconds", "wall s", ".0f"),
             ("peak_rss_mb", "peak RSS MB", ",.0f")],
}


def parse_passes(text: str) -> dict[str, float]:
    """``mlp=2,lenet5=1`` -> budgets in passes over the generated set, per model."""
    out: dict[str, float] = {}
    for item in text.split(","):
        model, sep, value = item.strip().partition("=")
        if not sep or float(value) <= 0:
            raise ValueError(f"{item!r}: MODEL=PASSES with PASSES > 0")
        out[model] = float(value)
    return out


def _loadavg() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# -- the S3 server and the environment it is reached with ------------------------------------

@contextmanager
def moto(endpoint: str | None) -> Iterator[str]:
    """``endpoint``, or a moto server of our own on a free loopback port until exit."""
    if endpoint:
        yield endpoint
        return
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or \
        shutil.which("moto_server")
    if not exe:
        raise RuntimeError("moto_server is missing (pip install 'moto[server]'), or pass "
                           "--s3-endpoint")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("moto_server did not start") from None
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def s3_env(endpoint: str) -> dict[str, str]:
    """This environment plus the endpoint (keys: the shell's AWS_* ones, else moto's any)."""
    return {**os.environ, "s3_endpoint_url": endpoint, "s3_region": "us-east-1",
            "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing")}


@contextmanager
def environ(env: Mapping[str, str]) -> Iterator[None]:
    """``os.environ`` as ``env`` for the block: setup_run reads the S3 settings from it, as a
    function does."""
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


class Bench:
    """One invocation's state: the S3 bucket, a work directory, the sets prepared so far."""

    def __init__(self, endpoint: str, work: Path, samples: int, store_url: str,
                 processes: int | None, echo: Callable[[str], None]) -> None:
        import boto3

        from emnist.data.generated import canonical_name

        self.env = s3_env(endpoint)
        self.bucket = "bench-" + secrets.token_hex(4)
        boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                     aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
                     aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"]
                     ).create_bucket(Bucket=self.bucket)
        self.work, self.samples, self.store_url = work, samples, store_url
        self.processes, self.echo = processes, echo
        self.dataset = canonical_name(samples)
        self.urls = {"dir": str(work / "sets"), "s3": f"s3://{self.bucket}/sets"}
        self.sets: dict[tuple[int, str], Any] = {}
        self.records: list[dict[str, Any]] = []

    def add(self, piece: str, **record: Any) -> dict[str, Any]:
        rec = {"piece": piece, **record, "loadavg": _loadavg()}
        self.records.append(rec)
        return rec

    def prepared(self, workers: int, where: str) -> tuple[Any, float]:
        """The generated set for ``workers`` at ``where`` (dir or s3), prepared on first use;
        and the seconds that took."""
        from emnist.data.prepared import prepare_set

        if (workers, where) not in self.sets:
            self.echo(f"preparing {self.dataset}, {workers} shards -> {self.urls[where]} ...")
            t0 = time.perf_counter()
            ps = prepare_set(self.dataset, workers, self.urls[where], env=self.env,
                             processes=self.processes)
            self.sets[workers, where] = (ps, time.perf_counter() - t0)
        return self.sets[workers, where]

    def node(self, name: str) -> dict[str, str]:
        """A worker process's environment: a node cache of its own, one BLAS thread."""
        return {**self.env, **ONE_THREAD, "EMNIST_HOME": str(self.work / "nodes" / name)}


# -- gen ---------------------------------------------------------------------------------------

def _gen_record(b: Bench, what: str, workers: int, nbytes: int, seconds: float) -> None:
    per_gb = seconds / (nbytes / 1e9)
    b.add("gen", what=what, dataset=b.dataset, workers=workers, bytes=nbytes, mb=nbytes / 1e6,
          seconds=seconds, mb_s=nbytes / 1e6 / seconds, seconds_per_gb=per_gb,
          under_3_min_per_gb=per_gb < 180, processes=b.processes or os.cpu_count())


def _file_pieces(path: Path) -> Iterator[bytes]:
    with open(path, "rb") as f:
        while piece := f.read(8 << 20):
            yield piece


def bench_gen(b: Bench) -> None:
    from emnist.data.location import open_location

    ps_dir, t_dir = b.prepared(2, "dir")
    _gen_record(b, "generate + write to a directory", 2, ps_dir.nbytes, t_dir)
    ps_s3, t_s3 = b.prepared(2, "s3")
    _gen_record(b, "generate + upload to S3", 2, ps_s3.nbytes, t_s3)
    if ps_s3.manifest["files"] != ps_dir.manifest["files"]:
        raise RuntimeError("the directory and S3 sets differ")  # same key, same bytes
    b.echo("uploading the directory set's files to S3 (no generation) ...")
    loc = open_location(f"s3://{b.bucket}/upload-only", b.env)
    t0 = time.perf_counter()
    for name, meta in ps_dir.manifest["files"].items():
        crc = loc.put(name, _file_pieces(Path(ps_dir.url) / name), meta["bytes"])
        if crc != meta["crc32c"]:
            raise RuntimeError(f"{name}: uploaded bytes differ from the set's")
    _gen_record(b, "upload only (S3 multipart)", 2, ps_dir.nbytes, time.perf_counter() - t0)
    loc.delete("")


# -- load --------------------------------------------------------------------------------------

def _raw_get(b: Bench, key: str, size: int, ranges: bool = False) -> int:
    """The object by plain GETs, read in 1 MiB pieces and dropped: one ranged GET of it all,
    or (``ranges``) the worker's pattern, RANGE_BYTES ranges READERS at a time."""
    from concurrent.futures import ThreadPoolExecutor

    from emnist.data import s3 as s3mod

    client = s3mod.S3Location(f"s3://{b.bucket}", b.env).s3

    def span(start: int, end: int) -> int:
        body = client.get_object(Bucket=b.bucket, Key=key, Range=f"bytes={start}-{end - 1}")
        n = 0
        while piece := body["Body"].read(s3mod.PIECE):
            n += len(piece)
        body["Body"].close()
        return n

    if not ranges:
        return span(0, size)
    spans = [(s, min(s + s3mod.RANGE_BYTES, size)) for s in range(0, size, s3mod.RANGE_BYTES)]
    with ThreadPoolExecutor(s3mod.READERS) as pool:
        return sum(pool.map(lambda se: span(*se), spans))


@contextmanager
def one_range() -> Iterator[None]:
    """The worker's S3 download with one range per object (no parallel ranges), to tell what
    the ranges cost on this server from what caching and verifying cost."""
    from emnist.data import s3 as s3mod

    saved = s3mod.RANGE_BYTES, s3mod.READERS
    s3mod.RANGE_BYTES, s3mod.READERS = 1 << 62, 1
    try:
        yield
    finally:
        s3mod.RANGE_BYTES, s3mod.READERS = saved


def _raw_file(path: Path) -> int:
    n = 0
    with open(path, "rb", buffering=0) as f:
        buf = bytearray(8 << 20)
        while got := f.readinto(buf):
            n += got
    return n


def _project_load(url: str, env: Mapping[str, str]) -> int:
    """Worker 0's shard as a worker gets it: fetched (S3) or checked in place (directory),
    verified, memory-mapped, every page read. The bytes that came from the source."""
    from emnist.data.cache import open_set

    reader = open_set(url, env)
    shard = reader.shard(0)
    for a in (shard.x, shard.y):  # one byte per page: every page faulted in, no arithmetic
        int(a.reshape(-1)[::4096].sum(dtype=np.uint64))
    files = ("worker-0-x.npy", "worker-0-y.npy")
    if reader.stats.fetched:
        return reader.stats.downloaded
    return sum((reader.dir / f).stat().st_size for f in files)


def bench_load(b: Bench, rounds: int) -> None:
    ps_s3, _ = b.prepared(2, "s3")
    ps_dir, _ = b.prepared(2, "dir")
    files = ("worker-0-x.npy", "worker-0-y.npy")
    shard_bytes = sum(ps_s3.manifest["files"][f]["bytes"] for f in files)
    prefix = ps_s3.url.split("/", 3)[3]
    cache = b.work / "nodes" / "load"

    def s3() -> int:
        shutil.rmtree(cache, ignore_errors=True)  # a node that never saw the set
        return _project_load(ps_s3.url, {**b.env, "EMNIST_HOME": str(cache)})

    def s3_one_range() -> int:
        with one_range():
            return s3()

    def raw(ranges: bool) -> int:
        return sum(_raw_get(b, f"{prefix}/{f}", ps_s3.manifest["files"][f]["bytes"], ranges)
                   for f in files)

    ways: dict[str, Callable[[], int]] = {
        RAW_GET: lambda: raw(False),
        RAW_RANGES: lambda: raw(True),
        S3_LOAD: s3,
        "S3 -> cache, one range per object": s3_one_range,
        RAW_FILE: lambda: sum(_raw_file(Path(ps_dir.url) / f) for f in files),
        "directory, verified, mapped": lambda: _project_load(ps_dir.url, b.env),
    }
    for way in ways.values():  # warm-up: clients, imports, page cache
        way()
    times: dict[str, list[float]] = {w: [] for w in ways}
    loaded: dict[str, int] = {}
    for r in range(rounds):
        b.echo(f"load round {r + 1}/{rounds} ...")
        for what, way in ways.items():
            t0 = time.perf_counter()
            loaded[what] = way()
            times[what].append(time.perf_counter() - t0)
    shutil.rmtree(cache, ignore_errors=True)
    recs = {}
    for what in ways:
        t = median(times[what])
        recs[what] = b.add("load", what=what, bytes=loaded[what], shard_bytes=shard_bytes,
                           mb=loaded[what] / 1e6, seconds=t, seconds_rounds=times[what],
                           mb_s=loaded[what] / 1e6 / t, rounds=rounds)
    for what, base in ((RAW_GET, RAW_GET), (RAW_RANGES, RAW_GET), (S3_LOAD, RAW_GET),
                       ("S3 -> cache, one range per object", RAW_GET),
                       (RAW_FILE, RAW_FILE), ("directory, verified, mapped", RAW_FILE)):
        recs[what]["vs_raw"] = recs[what]["mb_s"] / recs[base]["mb_s"]
    recs[S3_LOAD]["vs_raw_same_ranges"] = recs[S3_LOAD]["mb_s"] / recs[RAW_RANGES]["mb_s"]


# -- real workers: rss and runs ----------------------------------------------------------------

def _workers(b: Bench, run_id: str, count: int, tag: str, timeout: float) -> list[dict]:
    """``count`` dataworker processes at once, each on a node cache of its own."""
    procs = [subprocess.Popen([sys.executable, "-m", "emnist.bench.dataworker", b.store_url,
                               run_id, str(w)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=b.node(f"{tag}-{w}")) for w in range(count)]
    outs = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=timeout)
            if p.returncode != 0:
                raise RuntimeError(f"worker failed: {err.strip()[-2000:]}")
            outs.append(json.loads(out.strip().splitlines()[-1]))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outs


def _setup(b: Bench, workers: int, **cfg: Any) -> str:
    from emnist.store import open_kv
    from emnist.train.config import TrainConfig
    from emnist.train.run import new_run_id, setup_run

    run_id = "bench-data-" + new_run_id()
    with environ(b.env):
        setup_run(TrainConfig(store_url=b.store_url, number_of_workers=workers, **cfg),
                  open_kv(b.store_url), workers, run_id=run_id)
    return run_id


def bench_rss(b: Bench, counts: list[int]) -> None:
    for workers in counts:
        ps, seconds = b.prepared(workers, "s3")
        if workers != 2:
            _gen_record(b, "generate + upload to S3", workers, ps.nbytes, seconds)
        run_id = _setup(b, workers, dataset=b.dataset, data_location=b.urls["s3"],
                        iterations=1, target_accuracy=0.99)
        b.echo(f"rss: {workers} workers training one pass from S3 ...")
        for o in _workers(b, run_id, workers, f"rss{workers}", timeout=900):
            files = (f"worker-{o['worker']}-x.npy", f"worker-{o['worker']}-y.npy")
            shard_file_bytes = sum(ps.manifest["files"][f]["bytes"] for f in files)
            bound = o["shard_bytes"] + RSS_SLACK
            b.add("rss", workers=workers, worker=o["worker"], shard_bytes=o["shard_bytes"],
                  shard_file_bytes=shard_file_bytes, downloaded=o["downloaded"],
                  shard_mb=o["shard_bytes"] / 1e6, test_bytes=o["test_bytes"],
                  rss_before_data=o["rss_before_data"],
                  rss_before_data_mb=o["rss_before_data"] / 1e6, peak_rss=o["peak_rss"],
                  peak_rss_mb=o["peak_rss"] / 1e6, bound=bound, bound_mb=bound / 1e6,
                  within=o["peak_rss"] <= bound, load_seconds=o["load_seconds"],
                  load_mb_s=o["load_mb_s"], iterations=o["iterations"])
        shutil.rmtree(b.work / "nodes", ignore_errors=True)


def _per_pass(n: int, workers: int, batch: int) -> int:
    from emnist.data.shards import shard_sizes

    return max(1, min(shard_sizes(n, workers)) // batch) * batch * workers


def bench_runs(b: Bench, models: list[str], passes: Mapping[str, float],
               max_seconds: float) -> None:
    from emnist.train.config import TrainConfig

    b.prepared(2, "dir")
    for model in models:
        settings = RUN_SETTINGS.get(model, {})
        batch = settings.get("batch_size", TrainConfig.batch_size)
        budget = passes.get(model, 1.0) * _per_pass(b.samples, 2, batch)
        for dataset, n in ((b.dataset, b.samples), ("fashion-mnist", 60_000)):
            per_pass = _per_pass(n, 2, batch)
            iterations = max(1, round(budget / per_pass))
            run_id = _setup(b, 2, model=model, dataset=dataset, data_location=b.urls["dir"],
                            iterations=iterations, target_accuracy=0.999,
                            max_seconds=max_seconds, **settings)
            b.echo(f"runs: {model} on {dataset}, 2 workers, {iterations} passes ...")
            t0 = time.perf_counter()
            outs = _workers(b, run_id, 2, f"run-{model}", timeout=max_seconds + 600)
            wall = time.perf_counter() - t0
            curves = [o["curve"] for o in outs]
            hits = [next((p for p in c if p[2] >= TARGET), None) for c in curves]
            hits = [h for h in hits if h is not None]
            first = min(hits, key=lambda p: p[0]) if hits else None
            b.add("runs", model=model, dataset=dataset, workers=2, samples=n,
                  passes=iterations, budget_samples=iterations * per_pass,
                  samples_done=sum(o["samples"] for o in outs),
                  evaluations=max(len(c) for c in curves), target=TARGET,
                  seconds_to_target=first[0] if first else None,
                  samples_to_target=first[4] * 2 if first else None,
                  best_accuracy=max(p[2] for c in curves for p in c),
                  final_accuracy=max(o["accuracy"] for o in outs), wall_seconds=wall,
                  peak_rss_mb=max(o["peak_rss"] for o in outs) / 1e6, settings=settings,
                  curves=curves)


def targets(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Whether each of the issue's targets was met by what was measured (None: not run)."""
    gen = [r for r in records if r["piece"] == "gen" and "upload to S3" in r["what"]]
    s3 = next((r for r in records if r["piece"] == "load" and r["what"] == S3_LOAD), None)
    rss = [r for r in records if r["piece"] == "rss"]
    return {
        "prepare_1gb_under_3_min": all(r["under_3_min_per_gb"] for r in gen) if gen else None,
        "prepare_seconds_per_gb": [round(r["seconds_per_gb"], 1) for r in gen],
        "s3_stream_vs_raw_at_least_50pct": s3["vs_raw"] >= 0.5 if s3 else None,
        "s3_stream_vs_raw": round(s3["vs_raw"], 3) if s3 else None,
        "s3_stream_vs_raw_same_ranges": round(s3["vs_raw_same_ranges"], 3) if s3 else None,
        "rss_within_shard_plus_150mib": all(r["within"] for r in rss) if rss else None,
        "rss_worst_margin_mb": round(min((r["bound"] - r["peak_rss"]) / 1e6 for r in rss), 1)
        if rss else None,
    }


def bench_data(pieces: list[str], samples: int, *, rss_workers: list[int], models: list[str],
               passes: Mapping[str, float], rounds: int = 3, s3_endpoint: str | None = None,
               store_url: str = "memcached://127.0.0.1:11211", work_dir: str | None = None,
               processes: int | None = None, max_seconds: float = 600.0,
               echo: Callable[[str], None] = print,
               save: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Run ``pieces`` (of PIECES, in that order) and return the results document; ``save``
    gets the document so far after each piece (a long run keeps what it measured)."""
    unknown = set(pieces) - set(PIECES)
    if unknown:
        raise ValueError(f"unknown pieces {sorted(unknown)}; choose from {', '.join(PIECES)}")
    started, load0 = time.time(), _loadavg()
    work = Path(tempfile.mkdtemp(prefix="emnist-bench-data-", dir=work_dir))
    doc: dict[str, Any] = {}

    def document(done: list[str]) -> dict[str, Any]:
        doc.update({"bench": "data", "started": time.strftime("%Y-%m-%dT%H:%M:%SZ",
                                                              time.gmtime(started)),
                    "seconds": time.time() - started, "cpus": os.cpu_count(),
                    "loadavg_start": load0, "loadavg_end": _loadavg(), "samples": samples,
                    "dataset": b.dataset, "pieces": done,
                    "s3": s3_endpoint or "moto_server on loopback",
                    "targets": targets(b.records), "records": b.records})
        return doc

    steps: dict[str, Callable[[], None]] = {
        "gen": lambda: bench_gen(b), "load": lambda: bench_load(b, rounds),
        "rss": lambda: bench_rss(b, rss_workers),
        "runs": lambda: bench_runs(b, models, passes, max_seconds)}
    try:
        with moto(s3_endpoint) as endpoint:
            b = Bench(endpoint, work, samples, store_url, processes, echo)
            done: list[str] = []
            for piece in PIECES:
                if piece in pieces:
                    steps[piece]()
                    done.append(piece)
                    if save is not None:
                        save(document(done))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return document(done)
