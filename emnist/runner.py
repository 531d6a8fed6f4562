"""Drive a training run through the gateway: start it with emnist-setup, watch, collect.

Everything goes through the OpenFaaS gateway API (the setup function answers status queries
from the store), so the same code watches a run on the local gateway and on a cluster whose
store the user's machine cannot reach. No request names a store: the functions use the one
their deployment configures.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from emnist.gateway.client import GatewayClient, GatewayError
from emnist.wait import wait_until

SETUP, TRAIN = "emnist-setup", "emnist-train"


class RunError(RuntimeError):
    pass


class RunLost(RunError):
    """The store no longer knows the run (e.g. memcached restarted)."""


@dataclass
class RunOutcome:
    run_id: str
    workers: int
    invoked_at: float  # wall clock when setup was invoked
    results: list[dict[str, Any]] = field(default_factory=list)
    target: float = 0.0
    state: dict[str, Any] = field(default_factory=dict)
    recoveries: list[str] = field(default_factory=list)

    @property
    def reached(self) -> bool:
        return any(r.get("reached") for r in self.results)

    @property
    def seconds(self) -> float:
        """Setup invocation to the last worker's end (same-machine wall clocks)."""
        ends = [r["finished"] for r in self.results if r.get("finished")]
        return max(ends) - self.invoked_at if ends else float("nan")


def wait_replicas(gw: GatewayClient, name: str, n: int, timeout: float = 60) -> None:
    """Until ``name`` has exactly ``n`` replicas, all available."""
    def ready() -> bool:
        fn = gw.get_function(name)
        return bool(fn) and fn.get("availableReplicas", 0) >= n and fn.get("replicas", 0) == n

    wait_until(ready, timeout, f"{name} did not reach {n} available replicas in {timeout:.0f}s",
               interval=0.1, error=RunError)


def start_run(gw: GatewayClient, config: dict[str, Any]) -> tuple[dict[str, Any], float]:
    invoked = time.time()
    resp = gw.invoke(SETUP, config, timeout=120, check=False)
    body = _json(resp)
    if resp.status_code != 200:
        raise RunError(f"{SETUP} answered {resp.status_code}: {body.get('error', resp.text)}")
    return body, invoked


def status(gw: GatewayClient, run_id: str) -> dict[str, Any]:
    """A run's progress, read by emnist-setup from the store its deployment names."""
    resp = gw.invoke(SETUP, None, method="GET", query={"run_id": run_id}, timeout=30,
                     check=False)
    body = _json(resp)
    if resp.status_code == 404:
        raise RunLost(f"status of {run_id}: {body.get('error', resp.text)}")
    if resp.status_code != 200:
        raise RunError(f"status of {run_id}: {resp.status_code} {body.get('error', resp.text)}")
    return body


QUEUED_NOTE_AFTER = 5.0  # seconds a worker may wait for its call before the user is told
QUEUED_NOTE = ("workers {workers} have not started after {seconds:.0f}s while {running} "
               "train: their calls wait in the gateway's async queue. On OpenFaaS CE each "
               "queue-worker runs one call at a time, so workers train one after another: "
               "run queue-worker replicas >= workers, ack_wait and the gateway's timeouts "
               "above a call's length, or a dedicated queue (docs/deploy.md)")


QUEUED_PASSES = 2  # passes another worker trained while one never started: a serial queue


def queued_note(st: dict[str, Any], waited: float) -> str | None:
    """Why some workers have no state yet while others train (a serialising queue), or
    None: said after QUEUED_NOTE_AFTER seconds, or as soon as another worker has trained
    QUEUED_PASSES passes (concurrent workers start within a pass of each other)."""
    waiting = [w for w, p in enumerate(st["progress"]) if p is None and st["results"][w] is None]
    running = [w for w, p in enumerate(st["progress"]) if p is not None]
    ahead = max((p.get("iteration") or 0 for p in st["progress"] if p), default=0)
    if not waiting or not running or (waited < QUEUED_NOTE_AFTER and ahead < QUEUED_PASSES):
        return None
    return QUEUED_NOTE.format(workers=waiting, seconds=waited,
                              running=f"worker{'s' if len(running) > 1 else ''} {running}")


def _lost_calls(st: dict[str, Any], grace: float) -> list[int]:
    """Workers that never started although every worker that did has finished ``grace``
    seconds ago: a queue that ran their calls in turn is free by then, so their calls were
    lost (a replica killed before the worker saved anything), not queued."""
    started = [w for w, p in enumerate(st["progress"]) if p is not None]
    if not started or any(st["results"][w] is None for w in started):
        return []
    last = max(float((st["results"][w] or {}).get("finished") or 0.0) for w in started)
    if st["now"] - last <= grace:
        return []
    return [w for w, p in enumerate(st["progress"]) if p is None and st["results"][w] is None]


def _failures(st: dict[str, Any]) -> list[tuple[int, dict[str, Any]]]:
    """Workers without a result whose last call failed after their last heartbeat."""
    out = []
    for w, failure in enumerate(st.get("errors") or []):
        beat = (st["progress"][w] or {}).get("heartbeat") or 0.0
        if failure and st["results"][w] is None and failure["at"] > beat:
            out.append((w, failure))
    return out


def watch(gw: GatewayClient, state: dict[str, Any], invoked: float, *, timeout: float,
          interval: float = 0.25,
          on_status: Callable[[dict[str, Any]], None] | None = None,
          on_note: Callable[[str], None] | None = None,
          recover: bool = True, max_recoveries: int = 5) -> RunOutcome:
    """Poll until every worker has a result, or fail after ``timeout`` seconds.

    With ``recover``: a run the store lost is restored from its checkpoint (emnist-setup
    resume), and a worker whose heartbeat went stale (its replica died and nobody retried
    the call) is invoked again; it resumes from its saved state. A worker with no state at
    all is not invoked again while others train: its call may only be queued (OpenFaaS CE
    runs one call per queue-worker), and a second one would be a third delivery; ``on_note``
    hears why it waits, once. Once every started worker has finished, a queue would have
    run it: its call was lost, and it is invoked again.
    """
    run_id, config = state["run_id"], state["config"]
    lease = float(config.get("lease_seconds", 10.0))
    deadline = time.monotonic() + timeout
    recoveries: list[str] = []
    relaunched: dict[int, float] = {}
    seen, transient, noted = False, 0, False
    watching_since, started = time.time(), time.monotonic()
    while True:
        try:
            st = status(gw, run_id)
            seen, transient = True, 0
        except RunLost as e:
            first_init = config.get("execution_type") == 1 and not seen
            if first_init and time.monotonic() < deadline:  # type 1: not initialised yet
                time.sleep(interval)
                continue
            if not (recover and config.get("checkpoint_url")) or len(recoveries) >= max_recoveries:
                raise
            resume(gw, run_id, config["checkpoint_url"])
            recoveries.append(f"{time.time():.3f} restored from checkpoint: {e}")
            watching_since = time.time()
            continue
        except RunError:  # e.g. the store is restarting: the setup replica answered 502
            transient += 1
            if transient > 20 or time.monotonic() > deadline:
                raise
            time.sleep(interval)
            continue
        if on_status:
            on_status(st)
        if st["done"]:
            return RunOutcome(run_id, st["workers"], invoked, st["results"],
                              st["config"]["target_accuracy"], state, recoveries)
        note = None if noted else queued_note(st, time.monotonic() - started)
        if note and on_note:
            on_note(note)
            noted = True
        def due(w: int) -> bool:  # not invoked again within the last 3 leases
            return time.monotonic() - relaunched.get(w, -1e9) > 3 * lease

        def relaunch(w: int, why: str) -> None:
            relaunched[w] = time.monotonic()
            gw.invoke_async(TRAIN, {"run_id": run_id, "worker_id": w})
            recoveries.append(f"{time.time():.3f} relaunched {why} worker {w}")

        for w, failure in _failures(st):
            if not failure["retry"]:
                raise RunError(f"run {run_id}: worker {w} failed: {failure['error']} (see "
                               f"`emnist logs {TRAIN}`)")
            if recover and st["progress"][w] is None and due(w):
                if len(recoveries) >= max_recoveries:
                    raise RunError(f"run {run_id}: worker {w} failed again: "
                                   f"{failure['error']}")
                relaunch(w, "failed")  # its call failed before it saved: retry
        if recover:
            for w in _lost_calls(st, 3 * lease):
                if due(w):
                    relaunch(w, "never-started")
            for w, p in enumerate(st["progress"]):
                if st["results"][w] is not None or p is None:
                    continue  # p None: never started (queued), or the store lost it
                last = p.get("heartbeat") or watching_since
                stale = not p.get("done") and st["now"] - last > 3 * lease
                if stale and due(w):
                    relaunch(w, "stale")
        if time.monotonic() > deadline:
            missing = [w for w, r in enumerate(st["results"]) if r is None]
            raise RunError(f"run {run_id}: workers {missing} had no result after {timeout:.0f}s "
                           f"(see `emnist logs {TRAIN}`)")
        time.sleep(interval)


def resume(gw: GatewayClient, run_id: str,
           checkpoint_url: str | None = None) -> tuple[dict[str, Any], float]:
    """emnist-setup's resume: relaunch unfinished workers, restoring a lost run first."""
    body = {"resume": run_id, **({"checkpoint_url": checkpoint_url} if checkpoint_url else {})}
    return start_run(gw, body)


def _json(resp) -> dict[str, Any]:
    try:
        body = resp.json()
    except ValueError:
        return {"error": resp.text.strip() or f"empty {resp.status_code} response"}
    return body if isinstance(body, dict) else {"error": str(body)}


__all__ = ["GatewayError", "RunError", "RunLost", "RunOutcome", "resume", "start_run", "status",
           "wait_replicas", "watch"]
