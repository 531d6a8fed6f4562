"""`emnist bench run` and `emnist bench report`: the benchmark matrix and its tables/plots.

These commands attach themselves to the CLI's `bench` group when imported (emnist/cli.py
imports this module at its end).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from urllib.parse import urlsplit

import click

from emnist.bench import suite
from emnist.cli import DEFAULT_STORE, Ctx, bench, bring_up, friendly, pass_ctx
from emnist.cluster import k8s, local
from emnist.cluster.commands import cluster_errors

DEFAULT_RESULTS = "results/bench-suite.jsonl"


def _overrides(items: tuple[str, ...], target: float | None) -> dict:
    out: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        try:
            out[key] = json.loads(value)
        except ValueError:
            out[key] = value
    if target is not None:
        out["target_accuracy"] = target
    return out


@bench.command("run")
@click.argument("stacks", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False))
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True,
              help="Timed runs per stack variant.")
@click.option("--warmup", type=click.IntRange(0), default=0, show_default=True,
              help="Untimed runs per variant first.")
@click.option("--results", default=DEFAULT_RESULTS, show_default=True,
              type=click.Path(dir_okay=False), help="JSON-lines file the records append to.")
@click.option("--timeout", type=float, default=1800, show_default=True,
              help="Seconds one run may take before it counts as failed.")
@click.option("--target-accuracy", type=float, default=None,
              help="Override the variants' target accuracy.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Override a training setting in every run (JSON value), repeatable.")
@click.option("--store", envvar="STORE_URL", default=None,
              help="Parameter store URL (env STORE_URL; the local gateway: "
                   f"{DEFAULT_STORE}; else the stack's default).")
@click.option("--local-stack", default="emnist.yml", show_default=True,
              help="Stack the local gateway starts with when none answers on 127.0.0.1.")
@click.option("--down", is_flag=True, help="Stop the local stack afterwards if this started it.")
@click.option("--kubectl/--no-kubectl", "use_kubectl", default=None,
              help="Scale with kubectl (default: only above 5 workers on a real OpenFaaS).")
@click.option("--namespace", default=k8s.FUNCTIONS_NAMESPACE, show_default=True)
@pass_ctx
@friendly
@cluster_errors
def bench_run(c: Ctx, stacks: tuple[str, ...], rounds: int, warmup: int, results: str,
              timeout: float, target_accuracy: float | None, sets: tuple[str, ...],
              store: str | None, local_stack: str, down: bool, use_kubectl: bool | None,
              namespace: str) -> None:
    """Deploy each stack variant, run it --rounds times, append the records to --results."""
    config = _overrides(sets, target_accuracy)
    loopback = urlsplit(c.gateway).hostname in ("127.0.0.1", "localhost", "::1")
    started = False
    if loopback:
        store = store or DEFAULT_STORE
        started = bring_up(c, local_stack, store, ())
    env = {**os.environ, **({"STORE_URL": store} if store else {})}
    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    try:
        done, failed = suite.run_suite(
            c.client(), list(stacks), rounds=rounds, results=Path(results), env=env,
            config=config, store_url=store, timeout=timeout, warmup=warmup,
            use_kubectl=use_kubectl, namespace=namespace, echo=echo)
    finally:
        if down and started:
            local.stop_all()
    click.echo(f"{done} runs recorded in {results}" + (f", {failed} failed" if failed else ""))
    if failed:
        sys.exit(1)


@bench.command("report")
@click.option("--results", default=DEFAULT_RESULTS, show_default=True,
              type=click.Path(exists=True, dir_okay=False), help="JSON-lines results file.")
@click.option("--plots", "plots_dir", default=None, type=click.Path(file_okay=False),
              help="Write PNG plots here [default: plots/ beside the results file].")
@click.option("--no-plots", is_flag=True, help="Only print the tables.")
@click.option("--stack", "only", multiple=True, help="Only these stacks (names), repeatable.")
@pass_ctx
@friendly
def bench_report(c: Ctx, results: str, plots_dir: str | None, no_plots: bool,
                 only: tuple[str, ...]) -> None:
    """Tables of a results file (per round; mean and std across rounds) and PNG plots."""
    records, bad = suite.load_records(results)
    if only:
        records = [r for r in records if r["stack"] in only]
    if bad:
        click.echo(f"note: {bad} unreadable lines in {results} were skipped", err=True)
    if not records:
        raise click.ClickException(f"no benchmark records in {results}")
    click.echo(suite.report(records))
    if no_plots:
        return
    from emnist.bench import plots
    out = Path(plots_dir) if plots_dir else Path(results).parent / "plots"
    try:
        paths = plots.write_plots(records, out)
    except plots.PlotUnavailable as e:
        click.echo(f"plots skipped: {e}", err=True)
        return
    click.echo("plots: " + ", ".join(str(p) for p in paths))
