"""Synchronous parameter averaging: every ``average_every`` minibatches each worker publishes
its parameters, waits at a barrier kept in the store, and continues from the average.

Rounds are numbered by step (every worker does the same number of minibatches per pass), so
round r of one worker meets round r of the others. A barrier that times out proceeds with the
workers present and records who was missing; a worker that missed a round is not waited for
again (it joins any later round it reaches in time), so one dead worker costs one timeout, not
one per round. A worker that (re)starts behind the others jumps to the newest round.

A round is the sync point: the worker's progress is recorded after each one (its vector is in
the store), and a worker resumed at its last round takes that round's average again and redoes
the minibatches since (same order, same dropout masks). A pass end between rounds records
nothing new: this worker's minibatches since its last round are only in its own memory.

Big vectors move in the store's round-trip batches (``ParameterStore.batches``): a round
writes this worker's vector batch by batch, and the average is taken one batch of chunks at
a time (every member's copy of those chunks in one round trip, summed in worker order into a
batch-sized buffer), so no whole-vector temporary exists and the bits are those of the
whole-vector sum.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np

from emnist.store import ParameterStore, codec
from emnist.train.config import TrainConfig
from emnist.train.state import (
    Progress,
    WorkerState,
    require_finite,
    round_number,
    stop_signal,
)

KEEP_ROUNDS = 3  # a worker deletes its own round r - KEEP_ROUNDS when it publishes round r


class Averaging:
    def __init__(self, store: ParameterStore, cfg: TrainConfig, st: WorkerState, workers: int,
                 progress: Progress, tick: Callable[[], None]) -> None:
        self.store, self.st, self.me, self.progress = store, st, st.worker_id, progress
        self.every, self.timeout = cfg.average_every, cfg.barrier_timeout
        self.others = [w for w in range(workers) if w != self.me]
        self.tick = tick  # keeps the worker's lease alive while it waits
        self.suspect: set[int] = set()
        self.stop: dict[str, Any] | None = None

    def _keys(self, r: int, w: int) -> list[str]:
        return [self.store.key("avg", r, w, i) for i in range(len(self.store.bounds))]

    def _marker(self, r: int, w: int) -> str:
        return self.store.key("avgdone", r, w)

    # -- the worker loop's interface ------------------------------------------------------
    def after_step(self, params: np.ndarray, step: int, offset: int) -> None:
        if step % self.every == 0:
            self.average(params, step // self.every)
            self.progress.note_now()

    @property
    def synced(self) -> bool:
        """After ``end_iteration``: the pass ended on a round (else the minibatches since the
        last round are only in this worker's memory)."""
        return self.st.step % self.every == 0

    def end_iteration(self, params: np.ndarray) -> None:
        """Publish the pass's model as the run's global vector (checkpoints, resume)."""
        if all(w > self.me or w in self.suspect for w in self.others):  # lowest live id
            check_finite(params)
            self.store.put(params)

    def close(self) -> None:
        pass

    def rejoin(self, params: np.ndarray, steps_per_pass: int) -> None:
        """A worker that starts behind the newest round, or at it (its state is recorded at
        rounds), takes that round's average (skipping to it)."""
        r = round_number(self.store.get_doc("avglatest"))
        if r is None or r * self.every < self.st.step:
            return
        self.st.step = r * self.every
        self.st.iteration, self.st.offset = divmod(self.st.step, steps_per_pass)
        present = [w for w in range(len(self.others) + 1)
                   if self._marker(r, w) in self.store.kv.get_many([self._marker(r, w)])]
        if present:
            self._average_into(params, r, present, include_me=False)
        self.st.resumes.append({"rejoined_round": r, "at": time.time()})
        self.progress.save_now()

    # -- one round ------------------------------------------------------------------------
    def average(self, params: np.ndarray, r: int) -> None:
        check_finite(params)
        kv = self.store.kv
        mine = self._keys(r, self.me)
        batches = self.store.batches()
        for j, batch in enumerate(batches):
            values = {mine[i]: codec.encode(params[slice(*self.store.bounds[i])]) for i in batch}
            if j == len(batches) - 1:  # the marker last: a reader that sees it sees it all
                values[self._marker(r, self.me)] = codec.encode_doc({"round": r})
            kv.set_many(values)
        if r > KEEP_ROUNDS:
            kv.delete_many(self._keys(r - KEEP_ROUNDS, self.me)
                           + [self._marker(r - KEEP_ROUNDS, self.me)])
        markers = {self._marker(r, w): w for w in self.others}
        stop_key = self.store.key("stop")
        deadline = time.monotonic() + self.timeout
        last_tick = time.monotonic()
        while True:
            got = kv.get_many([*markers, stop_key])
            present = sorted(w for k, w in markers.items() if k in got)
            if stop_key in got:
                self.stop = stop_signal(codec.decode_doc(stop_key, got[stop_key]))
            waiting = [w for w in self.others if w not in present and w not in self.suspect]
            if not waiting:
                break
            now = time.monotonic()
            if now > deadline:
                self.st.barrier_timeouts.append({"round": r, "missing": waiting,
                                                 "after_s": self.timeout})
                self.suspect.update(waiting)
                break
            if now - last_tick > 0.5:
                self.tick()
                last_tick = now
            time.sleep(0.0005)
        self.suspect.difference_update(present)
        self._average_into(params, r, present, include_me=True)
        self.st.averages += 1
        self.store.put_doc("avglatest", {"round": r})

    def _average_into(self, params: np.ndarray, r: int, workers: list[int],
                      include_me: bool) -> None:
        """params = mean of the workers' round-r vectors, summed in worker order (so every
        worker that saw the same workers computes the same bits)."""
        members = sorted({*workers, self.me} if include_me else set(workers))
        # with include_me, this worker's vector is params; else (a rejoin) every member's,
        # its own round-r vector included, is read from the store
        stored = [w for w in members if not (include_me and w == self.me)]
        keys = {w: self._keys(r, w) for w in stored}
        bounds = self.store.bounds
        scale = np.float32(1.0 / len(members))
        for batch in self.store.batches(share=len(stored)):
            lo, hi = bounds[batch[0]][0], bounds[batch[-1]][1]
            wanted = [keys[w][i] for w in stored for i in batch]
            got = self.store.kv.get_many(wanted) if wanted else {}
            total = np.zeros(hi - lo, dtype=params.dtype)
            for w in members:
                if include_me and w == self.me:
                    total += params[lo:hi]
                    continue
                for i in batch:
                    k, (a, b) = keys[w][i], bounds[i]
                    total[a - lo:b - lo] += codec.decode(k, got.get(k), dtype=np.float32,
                                                         shape=(b - a,)).array
            np.multiply(total, scale, out=params[lo:hi])
        self.st.bytes_fetched += 4 * params.size * (len(members) - int(include_me))
        self.st.bytes_pushed += 4 * params.size


def check_finite(params: np.ndarray) -> None:
    require_finite(params, "the parameters to average are")
