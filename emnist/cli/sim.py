"""`emnist sim run|calibrate|validate|sweep|costs`: the virtual-time cluster simulator (real
training math, simulated time; docs/sim.md)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import click

from emnist.cli.base import DEFAULT_STORE, Ctx, friendly, pass_ctx, stack_option, write_json

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
# SimConfig fields given on the command line (the rest through --set KEY=VALUE)
RUN_FIELDS = ("algorithm", "workers", "model", "hidden_size", "dataset", "batch_size", "alpha",
              "lr", "iterations", "target_accuracy", "n_fetch", "n_push", "update",
              "average_every", "sync_every", "compression", "serverless", "tiered", "servers",
              "chunk_bytes", "max_steps", "samples", "eval_samples", "seed", "timing_seed",
              "data_location")


@click.group()
def sim() -> None:
    """Virtual-time cluster simulator: real training math, simulated time."""


def _sets(items: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", param_hint="--set")
        try:
            out[key.replace("-", "_")] = json.loads(value)
        except ValueError:
            out[key.replace("-", "_")] = value
    return out


def config_options(fn: Any) -> Any:
    """One option per common SimConfig field (defaults: SimConfig's), plus --set."""
    from emnist.sim.config import SimConfig
    defaults = {f.name: f.default for f in dataclasses.fields(SimConfig)}
    opts = [click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
                         help="Any other SimConfig field (JSON value), repeatable.")]
    for name in reversed(RUN_FIELDS):
        d = defaults[name]
        flag = "--" + name.replace("_", "-")
        if isinstance(d, bool):
            opts.append(click.option(f"{flag}/--no-{name.replace('_', '-')}", name,
                                     default=None))
        else:
            opts.append(click.option(flag, name, type=type(d) if d is not None else str,
                                     default=None, help=f"[default: {d!r}]"))
    for opt in opts:
        fn = opt(fn)
    return fn


def build_config(kw: dict[str, Any]) -> Any:
    from emnist.sim.config import SimConfig
    values = {k: kw.pop(k) for k in RUN_FIELDS if kw.get(k) is not None}
    for k in RUN_FIELDS:
        kw.pop(k, None)
    values.update(_sets(kw.pop("sets", ())))
    return SimConfig.from_dict(values)


def costs_option(fn: Any) -> Any:
    return click.option("--costs", "costs_name", default="local", show_default=True,
                        help="A shipped cost file by name (emnist sim costs) or a path.")(fn)


SUMMARY = [("costs", "costs", ""), ("algorithm", "algorithm", ""), ("workers", "workers", ",d"),
           ("model", "model", ""), ("batch_size", "batch", ""),
           ("time_to_target", "s to target", ".3f"), ("seconds", "s to end", ".3f"),
           ("reached", "reached", ""), ("accuracy", "accuracy", ".4f"),
           ("samples_per_s", "samples/s", ",.0f"), ("staleness_mean", "staleness", ".2f"),
           ("conflicts", "conflicts", ",d"), ("usd", "cost $", ".5f"),
           ("wall_s", "wall s", ".1f")]


def _row(r: dict[str, Any]) -> dict[str, Any]:
    return {**r, "usd": r["cost"]["usd"], "staleness_mean": r.get("staleness_mean", 0.0),
            "conflicts": r.get("conflicts", 0)}


@sim.command("run")
@config_options
@costs_option
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the report.")
@friendly
def run_cmd(costs_name: str, json_out: str | None, **kw: Any) -> None:
    """Simulate one run: W workers of Downpour, averaging or p2p, in virtual time."""
    from emnist.bench.results import format_table
    from emnist.sim.costs import load_costs
    from emnist.sim.engine import simulate
    cfg = build_config(kw)
    report = simulate(cfg, load_costs(costs_name))
    click.echo(format_table([_row(report)], SUMMARY))
    write_json(json_out, report)


@sim.command("calibrate")
@click.option("--out", default="emnist/sim/costs/local.yml", show_default=True,
              type=click.Path(dir_okay=False), help="Cost file to write.")
@click.option("--store", envvar="STORE_URL", default=DEFAULT_STORE, show_default=True,
              help="The memcached to measure (env STORE_URL).")
@click.option("--broker", default=DEFAULT_BROKER, show_default=True,
              help="The Redis to measure as the p2p broker.")
@click.option("--model", "models", multiple=True, default=("mlp",), show_default=True,
              help="Models to time (repeatable; torch models need the torch extra).")
@click.option("--dataset", default="fashion-mnist", show_default=True)
@click.option("--data-location", default="", help="Shard directory root (default: the cache).")
@click.option("--fast", is_flag=True,
              help="Few repetitions; compute, client and store only (for tests).")
@friendly
def calibrate_cmd(out: str, store: str, broker: str, models: tuple[str, ...], dataset: str,
                  data_location: str, fast: bool) -> None:
    """Measure this machine (compute, store, gateway, broker, start-up); write a cost file."""
    from emnist.sim.calibrate import calibrate, write_costs
    doc = calibrate(store_url=store, broker_url=broker, models=models, dataset=dataset,
                    data_location=data_location, fast=fast,
                    echo=lambda m: click.echo(m, err=True))
    path = write_costs(doc, out)
    steps = {k: v["step"] for k, v in doc["compute"]["models"].items()}
    click.echo(f"wrote {path}: step seconds {json.dumps(steps)}")


@sim.command("costs")
@click.argument("names", nargs=-1)
@friendly
def costs_cmd(names: tuple[str, ...]) -> None:
    """List the shipped cost files, or check the named ones (names or paths)."""
    from emnist.sim.costs import load_costs, shipped
    if not names:
        for name, path in shipped().items():
            c = load_costs(str(path))
            click.echo(f"{name:12} {c['description']}")
        return
    for name in names:
        c = load_costs(name)
        nodes = sum(k.count for k in c.nodes)
        click.echo(f"{name}: valid ({nodes} nodes, {c['store']['servers']} store servers, "
                   f"models {', '.join(c['compute']['models'])})")


@sim.command("sweep")
@config_options
@click.option("--costs", "costs_names", default="study3,cluster10,cluster100",
              show_default=True, help="Comma-separated cost files (names or paths).")
@click.option("--scale", "workers_list", default="1,2,4,8,16,32,64,128,256,512,1024",
              show_default=True, help="Comma-separated worker counts.")
@click.option("--variant", "variants", multiple=True, metavar="NAME:KEY=VALUE[,KEY=VALUE]",
              help="A named set of overrides swept as well (repeatable), e.g. "
                   "'n10:n_fetch=10,n_push=10'.")
@click.option("--json", "json_out", default="results/sim-sweep.json", show_default=True,
              type=click.Path(dir_okay=False))
@click.option("--table", "table_out", default="results/sim-sweep.md", show_default=True,
              type=click.Path(dir_okay=False), help="Markdown table.")
@click.option("--plot", "plot_out", default="results/sim-sweep.png", show_default=True,
              type=click.Path(dir_okay=False), help="PNG plot (the plot extra).")
@friendly
def sweep_cmd(costs_names: str, workers_list: str, variants: tuple[str, ...], json_out: str,
              table_out: str, plot_out: str, **kw: Any) -> None:
    """Scale study: time to target, samples/s, staleness, conflicts and cost versus W."""
    from emnist.sim import sweep
    base = build_config(kw)
    counts = [int(x) for x in workers_list.split(",") if x.strip()]
    names = [x.strip() for x in costs_names.split(",") if x.strip()]
    named = [sweep.parse_variant(v) for v in variants] or [("base", {})]
    records = sweep.sweep(base, names, counts, named, echo=lambda m: click.echo(m, err=True))
    text = sweep.table(records)
    click.echo(text)
    write_json(json_out, records)
    Path(table_out).parent.mkdir(parents=True, exist_ok=True)
    Path(table_out).write_text(text + "\n")
    try:
        click.echo(f"plot: {sweep.plot(records, plot_out)}")
    except sweep.PlotUnavailable as e:
        click.echo(f"plot skipped: {e}", err=True)


@sim.command("validate")
@costs_option
@click.option("--calibrate/--no-calibrate", "recalibrate", default=True, show_default=True,
              help="Calibrate first (into --costs-out) and simulate with that: the machine's "
                   "load drifts, so measure it next to the runs.")
@click.option("--costs-out", default="results/sim-validate-costs.yml", show_default=True,
              type=click.Path(dir_okay=False), help="Where --calibrate writes its cost file.")
@click.option("--rounds", type=click.IntRange(1), default=5, show_default=True,
              help="Real runs per case (after a warm-up); the median is compared.")
@click.option("--sim-rounds", type=click.IntRange(1), default=5, show_default=True,
              help="Simulations per case (timing seeds); the median is compared.")
@click.option("--case", "cases", multiple=True,
              help="Only these cases (repeatable; default: all). See docs/sim.md.")
@click.option("--model", "models", multiple=True, default=("mlp", "lenet5"), show_default=True,
              help="Models to validate each case with (repeatable).")
@click.option("--probe/--no-probe", default=True, show_default=True,
              help="Re-measure the cores left (and for p2p the exchange) before each case "
                   "(with --calibrate).")
@click.option("--broker", default=DEFAULT_BROKER, show_default=True)
@click.option("--store", envvar="STORE_URL", default=DEFAULT_STORE, show_default=True,
              help="Store of the local stack this may start (env STORE_URL).")
@click.option("--json", "json_out", default="results/sim-validate.json", show_default=True,
              type=click.Path(dir_okay=False))
@stack_option
@pass_ctx
@friendly
def validate_cmd(c: Ctx, costs_name: str, recalibrate: bool, costs_out: str, rounds: int,
                 sim_rounds: int, cases: tuple[str, ...], models: tuple[str, ...], probe: bool,
                 broker: str, store: str, json_out: str, stack: str) -> None:
    """Real runs on this machine next to their simulations; time to target compared."""
    from emnist.cli.train import run_training
    from emnist.sim import validate

    def run_train(config: dict[str, Any]) -> Any:
        return run_training(c, config, stack=stack, store=store, timeout=600, progress=False)
    probe_fn = None
    if recalibrate:
        from emnist.sim import calibrate as cal
        doc = cal.calibrate(store_url=store, broker_url=broker, models=models,
                            echo=lambda m: click.echo(m, err=True))
        costs_name = str(cal.write_costs(doc, costs_out))

        def probe_case(kind: str, model: str) -> tuple[dict[str, Any], dict[str, Any]]:
            return cal.probe(doc, kind, broker_url=broker, store_url=store, model=model)
        probe_fn = probe_case if probe else None
    from emnist.cluster import local

    # a stack this command starts is its own (its data roots name this run's temp data):
    # stopped at the end, as `emnist train --down` does, so the next validate starts afresh
    was_up = local.gateway_alive(c.gateway)
    try:
        records = validate.validate(c.gateway, costs_name, rounds, sim_rounds, list(cases),
                                    broker=broker, store=store, run_train=run_train,
                                    echo=lambda m: click.echo(m, err=True), models=models,
                                    probe=probe_fn)
    finally:
        if not was_up and local.gateway_alive(c.gateway):
            local.stop_all()
    click.echo(validate.table(records))
    write_json(json_out, records)
