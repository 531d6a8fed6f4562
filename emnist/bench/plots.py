"""PNG plots of benchmark records (matplotlib, the `plot` extra; imported only when asked)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from emnist.bench.suite import summarize

__all__ = ["PlotUnavailable", "write_plots"]

PLOT_HINT = ("matplotlib is not installed: install the `plot` extra "
             "(pip install -e '.[plot]') to write the PNG plots")


class PlotUnavailable(RuntimeError):
    pass


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise PlotUnavailable(PLOT_HINT) from e
    matplotlib.use("Agg")  # files only: no display, fine under nohup
    import matplotlib.pyplot as plt
    return plt


def write_plots(records: list[dict[str, Any]], out_dir: str | Path) -> list[Path]:
    """time-vs-workers.png (per batch size, mean +- std across rounds) and
    accuracy-vs-time.png (every worker's test-accuracy curve, one panel per stack)."""
    plt = _pyplot()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []

    fig, ax = plt.subplots(figsize=(6, 4))
    rows = [r for r in summarize(records) if r["time_mean"] is not None]
    for batch in sorted({r["batch_size"] for r in rows}):
        pts = sorted((r["workers"], r["time_mean"], r["time_std"]) for r in rows
                     if r["batch_size"] == batch)
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts], yerr=[p[2] for p in pts],
                    marker="o", capsize=3, label=f"batch {batch}")
    ax.set_xlabel("workers")
    ax.set_ylabel("time to target (s)")
    ax.set_title("Time to target accuracy vs workers")
    ax.set_xticks(sorted({r["workers"] for r in rows}) or [1])
    ax.grid(alpha=0.3)
    if rows:
        ax.legend()
    fig.tight_layout()
    paths.append(out / "time-vs-workers.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)

    stacks = sorted({(r.get("batch_size") or 0, r.get("workers") or 0, r["stack"])
                     for r in records if not r.get("error")})
    cols = min(2, max(1, len(stacks)))
    nrows = max(1, -(-len(stacks) // cols))
    fig, axes = plt.subplots(nrows, cols, figsize=(5 * cols, 3.2 * nrows), sharey=True,
                             squeeze=False)
    target = next((r.get("target") for r in records if r.get("target")), None)
    for ax in axes.flat[len(stacks):]:
        ax.set_visible(False)
    for ax, (batch, workers, stack) in zip(axes.flat, stacks):
        for rec in (r for r in records if r["stack"] == stack and not r.get("error")):
            for w in rec.get("results", []):
                curve = w.get("curve") or []
                if curve:
                    ax.plot([c[0] for c in curve], [c[2] for c in curve], marker=".",
                            alpha=0.7, label=f"round {rec.get('round')} worker {w['worker_id']}")
        if target:
            ax.axhline(target, color="grey", linestyle="--", linewidth=1)
        ax.set_title(f"{stack}: batch {batch}, {workers} worker(s)", fontsize="medium")
        ax.set_xlabel("worker time (s)")
        ax.set_ylabel("test accuracy")
        ax.grid(alpha=0.3)
    fig.suptitle("Test accuracy vs time (every worker, every round; dashed: target)")
    fig.tight_layout()
    paths.append(out / "accuracy-vs-time.png")
    fig.savefig(paths[-1], dpi=120)
    plt.close(fig)
    return paths
