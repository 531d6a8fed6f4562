"""A worker's progress, kept in the store so any invocation can pick up where the last stopped.

The state is one document per worker (``worker:{id}``), written with a lease: the invocation
that owns the worker writes its id and a heartbeat; another invocation for the same worker
waits until the heartbeat is stale (the owner died) and then takes over, so a retried or
re-launched call resumes the worker instead of running it twice.

What is written is never ahead of the store (``Progress``): a minibatch is recorded as done
only once its update is in the store, so a resumed worker neither skips an update that was
still pending in the dead one nor (where the backend allows) redoes one that landed. Each push
notes the owner's progress counters in a small key of its own (``note_key``: in the push's
transaction on Redis, right after it on memcached); the document itself is written by the
heartbeats and pass ends, and a worker taken over resumes from the document and its last
owner's note, whichever is further along.
"""

from __future__ import annotations

import re
import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field, fields
from typing import Any

import numpy as np

from emnist.store import MissingState, ParameterStore, StoreError, codec
from emnist.store.kv import Updater
from emnist.store.params import Check

SERIES_MAX, SERIES_EVERY = 120, 1.0  # the metrics ring: ~8 KB, the last two minutes at 1 s
# invocations one pass may take (resumes after faults, time slices): past it the worker stops
# instead of being invoked again, so no caller or stored state can chain calls without end
MAX_PASS_CALLS = 64


class LeaseLost(StoreError):
    """Another invocation took this worker over: this one must stop writing."""


class Diverged(RuntimeError):
    """A worker's parameters stopped being finite: what it would send (a delta, or its
    parameters for an average) is refused before it reaches the store, so one diverged
    worker never turns the global vector into NaN for every other."""


def require_finite(values: np.ndarray, what: str) -> None:
    """``Diverged`` unless every value of what a worker is about to send is finite."""
    if not np.isfinite(values).all():
        raise Diverged(f"{what} not finite (NaN or infinity): lower alpha")


class WorkerBusy(StoreError):
    """The worker is owned by a live invocation."""


class NothingToDo(Exception):
    """The call has nothing left to train: the worker is done, or the pass it was sent for
    is trained already (a redelivered or duplicated call). Nothing was written."""

    def __init__(self, state: WorkerState) -> None:
        super().__init__(f"worker {state.worker_id}: nothing to do")
        self.state = state


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
    # per pass: [seconds, iteration, accuracy, validation loss, samples]
    curve: list[list[float]] = field(default_factory=list)
    series: list[list[float]] = field(default_factory=list)  # metrics ring: see sample()
    invocations: int = 0
    pass_calls: int = 0  # invocations that took part in the current pass (MAX_PASS_CALLS)
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

    def sample(self, now: float, train_seconds: float) -> None:
        """Add the counters to the bounded metrics ring the dashboard draws (``series``, the
        newest SERIES_MAX, at most one per SERIES_EVERY s): ``[wall time, step, samples,
        train_seconds, iteration, offset, bytes_fetched, bytes_pushed, push_retries, clock]``."""
        if self.series and now - self.series[-1][0] < SERIES_EVERY:
            return
        self.series.append([round(now, 3), self.step, self.samples, round(train_seconds, 3),
                            self.iteration, self.offset, self.bytes_fetched, self.bytes_pushed,
                            self.push_retries, self.clock])
        del self.series[:-SERIES_MAX]

    def result(self) -> dict[str, Any]:
        out = self.to_dict()
        out.update(iterations=self.iteration, samples_per_s=self.samples_per_s)
        for k in ("lease", "heartbeat", "offset", "best_val_loss", "bad_epochs", "series"):
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


def stop_signal(doc: Any) -> dict[str, Any] | None:
    """A run's ``stop`` document as the loop uses it (the store is untrusted): None when
    there is none; a malformed one still stops the worker, its fields reduced to a worker
    id and a short reason."""
    if doc is None:
        return None
    if not isinstance(doc, dict):
        return {"worker_id": None, "reason": "a malformed stop signal"}
    worker = doc.get("worker_id")
    return {"worker_id": worker if isinstance(worker, int) and not isinstance(worker, bool)
            and 0 <= worker <= MAX_COUNT else None,
            "reason": str(doc.get("reason"))[:64]}


def round_number(doc: Any) -> int | None:
    """The ``round`` of an ``avglatest`` document, or None unless it is a counter in range."""
    r = doc.get("round") if isinstance(doc, dict) else None
    return r if isinstance(r, int) and not isinstance(r, bool) and 0 <= r <= MAX_COUNT \
        else None


def stop_calls(st: WorkerState) -> None:
    """End a worker whose current pass has taken ``MAX_PASS_CALLS`` invocations already."""
    if not st.done and st.pass_calls > MAX_PASS_CALLS:
        st.done = True
        st.stop_reason = (f"invocations: {MAX_PASS_CALLS} calls did not finish pass "
                          f"{st.iteration + 1}")


_FIELDS = [f.name for f in fields(WorkerState)]
_LISTS = ("barrier_timeouts", "curve", "resumes", "series")  # entries never changed in place


def snapshot(st: WorkerState) -> dict[str, Any]:
    """The state's fields as they are now (``to_dict`` without asdict's deep copy: ~1 µs
    against ~120 µs, and it is taken at every push)."""
    doc = {name: getattr(st, name) for name in _FIELDS}
    for name in _LISTS:
        doc[name] = list(doc[name])
    return doc


# what a push changes (the rest changes at pass ends, rounds and takeovers, which write the
# whole document): the part noted with every push, as float64 (exact for counters < 2**53;
# no JSON: a note is made at every push)
PROGRESS = ("iteration", "offset", "step", "samples", "seconds", "train_seconds", "fetches",
            "pushes", "bytes_fetched", "bytes_pushed", "bytes_skipped", "push_retries", "clock",
            "averages")


def state_key(worker_id: int) -> str:
    return f"worker:{worker_id}"


def note_key(worker_id: int, owner: str) -> str:
    return f"progress:{worker_id}:{owner}"


class _Moved(Exception):
    """Internal: the state changed owner between reading its note and taking it."""


_INTS = {k for k in PROGRESS if k not in ("seconds", "train_seconds")}
# a worker document read back from the store is checked before use (the store is untrusted:
# anyone who reaches memcached can write it): every field its type, numbers finite and
# bounded, lists and strings bounded, the lease a token; else CorruptValue naming the field
MAX_COUNT = 1 << 53  # counters stay exact in float64 (the progress notes)
MAX_ENTRIES = 100_000  # entries of a stored list (curve: one per pass, iterations <= 100,000)
MAX_ENTRY = 32  # values in one list entry
MAX_STR = 1024
_LEASE = re.compile(r"^[A-Za-z0-9_-]{0,64}$")  # a token; part of a store key (note_key)


def _scalar(v: Any) -> bool:
    """A value a list entry may hold: floats as they are (a loss may be NaN: a number steers
    nothing here), integers within the counters' range, short strings."""
    if v is None or isinstance(v, bool | float):
        return True
    if isinstance(v, int):
        return abs(v) <= MAX_COUNT
    return isinstance(v, str) and len(v) <= MAX_STR


def _valid(kind: str, v: Any) -> bool:
    if v is None and "None" in kind:
        return True
    if kind.startswith("bool"):
        return isinstance(v, bool)
    if kind.startswith("int"):
        return isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= MAX_COUNT
    if kind.startswith("float"):
        return isinstance(v, int | float) and not isinstance(v, bool) and _scalar(v)
    if kind.startswith("str"):
        return isinstance(v, str) and len(v) <= MAX_STR
    if kind.startswith("list"):
        return isinstance(v, list) and len(v) <= MAX_ENTRIES and all(
            _row(e) or (isinstance(e, dict) and len(e) <= MAX_ENTRY
                        and all(_scalar(x) or _row(x) for x in e.values()))
            for e in v)
    return True


def _row(v: Any) -> bool:
    """A short list of scalars (a curve point; an averaging timeout's missing workers)."""
    return isinstance(v, list) and len(v) <= MAX_ENTRY and all(map(_scalar, v))


_KINDS = {f.name: str(f.type) for f in fields(WorkerState)}


def checked_doc(key: str, doc: Any, worker_id: int | None = None) -> dict[str, Any]:
    """``doc`` if it is a worker state document (of ``worker_id``, when given) whose every
    known field has its type and bounds; else ``CorruptValue`` naming the field."""
    if not isinstance(doc, dict):
        raise codec.CorruptValue(key, "a worker state must be a JSON object")
    for name, kind in _KINDS.items():
        if name in doc and not _valid(kind, doc[name]):
            raise codec.CorruptValue(key, f"{name}: not a valid value for a worker state")
    if not _LEASE.match(doc.get("lease", "")):
        raise codec.CorruptValue(key, "lease: not a lease token")
    if "worker_id" not in doc or (worker_id is not None and doc["worker_id"] != worker_id):
        raise codec.CorruptValue(key, "worker_id: missing, or the document is another "
                                 "worker's")
    return doc


def encode_note(doc: dict[str, Any]) -> bytes:
    return codec.encode(np.array([doc[k] for k in PROGRESS], dtype=np.float64))


def decode_note(key: str, value: bytes) -> dict[str, Any]:
    """A progress note; ``CorruptValue`` unless every counter is finite and in range."""
    values = codec.decode(key, value, dtype=np.float64, shape=(len(PROGRESS),)).array
    if not (np.isfinite(values).all() and (values >= 0).all() and (values <= MAX_COUNT).all()):
        raise codec.CorruptValue(key, "a progress note's counters must be finite, >= 0 and "
                                 f"<= {MAX_COUNT}")
    return {k: int(v) if k in _INTS else float(v) for k, v in zip(PROGRESS, values.tolist())}


def _read_note(key: str, value: bytes) -> dict[str, Any] | None:
    """A note, or None when it is damaged or forged: a worker then resumes from its
    document (older, never ahead of the store)."""
    try:
        return decode_note(key, value)
    except codec.CorruptValue:
        return None


def resumable(doc: dict[str, Any], note: dict[str, Any] | None) -> dict[str, Any]:
    """The state a worker resumes from: the document, with its owner's progress note (read
    for the owner the document names) if that is further along (pushes noted after the last
    heartbeat)."""
    if note is None or note["step"] <= doc.get("step", 0):
        return doc
    return {**doc, **note}


def stored_state(store: ParameterStore, worker_id: int) -> WorkerState | None:
    """What a new invocation would resume (``resumable``); None: no state yet."""
    doc = stored_docs(store, [worker_id]).get(state_key(worker_id))
    return None if doc is None else WorkerState.from_dict(doc)


def stored_docs(store: ParameterStore, worker_ids: Iterable[int]) -> dict[str, dict[str, Any]]:
    """``{state_key(w): document}`` for the workers that have a state, each merged with its
    owner's progress note (``resumable``): what a takeover would resume, for status pages and
    checkpoints (the document alone lags the pushes by up to a heartbeat). Two round trips
    for any number of workers."""
    keys = {store.key(state_key(w)): w for w in worker_ids}
    got = store.kv.get_many(list(keys))
    docs = {}
    for k, v in got.items():
        try:
            docs[keys[k]] = checked_doc(k, codec.decode_doc(k, v), keys[k])
        except codec.CorruptValue:
            continue  # damaged or forged: reported as no state (a worker refuses it)
    owned = {w: d["lease"] for w, d in docs.items() if d.get("lease")}
    note_keys = {store.key(note_key(w, o)): w for w, o in owned.items()}
    notes = store.kv.get_many(list(note_keys)) if note_keys else {}
    by_worker = {note_keys[k]: _read_note(k, v) for k, v in notes.items()}
    return {state_key(w): resumable(d, by_worker.get(w)) for w, d in sorted(docs.items())}


def _note(store: ParameterStore, worker_id: int, owner: str) -> dict[str, Any] | None:
    if not owner:
        return None
    key = store.key(note_key(worker_id, owner))
    got = store.kv.get_many([key])
    return _read_note(key, got[key]) if key in got else None


class Lease:
    """Own one worker's state document while this invocation runs."""

    def __init__(self, store: ParameterStore, worker_id: int, seconds: float) -> None:
        self.store, self.worker_id, self.seconds = store, worker_id, seconds
        self.key = store.key(state_key(worker_id))
        self.owner = secrets.token_hex(6)

    def acquire(self, hostname: str, wait: float | None = None,
                sleep: Callable[[float], None] = time.sleep,
                for_pass: int | None = None, for_step: int | None = None) -> WorkerState:
        """Take the worker (resuming its state), waiting up to ``wait`` for a live owner's
        heartbeat to go stale. ``NothingToDo`` (and nothing written) when the worker is done,
        ``for_pass`` (the pass a call was sent for) is trained already, or the worker went on
        past ``for_step`` (the step it stood at when the call was sent): at-least-once
        delivery never trains a pass or a time slice twice nor rewrites a finished worker."""
        deadline = time.monotonic() + (2 * self.seconds if wait is None else wait)
        taken: list[WorkerState] = []
        while True:
            seen = self.store.kv.get_many([self.key]).get(self.key)
            owner = "" if seen is None else checked_doc(
                self.key, codec.decode_doc(self.key, seen), self.worker_id).get("lease", "")
            note = _note(self.store, self.worker_id, owner)

            def take(key: str, old: bytes | None, owner: str = owner,
                     note: dict[str, Any] | None = note) -> bytes:
                doc = {} if old is None else checked_doc(key, codec.decode_doc(key, old),
                                                         self.worker_id)
                if doc.get("lease", "") != owner:
                    raise _Moved  # read its owner's note again
                st = (WorkerState(self.worker_id) if old is None
                      else WorkerState.from_dict(resumable(doc, note)))
                if st.done or (for_pass is not None and st.iteration >= for_pass) \
                        or (for_step is not None and st.step > for_step):
                    raise NothingToDo(st)
                if st.lease and time.time() - st.heartbeat < self.seconds:
                    raise WorkerBusy(f"worker {self.worker_id} is running (lease {st.lease})")
                if st.invocations and not st.done:
                    st.resumes.append({"iteration": st.iteration, "offset": st.offset,
                                       "at": time.time(), "from": st.hostname})
                st.invocations += 1
                st.pass_calls += 1
                st.lease, st.heartbeat, st.hostname = self.owner, time.time(), hostname
                taken[:] = [st]
                return codec.encode_doc(st.to_dict())

            try:
                self.store.kv.update_many([self.key], take)
                return taken[0]
            except _Moved:
                continue
            except WorkerBusy:
                if time.monotonic() > deadline:
                    raise
                sleep(min(0.2, self.seconds / 10))

    @classmethod
    def held(cls, store: ParameterStore, worker_id: int, owner: str) -> Lease:
        """The lease an invocation already holds: its owner token is in the state it
        acquired (``WorkerState.lease``), so the training loop can check it on every push."""
        lease = cls(store, worker_id, 0.0)
        lease.owner = owner
        return lease

    @property
    def note_key(self) -> str:
        return self.store.key(note_key(self.worker_id, self.owner))

    @property
    def _mine(self) -> bytes:
        return b'"lease":"' + self.owner.encode() + b'"'

    def save(self, st: WorkerState, release: bool = False) -> None:
        """Write the state if this invocation still owns the worker; else ``LeaseLost``."""
        st.heartbeat = time.time()
        st.lease = "" if release else self.owner
        self.store.kv.update_many([self.key], self._writer(snapshot(st)))

    def for_push(self, doc: dict[str, Any]) -> tuple[Check, dict[str, bytes]]:
        """(check, note) for ``ParameterStore.push``: the push is refused unless this
        invocation still owns the worker, and notes ``doc``'s progress in this owner's key
        (only this invocation writes it, and only its owner's note is ever read back: a note
        needs no lease check of its own)."""
        return (self.key, self.still_mine), {self.note_key: encode_note(doc)}

    def still_mine(self, key: str, old: bytes | None) -> None:
        """``check`` without parsing the document at every push: its checksum is verified and
        its lease looked for as bytes (exact: the top-level "lease" is its only such key, and
        JSON escapes quotes inside strings); anything else goes the slow way."""
        if old is not None:
            raw = codec.decode(key, old).raw
            if raw is not None and self._mine in raw:
                return
        self.check(key, old)

    def check(self, key: str, old: bytes | None) -> dict[str, Any]:
        """The stored state, if it is still this invocation's (else ``LeaseLost``)."""
        if old is None:  # acquire wrote it: the store lost it (restarted, evicted)
            raise MissingState(f"worker {self.worker_id}'s state vanished from "
                               f"{self.store.kv.url}")
        cur = checked_doc(key, codec.decode_doc(key, old), self.worker_id)
        if cur.get("lease") not in (self.owner, ""):
            raise LeaseLost(f"worker {self.worker_id} was taken over by {cur.get('lease')}")
        return cur

    def _writer(self, doc: dict[str, Any]) -> Updater:
        """Checks the lease (``LeaseLost``) and never goes back: a stored state further along
        (an overlapped exchange's save, through a tier, racing a heartbeat of the push before)
        keeps its progress and takes only the heartbeat."""
        def put(key: str, old: bytes | None) -> bytes:
            cur = self.check(key, old)
            if cur.get("step", 0) > doc["step"]:
                return codec.encode_doc({**cur, "lease": doc["lease"],
                                         "heartbeat": doc["heartbeat"]})
            return codec.encode_doc(doc)

        return put


class Progress:
    """What a worker's saves write: its state as of the last update the store has.

    Between pushes the live state runs ahead of the store (minibatches whose update is still
    pending in the worker); saving it would record them as done, and a kill would lose them.
    So the state is snapshot only where nothing is pending (a push that sent every chunk, a
    pass end after its flush, an averaging round), each push notes its snapshot's progress
    (``for_push``: in the push's own transaction on Redis, right after it elsewhere), and
    the saves in between (``heartbeat``: the lease stays alive) write the last snapshot that
    landed.
    """

    def __init__(self, st: WorkerState, save: Callable[[WorkerState], None],
                 lease: Lease | None = None,
                 clock: Callable[[], tuple[float, float]] | None = None) -> None:
        self.st, self._save, self.lease = st, save, lease
        self.clock = clock  # (seconds, train_seconds) as of now
        self.last = self.take()  # the state resumed from: its updates are all in the store

    def take(self) -> dict[str, Any]:
        """A snapshot of the live state now (its owner records it once it is true)."""
        doc = snapshot(self.st)
        if self.clock is not None:
            doc["seconds"], doc["train_seconds"] = self.clock()
        return doc

    def for_push(self, doc: dict[str, Any]) -> tuple[Check, dict[str, bytes]] | None:
        """(check, note) for the push that makes ``doc`` true; None: no lease to check
        here, so ``write`` it after the push."""
        return None if self.lease is None else self.lease.for_push(doc)

    def landed(self, doc: dict[str, Any]) -> None:
        """The push that makes ``doc`` true has landed with its note (``for_push``), or in a
        node-local tier (the next heartbeat saves it)."""
        self.last = doc

    def write(self, doc: dict[str, Any]) -> None:
        """Record ``doc`` on its own: the update that makes it true has landed."""
        self._save(WorkerState.from_dict(doc))
        self.last = doc

    def save_now(self) -> None:
        """Nothing is pending: the live state is the store's (a flushed pass end)."""
        self.write(self.take())

    def note_now(self) -> None:
        """Nothing is pending (an averaging round): note the progress (one plain write of
        the owner's note; the heartbeats write the document)."""
        if self.lease is None:
            self.save_now()
            return
        doc = self.take()
        self.lease.store.kv.set_many(self.lease.for_push(doc)[1])
        self.last = doc

    def heartbeat(self) -> None:
        """Keep the lease alive, writing the last snapshot that landed (never the live
        state)."""
        self._save(WorkerState.from_dict(self.last))
