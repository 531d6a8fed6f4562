"""Turn p2p runs' metrics into a comparison table and PNG plots (matplotlib: the `plot` extra).

One row per run: the variant (peers, serverless or not, broker, compression), time to the
target, and the mean time per epoch by phase over peers and epochs.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emnist.bench.results import format_table
from emnist.p2p.metrics import PHASES, read_run

COLUMNS = [
    ("variant", "variant", ""),
    ("compression", "compression", ""),
    ("broker", "broker", ""),
    ("peers", "peers", ""),
    ("batches", "batch x sync", ""),
    ("epochs", "epochs", ""),
    ("accuracy", "test acc", ".4f"),
    ("time_to_target", "s to target", ".2f"),
    ("epoch_s", "s/epoch", ".3f"),
    ("compute_s", "compute", ".3f"),
    ("send_s", "send", ".3f"),
    ("recv_s", "receive", ".3f"),
    ("update_s", "update", ".3f"),
    ("val_s", "validate", ".3f"),
    ("barrier_s", "barrier", ".3f"),
    ("mb_sent", "MB sent/epoch", ".2f"),
    ("peak_rss_mb", "peak RSS MB", ".0f"),
    ("reason", "stopped by", ""),
]
PHASE_LABELS = {"compute_s": "compute", "send_s": "send", "recv_s": "receive",
                "update_s": "update", "val_s": "validate", "barrier_s": "barrier"}


class PlotUnavailable(RuntimeError):
    pass


def summarize(run_dir: str | Path) -> dict[str, Any]:
    """One run's summary (see COLUMNS) plus its per-epoch curve."""
    peers = read_run(run_dir)
    if not peers:
        raise ValueError(f"{run_dir}: no peer-*.jsonl metrics files")
    start = next((r for recs in peers.values() for r in recs if r["kind"] == "start"), {})
    cfg = start.get("config", {})
    epochs = {rank: [r for r in recs if r["kind"] == "epoch"] for rank, recs in peers.items()}
    results = [r for recs in peers.values() for r in recs if r["kind"] == "result"]
    all_epochs = [e for es in epochs.values() for e in es]
    n = max(1, len(all_epochs))
    target = cfg.get("target_accuracy") or 0.0
    reached = [min((e["t"] for e in es if target and e["test_accuracy"] >= target),
                   default=None) for es in epochs.values()]
    curve: dict[int, list[float]] = {}  # epoch -> [t max over peers, accuracy]
    for es in epochs.values():
        for e in es:
            t, _ = curve.get(e["epoch"], (0.0, 0.0))
            curve[e["epoch"]] = [max(t, e["t"]), e["test_accuracy"]]
    broker = str(cfg.get("broker_url", "")).split("://", 1)[0]
    row: dict[str, Any] = {
        "run": Path(run_dir).name,
        "variant": "serverless" if cfg.get("serverless") else "p2p",
        "compression": cfg.get("compression"), "broker": broker, "peers": len(peers),
        "batches": f"{cfg.get('batch_size')}x{cfg.get('sync_every') or 'epoch'}",
        "epochs": max((len(es) for es in epochs.values()), default=0),
        "accuracy": max((e["test_accuracy"] for e in all_epochs), default=None),
        "time_to_target": (max(reached) if reached and None not in reached else None),
        "epoch_s": None,
        "mb_sent": sum(e["bytes_sent"] for e in all_epochs) / n / 1e6,
        "peak_rss_mb": max((e["peak_rss_mb"] for e in all_epochs), default=None),
        "reason": ",".join(sorted({r.get("reason", "?") for r in results})) or "running?",
        "target": target,
        "curve": [[curve[k][0], k, curve[k][1]] for k in sorted(curve)],
    }
    for ph in PHASES:
        row[ph] = sum(e[ph] for e in all_epochs) / n
    row["epoch_s"] = sum(row[ph] for ph in PHASES)
    return row


def table(rows: list[dict[str, Any]]) -> str:
    return format_table(rows, COLUMNS)


def plot(rows: list[dict[str, Any]], path: str | Path) -> Path:
    """Two panels: time per epoch by phase (stacked bars), test accuracy against time."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise PlotUnavailable("plots need matplotlib: pip install 'emnist[plot]' "
                              "(the `plot` extra)") from None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 5))
    labels = [f"{r['variant']} {r['batches']}\n{r['compression']}/{r['broker']}" for r in rows]
    bottom = [0.0] * len(rows)
    for ph in PHASES:
        vals = [r[ph] for r in rows]
        ax1.bar(labels, vals, bottom=bottom, label=PHASE_LABELS[ph])
        bottom = [b + v for b, v in zip(bottom, vals)]
    ax1.set_ylabel("seconds per epoch (mean over peers)")
    ax1.set_title("time per epoch by phase")
    ax1.legend()
    for r, label in zip(rows, labels):
        ts = [c[0] for c in r["curve"]]
        accs = [c[2] for c in r["curve"]]
        ax2.plot(ts, accs, marker="o", label=label.replace("\n", " "))
    targets = {r["target"] for r in rows if r.get("target")}
    for t in targets:
        ax2.axhline(t, color="grey", linestyle="--", linewidth=0.8)
    ax2.set_xlabel("seconds since training started")
    ax2.set_ylabel("test accuracy")
    ax2.set_title("accuracy against time")
    ax2.legend()
    fig.tight_layout()
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
