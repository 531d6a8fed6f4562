"""One worker's training loop, for every algorithm and execution type.

The loop works from a ``WorkerState`` (iteration, offset into the pass, counters), so an
invocation that starts for a worker with state resumes mid-pass. What it saves is never ahead
of the store (``Progress``): each push that leaves nothing pending notes the progress as of
that push, a flushed pass end saves the state whole, and the saves in between (heartbeats)
write the last push's state. Each pass's minibatch order comes from (seed, worker, pass) and
each minibatch's dropout masks from (seed, worker, pass, offset), never from a stream, so a
resumed pass visits the same minibatches in the same order with the same masks.

The network is any ``emnist.models`` model (the run's ModelSpec): minibatches go to
``loss_and_grad`` as uint8 shard slices (the model converts them), and each pass ends with an
evaluation (``emnist.train.evaluation``: a fixed sample of the test set, the whole of it where
the result can decide the run); a batch-norm model calibrates first on ``calibration_images``
of the worker's own shard (the rule every path uses).

Stopping: the target accuracy, the iteration limit, a wall-clock limit, early stopping on
validation loss (patience), or another worker's stop signal; the reason is recorded.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from emnist.model import MLPShape
from emnist.models import Model, ModelSpec, build_model, calibration_images
from emnist.store import ParameterStore
from emnist.train.allreduce import AllReduce
from emnist.train.averaging import Averaging
from emnist.train.config import TrainConfig
from emnist.train.downpour import Exchange, batch_order
from emnist.train.evaluation import Evaluator
from emnist.train.state import Diverged, Lease, Progress, WorkerState

SAVE_SECONDS = 0.25  # how often the lease heartbeat (the last recorded progress) is written


def pass_order(cfg: TrainConfig, worker: int, iteration: int, n: int, steps: int) -> np.ndarray:
    rng = np.random.default_rng([cfg.seed, worker, iteration])
    return batch_order(n, cfg.batch_size, rng)[:steps]


class DropoutSeeds:
    """Each minibatch's dropout rng, from (seed, worker, pass, offset) alone.

    One Philox generator keyed by (seed, worker), its counter set to (pass, offset) per
    minibatch: ~4 µs, against ~17 µs for a ``default_rng`` per minibatch (a SeedSequence each)
    and ~600 µs for a reference step. Streams never overlap: a minibatch advances only the
    counter's low word. ``at`` returns the same Generator, repositioned.
    """

    def __init__(self, seed: int, worker: int) -> None:
        key = np.random.SeedSequence([seed, worker, 1]).generate_state(2, np.uint64)
        self._bits = np.random.Philox(key=key)
        self.rng = np.random.Generator(self._bits)
        self._state = self._bits.state

    def at(self, iteration: int, offset: int) -> np.random.Generator:
        """The generator for the minibatch at ``offset`` of pass ``iteration`` (1-based)."""
        s = self._state
        s["state"]["counter"][:] = (0, 0, offset, iteration)
        s["buffer_pos"], s["has_uint32"] = 4, 0  # nothing buffered from the last minibatch
        self._bits.state = s
        return self.rng


def as_model(model: Model | ModelSpec | MLPShape, cfg: TrainConfig) -> Model:
    """A built model; a ModelSpec is built, and a bare MLPShape (784 inputs: callers from
    before models had specs) is the MLP with ``cfg``'s dropout."""
    if isinstance(model, MLPShape):
        if model.inputs != 784:
            raise ValueError(f"an MLPShape names 784-pixel images, got {model.inputs}: "
                             "pass a ModelSpec")
        model = ModelSpec(name="mlp", classes=model.classes, hidden=model.hidden,
                          dropout=cfg.dropout_percent)
    if isinstance(model, ModelSpec):
        return build_model(model, seed=cfg.seed)
    return model


def run_worker(cfg: TrainConfig, store: ParameterStore, data: tuple[np.ndarray, ...],
               model: Model | ModelSpec | MLPShape, st: WorkerState, *, workers: int,
               steps_per_pass: int, run_started: float, save: Callable[[WorkerState], None],
               one_pass: bool = False, until: float | None = None) -> WorkerState:
    """Train ``model`` (see ``as_model``) from ``st`` until a stop condition (or one pass
    with ``one_pass``, or the ``time.monotonic()`` deadline ``until``: a time slice, which
    ends mid-pass with everything pushed and the state saved, so the next invocation resumes
    at the same minibatch; an averaging worker ends its slice at a pass end).

    ``save`` writes a state (the lease's save); with a lease in ``st`` and a plain parameter
    store, pushes also note progress themselves (in their transaction on Redis).
    """
    shard_x, shard_y, test_x, test_y = data
    t_start = time.perf_counter()
    seconds0 = st.seconds
    model = as_model(model, cfg)
    calib = calibration_images(shard_x) if model.needs_calibration else None
    evaluator = Evaluator(model, (test_x, test_y), calib, cfg)
    seeds = DropoutSeeds(cfg.seed, st.worker_id)
    params = np.empty(model.num_params, dtype=np.float32)
    store.fetch(params)
    st.fetches += 1
    st.bytes_fetched += params.nbytes
    last_save = time.monotonic()
    t0: float | None = None  # the current pass's loop started (None: outside the loop)

    def elapsed() -> float:
        return seconds0 + time.perf_counter() - t_start

    def clock() -> tuple[float, float]:
        return elapsed(), st.train_seconds + (0.0 if t0 is None else time.perf_counter() - t0)

    lease = Lease.held(store, st.worker_id, st.lease) \
        if st.lease and isinstance(store, ParameterStore) else None
    progress = Progress(st, save, lease, clock)

    def heartbeat() -> None:
        nonlocal last_save
        st.sample(time.time(), clock()[1])  # lands with the next recorded snapshot
        progress.heartbeat()
        last_save = time.monotonic()

    # allreduce: the exchange applies each gradient itself (a round per minibatch)
    reduces = cfg.algorithm == "allreduce"
    if cfg.algorithm == "averaging":
        ex: Any = Averaging(store, cfg, st, workers, progress, tick=heartbeat)
        ex.rejoin(params, steps_per_pass)
    elif reduces:
        ex = AllReduce(store, cfg, st, workers, steps_per_pass, progress, tick=heartbeat)
        ex.rejoin(params)
    else:
        ex = Exchange(store, cfg, st, params, cfg.overlap, progress)
    alpha, bs = np.float32(cfg.alpha), cfg.batch_size
    if not st.done and st.iteration >= cfg.iterations:  # nothing left: end, never wait
        st.done, st.stop_reason = True, "iterations"
    mid_pass = until is not None and cfg.algorithm != "averaging"
    try:
        while not st.done and st.iteration < cfg.iterations:
            it = st.iteration + 1
            order = pass_order(cfg, st.worker_id, it, len(shard_y), steps_per_pass)
            t0 = time.perf_counter()
            sliced = jumped = False
            for pos in range(st.offset, len(order)):
                at = order[pos]
                model.rng = seeds.at(it, pos)
                _, grad = model.loss_and_grad(params, shard_x[at:at + bs],
                                              shard_y[at:at + bs])
                if reduces:
                    if not ex.apply(params, grad):  # far behind: st moved to the newest round
                        jumped = True
                        break
                else:
                    grad *= -alpha
                    params += grad
                st.step, st.offset, st.samples = st.step + 1, pos + 1, st.samples + bs
                ex.after_step(params, st.step, st.offset)
                if ex.stop:
                    break
                if mid_pass and pos + 1 < len(order) and time.monotonic() >= until \
                        and ex.in_sync(st.step):
                    sliced = True
                    break
                if time.monotonic() - last_save > SAVE_SECONDS:
                    heartbeat()
            if jumped and st.offset:  # landed mid-pass: go on from there
                st.train_seconds += time.perf_counter() - t0
                t0 = None
                continue
            ex.end_iteration(params)
            st.train_seconds += time.perf_counter() - t0
            t0 = None
            if sliced:  # everything is pushed: the state as it is now is the store's
                st.seconds = elapsed()
                progress.save_now()
                break
            if st.offset >= len(order):  # a whole pass (a stop signal may end one early)
                st.iteration, st.offset, st.pass_calls = it, 0, 0
            evaluator.evaluate(params, st, elapsed())
            st.sample(time.time(), st.train_seconds)
            decide(cfg, st, ex.stop, run_started)
            if st.done:
                evaluator.final(params, st, elapsed())
            if st.reached:
                store.put_doc("stop", {"worker_id": st.worker_id, "iteration": st.iteration,
                                       "accuracy": st.accuracy, "reason": "target"})
            st.seconds = elapsed()
            if ex.synced:
                progress.save_now()
            else:
                progress.heartbeat()
            last_save = time.monotonic()
            if one_pass or (until is not None and time.monotonic() >= until):
                break
    except Diverged as e:  # nothing of the bad update reached the store
        st.done, st.stop_reason = True, f"diverged: {e}"
        st.seconds = elapsed()
        progress.save_now()
    finally:
        ex.close()
    st.seconds = elapsed()
    return st


def decide(cfg: TrainConfig, st: Any, stop: dict[str, Any] | None,
           run_started: float | None) -> None:
    """Set ``done`` and the reason, first match wins. ``run_started`` None skips the wall
    clock (the simulator's virtual time has none)."""
    if st.best_val_loss is None or st.val_loss < st.best_val_loss - cfg.min_delta:
        st.best_val_loss, st.bad_epochs = st.val_loss, 0
    else:
        st.bad_epochs += 1
    reason = None
    if st.accuracy >= cfg.target_accuracy:
        st.reached, reason = True, "target"
    elif stop:
        reason = f"stopped by worker {stop.get('worker_id')} ({stop.get('reason')})"
    elif cfg.max_seconds and run_started is not None \
            and time.time() - run_started >= cfg.max_seconds:
        reason = "wall clock"
    elif cfg.patience and st.bad_epochs >= cfg.patience:
        reason = f"early stop (validation loss, patience {cfg.patience})"
    elif st.iteration >= cfg.iterations:
        reason = "iterations"
    if reason:
        st.done, st.stop_reason = True, reason
