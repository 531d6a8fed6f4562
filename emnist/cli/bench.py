"""`emnist bench ...`: benchmarks (results written to files, never timed tests)."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import click

from emnist.bench import suite
from emnist.bench.results import format_table
from emnist.cli.base import (
    DEFAULT_STORE,
    Ctx,
    friendly,
    pass_ctx,
    stack_option,
    store_option,
    write_json,
)
from emnist.cli.functions import namespace_option
from emnist.cli.stack import bring_up, local_location, store_key_env
from emnist.cli.train import run_training
from emnist.cluster import local

DEFAULT_RESULTS = "results/bench-suite.jsonl"


@click.group()
def bench() -> None:
    """Benchmarks (results written to files, never timed tests)."""


@bench.command("store")
@click.option("--store", "urls", multiple=True, envvar="EMNIST_BENCH_STORES",
              help="Store URL to measure (repeatable; env EMNIST_BENCH_STORES, space-"
                   "separated); default: local memcached (text, and binary if pylibmc is "
                   "installed) and Redis.")
@click.option("--chunk-bytes", default="65536,262144,393216,524288", show_default=True,
              help="Comma-separated chunk sizes.")
@click.option("--scale", "scales", default="1,10", show_default=True,
              help="Vector sizes as multiples of the 784-100-47 model (333 KB).")
@click.option("--vector-mb", "vector_mb", default=None,
              help="Vector sizes in MB (10^6 bytes), comma-separated, instead of --scale: e.g. "
                   "6,515 (MobileNetV3-small, VGG11; 515 over the four default chunk sizes "
                   "needs a memcached with -m 4096: its slabs keep what earlier sizes took).")
@click.option("--reps", type=click.IntRange(10), default=300, show_default=True,
              help="Timed operations per figure (fewer for big vectors: ~2 GB moved).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write records here.")
@friendly
def bench_store_cmd(urls: tuple[str, ...], chunk_bytes: str, scales: str,
                    vector_mb: str | None, reps: int, json_out: str | None) -> None:
    """Fetch and atomic-push latency and MB/s per backend, against raw loopback TCP."""
    from emnist.bench.store import COLUMNS, REFERENCE, bench_store, default_urls
    chunks = [int(x) for x in chunk_bytes.split(",") if x.strip()]
    if vector_mb:
        try:
            vectors = [max(1, int(float(x) * 1e6 / 4)) for x in vector_mb.split(",")
                       if x.strip()]
        except ValueError:
            raise click.BadParameter("comma-separated numbers of MB",
                                     param_hint="--vector-mb") from None
    else:
        vectors = [int(float(x) * REFERENCE) for x in scales.split(",") if x.strip()]
    records = bench_store(list(urls) or default_urls(), chunks, vectors, reps,
                          echo=lambda m: click.echo(m, err=True))
    click.echo(format_table(records, COLUMNS))
    write_json(json_out, records)


@bench.command("gateway")
@click.option("--calls", type=click.IntRange(100), default=3000, show_default=True,
              help="Timed calls per path.")
@click.option("--rounds", type=click.IntRange(1), default=30, show_default=True,
              help="Interleaved rounds (direct, then through the gateway, each round).")
@click.option("--warmup", type=click.IntRange(0), default=300, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write records here.")
@friendly
def bench_gateway_cmd(calls: int, rounds: int, warmup: int, json_out: str | None) -> None:
    """Invoke overhead of the local gateway: a no-op function called directly and through it."""
    from emnist.bench.gateway import COLUMNS, run
    records = run(calls, rounds, warmup)
    click.echo(format_table(records, COLUMNS))
    write_json(json_out, records)


@bench.command("faults")
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True)
@click.option("--checkpoint-dir", default=None, help="Default: $EMNIST_HOME/checkpoints.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write records here.")
@stack_option
@store_option
@pass_ctx
@friendly
def bench_faults_cmd(c: Ctx, rounds: int, checkpoint_dir: str | None, json_out: str | None,
                     stack: str, store: str) -> None:
    """Time to 0.84 per execution type x algorithm; cost of a SIGKILL and a memcached restart."""
    from emnist.bench.faults import COLUMNS, bench_faults, restart_memcached
    checkpoint_dir = local_location(checkpoint_dir or str(local.home() / "checkpoints"))
    bring_up(c, stack, store, checkpoint_roots=[checkpoint_dir])
    if local.managed_pid("memcached") is None:
        raise local.LocalStackError("bench faults restarts the memcached `emnist up` started; "
                                    "stop yours (or `emnist down`) so `up` starts its own")
    restart = restart_memcached(local.home() / "memcached.pid",
                                lambda: local.ensure_memcached(store))
    records = bench_faults(c.gw, rounds, checkpoint_dir, restart,
                           echo=lambda m: click.echo(m, err=True))
    click.echo(format_table(records, COLUMNS))
    write_json(json_out, records)


@bench.command("train")
@click.option("--model", default="mlp", show_default=True,
              help="The network (emnist train --model's names and aliases).")
@click.option("--workers", "worker_counts", default="1,2", show_default=True,
              help="Comma-separated worker counts for the emnist runs.")
@click.option("--ddp", "ddp_counts", default=None,
              help="Comma-separated process counts of the torch DDP runs [default: 2 for "
                   "torch models, none for the mlp].")
@click.option("--alpha", type=float, default=None, help="Learning rate [the config's].")
@click.option("--algorithm", type=click.Choice(["downpour", "averaging", "allreduce"]),
              default=None, help="The emnist runs' algorithm [the config's: downpour].")
@click.option("--batch-size", type=int, default=None, help="Per-process minibatch.")
@click.option("--iterations", type=int, default=None, help="Passes at most [the config's].")
@click.option("--target-accuracy", type=float, default=0.85, show_default=True)
@click.option("--dataset", default="fashion-mnist", show_default=True)
@click.option("--n-fetch", type=int, default=10, show_default=True)
@click.option("--n-push", type=int, default=10, show_default=True)
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True,
              help="Timed runs per configuration (the median is reported).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write records here.")
@stack_option
@store_option
@pass_ctx
@friendly
def bench_train(c: Ctx, model: str, worker_counts: str, ddp_counts: str | None,
                alpha: float | None, algorithm: str | None, batch_size: int | None,
                iterations: int | None,
                target_accuracy: float, dataset: str, n_fetch: int, n_push: int, rounds: int,
                json_out: str | None, stack: str, store: str) -> None:
    """A plain loop against `emnist train` with 1..N workers and torch DDP, same model and
    data."""
    from emnist.bench.train import COLUMNS
    from emnist.bench.train import bench_train as run_bench
    from emnist.models import canonical_name
    try:
        model = canonical_name(model)
    except ValueError as e:
        raise click.BadParameter(str(e), param_hint="--model") from None
    counts = [int(x) for x in worker_counts.split(",") if x.strip()]
    ddp = None if ddp_counts is None else [int(x) for x in ddp_counts.split(",") if x.strip()]
    extra = {k: v for k, v in (("alpha", alpha), ("batch_size", batch_size),
                               ("iterations", iterations), ("algorithm", algorithm))
             if v is not None}
    records = run_bench(lambda cfg: run_training(c, cfg, stack=stack, store=store, timeout=1800,
                                                 progress=False),
                        counts, target_accuracy, dataset, n_fetch, n_push, rounds,
                        echo=lambda m: click.echo(m, err=True), model=model, extra=extra,
                        ddp=ddp)
    click.echo(format_table(records, COLUMNS))
    write_json(json_out, records)


@bench.command("runtimes")
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True,
              help="Rounds; each starts, measures and stops a stack per runtime in turn.")
@click.option("--workers", type=click.IntRange(1, 64), default=2, show_default=True)
@click.option("--target-accuracy", type=float, default=0.85, show_default=True)
@click.option("--dataset", default="fashion-mnist", show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              default="results/bench-runtimes.json", show_default=True,
              help="Write records here.")
@stack_option
@pass_ctx
@friendly
def bench_runtimes_cmd(c: Ctx, rounds: int, workers: int, target_accuracy: float, dataset: str,
                       json_out: str, stack: str) -> None:
    """Processes against containers of the real images (`emnist up --runtime`): stack start,
    one replica's start (scale from zero) and time to target for the same run, side by side.
    Needs the images (`emnist build --podman --base-images`) and no gateway running."""
    from emnist.bench.runtimes import COLUMNS, bench_runtimes
    if local.gateway_alive(c.gateway):
        raise click.UsageError(f"a gateway answers at {c.gateway}: this benchmark starts its "
                               "own stacks (stop it: `emnist down`)")
    config = {"number_of_workers": workers, "dataset": dataset,
              "target_accuracy": target_accuracy}
    records = bench_runtimes(
        c.gw, lambda runtime: bring_up(c, stack, DEFAULT_STORE, runtime=runtime),
        local.stop_all,
        lambda: run_training(c, config, stack=stack, store=DEFAULT_STORE, timeout=600,
                             progress=False),
        rounds, echo=lambda m: click.echo(m, err=True))
    click.echo(format_table(records, COLUMNS))
    write_json(json_out, records)


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
              help="Store URL the variants are deployed with (env STORE_URL; a local stack "
                   f"this starts: {DEFAULT_STORE}; else the stacks' default).")
@click.option("--local-stack", default="emnist.yml", show_default=True,
              help="Stack the local gateway starts with when none answers on 127.0.0.1.")
@click.option("--down", is_flag=True, help="Stop the local stack afterwards if this started it.")
@click.option("--kubectl/--no-kubectl", "use_kubectl", default=None,
              help="Scale with kubectl (default: only above 5 workers on a real OpenFaaS).")
@namespace_option
@pass_ctx
@friendly
def bench_run(c: Ctx, stacks: tuple[str, ...], rounds: int, warmup: int, results: str,
              timeout: float, target_accuracy: float | None, sets: tuple[str, ...],
              store: str | None, local_stack: str, down: bool, use_kubectl: bool | None,
              namespace: str) -> None:
    """Deploy each stack variant, run it --rounds times, append the records to --results."""
    config = _overrides(sets, target_accuracy)
    started = False
    env = {**os.environ, **({"STORE_URL": store} if store else {})}
    if local.is_loopback(c.gateway):
        store = store or DEFAULT_STORE
        started = bring_up(c, local_stack, store)
        # the variants seal run documents with the local stack's key, as emnist.yml does
        env.update(STORE_URL=store, **store_key_env())
    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    try:
        done, failed = suite.run_suite(
            c.gw, list(stacks), rounds=rounds, results=Path(results), env=env,
            config=config, timeout=timeout, warmup=warmup,
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


@bench.command("data")
@click.option("--only", default="gen,load,rss,runs", show_default=True,
              help="Comma-separated pieces to run.")
@click.option("--samples", type=click.IntRange(1000), default=1_300_000, show_default=True,
              help="Size of the generated set (1300000: about 1 GB).")
@click.option("--rss-workers", default="2,8", show_default=True,
              help="Comma-separated worker counts of the peak-RSS runs.")
@click.option("--models", default="mlp,lenet5", show_default=True,
              help="Comma-separated models of the full runs.")
@click.option("--passes", default="mlp=3,lenet5=1", show_default=True,
              help="Each model's budget, in passes over the generated set (the 60k set gets "
                   "the same number of samples).")
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True,
              help="Interleaved rounds of the load measurements (the median is reported).")
@click.option("--max-seconds", type=click.FloatRange(1), default=600, show_default=True,
              help="Wall-clock cap of each full run.")
@click.option("--s3-endpoint", envvar="EMNIST_BENCH_S3", default=None, metavar="URL",
              help="S3-compatible endpoint (env EMNIST_BENCH_S3) [default: a moto server "
                   "started on loopback].")
@click.option("--processes", type=click.IntRange(1), default=None,
              help="Processes generating images [default: every core].")
@click.option("--work-dir", default=None, type=click.Path(file_okay=False),
              help="Where the directory sets and node caches go [default: the temp dir].")
@click.option("--json", "json_out", default="results/bench-data.json", show_default=True,
              type=click.Path(dir_okay=False), help="Write the results here.")
@store_option
@friendly
def bench_data_cmd(only: str, samples: int, rss_workers: str, models: str, passes: str,
                   rounds: int, max_seconds: float, s3_endpoint: str | None,
                   processes: int | None, work_dir: str | None, json_out: str,
                   store: str) -> None:
    """The data path: generation and upload MB/s, shard load from S3 vs disk vs raw reads,
    workers' peak RSS, and full runs on the generated set against the 60k set."""
    from emnist.bench.data import COLUMNS, PIECES, bench_data, parse_passes
    pieces = [p.strip() for p in only.split(",") if p.strip()]
    if not pieces or set(pieces) - set(PIECES):
        raise click.BadParameter(f"choose from {','.join(PIECES)}", param_hint="--only")
    try:
        budgets = parse_passes(passes)
        counts = [int(x) for x in rss_workers.split(",") if x.strip()]
    except ValueError as e:
        raise click.BadParameter(str(e)) from None
    doc = bench_data(pieces, samples,
                     rss_workers=counts, models=[m.strip() for m in models.split(",")
                                                 if m.strip()],
                     passes=budgets, rounds=rounds, s3_endpoint=s3_endpoint, store_url=store,
                     work_dir=work_dir, processes=processes, max_seconds=max_seconds,
                     echo=lambda m: click.echo(m, err=True),
                     save=lambda d: write_json(json_out, d))
    for piece, columns in COLUMNS.items():
        rows = [r for r in doc["records"] if r["piece"] == piece]
        if rows:
            click.echo(f"\n{piece}:\n" + format_table(rows, columns))
    click.echo(f"\ntargets: {json.dumps(doc['targets'])}\nload average: "
               f"{doc['loadavg_start']} -> {doc['loadavg_end']} ({doc['cpus']} cores)")
    write_json(json_out, doc)
