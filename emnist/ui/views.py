"""What the pages show, shaped from the sources' documents (pure functions, no I/O).

One run view for every kind of run, so the run and compare pages draw them alike:

- ``workers``: per worker (or peer, or benchmark record) its latest numbers, ``curve`` (test
  accuracy and loss per pass: ``[t, samples, iteration, accuracy, loss]``, ``t`` on the
  worker's own training clock) and ``live`` (``[t, samples_per_s, progress, store_bytes,
  push_retries, staleness, heartbeat_age]``, ``t`` in wall seconds since setup).
- ``events``: ``{t, worker, kind, text}`` on the wall-clock timeline (``approx`` when placed
  by interpolation).
- ``phases`` (p2p): the mean seconds per phase of each epoch over the peers.

Staleness is in clocks (pushes): how far a worker's last exchange is behind the freshest
worker's. Every string is passed on as data; the pages escape it (textContent).
"""

from __future__ import annotations

import bisect
import math
from datetime import datetime
from typing import Any

__all__ = ["bench_suite_view", "clean", "p2p_run_view", "run_list", "store_run_view"]

CONFIG_TEXT = 200  # longest config string shown
P2P_RUNNING_S = 120  # a p2p run without results whose files changed this recently is running
PHASES = (("compute", "compute_s"), ("send", "send_s"), ("receive", "recv_s"),
          ("update", "update_s"), ("barrier", "barrier_s"), ("validate", "val_s"))


def clean(obj: Any) -> Any:
    """JSON-safe: non-finite floats become null (a browser's JSON.parse refuses NaN)."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): clean(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [clean(v) for v in obj]
    return obj


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _config(cfg: Any) -> dict[str, Any]:
    if not isinstance(cfg, dict):
        return {}
    out = {}
    for k, v in sorted(cfg.items()):
        if isinstance(v, str):
            out[str(k)] = v[:CONFIG_TEXT]
        elif v is None or isinstance(v, bool | int | float):
            out[str(k)] = v
    return out


# -- the runs list -----------------------------------------------------------------------------

def run_list(store: list[dict[str, Any]], p2p: list[dict[str, Any]],
             suites: list[dict[str, Any]], now: float) -> list[dict[str, Any]]:
    """Every run the sources know, newest first: source, id, kind, state, model, dataset,
    workers, started, elapsed, accuracy."""
    rows = []
    for r in store:
        rows.append({"source": "store", "id": str(r.get("run_id", "")),
                     "kind": str(r.get("algorithm") or "downpour"),
                     "state": str(r.get("state", "unknown")), "model": r.get("model"),
                     "dataset": r.get("dataset"), "workers": r.get("workers"),
                     "started": _num(r.get("started")), "elapsed": _num(r.get("elapsed")),
                     "accuracy": _num(r.get("accuracy")), "reached": bool(r.get("reached"))})
    for r in p2p:
        rows.append({"source": "p2p", **_p2p_summary(r["run_id"], r["peers_records"],
                                                     r["mtime"], now)})
    for s in suites:
        rows.append({"source": "bench", **_suite_summary(s["suite"], s["records_list"])})
    rows.sort(key=lambda r: r.get("started") or 0, reverse=True)
    return rows


# -- Downpour / averaging runs (emnist-setup's detailed status) --------------------------------

def _curve(doc: dict[str, Any], steps: int, batch: int) -> list[list[Any]]:
    out = []
    for c in doc.get("curve") or []:
        if not isinstance(c, list) or len(c) < 3:
            continue
        t, it, acc = _num(c[0]), _num(c[1]), _num(c[2])
        if t is None or it is None:
            continue
        loss = _num(c[3]) if len(c) > 3 else None
        samples = _num(c[4]) if len(c) > 4 else it * steps * batch
        out.append([t, samples, it, acc, loss])
    if out and doc.get("done") and len(doc["curve"][-1]) <= 4 and _num(doc.get("samples")):
        out[-1][1] = _num(doc.get("samples"))  # the last point of a finished worker: exact
    return out


def _to_wall(doc: dict[str, Any], started: float) -> float:
    """Offset from the worker's training clock to wall seconds since setup (exact while one
    invocation runs: its last save holds both clocks)."""
    hb, secs = _num(doc.get("heartbeat")), _num(doc.get("seconds"))
    if hb and secs is not None:
        return hb - started - secs
    since = _num(doc.get("since_setup"))
    return since - secs if since is not None and secs is not None else 0.0


def _t_at_pass(curve: list[list[Any]], progress: float) -> float | None:
    """The worker-clock time at fractional pass ``progress``, interpolated on its curve."""
    pts = [(0.0, 0.0)] + [(c[2], c[0]) for c in curve]
    xs = [p[0] for p in pts]
    i = bisect.bisect_left(xs, progress)
    if i >= len(pts):
        return None
    if i == 0 or xs[i] == progress:
        return pts[i][1]
    (x0, t0), (x1, t1) = pts[i - 1], pts[i]
    return t0 + (t1 - t0) * (progress - x0) / (x1 - x0) if x1 > x0 else t1


def _ring(doc: dict[str, Any]) -> list[list[float]]:
    """A worker's bounded metrics ring (``series``), when its state keeps one: per save
    ``[wall time, step, samples, train_seconds, iteration, offset, bytes_fetched,
    bytes_pushed, push_retries, clock]``."""
    out = []
    for s in doc.get("series") or []:
        if isinstance(s, list) and len(s) >= 10 and all(_num(v) is not None for v in s[:10]):
            out.append([float(v) for v in s[:10]])
    return out


def _ring_points(ring: list[list[float]], rings: list[list[list[float]]], started: float,
                 steps: int) -> list[list[Any]]:
    """Live points from a ring; staleness against every worker's clock at the same time."""
    times = [[s[0] for s in r] for r in rings]
    out = []
    for t, _, samples, train_s, it, off, bf, bp, retries, clock in ring:
        top = clock
        for ts, r in zip(times, rings):
            i = bisect.bisect_right(ts, t) - 1
            if i >= 0:
                top = max(top, r[i][9])
        out.append([t - started, samples / train_s if train_s else 0.0,
                    it + (off / steps if steps else 0.0), bf + bp, retries, top - clock, None])
    return out


def _padded(items: Any, n: int) -> list[Any]:
    items = list(items or [])[:n]
    return items + [None] * (n - len(items))


def _store_worker(w: int, p: dict[str, Any], r: dict[str, Any] | None, ctx: dict[str, Any],
                  ring_live: list[list[Any]]) -> dict[str, Any]:
    """One worker's numbers, curve and live points (the result document wins once done)."""
    doc = {**p, **(r or {})}
    now, started, steps = ctx["now"], ctx["started"], ctx["steps"]
    hb = _num(p.get("heartbeat"))
    age = now - hb if hb else None
    state = ("done" if r is not None else "waiting" if not p else
             "stale" if age is not None and age > 3 * ctx["lease"] else "running")
    train_s = _num(doc.get("train_seconds")) or 0.0
    samples = _num(doc.get("samples")) or 0.0
    it, off = _num(doc.get("iteration")) or 0.0, _num(p.get("offset")) or 0.0
    pass_progress = it + (off / steps if steps else 0.0)
    clock = _num(doc.get("clock"))
    # a finished worker exchanges no more: its staleness and heartbeat no longer mean anything
    staleness = ctx["top"] - clock if clock is not None and r is None else None
    stored = (_num(doc.get("bytes_fetched")) or 0.0) + (_num(doc.get("bytes_pushed")) or 0.0)
    sps = samples / train_s if train_s else 0.0
    live = list(ring_live)
    finished = _num((r or {}).get("finished"))
    if p:
        at = finished if finished is not None else now
        live.append([at - started, sps, pass_progress, stored,
                     _num(doc.get("push_retries")) or 0.0, staleness,
                     age if r is None else None])
    out = {"id": w, "host": str(doc.get("hostname") or ""), "state": state,
           "stop_reason": str(doc.get("stop_reason") or ""), "iteration": it, "offset": off,
           "progress": pass_progress, "samples": samples, "train_seconds": train_s,
           "samples_per_s": sps, "accuracy": _num(doc.get("accuracy")),
           "loss": _num(doc.get("val_loss")), "reached": bool(doc.get("reached")),
           "clock": clock, "staleness": staleness, "heartbeat_age": age,
           "curve": _curve(doc, steps, ctx["batch"]), "live": live,
           "wall_offset": _to_wall(doc, started)}
    for name in ("step", "seconds", "bytes_fetched", "bytes_pushed", "bytes_skipped",
                 "fetches", "pushes", "push_retries", "averages", "invocations"):
        out[name] = _num(doc.get(name))
    return out


def _worker_events(worker: dict[str, Any], doc: dict[str, Any], r: dict[str, Any] | None,
                   ctx: dict[str, Any]) -> list[dict[str, Any]]:
    """Resumes (lease takeovers, retried calls), barrier timeouts and the stop of a worker."""
    w, started, events = worker["id"], ctx["started"], []
    for res in doc.get("resumes") or []:
        if isinstance(res, dict):
            at = _num(res.get("at"))
            where = (f"pass {int(_num(res.get('iteration')) or 0) + 1} at minibatch "
                     f"{int(_num(res.get('offset')) or 0)}")
            events.append({"t": at - started if at else None, "worker": w, "kind": "resume",
                           "text": f"worker {w} resumed in {where}, taking over from "
                                   f"{str(res.get('from') or '?')[:253]} (a lease takeover "
                                   "or a retried call)"})
    every, steps = ctx["average_every"], ctx["steps"]
    for bt in doc.get("barrier_timeouts") or []:
        if not isinstance(bt, dict):
            continue
        rnd = _num(bt.get("round"))
        tw = _t_at_pass(worker["curve"], rnd * every / steps) if rnd is not None and steps \
            else None
        missing = bt.get("missing")
        names = ", ".join(str(m) for m in missing[:16]) if isinstance(missing, list) else "?"
        events.append({"t": tw + worker["wall_offset"] if tw is not None else None,
                       "worker": w, "kind": "barrier timeout", "approx": True,
                       "text": f"worker {w}: averaging round {int(rnd or 0)} timed out "
                               f"waiting for workers {names}"})
    if r is not None:
        fin = _num(r.get("finished"))
        events.append({"t": fin - started if fin else None, "worker": w, "kind": "stop",
                       "text": f"worker {w} stopped: {str(r.get('stop_reason') or '?')}"})
    return events


def _run_events(status: dict[str, Any], results: list[Any], started: float
                ) -> list[dict[str, Any]]:
    """The run's stop signal and checkpoint restores."""
    events = []
    stop = status.get("stop")
    if isinstance(stop, dict):
        who = stop.get("worker_id")
        who = who if isinstance(who, int) and 0 <= who < len(results) else None
        res = results[who] if who is not None and isinstance(results[who], dict) else {}
        fin = _num(res.get("finished"))
        events.append({"t": fin - started if fin else None, "worker": who,
                       "kind": "stop signal",
                       "text": f"stop signal from worker {who}: {str(stop.get('reason') or '?')}"
                               f" at pass {stop.get('iteration')}, accuracy "
                               f"{stop.get('accuracy')}"})
    for rs in status.get("restores") or []:
        if isinstance(rs, dict):
            at = _num(rs.get("at"))
            events.append({"t": at - started if at else None, "worker": None,
                           "kind": "checkpoint restore",
                           "text": "run restored from its checkpoint into the store"})
    return events


def store_run_view(status: dict[str, Any]) -> dict[str, Any]:
    """A Downpour or averaging run from emnist-setup's ``GET ?run_id=ID&detail=1``."""
    cfg = status.get("config") if isinstance(status.get("config"), dict) else {}
    n = int(_num(status.get("workers")) or 0)
    progress, results = _padded(status.get("progress"), n), _padded(status.get("results"), n)
    progress = [p if isinstance(p, dict) else {} for p in progress]
    results = [r if isinstance(r, dict) else None for r in results]
    started = _num(status.get("started")) or 0.0
    clocks = [_num({**p, **(r or {})}.get("clock")) for p, r in zip(progress, results)]
    ctx = {"started": started, "now": _num(status.get("now")) or started,
           "steps": int(_num(status.get("steps_per_pass")) or 0),
           "batch": int(_num(cfg.get("batch_size")) or 0),
           "lease": _num(cfg.get("lease_seconds")) or 10.0,
           "average_every": _num(cfg.get("average_every")) or 0.0,
           "top": max((c for c in clocks if c is not None), default=0.0)}
    rings = [_ring(p) for p in progress]
    workers, events = [], []
    for w in range(n):
        ring_live = _ring_points(rings[w], rings, started, ctx["steps"])
        worker = _store_worker(w, progress[w], results[w], ctx, ring_live)
        workers.append(worker)
        events += _worker_events(worker, {**progress[w], **(results[w] or {})}, results[w],
                                 ctx)
    events += _run_events(status, results, started)
    events.sort(key=lambda e: (e["t"] is None, e["t"] or 0))
    done = bool(status.get("done"))
    fins = [_num(r.get("finished")) for r in results if r is not None]
    end = max((f for f in fins if f), default=None) if done else ctx["now"]
    return {"source": "store", "id": str(status.get("run_id", "")),
            "kind": str(cfg.get("algorithm") or "downpour"),
            "state": "done" if done else "running", "model": _model(cfg, status),
            "dataset": cfg.get("dataset"), "workers_count": n, "started": started,
            "elapsed": (end - started) if end else None, "now": ctx["now"],
            "target": _num(cfg.get("target_accuracy")), "config": _config(cfg),
            "workers": workers, "events": events, "phases": []}


def _model(cfg: dict[str, Any], status: dict[str, Any]) -> str:
    if isinstance(cfg.get("model"), str) and cfg["model"] and cfg["model"] != "mlp":
        return cfg["model"][:64]
    return f"mlp {cfg.get('pixels_per_image')}-{cfg.get('hidden_size')}-" \
           f"{status.get('num_classes')}"


# -- p2p runs (metrics files) ------------------------------------------------------------------

def _p2p_parts(peers: dict[int, list[dict[str, Any]]]) -> tuple[dict, dict, dict, dict]:
    starts = {r: next((x for x in recs if x.get("kind") == "start"), None)
              for r, recs in peers.items()}
    epochs = {r: [x for x in recs if x.get("kind") == "epoch"] for r, recs in peers.items()}
    ends = {r: next((x for x in reversed(recs) if x.get("kind") == "result"), None)
            for r, recs in peers.items()}
    first = next((s for s in starts.values() if s), None) or {}
    return starts, epochs, ends, first


def _p2p_summary(run_id: str, peers: dict[int, list[dict[str, Any]]], mtime: float,
                 now: float) -> dict[str, Any]:
    starts, epochs, ends, first = _p2p_parts(peers)
    cfg = first.get("config") if isinstance(first.get("config"), dict) else {}
    done = bool(peers) and all(ends.values())
    ts = [_num(e.get("t")) for es in epochs.values() for e in es] + \
         [_num(e.get("t")) for e in ends.values() if e]
    accs = [_num(e.get("test_accuracy")) for es in epochs.values() for e in es]
    return {"id": run_id, "kind": "serverless p2p" if cfg.get("serverless") else "p2p",
            "state": "done" if done else "running" if now - mtime < P2P_RUNNING_S
            else "incomplete",
            "model": f"mlp {cfg.get('hidden')} hidden ({first.get('params')} params)",
            "dataset": str(cfg.get("data") or "").rstrip("/").rsplit("/", 1)[-1][:64],
            "workers": len(peers), "started": _num(first.get("time")),
            "elapsed": max((t for t in ts if t is not None), default=None),
            "accuracy": max((a for a in accs if a is not None), default=None),
            "reached": any(bool(e and e.get("reached")) for e in ends.values())}


def p2p_run_view(run_id: str, peers: dict[int, list[dict[str, Any]]], mtime: float,
                 now: float) -> dict[str, Any]:
    """A p2p run from its peers' metrics records."""
    starts, epochs, ends, first = _p2p_parts(peers)
    summary = _p2p_summary(run_id, peers, mtime, now)
    cfg = first.get("config") if isinstance(first.get("config"), dict) else {}
    per_epoch = (_num(first.get("batches")) or 0.0) * (_num(cfg.get("batch_size")) or 0.0)
    workers, events = [], []
    for rank in sorted(peers):
        es, end = epochs[rank], ends[rank]
        curve, live, sent, prev_t = [], [], 0.0, 0.0
        for e in es:
            t, ep = _num(e.get("t")) or 0.0, _num(e.get("epoch")) or 0.0
            curve.append([t, ep * per_epoch, ep, _num(e.get("test_accuracy")),
                          _num(e.get("val_loss"))])
            sent += _num(e.get("bytes_sent")) or 0.0
            dt = t - prev_t
            live.append([t, per_epoch / dt if dt > 0 else None, ep, sent, None, None, None])
            prev_t = t
        last = es[-1] if es else {}
        acc = _num((end or {}).get("test_accuracy"))
        workers.append({
            "id": rank, "host": "", "state": "done" if end else summary["state"],
            "stop_reason": str((end or {}).get("reason") or ""),
            "iteration": _num(last.get("epoch")), "progress": _num(last.get("epoch")),
            "samples": (_num(last.get("epoch")) or 0.0) * per_epoch,
            "accuracy": acc if acc is not None else _num(last.get("test_accuracy")),
            "loss": _num(last.get("val_loss")), "reached": bool((end or {}).get("reached")),
            "bytes_pushed": sent, "samples_per_s": live[-1][1] if live else None,
            "curve": curve, "live": live, "wall_offset": 0.0})
        if end:
            text = f"peer {rank} stopped: {str(end.get('reason') or '?')}"
            if end.get("error"):
                text += f" ({str(end['error'])[:300]})"
            events.append({"t": _num(end.get("t")), "worker": rank, "kind": "stop",
                           "text": text})
    phases = []
    for ep in sorted({int(_num(e.get("epoch")) or 0) for es in epochs.values() for e in es}):
        rows = [e for es in epochs.values() for e in es if _num(e.get("epoch")) == ep]
        phases.append({"epoch": ep, **{name: sum(_num(e.get(key)) or 0.0 for e in rows)
                                      / len(rows) for name, key in PHASES}})
    return {"source": "p2p", **summary, "workers_count": summary["workers"],
            "target": _num(cfg.get("target_accuracy")), "config": _config(cfg),
            "now": now, "workers": workers, "events": events, "phases": phases}


# -- benchmark suites (results files) ----------------------------------------------------------

def _iso(value: Any) -> float | None:
    try:
        return datetime.fromisoformat(str(value)).timestamp()
    except ValueError:
        return None


def _suite_summary(name: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    ok = [r for r in records if not r.get("error")]
    starts = [t for t in (_iso(r.get("started")) for r in records) if t is not None]
    counts = sorted({int(r["workers"]) for r in records if isinstance(r.get("workers"), int)})
    accs = [_num(w.get("accuracy")) for r in ok for w in r.get("results") or []
            if isinstance(w, dict)]
    return {"id": name, "kind": "benchmark suite",
            "state": f"{len(ok)} runs" + (f", {len(records) - len(ok)} failed"
                                          if len(ok) < len(records) else ""),
            "model": "", "dataset": ",".join(sorted({str(r.get("dataset")) for r in ok
                                                     if r.get("dataset")}))[:64],
            "workers": "-".join(str(c) for c in (counts[0], counts[-1]) if counts)
            if len(counts) > 1 else (counts[0] if counts else None),
            "started": min(starts, default=None),
            "elapsed": sum(_num(r.get("seconds")) or 0.0 for r in ok),
            "accuracy": max((a for a in accs if a is not None), default=None),
            "reached": any(r.get("reached") for r in ok)}


def bench_suite_view(name: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    """A benchmark suite: one row per recorded run, each worker's curve as a line."""
    summary = _suite_summary(name, records)
    rows, workers = [], []
    for r in records:
        res = [w for w in r.get("results") or [] if isinstance(w, dict)]
        rows.append({"stack": str(r.get("stack", "")), "batch_size": r.get("batch_size"),
                     "workers": r.get("workers"), "round": r.get("round"),
                     "run_id": str(r.get("run_id") or ""), "seconds": _num(r.get("seconds")),
                     "reached": bool(r.get("reached")), "error": str(r.get("error") or ""),
                     "accuracy": max((a for a in (_num(w.get("accuracy")) for w in res)
                                      if a is not None), default=None)})
        for w in res:
            curve = []
            for c in w.get("curve") or []:
                if isinstance(c, list) and len(c) >= 3 and _num(c[0]) is not None:
                    curve.append([_num(c[0]), None, _num(c[1]), _num(c[2]), None])
            workers.append({"id": f"{r.get('stack')} r{r.get('round')} w{w.get('worker_id')}",
                            "host": str(w.get("hostname") or ""), "state": "done",
                            "stop_reason": str(w.get("stop_reason") or ""),
                            "iteration": _num(w.get("iterations")),
                            "accuracy": _num(w.get("accuracy")),
                            "samples_per_s": _num(w.get("samples_per_s")),
                            "seconds": _num(w.get("seconds")), "curve": curve, "live": [],
                            "run_id": str(r.get("run_id") or "")})
    return {"source": "bench", **summary, "workers_count": len(workers), "now": None,
            "target": next((_num(r.get("target")) for r in records if r.get("target")), None),
            "config": {}, "workers": workers, "events": [], "phases": [], "records": rows}
