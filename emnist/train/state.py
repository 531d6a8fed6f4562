"""A worker's progress, kept in the store so any invocation can pick up where the last stopped.

The state is one document per worker (``worker:{id}``), written with a lease: the invocation
that owns the worker writes its id and a heartbeat; another invocation for the same worker
waits until the heartbeat is stale (the owner died) and then takes over, so a retried or
re-launched call resumes the worker instead of running it twice.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from emnist.store import MissingState, ParameterStore, StoreError, codec


class LeaseLost(StoreError):
    """Another invocation took this worker over: this one must stop writing."""


class WorkerBusy(StoreError):
    """The worker is owned by a live invocation."""


@dataclass
class WorkerState:
    worker_id: int
    hostname: str = ""
    iteration: int = 0  # completed passes over the shard
    offset: int = 0  # minibatches done in the current pass
    step: int = 0  # minibatches done in all
    samples: int = 0
    seconds: float = 0.0  # wall time worked, over every invocation
    train_seconds: float = 0.0  # time inside the minibatch loop (compute + exchange)
    accuracy: float = 0.0
    val_loss: float | None = None
    best_val_loss: float | None = None
    bad_epochs: int = 0
    fetches: int = 0
    pushes: int = 0
    bytes_fetched: int = 0
    bytes_pushed: int = 0
    bytes_skipped: int = 0
    push_retries: int = 0
    clock: int = 0  # the store's logical clock (pushes every chunk had) at the last exchange
    averages: int = 0
    barrier_timeouts: list[dict[str, Any]] = field(default_factory=list)
    curve: list[list[float]] = field(default_factory=list)  # [seconds, iteration, accuracy]
    invocations: int = 0
    resumes: list[dict[str, Any]] = field(default_factory=list)
    done: bool = False
    reached: bool = False
    stop_reason: str = ""
    lease: str = ""
    heartbeat: float = 0.0

    @property
    def iterations(self) -> int:
        return self.iteration

    @property
    def samples_per_s(self) -> float:
        return self.samples / self.train_seconds if self.train_seconds else 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def result(self) -> dict[str, Any]:
        out = self.to_dict()
        out.update(iterations=self.iteration, samples_per_s=self.samples_per_s)
        for k in ("lease", "heartbeat", "offset", "best_val_loss", "bad_epochs"):
            out.pop(k)
        return out

    def summary_line(self) -> str:
        """The original's result line; existing log greps depend on its exact shape."""
        return (f"Worker ID: {self.worker_id} Iterations: {self.iteration} "
                f"Time: {self.seconds:.3f} Name: {self.hostname}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> WorkerState:
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def state_key(worker_id: int) -> str:
    return f"worker:{worker_id}"


class Lease:
    """Own one worker's state document while this invocation runs."""

    def __init__(self, store: ParameterStore, worker_id: int, seconds: float) -> None:
        self.store, self.worker_id, self.seconds = store, worker_id, seconds
        self.key = store.key(state_key(worker_id))
        self.owner = secrets.token_hex(6)

    def acquire(self, hostname: str, wait: float | None = None,
                sleep: Callable[[float], None] = time.sleep) -> WorkerState:
        """Take the worker (resuming its state), waiting up to ``wait`` for a live owner's
        heartbeat to go stale."""
        deadline = time.monotonic() + (2 * self.seconds if wait is None else wait)
        taken: list[WorkerState] = []
        while True:

            def take(key: str, old: bytes | None) -> bytes:
                st = (WorkerState(self.worker_id) if old is None
                      else WorkerState.from_dict(codec.decode_doc(key, old)))
                if st.lease and time.time() - st.heartbeat < self.seconds:
                    raise WorkerBusy(f"worker {self.worker_id} is running (lease {st.lease})")
                if st.invocations and not st.done:
                    st.resumes.append({"iteration": st.iteration, "offset": st.offset,
                                       "at": time.time(), "from": st.hostname})
                st.invocations += 1
                st.lease, st.heartbeat, st.hostname = self.owner, time.time(), hostname
                taken[:] = [st]
                return codec.encode_doc(st.to_dict())

            try:
                self.store.kv.update_many([self.key], take)
                return taken[0]
            except WorkerBusy:
                if time.monotonic() > deadline:
                    raise
                sleep(min(0.2, self.seconds / 10))

    def save(self, st: WorkerState, release: bool = False) -> None:
        """Write the state if this invocation still owns the worker; else ``LeaseLost``."""
        st.heartbeat = time.time()
        st.lease = "" if release else self.owner

        def put(key: str, old: bytes | None) -> bytes:
            if old is None:  # acquire wrote it: the store lost it (restarted, evicted)
                raise MissingState(f"worker {self.worker_id}'s state vanished from "
                                   f"{self.store.kv.url}")
            owner = codec.decode_doc(key, old).get("lease")
            if owner not in (self.owner, ""):
                raise LeaseLost(f"worker {self.worker_id} was taken over by {owner}")
            return codec.encode_doc(st.to_dict())

        self.store.kv.update_many([self.key], put)
