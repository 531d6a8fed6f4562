"""Synchronous data-parallel SGD through the store: every minibatch is one round of a
reduce-scatter and an all-gather, so W workers train as one process would on their W
minibatches together (the global batch, mean loss), with momentum and a learning rate scaled
to that batch.

Round r is the r-th minibatch of the run (every worker does the same number per pass, so
rounds line up). The vector is cut into W contiguous partitions (sizes differ by at most one),
each stored in chunks of ``chunk_bytes``; keys live under the run, ``ar:{r}:...``:

1. contribute: each worker writes its gradient, partition by partition, under
   ``g:{worker}:{partition}:{chunk}``, then its marker ``in:{worker}`` (a reader that sees the
   marker sees every chunk). Every key is written with ``add``: write-once, so a write retried
   after a lost reply never counts twice (``emnist.store.outcome``), and nothing is a
   read-modify-write sum.
2. close: the round's members are fixed once, in ``members`` (``add``: the first writer wins),
   by the first worker that sees the marker of every worker it waits for, or at
   ``barrier_timeout`` with the markers present. Every partition is reduced over exactly those
   members; a contribution that comes later is never used, in this round or any other (keys
   are per round).
3. reduce: partition p is reduced by whoever holds ``claim:{p}:{gen}`` (``add``): generation 0
   is worker p's when it is a member, else member ``members[p % k]``'s; a partition whose
   ``done:{p}`` has not appeared ``barrier_timeout`` after a worker began waiting for it may be
   claimed by that worker at the next generation (its reducer died or hangs). The reducer sums
   the members' partitions in worker order, divides by their count k, folds the mean into the
   momentum (v = mu v + g) and steps (w = w - lr v); it writes its partition of v and of w
   (``v:{p}:{c}``, ``w:{p}:{c}``, ``add``) and then ``done:{p}``. Two generations can only
   write the same bits (the members are fixed and the sum deterministic), so a slow reducer
   and its replacement never disagree: whichever ``done`` lands first stands.
4. all-gather: every worker reads v of every partition and applies w -= lr v with the very
   float32 operations the reducer used, so all workers hold bit-identical parameters and
   momentum after every round (and ``w`` is the snapshot a restarted worker rejoins from).

Per worker and round this writes the vector once plus 2/W of it (v and w of its partition) and
reads 2 (W - 1)/W of it, plus about 2W small keys: the traffic does not grow with W.

The learning rate (``learning_rate``): alpha, scaled by the linear rule to alpha x k for a
round of k members (``scale_lr``), reached by a linear warm-up from alpha over
``warmup_steps`` rounds (None: half a pass). One gradient per round: ``average_every`` is not
used (local SGD between rounds is not implemented).

Failures. Every wait has a deadline. A worker missing at a close is suspected and not waited
for again, so a dead worker costs one timeout; a worker that ends (``st.done``) leaves
``gone:{worker}`` and is not waited for at all. A worker that was too late for a round follows
it (applies the reduced partitions, its own contribution unused) and announces the round it
will be back for (``join:{worker}``: the others wait for it there once more); one that finds
its round deleted (more than ``KEEP_ROUNDS`` behind) jumps to the newest complete round: it
loads that round's v and w and moves its position there (``apply`` returns False). An
invocation rejoins the same way (``rejoin``), so execution types 1, 2 and 3 and time slices
all resume from the store, bit for bit. Without any round in the store (a fresh run, or a
store restored from a checkpoint) the workers agree on a base round through ``base`` (``add``)
and start from the run's global vector with zero momentum.

Cleanup: the reducer of partition p in round r deletes that partition's contributions of round
r - 2 and its v, w, done and claims of round r - KEEP_ROUNDS (partition 0's also the markers
and the members document). Not implemented: backup workers (close at the first W - b
contributions), local SGD rounds, a node-local tier in front (refused by the config).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np

from emnist.store import MissingState, ParameterStore, StoreError, claim, codec
from emnist.train.config import TrainConfig
from emnist.train.state import Progress, WorkerState, require_finite, round_number, stop_signal

KEEP_ROUNDS = 8  # rounds whose reduced partitions stay: a worker this far behind follows them
POLL_SECONDS = 0.0005
TICK_SECONDS = 0.5  # lease heartbeats while waiting
Bounds = tuple[int, int]


def partitions(n: int, workers: int) -> list[Bounds]:
    """``workers`` contiguous [lo, hi) ranges covering n; the first n % workers one longer."""
    size, extra = divmod(n, workers)
    out, lo = [], 0
    for p in range(workers):
        hi = lo + size + (p < extra)
        out.append((lo, hi))
        lo = hi
    return out


def learning_rate(alpha: float, round_: int, members: int, warmup: int, scale: bool
                  ) -> np.float32:
    """Round ``round_``'s (1-based) rate: alpha x members once warmed up (the linear scaling
    rule), rising linearly from alpha over the first ``warmup`` rounds; alpha without
    ``scale``. Plain float arithmetic: every worker computes the same bits."""
    if not scale or members <= 1:
        return np.float32(alpha)
    ramp = 1.0 if warmup <= 0 else min(1.0, (round_ - 1) / warmup)
    return np.float32(alpha * (1.0 + (members - 1) * ramp))


def momentum_step(w_in: np.ndarray, v: np.ndarray, lr: np.float32, out: np.ndarray) -> None:
    """out = w_in - lr v: the one update every worker and every reducer computes."""
    np.subtract(w_in, lr * v, out=out)


class RoundGone(Exception):
    """Internal: this worker's round was deleted (it is too far behind): jump ahead."""


class AllReduce:
    """One worker's side of the rounds (the worker loop's exchange for ``allreduce``)."""

    def __init__(self, store: ParameterStore, cfg: TrainConfig, st: WorkerState, workers: int,
                 steps_per_pass: int, progress: Progress, tick: Callable[[], None]) -> None:
        self.store, self.kv, self.st, self.progress = store, store.kv, st, progress
        self.me, self.n_workers, self.steps_per_pass = st.worker_id, workers, steps_per_pass
        self.timeout, self.mu = cfg.barrier_timeout, np.float32(cfg.momentum)
        self.alpha, self.scale = cfg.alpha, cfg.scale_lr
        self.warmup = steps_per_pass // 2 if cfg.warmup_steps is None else cfg.warmup_steps
        self.tick = tick
        n = int(store.num_params or 0)
        self.bounds = partitions(n, workers)
        chunk = store.chunk
        self.chunks = [[(a, min(a + chunk, hi)) for a in range(lo, hi, chunk)]
                       for lo, hi in self.bounds]
        self.per_batch = store.per_batch
        self.v = np.zeros(n, dtype=np.float32)
        self.suspect: set[int] = set()
        self.gone: set[int] = set()
        self.behind = True  # look before contributing: the round may be closed already
        self.fresh = False  # this round's contribution is this invocation's own bits
        self.last_members: list[int] = []
        self.takeovers: list[tuple[int, int, int]] = []  # (round, partition, generation)
        self.stop: dict[str, Any] | None = None

    # -- keys -----------------------------------------------------------------------------
    def _k(self, r: int, *parts: object) -> str:
        return self.store.key("ar", r, *parts)

    def _gone_key(self, w: int) -> str:
        return self.store.key("ar", "gone", w)

    def _chunk_keys(self, r: int, kind: str, p: int, *who: int) -> list[str]:
        return [self._k(r, kind, *who, p, c) for c in range(len(self.chunks[p]))]

    # -- the worker loop's interface ------------------------------------------------------
    def apply(self, params: np.ndarray, grad: np.ndarray) -> bool:
        """Round ``st.step + 1`` with this minibatch's gradient: ``params`` becomes the
        round's result. False: the round was gone, and this worker jumped to the newest
        complete round instead (``st`` moved there; the loop must re-position)."""
        r = self.st.step + 1
        try:
            self._round(params, grad, r)
        except RoundGone:
            self.kv.delete_many([k for p in range(self.n_workers)
                                 for k in self._chunk_keys(r, "g", p, self.me)]
                                + [self._k(r, "in", self.me)])
            self._jump(params)
            return False
        return True

    def after_step(self, params: np.ndarray, step: int, offset: int) -> None:
        """The round is in the store (v and w of every partition): the state as of now is
        what a resumed worker would rejoin at; the next heartbeat saves it."""
        self.progress.landed(self.progress.take())

    @property
    def synced(self) -> bool:
        return True

    def in_sync(self, step: int) -> bool:
        return True

    def end_iteration(self, params: np.ndarray) -> None:
        """The lowest member of the last round publishes the run's global vector
        (checkpoints, results, a restore)."""
        if self.last_members and self.me == self.last_members[0]:
            self.store.put(params)
            self.st.bytes_pushed += params.nbytes

    def close(self) -> None:
        """A finished worker says so: the others stop waiting for it at once."""
        if self.st.done:
            self.store.put_doc(f"ar:gone:{self.me}", {"step": self.st.step})

    def rejoin(self, params: np.ndarray) -> None:
        """Start where the run is: load the newest complete round (v and w) and move there;
        with no round in the store, agree on a base round and start from ``params`` (the
        run's global vector, just fetched) with zero momentum."""
        newest = self._newest()
        if newest is not None:
            self._load(params, newest)
            if newest != self.st.step:
                self._move(newest, "rejoined_round")
            self._announce(newest + 1)
            return
        base = self.st.iteration * self.steps_per_pass  # the current pass's start
        key = self.store.key("ar", "base")
        if not self.kv.add(key, codec.encode_doc({"round": base})):
            got = round_number(self.store.get_doc("ar:base"))
            if got is None:
                raise codec.CorruptValue(key, "not an all-reduce base round")
            base = got
        if base != self.st.step:
            self._move(base, "base_round")

    # -- one round ------------------------------------------------------------------------
    def _round(self, params: np.ndarray, grad: np.ndarray, r: int) -> None:
        members = self._closed(r) if self.behind else None
        self.fresh = False
        if members is None:
            self._contribute(r, grad)
            members = self._close(r)
        self.behind = self.me not in members
        self.last_members = members
        self._gather(params, grad, r, members)
        if self.behind:  # followed a round closed without it: ask to be waited for again
            self._announce(r + 2)
        self.st.averages += 1

    def _announce(self, r: int) -> None:
        """``join:{me}``: the others wait for this (suspected) worker at round r again."""
        self.store.put_doc(f"ar:join:{self.me}", {"round": r})

    def _closed(self, r: int) -> list[int] | None:
        """Round r's members if it closed already (this worker is late: it follows)."""
        mkey, lkey = self._k(r, "members"), self.store.key("ar", "latest")
        got = self.kv.get_many([mkey, lkey])
        if mkey in got:
            return self._members(mkey, got[mkey])
        latest = round_number(codec.decode_doc(lkey, got[lkey])) if lkey in got else None
        if latest is not None and latest >= r:
            raise RoundGone
        return None

    def _contribute(self, r: int, grad: np.ndarray) -> None:
        require_finite(grad, "the gradient to contribute is")
        fresh = True
        for p, chunks in enumerate(self.chunks):
            for key, (a, b) in zip(self._chunk_keys(r, "g", p, self.me), chunks, strict=True):
                fresh &= self.kv.add(key, codec.encode(grad[a:b]))
        # the marker last; False: an earlier invocation of this worker wrote this round
        fresh &= self.kv.add(self._k(r, "in", self.me), codec.encode_doc({"round": r}))
        self.fresh = fresh
        self.st.bytes_pushed += grad.nbytes

    def _close(self, r: int) -> list[int]:
        """Wait for the markers of every worker not suspected or gone, at most
        ``barrier_timeout``; the first worker to decide writes the members, all use them."""
        mkey, lkey = self._k(r, "members"), self.store.key("ar", "latest")
        stop_key = self.store.key("stop")
        others = [w for w in range(self.n_workers) if w != self.me]
        markers = {self._k(r, "in", w): w for w in others}
        gones = {self._gone_key(w): w for w in others}
        joins = {self.store.key("ar", "join", w): w for w in self.suspect}
        deadline = time.monotonic() + self.timeout
        last_tick = time.monotonic()
        while True:
            got = self.kv.get_many([mkey, lkey, stop_key, *markers, *gones, *joins])
            if mkey in got:
                return self._after_close(r, self._members(mkey, got[mkey]))
            if lkey in got and (round_number(codec.decode_doc(lkey, got[lkey])) or 0) >= r:
                raise RoundGone
            if stop_key in got:
                self.stop = stop_signal(codec.decode_doc(stop_key, got[stop_key]))
            self.gone.update(w for k, w in gones.items() if k in got)
            present = sorted({self.me} | {w for k, w in markers.items() if k in got})
            back = {w for k, w in joins.items()
                    if k in got and round_number(codec.decode_doc(k, got[k])) == r}
            waiting = [w for w in others if w not in present and w not in self.gone
                       and (w not in self.suspect or w in back)]
            now = time.monotonic()
            if not waiting or now > deadline or self.stop:
                if self.kv.add(mkey, codec.encode_doc({"round": r, "members": present})):
                    return self._after_close(r, present)
                continue  # another worker closed first: read its members back
            if now - last_tick > TICK_SECONDS:
                self.tick()
                last_tick = now
            time.sleep(POLL_SECONDS)

    def _after_close(self, r: int, members: list[int]) -> list[int]:
        missing = [w for w in range(self.n_workers) if w not in members
                   and w not in self.suspect and w not in self.gone and w != self.me]
        if missing and not self.stop:
            self.st.barrier_timeouts.append({"round": r, "after_s": self.timeout,
                                             "missing": ",".join(map(str, missing))})
        self.suspect.update(missing)
        self.suspect.difference_update(members)
        return members

    def _members(self, key: str, value: bytes) -> list[int]:
        """A members list from the store (untrusted): sorted distinct worker ids."""
        doc = codec.decode_doc(key, value)
        m = doc.get("members") if isinstance(doc, dict) else None
        if not (isinstance(m, list) and m and m == sorted(set(m)) and all(
                isinstance(w, int) and not isinstance(w, bool) and 0 <= w < self.n_workers
                for w in m)):
            raise codec.CorruptValue(key, "members: not a sorted list of this run's workers")
        return m

    # -- reduce-scatter and all-gather ----------------------------------------------------
    def _gather(self, params: np.ndarray, grad: np.ndarray, r: int,
                members: list[int]) -> None:
        """Wait for every partition's ``done`` (reducing the ones this worker is due to
        claim), then read the partitions' momentum and step."""
        k = len(members)
        lr = learning_rate(self.alpha, r, k, self.warmup, self.scale)
        now = time.monotonic()
        due = {}
        for p in range(self.n_workers):
            first = p if p in members else members[p % k]
            due[p] = now if first == self.me else now + self.timeout
        gen = dict.fromkeys(range(self.n_workers), 0)
        local: dict[int, np.ndarray] = {}  # partitions reduced here: their new momentum
        done: set[int] = set()
        done_keys = {self._k(r, "done", p): p for p in range(self.n_workers)}
        lkey = self.store.key("ar", "latest")
        last_tick = now
        while True:
            for p in sorted(p for p in range(self.n_workers)
                            if p not in done and time.monotonic() >= due[p]):
                if gen[p] > self.n_workers + 1:
                    raise StoreError(f"round {r}: partition {p} was claimed "
                                     f"{gen[p]} times and never reduced")
                if claim(self.kv, self._k(r, "claim", p, gen[p])):
                    if gen[p] or p != self.me:
                        self.takeovers.append((r, p, gen[p]))
                    v = self._reduce(params, grad, r, p, members, lr, gen[p])
                    done.add(p)
                    if v is not None:
                        local[p] = v
                else:
                    gen[p] += 1
                    due[p] = time.monotonic() + self.timeout
            todo = [key for key, p in done_keys.items() if p not in done]
            if not todo:
                break
            got = self.kv.get_many([*todo, lkey])
            for key in todo:
                if key in got:
                    self._check_done(key, got[key], members)
                    done.add(done_keys[key])
            latest = round_number(codec.decode_doc(lkey, got[lkey])) if lkey in got else None
            if len(done) < self.n_workers and latest is not None and latest > r:
                raise RoundGone  # the round completed and was deleted since
            now = time.monotonic()
            if len(done) < self.n_workers:
                if now - last_tick > TICK_SECONDS:
                    self.tick()
                    last_tick = now
                time.sleep(POLL_SECONDS)
        for p, (lo, hi) in enumerate(self.bounds):
            if p in local:
                self.v[lo:hi] = local[p]
        self._read_parts(r, "v", [p for p in range(self.n_workers) if p not in local], self.v)
        momentum_step(params, self.v, lr, out=params)

    def _check_done(self, key: str, value: bytes, members: list[int]) -> None:
        doc = codec.decode_doc(key, value)
        if not isinstance(doc, dict) or doc.get("members") != members:
            raise codec.CorruptValue(key, "done: not reduced over this round's members")

    def _reduce(self, params: np.ndarray, grad: np.ndarray, r: int, p: int,
                members: list[int], lr: np.float32, gen: int) -> np.ndarray | None:
        """Reduce partition p (this worker holds its claim); its new momentum, or None when
        an earlier generation had written it (then it is read back like the others')."""
        lo, hi = self.bounds[p]
        own = self.fresh and self.me in members
        stored = [w for w in members if not (own and w == self.me)]
        total = np.zeros(hi - lo, dtype=np.float32)
        keys = {w: self._chunk_keys(r, "g", p, w) for w in stored}
        chunks = self.chunks[p]
        per = max(1, self.per_batch // max(1, len(stored)))
        for c0 in range(0, len(chunks), per):
            group = range(c0, min(c0 + per, len(chunks)))
            got = self.kv.get_many([keys[w][c] for w in stored for c in group]) \
                if stored else {}
            for w in members:
                for c in group:
                    a, b = chunks[c]
                    if own and w == self.me:
                        total[a - lo:b - lo] += grad[a:b]
                        continue
                    key = keys[w][c]
                    if key not in got:  # a member's marker came after all its chunks
                        raise RoundGone
                    total[a - lo:b - lo] += codec.decode(key, got[key], dtype=np.float32,
                                                         shape=(b - a,)).array
        self.st.bytes_fetched += 4 * (hi - lo) * len(stored)
        total /= np.float32(len(members))
        v = self.v[lo:hi] * self.mu
        v += total
        w_new = np.empty_like(v)
        momentum_step(params[lo:hi], v, lr, out=w_new)
        require_finite(w_new, "the reduced parameters are")
        ours = True
        for kind, values in (("v", v), ("w", w_new)):
            for key, (a, b) in zip(self._chunk_keys(r, kind, p), chunks, strict=True):
                ours &= self.kv.add(key, codec.encode(values[a - lo:b - lo]))
        self.st.bytes_pushed += 8 * (hi - lo)
        doc = {"round": r, "members": members, "by": self.me, "gen": gen}
        if self.kv.add(self._k(r, "done", p), codec.encode_doc(doc)) and p == 0:
            self.store.put_doc("ar:latest", {"round": r})
        self._cleanup(r, p)
        return v if ours else None

    def _cleanup(self, r: int, p: int) -> None:
        """Partition p's keys of old rounds (see the module docstring)."""
        keys: list[str] = []
        if r > 2:
            keys += [k for w in range(self.n_workers) for k in self._chunk_keys(r - 2, "g", p, w)]
            if p == 0:
                keys += [self._k(r - 2, "in", w) for w in range(self.n_workers)]
        old = r - KEEP_ROUNDS
        if old > 0:
            keys += self._chunk_keys(old, "v", p) + self._chunk_keys(old, "w", p)
            keys += [self._k(old, "done", p)]
            keys += [self._k(old, "claim", p, g) for g in range(self.n_workers + 2)]
            if p == 0:
                keys.append(self._k(old, "members"))
        if keys:
            self.kv.delete_many(keys)

    def _read_parts(self, r: int, kind: str, parts: list[int], out: np.ndarray) -> None:
        """Round r's ``kind`` chunks of ``parts`` into ``out``, one batch per round trip;
        ``RoundGone`` if any is missing (deleted: this worker is far behind)."""
        wanted = [(key, ab) for p in parts
                  for key, ab in zip(self._chunk_keys(r, kind, p), self.chunks[p], strict=True)]
        for batch in _batches(wanted, self.per_batch):
            got = self.kv.get_many([key for key, _ in batch])
            for key, (a, b) in batch:
                if key not in got:
                    raise RoundGone
                out[a:b] = codec.decode(key, got[key], dtype=np.float32, shape=(b - a,)).array
                self.st.bytes_fetched += 4 * (b - a)

    # -- rejoining ------------------------------------------------------------------------
    def _newest(self) -> int | None:
        """The newest round whose every partition is done (None: no round in the store).
        ``latest`` is set after partition 0 of its round, so that round may still be open
        (the one before is complete) or rounds after it may be complete already."""
        for _ in range(3):
            latest = round_number(self.store.get_doc("ar:latest"))
            if latest is None:
                return None
            r = latest
            for _ in range(KEEP_ROUNDS):
                if not self._complete(r + 1):
                    break
                r += 1
            for candidate in (r, r - 1):
                if candidate > 0 and self._complete(candidate):
                    return candidate
        raise MissingState(f"no complete all-reduce round in {self.kv.url} although "
                           f"round {latest} was reduced")

    def _complete(self, r: int) -> bool:
        keys = [self._k(r, "done", p) for p in range(self.n_workers)]
        return len(self.kv.get_many(keys)) == len(keys)

    def _load(self, params: np.ndarray, r: int) -> None:
        parts = list(range(self.n_workers))
        self._read_parts(r, "v", parts, self.v)
        self._read_parts(r, "w", parts, params)

    def _jump(self, params: np.ndarray) -> None:
        """Load the newest complete round and move there (a few tries: rounds go on)."""
        for _ in range(3):
            newest = self._newest()
            if newest is None:
                break
            try:
                self._load(params, newest)
            except RoundGone:
                continue
            self._move(newest, "jumped_to_round")
            self._announce(newest + 2)
            self.progress.save_now()
            return
        raise MissingState(f"no complete all-reduce round to rejoin in {self.kv.url}")

    def _move(self, r: int, why: str) -> None:
        self.st.step = r
        self.st.iteration, self.st.offset = divmod(r, self.steps_per_pass)
        self.st.resumes.append({why: r, "at": time.time()})
        self.behind, self.last_members = True, []


def _batches(items: list[Any], size: int) -> Iterator[list[Any]]:
    for i in range(0, len(items), max(1, size)):
        yield items[i:i + size]
