"""Compute measurements for ``emnist sim calibrate``, in a fresh interpreter with one BLAS
thread (the caller sets the environment before numpy loads, as ``emnist.bench.plain``).

``python -m emnist.sim.measure steps SPEC_JSON`` prints one JSON record: per model and batch
size the median seconds of a training step (the model's ``loss_and_grad`` on real shard
minibatches, then ``grad *= -alpha; params += grad``, exactly the worker's step), the robust
lognormal sigma of those times, the seconds per test image of ``evaluate``, and the client's
per-byte costs (codec decode and encode of the model's vector, one float32 elementwise pass).

``python -m emnist.sim.measure loop SPEC_JSON`` runs the MLP step (or ``model``'s) for
``seconds`` and prints every step's duration: the caller starts one per core at once to see
how processes sharing the machine drift apart.

``python -m emnist.sim.measure barrier SPEC_JSON`` runs ``procs`` processes (each count in
the list in turn) doing ``model`` steps with a barrier after each, as p2p peers do, and
prints each count's median step (the barrier to barrier time): the evidence for the
simulator's per-core placement (``events.CoreCPU``).

``python -m emnist.sim.measure grads SPEC_JSON`` is one serverless peer's compute phase with
the real ``ServerlessGradients`` against a running gateway (``calibrate.measure_serverless``
starts three at once, as the validation's peers run).
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import numpy as np

from emnist.data import open_shard, open_test, prepare_shards
from emnist.models import ModelSpec, build_model
from emnist.store import codec


def _data(spec: dict[str, Any]) -> tuple[Any, Any, Any, Any, int]:
    d = prepare_shards(spec["dataset"], spec.get("dataset_dir"), 1, spec["data_location"], 0)
    s = open_shard(d, 0)
    tx, ty = open_test(d)
    return s.x, s.y, tx, ty, s.num_classes


def _model(name: str, dataset: str, classes: int, hidden: int) -> Any:
    over = {"hidden": hidden} if name == "mlp" else {}
    return build_model(ModelSpec.for_dataset(name, dataset, classes=classes, **over), seed=0)


def _timed(fn: Any, reps: int, warmup: int, clock: Any = time.perf_counter) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(reps):
        t = clock()
        fn()
        out.append(clock() - t)
    return out


def robust_sigma(times: list[float]) -> float:
    """Lognormal sigma from the median absolute deviation of log times (outliers aside)."""
    logs = np.log(np.asarray(times))
    return float(1.4826 * np.median(np.abs(logs - np.median(logs))))


def _train_step(model: Any, params: Any, x: Any, y: Any, at: int, b: int, alpha: Any) -> None:
    """The worker's step on the minibatch at ``at``, in place."""
    _, grad = model.loss_and_grad(params, x[at:at + b], y[at:at + b])
    grad *= -alpha
    params += grad


def _step_times(model: Any, x: Any, y: Any, batches: list[int], n: int) -> dict[int, list]:
    """Each batch size's step times in CPU seconds of this process (``process_time``), the
    intrinsic cost: a wall-clock median of a step longer than the scheduler's slice carries
    the preemptions of a loaded machine (lenet5's 7 ms step measured 27 ms under a load of 6
    on 2 cores, the MLP's 0.4 ms one did not), and load is the node's ``speed`` and
    ``cores``, measured apart. Batch sizes interleaved so what is left of load hits all
    alike."""
    params = model.init_params(0)
    alpha = np.float32(0.2)
    starts = {b: np.arange(0, len(y) - b, b) for b in batches}
    times: dict[int, list[float]] = {b: [] for b in batches}
    warm = max(3, n // 10)
    for r in range(n + warm):
        for b in batches:
            at = int(starts[b][r % len(starts[b])])
            t = time.process_time()
            _train_step(model, params, x, y, at, b, alpha)
            if r >= warm:
                times[b].append(time.process_time() - t)
    return times


def _eval_time(model: Any, x: Any, tx: Any, ty: Any) -> float:
    params = model.init_params(0)
    calib = x[:2048] if getattr(model, "needs_calibration", False) else None
    times = _timed(lambda: model.evaluate(params, tx, ty, calib=calib), 3, 1,
                   clock=time.process_time)  # CPU seconds, as the steps
    return float(np.median(times)) / len(ty)


def steps(spec: dict[str, Any]) -> dict[str, Any]:
    x, y, tx, ty, classes = _data(spec)
    out: dict[str, Any] = {"models": {}, "client": {}}
    n_eval = min(len(ty), spec.get("eval_images", 2000))
    for name in spec["models"]:
        model = _model(name, spec["dataset"], classes, spec["hidden"])
        n = max(5, spec["reps"] if name == "mlp" else spec["reps"] // 4)
        times = _step_times(model, x, y, list(spec["batches"]), n)
        key = f"mlp-h{spec['hidden']}" if name == "mlp" else name
        out["models"][key] = {
            "params": int(model.num_params),
            "step": {b: float(np.median(ts)) for b, ts in times.items()},
            "eval_per_sample": _eval_time(model, x, tx[:n_eval], ty[:n_eval]),
            "spread_alone": float(np.median([robust_sigma(ts) for ts in times.values()]))}
    n = int(out["models"][next(iter(out["models"]))]["params"])
    vec = np.random.default_rng(0).random(n, dtype=np.float32)
    raw = codec.encode(vec)
    dec = _timed(lambda: np.copyto(vec, codec.decode("k", raw, dtype=np.float32,
                                                      shape=(n,)).array), 200, 20)
    enc = _timed(lambda: codec.encode(vec), 200, 20)
    other = vec.copy()
    vop = _timed(lambda: np.add(vec, other, out=other), 200, 20)
    nbytes = 4 * n
    out["client"] = {"decode_per_byte": float(np.median(dec)) / nbytes,
                     "encode_per_byte": float(np.median(enc)) / nbytes,
                     "vector_per_byte": float(np.median(vop)) / nbytes}
    return out


def loop(spec: dict[str, Any]) -> list[float]:
    x, y, _, _, classes = _data(spec)
    model = _model(spec.get("model", "mlp"), spec["dataset"], classes, spec["hidden"])
    params = model.init_params(0)
    b, alpha = spec["batch"], np.float32(0.2)
    starts = np.arange(0, len(y) - b, b)
    out, i = [], 0
    end = time.perf_counter() + spec["seconds"]
    while time.perf_counter() < end:
        at = int(starts[i % len(starts)])
        i += 1
        t = time.perf_counter()
        _train_step(model, params, x, y, at, b, alpha)
        out.append(time.perf_counter() - t)
    return out


def wake(spec: dict[str, Any]) -> list[float] | None:
    """One side of a publish -> blocked-reader timing over the real RedisBroker: the
    publisher stamps each message with its wall clock (the reader is on the same machine)."""
    from emnist.p2p.broker import open_broker
    role, n, size = spec["role"], spec["messages"], spec["bytes"]
    b = open_broker(spec["url"], spec["run"], 0 if role == "pub" else 1, 2)
    lat = []
    try:
        for s in range(n):
            if role == "pub":
                time.sleep(0.005)  # the reader is blocked by now
                b.publish(f"w.{s}", f"{time.time():.9f}".encode().ljust(size, b" "), [1])
            else:
                for m in b.receive(f"w.{s}", time.monotonic() + 30):
                    lat.append(time.time() - float(m[:24].strip()))
                    break
        if role == "pub":
            time.sleep(0.5)
            b.cleanup()
    finally:
        b.close()
    return lat if role == "sub" else None


def exchange(spec: dict[str, Any]) -> float:
    """One of ``peers`` processes doing a p2p step's communication (the real
    messages.gradient, publish, collect with the real checks and decode, finished), for
    ``steps`` steps, after the MLP's gradient of ``compute_batch`` images if given (as a
    peer does; untimed); prints its median exchange time."""
    from emnist.p2p import compress, messages
    from emnist.p2p.broker import open_broker
    from emnist.p2p.peer import collect
    run, rank, peers, n = spec["run"], spec["rank"], spec["peers"], spec["params"]
    comp = compress.make("none")
    b = open_broker(spec["url"], run, rank, peers)
    g = np.random.default_rng(rank).random(n, dtype=np.float32)
    step = None
    if spec.get("compute_batch"):  # a peer's gradient before each exchange, as in training
        x, y, _, _, classes = _data(spec)
        model = _model("mlp", spec["dataset"], classes, spec["hidden"])
        params, bs = model.init_params(0), spec["compute_batch"]

        def step(s: int) -> None:
            at = (s * bs) % (len(y) - bs)
            model.loss_and_grad(params, x[at:at + bs], y[at:at + bs])
    times = []
    try:
        for s in range(spec["steps"]):
            if step is not None:
                step(s)
            t = time.perf_counter()
            parts = comp.compress(g)
            comp.decompress(parts, n)
            b.publish(f"g.{s}", messages.gradient(run, s, 1, rank, comp, parts, n, 0.0), [])

            def accept(msg: Any, s: int = s) -> Any:
                messages.check(msg, run=run, kind="grad", size=peers, step=s, epoch=1)
                return messages.read_gradient(msg, comp, n)
            collect(b, f"g.{s}", set(range(peers)) - {rank}, time.monotonic() + 30, accept)
            b.finished(f"g.{s}")
            times.append(time.perf_counter() - t)
    finally:
        if rank == 0:
            time.sleep(0.5)
            b.cleanup()
        b.close()
    return float(np.median(times[len(times) // 10:]))


def _barrier_proc(spec: dict[str, Any], bar: Any, out: Any) -> None:
    x, y, _, _, classes = _data(spec)
    model = _model(spec["model"], spec["dataset"], classes, spec.get("hidden", 128))
    params, bs = model.init_params(0), spec["batch"]
    alpha = np.float32(0.01)
    steps = []
    for s in range(spec["steps"] + 5):  # 5 warm-up steps
        _train_step(model, params, x, y, (s * bs) % (len(y) - bs), bs, alpha)
        bar.wait()
        steps.append(time.perf_counter())
    out.put(float(np.median(np.diff(steps[5:]))))


def barrier(spec: dict[str, Any]) -> dict[str, float]:
    """Median barrier-to-barrier step of n processes, per n in ``procs``."""
    import multiprocessing as mp
    prepare_shards(spec["dataset"], spec.get("dataset_dir"), 1, spec["data_location"], 0)
    result = {}
    for n in spec["procs"]:
        bar, out = mp.Barrier(n), mp.Queue()
        ps = [mp.Process(target=_barrier_proc, args=(spec, bar, out)) for _ in range(n)]
        for p in ps:
            p.start()
        medians = [out.get(timeout=600) for _ in ps]
        for p in ps:
            p.join()
        result[str(n)] = float(np.median(medians))
    return result


def gwcalls(spec: dict[str, Any]) -> float:
    """``threads`` threads calling a function through ``GatewayClient`` ``calls`` times each
    (as a serverless peer's pool does); the median call."""
    import threading

    from emnist.gateway.client import GatewayClient
    times: list[float] = []
    lock = threading.Lock()

    def caller() -> None:
        client = GatewayClient(spec["gateway"])
        for i in range(spec["calls"]):
            t = time.perf_counter()
            client.invoke(spec["function"], {"batch": i})
            with lock:
                times.append(time.perf_counter() - t)
    threads = [threading.Thread(target=caller) for _ in range(spec["threads"])]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return float(np.median(times[len(times) // 10:]))


def grads(spec: dict[str, Any]) -> dict[str, float]:
    """One serverless peer's compute phase: the real ``ServerlessGradients.compute`` (the
    step's parameters to the store, ``per_step`` emnist-grad calls through the gateway in
    parallel, their gradients decoded and averaged) for ``steps`` steps of the MLP; prints
    the mean step (a run's time goes as the mean) after a tenth as warm-up, and the calls
    answered."""
    from types import SimpleNamespace

    from emnist.p2p.serverless import ServerlessGradients
    mspec = ModelSpec.for_dataset("mlp", spec["dataset"], classes=10, hidden=spec["hidden"])
    params = build_model(mspec, seed=0).init_params(0)
    cfg = SimpleNamespace(store_url=spec["store_url"], run_id=spec["run"], rank=spec["rank"],
                          data=spec["data"], batch_size=spec["batch"], function="emnist-grad",
                          timeout=60.0, gateway=spec["gateway"], sync_every=spec["per_step"],
                          seed=0)
    sg = ServerlessGradients(cfg, mspec, int(params.size))
    k, count = spec["per_step"], spec["batches"]
    times = []
    try:
        for s in range(spec["steps"]):
            t = time.perf_counter()
            sg.compute(params, s, np.arange(s * k, s * k + k) % count)
            times.append(time.perf_counter() - t)
    finally:
        sg.close()
    return {"mean_step_s": float(np.mean(times[len(times) // 10:])), "calls": sg.calls}


if __name__ == "__main__":
    what, arg = sys.argv[1], json.loads(sys.argv[2])
    print(json.dumps({"steps": steps, "loop": loop, "wake": wake, "exchange": exchange,
                      "gwcalls": gwcalls, "barrier": barrier,
                      "grads": grads}[what](arg)))
