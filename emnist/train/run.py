"""A run's life in the store: set it up once, let each worker join it by run id, resume it.

Setup writes everything a worker needs (config, the network's ModelSpec, shard location,
initial parameters) under the run id, so a train invocation carries only ``{run_id,
worker_id}`` and every worker of a run builds the same network and trains with the same
configuration, whatever its own environment says. Worker progress lives
in the store too (``worker:{id}``), and checkpoints go to a durable place, so a killed worker
or a restarted memcached costs at most what was not saved yet.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from emnist import policy
from emnist.data.cache import open_set
from emnist.data.prepared import ensure_set
from emnist.data.shards import image_shape
from emnist.models import Model, ModelSpec, build_model, param_count
from emnist.store import KV, CorruptValue, MissingState, ParameterStore, claim, codec, shared_kv
from emnist.store.keys import key_for
from emnist.store.tiered import TieredStore
from emnist.train.checkpoint import Checkpoints, NoCheckpoint
from emnist.train.config import ConfigError, TrainConfig
from emnist.train.rundoc import RunRefused, checked_run
from emnist.train.runindex import record_run
from emnist.train.state import (
    Lease,
    NothingToDo,
    WorkerState,
    state_key,
    stop_calls,
    stored_docs,
)
from emnist.train.worker import run_worker
from emnist.wait import wait_until

StartWorker = Callable[[dict[str, Any]], None]


class UnknownRun(LookupError):
    pass


def new_run_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def _describe(cfg: TrainConfig, workers: int, run_id: str) -> tuple[dict[str, Any], ModelSpec]:
    """Check the config against the dataset's class count and image shape (known from its
    name) and build the network, then find or prepare the run's set at its data location (a
    directory or s3://) and check its manifest against them (no shard is read here): every
    refusal comes before anything is written, so a refused request leaves nothing behind.
    The run document, with the network's ModelSpec."""
    from emnist.data.datasets import dataset_shape
    from emnist.models import TorchMissing

    if workers < 1:
        raise ConfigError("number_of_workers", f"must be >= 1, got {workers}")
    try:
        num_classes, shape = dataset_shape(cfg.dataset)
    except ValueError as e:
        raise ConfigError("dataset", str(e)) from None
    features = shape[0] * shape[1] * shape[2]
    if cfg.num_labels is not None and cfg.num_labels != num_classes:
        raise ConfigError("num_labels", f"{cfg.num_labels} given but {cfg.dataset} has "
                          f"{num_classes} classes")
    if cfg.model == "mlp" and features != cfg.pixels_per_image:
        raise ConfigError("pixels_per_image", f"{cfg.pixels_per_image} given but {cfg.dataset} "
                          f"has {features}")
    try:
        spec = cfg.model_spec(num_classes, shape)
        num_params = param_count(spec)
    except (ValueError, TorchMissing) as e:  # e.g. an image shape the architecture cannot take
        raise ConfigError("model", f"{cfg.model} on {cfg.dataset}: {e}") from None
    found = ensure_set(cfg.dataset, workers, cfg.shard_location, seed=cfg.seed,
                       root=cfg.dataset_dir)
    man = found.manifest
    got = (int(man["num_classes"]), image_shape(man, int(man["features"])))
    if got != (num_classes, shape):
        raise ConfigError("dataset", f"the prepared set of {cfg.dataset} has {got[0]} classes "
                          f"of {list(got[1])} images, not {num_classes} of {list(shape)}")
    # every worker does the same number of minibatches per pass: averaging rounds line up
    steps = max(1, min(man["sizes"]) // cfg.batch_size)
    return {"run_id": run_id, "config": cfg.to_dict(), "model": spec.to_dict(),
            "workers": workers, "shard_dir": found.url, "data_set": found.name,
            "num_classes": num_classes, "image_shape": list(shape), "num_params": num_params,
            "steps_per_pass": steps, "started": time.time()}, spec


def _initial(spec: ModelSpec, seed: int) -> np.ndarray:
    """The run's initial vector (the MLP's is exactly emnist.model.init_params(shape, seed))."""
    return build_model(spec, seed=seed).init_params(seed)


def _launch(state: dict[str, Any], start_worker: StartWorker | None, only: list[int],
            first: bool = False) -> None:
    """Start ``only``'s workers; a new type-2 run's first calls name their pass, so a
    redelivered one finds it trained and does nothing."""
    per_pass = first and state["config"].get("execution_type") == 2
    extra = {"pass": 1} if per_pass else {}
    for w in only if start_worker else ():
        start_worker({"run_id": state["run_id"], "worker_id": w,
                      "store_url": state["config"]["store_url"], **extra})


def setup_run(cfg: TrainConfig, kv: KV, workers: int, *, run_id: str | None = None,
              start_worker: StartWorker | None = None) -> dict[str, Any]:
    """Prepare shards, write the run's state, then start one worker per shard. A run id
    that exists (or is being created by a type-1 worker) is refused: a run is created once."""
    run_id = run_id or new_run_id()
    state = _create(cfg, kv, workers, run_id,
                    ParameterStore(kv, run_id, chunk_bytes=cfg.chunk_bytes))
    if state is None:
        raise ConfigError("run_id", f"run {run_id} already exists in the store")
    _launch(state, start_worker, list(range(workers)), first=True)
    return state


def _create(cfg: TrainConfig, kv: KV, workers: int, run_id: str,
            store: ParameterStore) -> dict[str, Any] | None:
    """Create the run under ``run_id`` unless someone else did (None). Setup and type-1
    workers take the same ``init-claim``, and a run document that outlived its claim (an
    evicted key) is never overwritten, so no path re-creates a run. A failure after the
    claim releases it: a refused request leaves no claim that would stall later workers."""
    if not claim(kv, store.key("init-claim")):
        return None
    try:
        if store.get_doc("run") is not None:
            return None
        state, spec = _describe(cfg, workers, run_id)
        store.init(_initial(spec, cfg.seed))
        store.put_doc("run", state)
    except BaseException:
        if store.get_doc("run") is None:
            kv.delete_many([store.key("init-claim")])
        raise
    record_run(kv, state)
    return state


def ensure_run(cfg: TrainConfig, kv: KV, workers: int, run_id: str,
               timeout: float = 60) -> dict[str, Any]:
    """Execution type 1: whichever worker arrives first initialises the run; the others
    (and any call naming a run that exists, whatever its ``config``) join the stored run,
    its configuration unchanged. Idempotent."""
    store = ParameterStore(kv, run_id, chunk_bytes=cfg.chunk_bytes)
    state = _create(cfg, kv, workers, run_id, store)
    if state is not None:
        return state
    return wait_until(lambda: store.get_doc("run"), timeout,
                      f"run {run_id} was claimed but not initialised in {timeout}s",
                      interval=0.02, error=MissingState)


def resume_run(kv: KV, run_id: str, checkpoint_url: str = "",
               start_worker: StartWorker | None = None,
               env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Relaunch a run's unfinished workers; if the store lost the run (a memcached restart),
    restore it from its last checkpoint first. The run document, stored or restored, must
    pass ``checked_run`` (with the function's ``env``: its policy and caps)."""
    store = ParameterStore(kv, run_id)
    key = store.key("run")
    state = store.get_doc("run")
    restored = False
    if state is None:
        if not checkpoint_url:
            raise UnknownRun(f"unknown run id {run_id!r}: not in {kv.url} and no "
                             "checkpoint_url to restore it from")
        try:
            docs, params = Checkpoints(checkpoint_url).read(run_id)
        except NoCheckpoint as e:
            raise UnknownRun(f"unknown run id {run_id!r}: not in {kv.url}; {e}") from None
        sealer = getattr(kv, "sealer", None)
        state = sealer.open(key, docs.get("run")) if sealer is not None else docs.get("run")
        state, cfg = checked_run(key, run_id, state, env)
        if params.size != state["num_params"]:
            raise RunRefused(key, "num_params: differs from the checkpoint's parameters")
        state["restores"] = (state.get("restores") or [])[-19:] + [{"at": time.time()}]
        store = ParameterStore(kv, run_id, chunk_bytes=cfg.chunk_bytes)
        store.init(params)
        names = {state_key(w) for w in range(state["workers"])}
        workers = {k: {**v, "lease": ""} for k, v in (docs.get("workers") or {}).items()
                   if k in names and isinstance(v, dict)}
        kept = {f"result:{w}" for w in range(state["workers"])} | {"stop", "avglatest"}
        extra = {k: v for k, v in (docs.get("extra") or {}).items() if k in kept}
        store.put_docs({**workers, **extra, "run": state})
        record_run(kv, state)  # the store lost its run index too
        restored = True
    else:
        state, _ = checked_run(key, run_id, state, env)
    results = store.get_docs([f"result:{w}" for w in range(state["workers"])])
    todo = [w for w in range(state["workers"]) if f"result:{w}" not in results]
    _launch(state, start_worker, todo)
    return {**state, "resumed_workers": todo, "restored_from_checkpoint": restored}


def load_run(kv: KV, run_id: str, env: Mapping[str, str] | None = None
             ) -> tuple[ParameterStore, dict[str, Any]]:
    """The run's parameter store and document, both checked (``checked_run``: caps, and with
    the function's ``env`` its policy; the layout against the caps and the document) before
    anything is sized from them."""
    store = ParameterStore(kv, run_id)
    state = store.get_doc("run")
    if state is None:
        raise UnknownRun(f"unknown run id {run_id!r} (not in {kv.url})")
    state, _ = checked_run(store.key("run"), run_id, state, env)
    store.attach(max_params=policy.max_params(env or {}))
    if store.num_params != state["num_params"]:
        raise RunRefused(store.key("layout"), "num_params: differs from the run document's")
    return store, state


def write_checkpoint(store: ParameterStore, state: dict[str, Any], url: str) -> None:
    """The run's documents, then its parameters (read after the states, so no state is ahead
    of them), to ``url``. Worker states are the merged stored ones (``stored_docs``: the
    document with its owner's last progress note), what a takeover would resume."""
    n = state["workers"]
    names = [f"result:{w}" for w in range(n)] + ["stop", "avglatest"]
    docs = {**stored_docs(store, range(n)), **store.get_docs(names)}
    params = np.empty(store.num_params, dtype=np.float32)
    store.fetch(params)
    workers = {k: v for k, v in docs.items() if k.startswith("worker:")}
    extra = {k: v for k, v in docs.items() if not k.startswith("worker:")}
    sealer = getattr(store.kv, "sealer", None)  # the run document keeps its seal here too
    run = sealer.seal(store.key("run"), state) if sealer is not None else state
    Checkpoints(url).write(store.run_id, {"run": run, "workers": workers, "extra": extra},
                           params)


def run_model(state: dict[str, Any], cfg: TrainConfig,
              image_shape: tuple[int, int, int]) -> Model:
    """The network of a run, from its document's ModelSpec (validated: the document is data
    from the store); a run set up before specs were recorded trains the MLP its config
    describes."""
    raw = state.get("model")
    try:
        spec = (ModelSpec.from_dict(raw) if raw is not None
                else cfg.model_spec(state.get("num_classes"), image_shape))
        count = param_count(spec)  # nothing allocated yet
    except (ValueError, TypeError, ImportError) as e:  # ImportError: a torch model, no torch
        raise RunRefused(key_for(state["run_id"], "run"),
                         f"model: not a valid network ({str(e)[:200]})") from None
    if count != state["num_params"]:  # checked against max_params (checked_run)
        raise RunRefused(key_for(state["run_id"], "run"), "model: its size differs from the run "
                         "document's num_params")
    return build_model(spec, seed=cfg.seed)


def train_worker(kv: KV, run_id: str, worker_id: int, hostname: str, *,
                 next_pass: Callable[[int, int], None] | None = None,
                 env: Mapping[str, str] | None = None,
                 for_pass: int | None = None,
                 for_step: int | None = None) -> tuple[WorkerState, dict[str, Any]]:
    """One worker of a run, resumed from its stored state. With execution type 2 it trains
    one pass, and with ``slice_seconds`` for at most that long, then calls ``next_pass(pass,
    step)`` to have the gateway start the next invocation (so no call outlives the
    platform's timeouts). ``env``: the function's environment, whose policy and caps the run
    document must pass (None: a trusted caller, the default caps only). ``for_pass`` and
    ``for_step``: where the worker stood when the call was sent; a call with nothing to do (a
    redelivery, a duplicate, a finished worker) trains nothing, writes nothing and answers
    the worker's record with ``repeat``."""
    began = time.monotonic()
    store, state = load_run(kv, run_id, env)
    if not 0 <= worker_id < state["workers"]:
        raise ConfigError("worker_id", f"{worker_id} is outside run {run_id} "
                          f"(workers 0..{state['workers'] - 1})")
    cfg = TrainConfig(**state["config"])
    # only this worker's shard and the test set: read in place from a directory, or fetched
    # from s3:// into the node's cache, verified, memory-mapped
    data_set = open_set(state["shard_dir"])
    shard = data_set.shard(worker_id)
    model = run_model(state, cfg, shard.image_shape)
    lease = Lease(store, worker_id, cfg.lease_seconds)
    try:
        st = lease.acquire(hostname, for_pass=for_pass, for_step=for_step)
    except NothingToDo as e:
        return e.state, _repeat(store, e.state)
    started_at = (st.iteration, st.step)
    stop_calls(st)
    data = (shard.x, shard.y, *data_set.test())
    last_ckpt = [st.iteration]

    def save(s: WorkerState) -> None:
        lease.save(s)
        due = s.offset == 0 and s.iteration > last_ckpt[0] and \
            s.iteration % cfg.checkpoint_every == 0
        if cfg.checkpoint_url and due:
            last_ckpt[0] = s.iteration
            if claim(kv, store.key("ckpt-claim", s.iteration)):  # one writer per pass
                write_checkpoint(store, state, cfg.checkpoint_url)

    tier = None
    if cfg.local_store_url:
        tier = TieredStore(kv, shared_kv(cfg.local_store_url), run_id, cfg.sync_interval)
        tier.attach()
    try:
        if not st.done:
            run_worker(cfg, tier or store, data, model, st, workers=state["workers"],
                       steps_per_pass=state["steps_per_pass"], run_started=state["started"],
                       save=save, one_pass=cfg.execution_type == 2,
                       until=began + cfg.slice_seconds if cfg.slice_seconds else None)
    finally:
        if tier is not None:
            tier.close()  # flushes what the node has not synchronised yet
    if not st.done and (st.iteration, st.step) <= started_at:
        st.done, st.stop_reason = True, "stalled: an invocation made no progress"
    lease.save(st, release=True)
    finished = time.time()
    record = {**st.result(), "run_id": run_id, "finished": finished,
              "since_setup": finished - state["started"], "model": model.spec.name,
              "params": model.num_params, "threads": getattr(model, "threads", 1)}
    if tier is not None:
        record.update(tier_syncs=tier.syncs, tier_bytes_synced=tier.bytes_synced)
    if st.done:
        store.put_doc(f"result:{worker_id}", record)
    elif next_pass is not None:  # after progress only (above): no chain spins in place
        next_pass(st.iteration + 1, st.step)
    return st, record


MAX_ERROR = 300  # characters of a worker's error document


def record_failure(kv: KV, run_id: str, worker_id: int, hostname: str, message: str,
                   retry: bool) -> bool:
    """Note why a worker's call failed (``error:{worker}``), so a watcher ends a run that
    cannot proceed within seconds, and relaunches only what a retry can fix. Only for a
    run that exists (a refused request leaves nothing), one bounded document per worker."""
    store = ParameterStore(kv, run_id)
    if store.key("run") not in kv.get_many([store.key("run")]):
        return False
    store.put_doc(f"error:{worker_id}", {"worker_id": worker_id, "hostname": hostname[:64],
                                         "at": time.time(), "error": message[:MAX_ERROR],
                                         "retry": retry})
    return True


def _errors(store: ParameterStore, n: int) -> list[dict[str, Any] | None]:
    """Each worker's last failure note, a damaged or forged one read as none."""
    keys = [store.key(f"error:{w}") for w in range(n)]
    got = store.kv.get_many(keys)
    out = []
    for k in keys:
        try:
            out.append(_error_doc(codec.decode_doc(k, got[k])) if k in got else None)
        except CorruptValue:
            out.append(None)
    return out


def _error_doc(doc: Any) -> dict[str, Any] | None:
    """A stored error document as status reports it (the store is untrusted), or None."""
    if not (isinstance(doc, dict) and isinstance(doc.get("error"), str)
            and isinstance(doc.get("at"), int | float)):
        return None
    return {"error": doc["error"][:MAX_ERROR], "at": float(doc["at"]),
            "retry": doc.get("retry") is True, "hostname": str(doc.get("hostname", ""))[:64]}


def _repeat(store: ParameterStore, st: WorkerState) -> dict[str, Any]:
    """What a call with nothing to do answers: the finished worker's stored result (never
    rewritten), else its state's record, marked ``repeat``."""
    stored = store.get_doc(f"result:{st.worker_id}") if st.done else None
    return {**(stored if isinstance(stored, dict) else st.result()), "repeat": True}


PROGRESS_FIELDS = ("worker_id", "iteration", "offset", "accuracy", "hostname", "heartbeat",
                   "done", "stop_reason", "invocations")
DETAIL_LISTS = {"curve": 1000, "resumes": 100, "barrier_timeouts": 100}  # newest kept


def _detail(doc: dict[str, Any]) -> dict[str, Any]:
    """A worker document for a dashboard: everything but the lease token, lists bounded."""
    out = {k: v for k, v in doc.items() if k != "lease"}
    for name, most in DETAIL_LISTS.items():
        if isinstance(out.get(name), list):
            out[name] = out[name][-most:]
    return out


def run_status(kv: KV, run_id: str, detail: bool = False,
               env: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Per-worker progress and results, for the CLI's progress bar and `emnist status`;
    with ``detail`` each worker's whole state document (bounded lists), for the dashboard.
    The run document is checked first (``checked_run``): its worker count is within the
    caps before it sizes the answer."""
    store = ParameterStore(kv, run_id)
    state = store.get_doc("run")
    if state is None:
        raise UnknownRun(f"unknown run id {run_id!r} (not in {kv.url})")
    state, _ = checked_run(store.key("run"), run_id, state, env, report=True)
    n = state["workers"]
    # worker states merged with their owners' progress notes (the documents alone lag the
    # pushes by up to a heartbeat)
    docs = {**stored_docs(store, range(n)),
            **store.get_docs([f"result:{w}" for w in range(n)] + ["stop"])}
    progress = []
    for w in range(n):
        d = docs.get(state_key(w))
        progress.append(None if d is None else _detail(d) if detail else {
            k: d.get(k) for k in PROGRESS_FIELDS})
    results = [docs.get(f"result:{w}") for w in range(n)]
    return {"run_id": run_id, "workers": n, "config": state["config"],
            "errors": _errors(store, n),
            "started": state["started"], "stop": docs.get("stop"), "now": time.time(),
            "steps_per_pass": state.get("steps_per_pass"), "model": state.get("model"),
            "num_classes": state.get("num_classes"), "num_params": state.get("num_params"),
            "restores": state.get("restores") or [], "progress": progress, "results": results,
            "done": all(r is not None for r in results)}
