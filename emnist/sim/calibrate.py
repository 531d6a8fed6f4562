"""``emnist sim calibrate``: measure this machine and write a cost file (see costs.py).

What is measured, and with what:

- compute per model and batch size, the eval cost and the client's per-byte costs: a fresh
  single-BLAS-thread interpreter (``emnist.sim.measure steps``) timing the worker's own step;
- the spread and drift of processes sharing the machine: one ``measure loop`` per core at
  once, each step timed; the lognormal sigma of single steps and of 25-step means and the
  means' lag-1 correlation give ``spread``, ``drift`` and ``drift_steps``;
- the store: ``emnist.bench.store.measure`` (the project's benchmark: full fetch and atomic
  push, p50) for the reference vector and 10x it; the slope is per byte, the intercept one
  call (80% of it counted as round trip, 20% as the server's queued work: on loopback most
  of a small call is client and kernel time);
- the gateway: ``emnist.bench.gateway`` (a no-op function called straight and through a real
  local gateway), then its local gateway with a handler answering a gradient-sized body,
  called with ``GatewayClient`` as a serverless peer calls emnist-grad: ``invoke`` and
  ``per_byte``;
- the broker: a peer's own pieces on real Redis (``messages.gradient`` + ``publish``;
  ``collect`` of two messages + ``finished``) for a tiny and a gradient-sized message;
- the cores: one step loop per core at once runs slower than one alone when something else
  uses the machine; the local node's ``cores`` is the cores this leaves (stores, broker and
  functions here are ``on_node``: their calls take the same cores);
- setup and worker start: ``emnist.train.run.setup_run`` (shards already prepared), then
  ``load_run``, the lease, ``open_shard`` and ``open_test`` as ``train_worker`` does them.

``fast`` (for tests) measures compute, client and store with few repetitions and keeps the
template's figures for the gateway, broker and start-up (marked "not measured").
"""

from __future__ import annotations

import contextlib
import json
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from emnist.sim.costs import parse_costs, validate

__all__ = ["TEMPLATE", "calibrate", "load_figures", "mean_of", "probe", "probe_mean", "write_costs"]

ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
BATCHES = (16, 32, 64, 100, 128)
SERVER_SHARE = 0.2  # of a small call's time, counted as the server's queued work

TEMPLATE: dict[str, Any] = {
    "name": "local",
    "description": "this machine (emnist sim calibrate)",
    "nodes": [{"name": "this", "count": 1, "cores": 2, "speed": 1.0, "memory_gb": 8,
               "link_bandwidth": 1e10}],
    "compute": {"spread": 0.12, "drift": 0.1, "drift_steps": 100, "models": {}},
    "client": {"decode_per_byte": 1e-10, "encode_per_byte": 1e-10, "vector_per_byte": 1e-10},
    "store": {"servers": 1, "rtt": 8e-5, "op": 2e-5, "bandwidth": 2e9,
              "write_bandwidth": 1e9, "note_per_push": True,
              "doc_bytes": 4000, "vcpus": 0, "memory_gb": 0},
    "tier": {"rtt": 2e-5, "op": 1e-5, "bandwidth": 5e9, "write_bandwidth": 2e9,
             "sync_interval": 0.05},
    "broker": {"rtt": 1e-4, "op": 5e-5, "bandwidth": 1e9, "write_bandwidth": 1e9, "vcpus": 0,
               "memory_gb": 0},
    "gateway": {"invoke": 1.5e-3, "per_byte": 2e-9, "async": 2e-3, "on_node": True,
                "io_factor": 1.0},
    "functions": {"on_node": True, "instances": 3, "concurrency": 0, "cold_start": 0.0,
                  "keep_warm": 600, "speed": 1.0, "memory_gb": 0.5, "handler": 3e-4},
    "run": {"setup": 0.1, "worker_start": 0.05, "peer_start": 0.3},
    # an on-demand VM's list price per vCPU and GB (about a 2 vCPU / 8 GB general-purpose
    # instance) and AWS Lambda's x86 prices, so local figures compare with the clusters
    "prices": {"vcpu_hour": 0.0416, "gb_hour": 0.0052, "function_gb_second": 1.6667e-5,
               "function_request": 2e-7},
}


def _subprocess(what: str, spec: dict[str, Any], timeout: float = 1200) -> Any:
    out = subprocess.run([sys.executable, "-m", "emnist.sim.measure", what, json.dumps(spec)],
                         env={**os.environ, **ONE_THREAD}, capture_output=True, text=True,
                         timeout=timeout, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"measure {what} failed: {out.stderr.strip()[-1500:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def measure_drift(spec: dict[str, Any], procs: int, seconds: float,
                  sessions: str = "each") -> dict[str, float]:
    """``procs`` step loops at once: spread of single steps, drift of 25-step means, the
    throughput. With the kernel's autogroup scheduling a session's processes share one fair
    share of the CPU, so the loops run as the real processes they stand for do: ``each`` in
    its own session (gateway replicas are started so), or ``one`` session for all (the peers
    of ``emnist p2p run``)."""
    args = json.dumps({**spec, "seconds": seconds, "batch": 100})
    cmd = [sys.executable, "-m", "emnist.sim.measure", "loop", args]
    env = {**os.environ, **ONE_THREAD}
    if sessions == "one":
        group = ("import subprocess, sys\n"
                 f"ps = [subprocess.Popen({cmd!r}, stdout=subprocess.PIPE, text=True) "
                 f"for _ in range({procs})]\n"
                 "print('[' + ','.join(p.communicate()[0].strip() for p in ps) + ']')\n")
        out = subprocess.run([sys.executable, "-c", group], env=env, capture_output=True,
                             text=True, timeout=seconds + 180, check=True,
                             start_new_session=True)
        series = json.loads(out.stdout)
    else:
        running = [subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, text=True,
                                    start_new_session=True) for _ in range(procs)]
        series = [json.loads(p.communicate(timeout=seconds + 120)[0]) for p in running]
    spreads, drifts, rhos, medians, windows = [], [], [], [], []
    for ts in series:
        t = np.asarray(ts[len(ts) // 20:])  # warm-up aside
        windows.extend(window_means(t, WINDOW_S))
        logs = np.log(t)
        spreads.append(float(1.4826 * np.median(np.abs(logs - np.median(logs)))))
        win = logs[: len(logs) // 25 * 25].reshape(-1, 25).mean(axis=1)
        drifts.append(float(win.std()))
        if len(win) > 3:
            rhos.append(float(np.corrcoef(win[:-1], win[1:])[0, 1]))
        medians.append(float(np.median(t)))
    rho = min(0.999, max(0.01, statistics.median(rhos) if rhos else 0.5))
    return {"spread": statistics.median(spreads), "drift": statistics.median(drifts),
            "drift_steps": float(min(1e6, max(1.0, -25.0 / np.log(rho)))),
            "concurrent_step_median_s": statistics.median(medians),
            "window_step_s": statistics.median(windows) if windows else float("nan"),
            "procs": procs}


WINDOW_S = 0.25  # throughput windows: long enough to hold the descheduled steps load causes


def window_means(t: np.ndarray, seconds: float) -> list[float]:
    """Mean step time in consecutive windows of about ``seconds`` of steps: the throughput a
    loop got, window by window (the median over windows keeps a rare burst of someone else's
    load out, and the steps descheduled by the usual load in)."""
    edges = np.searchsorted(np.cumsum(t), np.arange(seconds, float(t.sum()) + 1e-12, seconds))
    out, start = [], 0
    for e in edges:
        if e > start:
            out.append(float(t[start:e].mean()))
            start = e
    return out


def measure_store(url: str, reps: int) -> dict[str, float]:
    """A small get (one call), a full fetch and an atomic push of the reference vector and
    of 10x it (``emnist.bench.store.measure``): per-call and per-byte costs of reads and
    writes."""
    from emnist.bench.store import REFERENCE, measure
    from emnist.store import open_kv
    kv = open_kv(url)
    key = "emnist:cal" + secrets.token_hex(4) + ":doc"
    kv.set_many({key: b"x" * 100})
    small = []
    for i in range(reps + 20):
        t = time.perf_counter()
        kv.get_many([key])
        if i >= 20:
            small.append(time.perf_counter() - t)
    kv.delete_many([key])
    kv.close()
    ones = [measure(url, REFERENCE, 384 * 1024, max(10, reps // 3)) for _ in range(3)]
    ten = measure(url, 10 * REFERENCE, 384 * 1024, max(10, reps // 3))
    nb = 4 * REFERENCE
    call = statistics.median(small)
    fetch = statistics.median(o["fetch_p50_ms"] for o in ones) / 1e3  # three blocks: the
    push = statistics.median(o["push_p50_ms"] for o in ones) / 1e3  # machine's load varies
    return {"call_s": call, "fetch_p50_s": fetch, "push_p50_s": push,
            "fetch10_p50_s": ten["fetch_p50_ms"] / 1e3, "push10_p50_s": ten["push_p50_ms"] / 1e3,
            "read_per_byte_s": max(1e-13, (fetch - call) / nb),
            # a push is a fetch-like gets, the client's add, then a cas carrying the vector
            "cas_s": max(call, push - fetch), "vector_bytes": nb}


GRAD_HANDLER = ("def handle(event, context):\n"
                "    return (b'\\0' * {n}, 200, {{'Content-Type': 'application/octet-stream'}})\n")


def measure_gateway(calls: int) -> dict[str, float]:
    """``emnist.bench.gateway``'s no-op function, straight and through the local gateway,
    then the same with a handler answering a gradient-sized body (as emnist-grad does),
    called with ``GatewayClient`` (what a serverless peer uses)."""
    from emnist.bench import gateway as bench_gateway
    from emnist.bench.store import REFERENCE
    from emnist.gateway.client import GatewayClient
    nbytes = 4 * REFERENCE
    with bench_gateway.local_noop_gateway() as (gw, direct):
        small = bench_gateway.invoke_overhead(gw, direct, calls=calls, rounds=10,
                                              warmup=calls // 10)
    saved = bench_gateway.NOOP_HANDLER
    bench_gateway.NOOP_HANDLER = GRAD_HANDLER.format(n=nbytes)
    try:
        with bench_gateway.local_noop_gateway() as (gw, _):
            client = GatewayClient(gw.rsplit("/function/", 1)[0])
            times = []
            for i in range(calls // 4 + 20):
                t = time.perf_counter()
                resp = client.invoke("noop", {"batch": i})
                if len(resp.content) != nbytes:
                    raise RuntimeError(f"the gradient-sized handler answered {len(resp.content)}"
                                       " bytes")
                times.append(time.perf_counter() - t)
            # three peers' pools of two at once, each its own process
            spec = json.dumps({"gateway": client.url, "function": "noop", "threads": 2,
                               "calls": max(20, calls // 20)})
            cmd = [sys.executable, "-m", "emnist.sim.measure", "gwcalls", spec]
            procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True) for _ in range(3)]
            concurrent = statistics.median(json.loads(p.communicate(timeout=600)[0])
                                           for p in procs)
    finally:
        bench_gateway.NOOP_HANDLER = saved
    big = statistics.median(times[20:])
    g_small = small[1]["p50_ms"] / 1e3
    # per byte: what a gradient-sized answer adds, requests' own overhead included (an
    # effective figure: invoke + per_byte x bytes is the whole call as a peer sees it)
    cores = os.cpu_count() or 1
    # processor sharing of 6 such calls on the cores would take big * 6 / cores each
    return {"invoke_s": g_small, "direct_s": small[0]["p50_ms"] / 1e3,
            "client_big_s": big, "response_bytes": nbytes,
            "per_byte_s": max(0.0, (big - g_small) / nbytes), "concurrent6_s": concurrent,
            "io_factor": max(1.0, concurrent / (big * 6 / min(cores, 6)))}


@contextlib.contextmanager
def _grad_gateway(store_url: str, dataset: str, dataset_dir: str | None, peers: int,
                  batch: int, replicas: int) -> Iterator[tuple[str, Path, list[int]]]:
    """A local gateway running this repository's emnist.yml with ``replicas`` of emnist-grad
    (all up) and a real p2p split of ``peers`` with its batch files under its own data root:
    yields (gateway URL, split dir, batch files per peer)."""
    import tempfile

    from emnist.bench.gateway import local_gateway
    from emnist.gateway.client import GatewayClient
    from emnist.p2p.split import split, write_batches
    from emnist.wait import wait_until
    stack = Path(__file__).resolve().parents[2] / "emnist.yml"
    if not stack.exists():
        raise RuntimeError("emnist.yml is not beside the package: run from the repository")
    with tempfile.TemporaryDirectory(prefix="emnist-cal-grad-") as tmp:
        d = split(dataset, dataset_dir, peers, tmp, seed=0, train_samples=6000,
                  test_samples=500)
        out = write_batches(d, batch)
        counts = [len(list((out / f"peer-{r}").iterdir())) for r in range(peers)]
        env = {"STORE_URL": store_url, "DATA_ROOTS": tmp, "GRAD_REPLICAS": str(replicas),
               "TRAIN_REPLICAS": "0"}
        with local_gateway(stack, Path(tmp), env) as (url, _):
            wait_until(lambda: GatewayClient(url).replicas("emnist-grad") >= replicas, 60,
                       f"emnist-grad has fewer than {replicas} replicas")
            yield url, d, counts


def measure_grad_calls(store_url: str, dataset: str, dataset_dir: str | None, hidden: int,
                       calls: int, batch: int = 50) -> dict[str, Any]:
    """The real emnist-grad behind a real local gateway (this repository's emnist.yml, one
    replica, its own data root), called one at a time with ``GatewayClient`` and a real p2p
    split's batch files, as a serverless peer's pool calls it: the median call whose step's
    parameters the replica holds (``hit_s``) and one whose parameters it must first take
    from the store (``miss_s``: a fresh key per call, each written beforehand)."""
    from emnist.gateway.client import GatewayClient
    from emnist.models import ModelSpec, build_model
    from emnist.p2p.serverless import params_store
    from emnist.p2p.split import batch_name
    from emnist.store import open_kv
    spec = ModelSpec.for_dataset("mlp", dataset, classes=10, hidden=hidden)
    params = build_model(spec, seed=0).init_params(0)
    kv = open_kv(store_url)
    run = "calgrad" + secrets.token_hex(4)
    stores = [params_store(kv, run, 0, k) for k in range(calls)]
    try:
        for k, st in enumerate(stores):
            st.init(params, {"step": k})
        with _grad_gateway(store_url, dataset, dataset_dir, 3, batch, 1) as (url, d, counts):
            client = GatewayClient(url)
            count = counts[0]

            def call(k: int, i: int) -> float:
                body = {"run_id": run, "params_key": stores[k].base, "data": str(d),
                        "batch": batch_name(batch, 0, i % count), "model": spec.to_dict(),
                        "step": k}
                t = time.perf_counter()
                r = client.invoke("emnist-grad", body, check=False)
                if r.status_code != 200 or len(r.content) < 4 * params.size:
                    raise RuntimeError(f"emnist-grad answered {r.status_code}: "
                                       f"{r.text[:200]}")
                return time.perf_counter() - t
            for i in range(10):  # warm: imports, connections, the batch cache
                call(0, i)
            miss, hit = [], []
            for k in range(1, calls):
                miss.append(call(k, k))
                hit.append(call(k, k + 1))
    finally:
        for st in stores:
            st.delete(["layout"])
    return {"batch": batch, "calls": 2 * (calls - 1), "hit_s": statistics.median(hit),
            "miss_s": statistics.median(miss), "response_bytes": 4 * int(params.size) + 40}


def measure_serverless(store_url: str, dataset: str, hidden: int, peers: int = 3,
                       batch: int = 50, per_step: int = 2, steps: int = 300,
                       replicas: int = 3) -> float:
    """``peers`` processes each doing a serverless peer's compute phase at once (the real
    ``ServerlessGradients`` against the real emnist-grad, ``_grad_gateway`` with
    ``replicas``, emnist.yml's default): their mean step, the median over the processes."""
    run = "calsl" + secrets.token_hex(4)
    with _grad_gateway(store_url, dataset, None, peers, batch, replicas) as (url, d, counts):
        cmd = [sys.executable, "-m", "emnist.sim.measure", "grads"]
        procs = [subprocess.Popen(
            [*cmd, json.dumps({"gateway": url, "store_url": store_url, "run": run, "rank": r,
                               "data": str(d), "batch": batch, "per_step": per_step,
                               "batches": min(counts), "steps": steps, "dataset": dataset,
                               "hidden": hidden})],
            stdout=subprocess.PIPE, text=True, env={**os.environ, **ONE_THREAD})
            for r in range(peers)]  # one session, as `emnist p2p run`'s peers
        got = [json.loads(p.communicate(timeout=600)[0]) for p in procs]
    if any(g["calls"] != steps * per_step for g in got):
        raise RuntimeError(f"serverless peers answered {[g['calls'] for g in got]} calls, "
                           f"not {steps * per_step} each")
    return statistics.median(g["mean_step_s"] for g in got)


def _call_s(server: dict[str, Any], req: int, resp: int) -> float:
    """An on-node call's whole time on a cost file's server section (all of it CPU work)."""
    return (server["rtt"] + server["op"] + req / server["write_bandwidth"]
            + resp / server["bandwidth"])


def serverless_factor(doc: dict[str, Any], step_s: float, model: str, peers: int = 3,
                      per_step: int = 2, batch: int = 50) -> float:
    """The gateway's ``io_factor`` that makes the CPU work of ``peers`` serverless peers'
    compute phases (``measure_serverless``) take the measured ``step_s`` on the node's cores:
    per step a peer encodes and puts its parameters, makes ``per_step`` calls (the gateway
    both ways, the handler, a fetch of the parameters with its decode and ``params_fetch``,
    the gradient, its encode, the peer's decode), sums and deletes; every on-node call's
    whole time is work on the cores, as the simulator charges it."""
    from emnist.sim.costs import ModelCost
    m = doc["compute"]["models"][model]
    nb = 4 * int(m["params"])
    b, cl, g, f = doc["store"], doc["client"], doc["gateway"], doc["functions"]

    def rpc(req: int, resp: int) -> float:
        return _call_s(b, req, resp)
    grad = ModelCost(1, m["step"], 0.0, 0.0).step_s(batch)
    call = (f["handler"] + rpc(100, nb) + cl["decode_per_byte"] * nb + f["params_fetch"]
            + grad + cl["encode_per_byte"] * (nb + 40) + cl["decode_per_byte"] * nb)
    rest = (cl["encode_per_byte"] * nb + rpc(nb + 40, 20) + per_step * call
            + cl["vector_per_byte"] * nb * (per_step + 1) + rpc(80, 20))
    gateway = per_step * (g["invoke"] + g["per_byte"] * (400 + nb + 40))
    node = doc["nodes"][0]
    need = step_s * min(node["cores"], peers) * node.get("speed", 1.0) / peers
    return min(1000.0, max(1.0, (need - rest) / gateway))


def function_figures(doc: dict[str, Any], fg: dict[str, Any], g: dict[str, Any],
                     s: dict[str, Any], model: str) -> dict[str, Any]:
    """``functions.handler`` and ``params_fetch`` from ``measure_grad_calls``: a cached call
    is a gradient-sized no-op call (``g``'s ``client_big_s``: what the gateway figures
    charge) plus the handler, the gradient (the model's step at that batch) and encoding
    the answer; a miss adds the store's fetch (``s``'s ``fetch_p50_s``), the decode and
    ``params_fetch``. Returns the notes."""
    from emnist.sim.costs import ModelCost
    grad = ModelCost(1, doc["compute"]["models"][model]["step"], 0.0, 0.0).step_s(fg["batch"])
    nb, cl = fg["response_bytes"], doc["client"]
    handler = fg["hit_s"] - g["client_big_s"] - grad - cl["encode_per_byte"] * nb
    fetch = fg["miss_s"] - fg["hit_s"] - s["fetch_p50_s"] - cl["decode_per_byte"] * nb
    doc["functions"].update(handler=round(max(0.0, handler), 7),
                            params_fetch=round(max(0.0, fetch), 7))
    return {**fg, "noop_big_s": g["client_big_s"], "gradient_s": grad,
            "handler_s": handler, "params_fetch_s": fetch}


def measure_broker(url: str, reps: int) -> dict[str, float]:
    """What a peer pays per message, with the real pieces: ``messages.gradient`` +
    ``RedisBroker.publish`` to send, ``collect`` (XREAD, unpack, checks, decode) +
    ``finished`` to receive two, for a tiny gradient and one of the reference MLP's size."""
    import numpy as np

    from emnist.bench.store import REFERENCE
    from emnist.p2p import compress, messages
    from emnist.p2p.broker import open_broker
    from emnist.p2p.peer import collect
    run = "cal" + secrets.token_hex(4)
    peers = [open_broker(url, run, r, 3) for r in range(3)]
    comp = compress.make("none")
    out: dict[str, float] = {}
    try:
        for label, n in (("small", 16), ("big", REFERENCE)):
            g = np.random.default_rng(0).random(n, dtype=np.float32)
            pubs, recvs = [], []
            for s in range(reps):
                topic = f"{label}.{s}"
                t = time.perf_counter()
                parts = comp.compress(g)
                comp.decompress(parts, n)
                peers[1].publish(topic, messages.gradient(run, s, 1, 1, comp, parts, n, 0.0),
                                 [0, 2])
                pubs.append(time.perf_counter() - t)
                peers[2].publish(topic, messages.gradient(run, s, 1, 2, comp, parts, n, 0.0),
                                 [0, 1])
                t = time.perf_counter()

                def accept(msg: Any, s: int = s, n: int = n) -> Any:
                    messages.check(msg, run=run, kind="grad", size=3, step=s, epoch=1)
                    return messages.read_gradient(msg, comp, n)
                collect(peers[0], topic, {1, 2}, time.monotonic() + 10, accept)
                peers[0].finished(topic)
                recvs.append(time.perf_counter() - t)
            out[f"publish_{label}_s"] = statistics.median(pubs[reps // 10:])
            out[f"receive2_{label}_s"] = statistics.median(recvs[reps // 10:])
    finally:
        peers[0].cleanup()
        for b in peers:
            b.close()
    out["message_bytes"] = 4 * REFERENCE
    return out


def measure_wake(url: str, nbytes: int, messages: int = 200) -> dict[str, float]:
    """Publish -> blocked XREAD return, two processes, the real RedisBroker."""
    run = "cal" + secrets.token_hex(4)
    spec = {"url": url, "run": run, "messages": messages, "bytes": nbytes}
    cmd = [sys.executable, "-m", "emnist.sim.measure", "wake"]
    sub = subprocess.Popen([*cmd, json.dumps({**spec, "role": "sub"})], stdout=subprocess.PIPE,
                           text=True)
    time.sleep(1.0)  # the reader is up and blocked
    subprocess.run([*cmd, json.dumps({**spec, "role": "pub"})], check=True, timeout=120,
                   stdout=subprocess.DEVNULL)
    lat = json.loads(sub.communicate(timeout=120)[0])[messages // 10:]
    return {"median_s": statistics.median(lat), "mean_s": statistics.fmean(lat)}


def exchange_compute(spec: dict[str, Any]) -> dict[str, Any]:
    """Exchanges are timed between MLP gradients of a batch of 100, as peers exchange: three
    processes exchanging back to back took 4.5-5.4 ms a step here, between gradients 2.4-2.5
    ms, and the real 3-peer MLP run's send + receive is ~3 ms a step (waits included)."""
    return {"dataset": spec["dataset"], "data_location": spec["data_location"],
            "hidden": spec["hidden"], "compute_batch": 100}


def measure_exchange(url: str, peers: int, params: int, steps: int = 300,
                     compute: dict[str, Any] | None = None) -> float:
    """The median exchange of ``peers`` processes exchanging gradients, with nothing else or
    (``compute``: dataset, data_location, hidden, compute_batch) after an MLP gradient."""
    run = "cal" + secrets.token_hex(4)
    cmd = [sys.executable, "-m", "emnist.sim.measure", "exchange"]
    procs = [subprocess.Popen([*cmd, json.dumps({"url": url, "run": run, "rank": r,
                                                  "peers": peers, "params": params,
                                                  "steps": steps, **(compute or {})})],
                              stdout=subprocess.PIPE, text=True, env={**os.environ, **ONE_THREAD})
             for r in range(peers)]
    return statistics.median(json.loads(p.communicate(timeout=600)[0]) for p in procs)


def io_factor(doc: dict[str, Any], peers: int, step_s: float, nbytes: int) -> float:
    """How much more on-node call work costs when ``peers`` processes do it at once than the
    single-call figures say: the measured exchange (between gradients) against the CPU work those
    figures give it (a publish, a read of every entry, a delete per peer, on the cores)."""
    b, cl = doc["broker"], doc["client"]

    def call(req: int, resp: int) -> float:
        return _call_s(b, req, resp)
    per_peer = (call(nbytes, 20) + call(100, peers * nbytes) + call(80, 20)
                + nbytes * (cl["encode_per_byte"] + (peers - 1) * cl["decode_per_byte"]
                            + 2 * cl["vector_per_byte"]))
    node = doc["nodes"][0]
    modelled = per_peer * peers / min(node["cores"], peers) / node.get("speed", 1.0)
    return max(1.0, step_s / modelled)


def store_figures(s: dict[str, float], cl: dict[str, float]) -> dict[str, float]:
    """The store's rtt, op and bandwidths from ``measure_store`` and the client's per-byte
    costs (at the same speed): a call's intercept split 80/20 (``SERVER_SHARE``), a read's
    slope less the decode, a cas's less the client's decode + add + encode."""
    nb = s["vector_bytes"]
    read_pb = max(1e-13, s["read_per_byte_s"] - cl["decode_per_byte"])
    add = nb * (cl["decode_per_byte"] + cl["encode_per_byte"] + cl["vector_per_byte"])
    write_pb = max(1e-13, (s["cas_s"] - add - s["call_s"]) / nb)
    return {"rtt": (1 - SERVER_SHARE) * s["call_s"], "op": SERVER_SHARE * s["call_s"],
            "bandwidth": min(1e12, 1.0 / read_pb), "write_bandwidth": min(1e12, 1 / write_pb)}


def load_figures(median_s: float, alone_mean_s: float, concurrent_mean_s: float,
                 cores: int) -> tuple[float, float]:
    """(speed, cores) of the node that make the simulator's step times the measured
    throughput (``window_means``): one loop alone takes median / speed, so speed = median /
    alone; ``cores`` loops at once each take median / (speed * effective / cores), so
    effective = cores * alone / concurrent (at least one core, at most ``cores``)."""
    speed = min(100.0, median_s / alone_mean_s)  # > 1: quieter than at calibration
    eff = min(float(cores), max(1.0, cores * alone_mean_s / concurrent_mean_s))
    return round(speed, 4), round(eff, 3)


def probe(doc: dict[str, Any], kind: str, *, broker_url: str, store_url: str = "",
          dataset: str = "fashion-mnist", data_location: str = "", hidden: int = 100,
          model: str = "mlp") -> tuple[dict[str, Any], dict[str, Any]]:
    """What the machine's load changes, re-measured into a copy of a calibrated ``doc`` just
    before a validation case: the MLP's mean step alone and one step loop per core at once
    (``speed`` and ``cores`` by ``load_figures``; the hypothesis is that load slows every
    model's compute alike; spread and drift as ``calibrate``); for another ``model`` its own
    step alone, its table scaled to it (a model's table measured minutes earlier can be off
    by half against the MLP's: the VM's speed moves unevenly); for ``p2p`` the exchange
    between MLP gradients (the broker's ``io_factor``), for ``serverless`` (a p2p case with
    emnist-grad) also three peers' serverless compute phases (``measure_serverless``: the
    gateway's ``io_factor`` by ``serverless_factor``), and with ``store_url`` the store's
    fetch and push.
    Returns (new doc, what it measured).
    """
    import copy

    from emnist.train.config import default_data_location
    doc = copy.deepcopy(doc)
    cores = os.cpu_count() or 1
    spec = {"dataset": dataset, "data_location": data_location or default_data_location(),
            "hidden": hidden, "models": ["mlp"], "batches": [100], "reps": 400,
            "eval_images": 1000}
    key = f"mlp-h{hidden}"
    calibrated = doc["compute"]["models"][key]["step"][100]
    alone = measure_drift(spec, 1, 2.0)["window_step_s"]
    # p2p's peers share one session (and so one fair share); replicas have one each
    d = measure_drift(spec, cores, 4.0, "one" if kind in ("p2p", "serverless") else "each")
    speed, eff = load_figures(calibrated, alone, d["window_step_s"], cores)
    node = doc["nodes"][0]
    node.update(speed=speed, cores=eff)
    doc["compute"].update(spread=round(d["spread"], 4), drift=round(d["drift"], 4),
                          drift_steps=round(d["drift_steps"], 1))
    notes: dict[str, Any] = {"alone_window_step_s": alone, "calibrated_step_s": calibrated,
                             "speed": node["speed"], "cores": node["cores"],
                             "concurrent_window_step_s": d["window_step_s"],
                             "loadavg": [round(x, 2) for x in os.getloadavg()]}
    if model != "mlp":  # the case's own model alone: its table / speed made that step
        table = doc["compute"]["models"][model]["step"]
        mine = measure_drift({**spec, "model": model}, 1, 2.0)["window_step_s"]
        scale = mine * speed / table[100]
        doc["compute"]["models"][model]["step"] = {b: t * scale for b, t in table.items()}
        notes.update(model=model, model_window_step_s=mine, model_table_scale=round(scale, 4))
    if store_url:  # the store's figures, at this speed, stored at speed 1
        m = measure_store(store_url, 100)
        cl = {k: v / speed for k, v in doc["client"].items()}
        f = store_figures(m, cl)
        doc["store"].update(rtt=f["rtt"] * speed, op=f["op"] * speed,
                            bandwidth=min(1e12, f["bandwidth"] / speed),
                            write_bandwidth=min(1e12, f["write_bandwidth"] / speed))
        notes.update(push_p50_s=m["push_p50_s"], fetch_p50_s=m["fetch_p50_s"])
    if kind in ("p2p", "serverless"):
        nb = doc["calibrated"]["broker"]["message_bytes"]  # the MLP's gradient message
        step = measure_exchange(broker_url, 3, nb // 4, compute=exchange_compute(spec))
        k = io_factor(doc, 3, step, nb)
        doc["broker"]["io_factor"] = round(k, 3)
        notes.update(exchange_step_s=step, io_factor=round(k, 3))
    if kind == "serverless" and store_url:
        step = measure_serverless(store_url, dataset, hidden)
        k = serverless_factor(doc, step, key)
        doc["gateway"]["io_factor"] = round(k, 3)
        notes.update(serverless_step_s=step, gateway_io_factor=round(k, 3))
    doc.setdefault("calibrated", {})["probe"] = notes
    return validate(doc), notes


def mean_of(docs: list[Any]) -> Any:
    """The mean of several probes of one calibration (``probe`` before every real round of a
    validation case and after the last): every number they differ in (what the probes
    measured) averaged, the rest kept as in the first; the probes' notes are listed in
    ``calibrated.probes``."""
    first = docs[0]
    if isinstance(first, dict) and all(isinstance(d, dict) for d in docs):
        out = {k: mean_of([d[k] for d in docs]) if all(k in d for d in docs) else v
               for k, v in first.items() if k != "probe"}
        if "probe" in first:
            out["probes"] = [d.get("probe") for d in docs]
        return out
    if isinstance(first, list) and all(isinstance(d, list) and len(d) == len(first)
                                       for d in docs):
        return [mean_of(list(x)) for x in zip(*docs)]
    numbers = all(isinstance(d, (int, float)) and not isinstance(d, bool) for d in docs)
    if numbers and any(d != first for d in docs):
        return sum(docs) / len(docs)
    return first


def probe_mean(probes: list[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """One cost document from several ``probe`` results: ``mean_of`` them, with the node's
    ``speed`` and ``cores`` from the mean step times the probes measured (a run's time goes
    as the mean step time, i.e. as 1 / speed, so averaging speeds would understate it)."""
    doc = mean_of([d for d, _ in probes])
    notes = [n for _, n in probes]
    alone = statistics.fmean(n["alone_window_step_s"] for n in notes)
    concurrent = statistics.fmean(n["concurrent_window_step_s"] for n in notes)
    speed, eff = load_figures(notes[0]["calibrated_step_s"], alone, concurrent,
                              os.cpu_count() or 1)
    doc["nodes"][0].update(speed=speed, cores=eff)
    return doc


def measure_start(url: str, data_location: str, dataset: str) -> dict[str, float]:
    """setup_run without launching, then what train_worker does before its loop."""
    from emnist.data import open_shard, open_test
    from emnist.store import open_kv
    from emnist.train.config import TrainConfig
    from emnist.train.run import load_run, setup_run
    from emnist.train.state import Lease
    kv = open_kv(url)
    cfg = TrainConfig(dataset=dataset, data_location=data_location, store_url=url)
    setup_run(cfg, kv, 2)  # shards prepared once, untimed
    setups, starts = [], []
    for _ in range(5):
        t = time.perf_counter()
        state = setup_run(cfg, kv, 2)
        setups.append(time.perf_counter() - t)
        t = time.perf_counter()
        store, st = load_run(kv, state["run_id"])
        Lease(store, 0, 10).acquire("calibrate")
        open_shard(st["shard_dir"], 0)
        open_test(st["shard_dir"])
        starts.append(time.perf_counter() - t)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import emnist.p2p.peer"], check=True)
    peer = time.perf_counter() - t
    kv.close()
    return {"setup_s": statistics.median(setups), "worker_start_s": statistics.median(starts),
            "peer_import_s": peer}


def calibrate(*, store_url: str = "memcached://127.0.0.1:11211",
              broker_url: str = "redis://127.0.0.1:6379/0", models: tuple[str, ...] = ("mlp",),
              dataset: str = "fashion-mnist", data_location: str = "", hidden: int = 100,
              fast: bool = False, echo: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure; return a validated cost document (see the module docstring)."""
    from emnist.train.config import default_data_location
    doc = json.loads(json.dumps(TEMPLATE))
    data_location = data_location or default_data_location()
    cores = os.cpu_count() or 1
    doc["nodes"][0].update(cores=cores, memory_gb=round(_memory_gb(), 1))
    notes: dict[str, Any] = {"at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                             "host": platform.node(), "cpu": platform.processor() or
                             platform.machine(), "cores": cores, "fast": fast}
    spec = {"dataset": dataset, "data_location": data_location, "hidden": hidden,
            # the MLP always: the node's speed and cores are measured with its step loop
            "models": ["mlp", *(m for m in models if m != "mlp")],
            "batches": [100] if fast else list(BATCHES),
            "reps": 40 if fast else 400, "eval_images": 1000 if fast else 10000}
    echo("compute: one step per model and batch size ...")
    got = _subprocess("steps", spec)
    doc["compute"]["models"] = {
        k: {**{f: v for f, v in m.items() if f not in ("spread_alone", "step")},
            "step": {int(b): t for b, t in m["step"].items()}}  # JSON made the keys strings
        for k, m in got["models"].items()}
    notes["steps_alone_spread"] = {k: m["spread_alone"] for k, m in got["models"].items()}
    doc["client"] = got["client"]
    if not fast:
        echo(f"compute: {cores} step loops at once (spread, drift) ...")
        d = measure_drift(spec, cores, 6.0)
        doc["compute"].update(spread=round(d["spread"], 4), drift=round(d["drift"], 4),
                              drift_steps=round(d["drift_steps"], 1))
        notes["drift"] = d
        # what else runs here takes CPU time: mean step times (a descheduled step is a long
        # one) against the median table give the node's speed (one loop alone) and cores
        # (one loop per core at once)
        key = f"mlp-h{hidden}"
        alone = measure_drift(spec, 1, 2.0)["window_step_s"]
        speed, eff = load_figures(doc["compute"]["models"][key]["step"][100], alone,
                                  d["window_step_s"], cores)
        doc["nodes"][0].update(speed=speed, cores=eff)
        notes["effective_cores"] = {"cores": cores, "speed": speed, "effective": eff,
                                    "alone_window_step_s": alone,
                                    "concurrent_window_step_s": d["window_step_s"]}
    else:
        notes["drift"] = "not measured (fast): template values"
    echo("store: fetch and push (emnist.bench.store) ...")
    s = measure_store(store_url, 30 if fast else 300)
    notes["store"] = {"url": store_url, **s}
    doc["store"].update(store_figures(s, doc["client"]), on_node=True)
    if fast:
        notes["gateway"] = notes["broker"] = notes["start"] = "not measured (fast): template"
    else:
        echo("gateway: invoke overhead (emnist.bench.gateway) ...")
        g = measure_gateway(1000)
        notes["gateway"] = g
        doc["gateway"].update({"invoke": g["invoke_s"], "per_byte": g["per_byte_s"],
                               "async": g["invoke_s"],  # an async submit: one small call
                               "io_factor": round(g["io_factor"], 3)})
        echo("functions: the real emnist-grad behind a local gateway ...")
        try:
            notes["functions"] = function_figures(doc, measure_grad_calls(
                store_url, dataset, None, hidden, 150), g, s, f"mlp-h{hidden}")
        except Exception as e:  # noqa: BLE001 - keeps the template's figures, says why
            notes["functions"] = f"not measured: {type(e).__name__}: {e}"
        echo("broker: a peer's publish and receive (Redis Streams) ...")
        try:
            b = measure_broker(broker_url, 200)
            notes["broker"] = {"url": broker_url, **b}
            nb, cl = b["message_bytes"], doc["client"]
            call = b["publish_small_s"]
            pub_pb = (b["publish_big_s"] - call) / nb - cl["encode_per_byte"] \
                - 2 * cl["vector_per_byte"]
            # a receive of two: one XREAD of three entries (its own included), two decodes
            recv_pb = ((b["receive2_big_s"] - b["receive2_small_s"]) / nb
                       - 2 * cl["decode_per_byte"]) / 3
            doc["broker"].update(rtt=(1 - SERVER_SHARE) * call, op=SERVER_SHARE * call,
                                 write_bandwidth=min(1e12, 1 / max(1e-13, pub_pb)),
                                 bandwidth=min(1e12, 1 / max(1e-13, recv_pb)), on_node=True)
            w = measure_wake(broker_url, nb)
            br = doc["broker"]
            path = br["rtt"] + 2 * br["op"] + nb / br["write_bandwidth"] + nb / br["bandwidth"]
            notes["broker_wake"] = {**w, "modelled_path_s": path}
            br["wake"] = max(0.0, w["median_s"] - path)
            ratio = max(1.0, w["mean_s"] / w["median_s"])
            br["wake_spread"] = min(3.0, (2 * np.log(ratio)) ** 0.5)
            step = measure_exchange(broker_url, 3, nb // 4, compute=exchange_compute(spec))
            k = io_factor(doc, 3, step, nb)
            notes["exchange"] = {"peers": 3, "step_s": step, "io_factor": k}
            br["io_factor"] = round(k, 3)
        except Exception as e:  # noqa: BLE001 - a missing broker keeps the template's figures
            notes["broker"] = f"not measured: {type(e).__name__}: {e}"
        echo("start-up: setup_run, a worker's start ...")
        st = measure_start(store_url, data_location, dataset)
        notes["start"] = st
        doc["run"].update(setup=st["setup_s"] + g["invoke_s"],
                          worker_start=st["worker_start_s"] + g["invoke_s"],
                          peer_start=st["peer_import_s"])
    to_speed_one(doc)
    doc["calibrated"] = notes
    return validate(json.loads(json.dumps(doc)))


def to_speed_one(doc: dict[str, Any]) -> None:
    """On-node call costs and the client's per-byte costs are CPU work the simulator runs on
    the node at its ``speed``; they were measured at that speed, so store them at speed 1
    (times ``speed``), or the load would count twice."""
    speed = doc["nodes"][0]["speed"]
    if speed >= 1.0:
        return
    for k in doc["client"]:
        doc["client"][k] *= speed
    for sec in ("store", "broker"):
        d = doc[sec]
        if d.get("on_node"):
            d["rtt"] *= speed
            d["op"] *= speed
            d["bandwidth"] = min(1e12, d["bandwidth"] / speed)
            d["write_bandwidth"] = min(1e12, d["write_bandwidth"] / speed)
    g = doc["gateway"]
    if g.get("on_node"):
        for k in ("invoke", "per_byte", "async"):
            g[k] *= speed
    f = doc["functions"]
    if f.get("on_node"):
        for k in ("handler", "params_fetch"):
            if k in f:
                f[k] *= speed


def _memory_gb() -> float:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError, AttributeError):
        return 8.0


def write_costs(doc: dict[str, Any], path: str | os.PathLike[str]) -> Path:
    """Write a cost document as YAML (checked once more by reading it back)."""
    text = yaml.safe_dump(_plain(doc), sort_keys=False, width=100)
    parse_costs(text, str(path))
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def _plain(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k) if not isinstance(k, int) else k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, (np.floating, float)):
        return float(obj)
    if isinstance(obj, (np.integer,)):
        return int(obj)
    return obj
