"""The virtual clock: an event heap, generator processes, FIFO resources and shared CPUs.

Everything in a simulation happens at a virtual time taken from a heap; ties keep the order
in which they were scheduled (a sequence number), so a run is deterministic. Nothing here
sleeps or reads a wall clock: a process that "computes for 0.6 ms" is resumed 0.6 ms of
virtual time later, whatever the real math beside it cost.

- :class:`Loop`: the heap. ``at(t, fn, arg)``; time never goes back (checked).
- :class:`Proc`: a generator driven by the loop. It yields a number (sleep that many virtual
  seconds) or a callable ``op(proc)`` that arranges ``proc.resume(value)`` later; ``yield``
  returns that value. Workers, peers and syncers are processes.
- :class:`Fifo`: a first-come-first-served resource (a server's NIC + CPU, a node's link):
  ``reserve(duration)`` returns when the request starts and ends. Requests reach it in time
  order (each arrival is an event), so a scalar "free at" is the whole queue.
- :class:`CPU`: processor sharing over ``cores`` at relative ``speed``: with n jobs each
  progresses at ``speed * min(1, cores / n)`` (several workers, or workers and functions, on
  one node share its cores; a worker waiting on the network uses none). Kept in work units
  (a "virtual work clock"), so adding or finishing a job is O(log n), not O(n).
- :class:`CoreCPU`: the same cores as Linux runs them: a job that becomes runnable goes to
  the core with the fewest jobs and stays there, sharing that core with its neighbours. With
  no more jobs than cores it is :class:`CPU`; with more it is not work conserving: three
  barrier-synchronised processes on two cores take two step times a step, not 1.5 (measured
  here: 16.5 ms for a 7.9 ms lenet5 step, docs/sim.md).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Generator
from typing import Any

Op = Callable[["Proc"], None]
ProcGen = Generator[Any, Any, Any]


class Loop:
    def __init__(self) -> None:
        self.now = 0.0
        self.events = 0
        self._heap: list[tuple[float, int, Callable[[Any], None], Any]] = []
        self._seq = 0

    def at(self, t: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        """Run ``fn(arg)`` at virtual time ``t`` (>= now)."""
        if not t >= self.now:  # also refuses NaN
            raise ValueError(f"event at {t!r} is before now ({self.now!r})")
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, fn, arg))

    def after(self, dt: float, fn: Callable[[Any], None], arg: Any = None) -> None:
        self.at(self.now + dt, fn, arg)

    def spawn(self, gen: ProcGen, name: str = "", on_exit: Callable[[Proc], None] | None = None,
              delay: float = 0.0) -> Proc:
        p = Proc(self, gen, name, on_exit)
        self.after(delay, p.resume)
        return p

    def run(self, until: float = math.inf, stop: Callable[[], bool] | None = None,
            max_events: int | None = None) -> None:
        """Process events in time order until none is left, ``until``, ``stop()`` or
        ``max_events``."""
        heap, pop = self._heap, heapq.heappop
        limit = math.inf if max_events is None else self.events + max_events
        while heap and self.events < limit:
            if heap[0][0] > until:
                self.now = until
                return
            t, _, fn, arg = pop(heap)
            self.now = t
            fn(arg)
            self.events += 1
            if stop is not None and stop():
                return

    @property
    def pending(self) -> int:
        return len(self._heap)


class Proc:
    """A generator process: yields a float (sleep) or an ``op(proc)``; resumed with a value."""

    __slots__ = ("loop", "gen", "name", "done", "result", "on_exit")

    def __init__(self, loop: Loop, gen: ProcGen, name: str = "",
                 on_exit: Callable[[Proc], None] | None = None) -> None:
        self.loop, self.gen, self.name, self.on_exit = loop, gen, name, on_exit
        self.done, self.result = False, None

    def resume(self, value: Any = None) -> None:
        """Continue the generator now with ``value`` (as the result of its last yield)."""
        try:
            op = self.gen.send(value)
        except StopIteration as e:
            self.done, self.result = True, e.value
            if self.on_exit is not None:
                self.on_exit(self)
            return
        if isinstance(op, (int, float)):
            if op < 0 or op != op:
                raise ValueError(f"{self.name}: cannot sleep {op!r} s")
            self.loop.at(self.loop.now + op, self.resume)
        else:
            op(self)

    def resume_at(self, t: float, value: Any = None) -> None:
        self.loop.at(t, self.resume, value)


class Fifo:
    """First come, first served: one request at a time (queueing statistics included)."""

    __slots__ = ("name", "free_at", "busy", "waited", "max_wait", "requests", "bytes")

    def __init__(self, name: str) -> None:
        self.name = name
        self.free_at = 0.0
        self.busy = 0.0  # seconds serving
        self.waited = 0.0  # seconds requests spent queued, summed
        self.max_wait = 0.0
        self.requests = 0
        self.bytes = 0

    def reserve(self, now: float, duration: float, nbytes: int = 0) -> tuple[float, float]:
        """A request arriving at ``now`` for ``duration`` s: its (start, end)."""
        start = self.free_at if self.free_at > now else now
        wait = start - now
        self.waited += wait
        if wait > self.max_wait:
            self.max_wait = wait
        self.free_at = start + duration
        self.busy += duration
        self.requests += 1
        self.bytes += nbytes
        return start, self.free_at

    def stats(self, horizon: float) -> dict[str, float]:
        """Counters as of ``horizon`` (work already queued beyond it is not counted busy)."""
        busy = max(0.0, self.busy - max(0.0, self.free_at - horizon))
        return {"requests": self.requests, "bytes": self.bytes,
                "busy_s": busy, "utilisation": busy / horizon if horizon else 0.0,
                "queue_wait_mean_s": self.waited / self.requests if self.requests else 0.0,
                "queue_wait_max_s": self.max_wait,
                "bytes_per_s": self.bytes / horizon if horizon else 0.0}


class CPU:
    """Processor sharing: ``run(work, fn)`` calls ``fn()`` once ``work`` core-seconds (at
    speed 1) are done, each of the n running jobs getting ``speed * min(1, cores / n)``."""

    def __init__(self, loop: Loop, cores: float, speed: float = 1.0, name: str = "") -> None:
        if cores <= 0 or speed <= 0:
            raise ValueError("cores and speed must be > 0")
        self.loop, self.cores, self.speed, self.name = loop, cores, speed, name
        self.work = 0.0  # work done per job since the start (all running jobs advance alike)
        self.t = 0.0
        self.jobs: list[tuple[float, int, Callable[[], None]]] = []  # (work at finish, seq, fn)
        self._seq = 0
        self._version = 0
        self.busy = 0.0  # core-seconds in use

    def _rate(self) -> float:
        n = len(self.jobs)
        return self.speed * min(1.0, self.cores / n) if n else 0.0

    def _advance(self) -> None:
        now = self.loop.now
        dt = now - self.t
        if dt > 0 and self.jobs:
            self.work += dt * self._rate()
            self.busy += dt * min(len(self.jobs), self.cores)
        self.t = now

    def run(self, work: float, fn: Callable[[], None]) -> None:
        self._advance()
        self._seq += 1
        heapq.heappush(self.jobs, (self.work + max(0.0, work), self._seq, fn))
        self._schedule()

    def op(self, work: float) -> Op:
        """A process op: resume after ``work`` core-seconds on this CPU."""
        def start(p: Proc) -> None:
            self.run(work, p.resume)
        return start

    def _schedule(self) -> None:
        self._version += 1
        if self.jobs:
            left = self.jobs[0][0] - self.work
            self.loop.at(self.loop.now + max(0.0, left) / self._rate(), self._fire,
                         self._version)

    def _fire(self, version: int) -> None:
        if version != self._version:
            return  # a job arrived or left since this was scheduled
        self._advance()
        done = []
        eps = 1e-12 * max(1.0, abs(self.work))
        while self.jobs and self.jobs[0][0] <= self.work + eps:
            done.append(heapq.heappop(self.jobs)[2])
        if not done:  # rounding left a sliver: take the first job anyway
            done.append(heapq.heappop(self.jobs)[2])
        self._schedule()
        for fn in done:
            fn()

    @property
    def running(self) -> int:
        return len(self.jobs)


class _Core:
    """One core of a :class:`CoreCPU`: processor sharing among its own jobs."""

    __slots__ = ("jobs", "work")

    def __init__(self) -> None:
        self.work = 0.0
        self.jobs: list[tuple[float, int, Callable[[], None]]] = []


class CoreCPU:
    """Per-core run queues: ``run(work, fn)`` places the job on the core with the fewest jobs
    (the lowest index on a tie); a core's n jobs each get ``speed * f / n``, where ``f`` is
    ``min(1, cores / busy cores)`` so a fractional ``cores`` (the share of the machine load
    leaves) caps the total as :class:`CPU` does. Jobs never migrate: Linux keeps a running
    task on its CPU, and a barrier's waiters sleeping frees a core rather than rebalancing
    the others."""

    def __init__(self, loop: Loop, cores: float, speed: float = 1.0, name: str = "") -> None:
        if cores <= 0 or speed <= 0:
            raise ValueError("cores and speed must be > 0")
        self.loop, self.cores, self.speed, self.name = loop, cores, speed, name
        self.per_core = [_Core() for _ in range(max(1, math.ceil(cores - 1e-9)))]
        self.t = 0.0
        self._seq = 0
        self._version = 0
        self.busy = 0.0
        self.busy_cores = 0

    def _share(self) -> float:
        n = self.busy_cores
        return self.speed * min(1.0, self.cores / n) if n else 0.0

    def _advance(self) -> None:
        now = self.loop.now
        dt = now - self.t
        if dt > 0 and self.busy_cores:
            step = dt * self._share()
            for c in self.per_core:
                if c.jobs:
                    c.work += step / len(c.jobs)
            self.busy += dt * min(self.busy_cores, self.cores)
        self.t = now

    def run(self, work: float, fn: Callable[[], None]) -> None:
        self._advance()
        self._seq += 1
        core = min(self.per_core, key=lambda c: len(c.jobs))
        self.busy_cores += not core.jobs
        heapq.heappush(core.jobs, (core.work + max(0.0, work), self._seq, fn))
        self._schedule()

    op = CPU.op

    def _schedule(self) -> None:
        self._version += 1
        share = self._share()
        soonest = math.inf
        for c in self.per_core:
            if c.jobs:
                left = max(0.0, c.jobs[0][0] - c.work)
                soonest = min(soonest, left * len(c.jobs) / share)
        if soonest < math.inf:
            self.loop.at(self.loop.now + soonest, self._fire, self._version)

    def _fire(self, version: int) -> None:
        if version != self._version:
            return
        self._advance()
        done = []
        for c in self.per_core:
            eps = 1e-12 * max(1.0, abs(c.work))
            while c.jobs and c.jobs[0][0] <= c.work + eps:
                done.append(heapq.heappop(c.jobs))
                self.busy_cores -= not c.jobs
        if not done:  # rounding left a sliver: take the nearest job anyway
            c = min((c for c in self.per_core if c.jobs),
                    key=lambda c: (c.jobs[0][0] - c.work) * len(c.jobs))
            done.append(heapq.heappop(c.jobs))
            self.busy_cores -= not c.jobs
        self._schedule()
        for _, _, fn in sorted(done, key=lambda j: j[1]):
            fn()

    @property
    def running(self) -> int:
        return sum(len(c.jobs) for c in self.per_core)


def make_cpu(loop: Loop, cores: float, speed: float, name: str,
             placement: str = "per-core") -> CPU | CoreCPU:
    """A node's cores: ``per-core`` (how Linux places processes) or ``shared`` (ideal
    processor sharing, the fluid limit)."""
    return (CoreCPU if placement == "per-core" else CPU)(loop, cores, speed, name)
