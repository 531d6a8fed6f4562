"""`emnist p2p peer|run|report`: peer-to-peer training over a broker, with or without
serverless gradients (emnist-grad)."""

from __future__ import annotations

import logging
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Any

import click

from emnist.cli.base import Ctx, friendly, pass_ctx, stack_option, store_option, write_json
from emnist.cli.stack import bring_up, local_location
from emnist.cluster import local
from emnist.p2p.launch import launch_peers
from emnist.paths import cache_dir
from emnist.runner import wait_replicas

DEFAULT_BROKER = "redis://127.0.0.1:6379/0"
GRAD = "emnist-grad"
# how `p2p run` starts each peer: this CLI's `p2p peer` in a fresh interpreter
PEER_COMMAND = [sys.executable, "-m", "emnist.cli", "p2p", "peer"]


def default_data_root() -> Path:
    return cache_dir() / "p2p-data"


class SeedSpelling(click.Command):
    """Also accepts long options written with underscores, as the p2p seed's users type them
    (``--model_str vgg11``, ``--batch_size 64``): each becomes its dashed name when that is an
    option of the command. Option names themselves keep dashes only."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        known = {o for p in self.params for o in getattr(p, "opts", ())}
        out = []
        for i, arg in enumerate(args):
            if arg == "--":
                out += args[i:]
                break
            name, eq, value = arg.partition("=")
            if name.startswith("--") and "_" in name and name.replace("_", "-") in known:
                arg = name.replace("_", "-") + eq + value
            out.append(arg)
        return super().parse_args(ctx, out)


def _model_name(ctx: click.Context, param: click.Parameter, value: str) -> str:
    from emnist.models import canonical_name
    try:
        return canonical_name(value)
    except ValueError as e:
        raise click.BadParameter(str(e)) from None


def _sync_every(value: str) -> int:
    if value == "epoch":
        return 0
    try:
        n = int(value)
    except ValueError:
        raise click.BadParameter("a number of minibatches or 'epoch'") from None
    if n < 1:
        raise click.BadParameter("must be >= 1 (or 'epoch')")
    return n


@click.group()
def p2p() -> None:
    """Peer-to-peer training over a broker, with or without serverless gradients."""


def peer_options(fn):
    opts = [
        click.option("--broker", default=DEFAULT_BROKER, envvar="EMNIST_BROKER",
                     show_default=True,
                     help="redis://host:port/db (streams) or amqp://user:pw@host:port/vhost "
                          "(env EMNIST_BROKER)."),
        click.option("--compression", type=click.Choice(["none", "qsgd", "topk"]),
                     default="none", show_default=True),
        click.option("--qsgd-levels", type=click.IntRange(1, 127), default=127,
                     show_default=True, help="QSGD levels per sign."),
        click.option("--topk-ratio", type=float, default=0.01, show_default=True,
                     help="Top-k: fraction of values sent."),
        click.option("--batch-size", type=click.IntRange(1), default=100, show_default=True),
        click.option("--sync-every", default="1", show_default=True,
                     help="Minibatches per synchronous step, or 'epoch' (the original)."),
        click.option("--lr", type=float, default=0.3, show_default=True,
                     help="Learning rate."),
        click.option("--model", "--model-str", "model", default="mlp", show_default=True,
                     callback=_model_name,
                     help="mlp, lenet5, cnn, mobilenet_v3_small, squeezenet1_1 or vgg11 (torch "
                          "models need the `torch` extra); the seed's names work too: "
                          "squeezenet1.1, vgg11, 'mobilenet v3 small' (also as --model_str)."),
        click.option("--hidden-size", type=click.IntRange(1), default=100, show_default=True,
                     help="The mlp's hidden width."),
        click.option("--epochs", type=click.IntRange(1), default=20, show_default=True,
                     help="Passes over each partition, at most."),
        click.option("--target-accuracy", type=float, default=0.84, show_default=True,
                     help="Stop when the test accuracy reaches this (0: never)."),
        click.option("--patience", type=click.IntRange(1), default=3, show_default=True,
                     help="Early stopping: epochs without a better validation loss."),
        click.option("--lr-patience", type=click.IntRange(1), default=2, show_default=True,
                     help="Epochs of plateau before the learning rate is reduced."),
        click.option("--lr-factor", type=float, default=0.5, show_default=True),
        click.option("--timeout", type=float, default=60, show_default=True,
                     help="Seconds to wait for the other peers at a step or barrier."),
        click.option("--start-timeout", type=float, default=120, show_default=True,
                     help="... at the first step."),
        click.option("--allow-missing", is_flag=True,
                     help="Go on with the peers present when one times out."),
        click.option("--seed", type=int, default=0, show_default=True),
        click.option("--serverless", is_flag=True,
                     help="Compute each minibatch's gradient with the emnist-grad function."),
        click.option("--frame-mb", type=click.FloatRange(0.004, 256), default=8,
                     show_default=True,
                     help="Messages larger than this travel in frames of this size."),
        store_option,
    ]
    for opt in reversed(opts):
        fn = opt(fn)
    return fn


def _peer_config(c: Ctx, run_id: str, rank: int, size: int, data_loc: str,
                 metrics_dir: str | None, kw: dict[str, Any]):
    from emnist.p2p.peer import PeerConfig
    return PeerConfig(
        run_id=run_id, rank=rank, size=size, data=local_location(data_loc),
        broker_url=kw["broker"],
        compression=kw["compression"], qsgd_levels=kw["qsgd_levels"],
        topk_ratio=kw["topk_ratio"], batch_size=kw["batch_size"],
        sync_every=_sync_every(kw["sync_every"]), lr=kw["lr"], model=kw["model"],
        hidden=kw["hidden_size"], frame_bytes=int(kw["frame_mb"] * (1 << 20)),
        epochs=kw["epochs"], target_accuracy=kw["target_accuracy"], patience=kw["patience"],
        lr_patience=kw["lr_patience"], lr_factor=kw["lr_factor"], timeout=kw["timeout"],
        start_timeout=kw["start_timeout"], allow_missing=kw["allow_missing"], seed=kw["seed"],
        metrics_dir=metrics_dir, serverless=kw["serverless"], gateway=c.gateway,
        store_url=kw["store"])


@p2p.command(cls=SeedSpelling)
@click.option("--rank", type=click.IntRange(0), required=True)
@click.option("--size", type=click.IntRange(1), required=True, help="Number of peers.")
@click.option("--run-id", required=True, help="Shared by all peers of a run.")
@click.option("--data", "data_loc", required=True,
              help="The split's location (`emnist data split`): a directory or URL prefix.")
@click.option("--metrics-dir", default=None, help="Write peer-<rank>.jsonl metrics here.")
@peer_options
@pass_ctx
@friendly
def peer(c: Ctx, rank: int, size: int, run_id: str, data_loc: str,
         metrics_dir: str | None, **kw) -> None:
    """Run one peer (the others run the same command with their --rank)."""
    from emnist.p2p.peer import run_peer
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"%(asctime)s peer {rank}: %(levelname)s %(message)s")
    run_peer(_peer_config(c, run_id, rank, size, data_loc, metrics_dir, kw))


def _ensure_gateway(c: Ctx, stack: str, store: str, replicas: int, data_loc: str) -> bool:
    started = bring_up(c, stack, store, (f"{GRAD}={replicas}",), data_roots=[data_loc])
    if c.gw.get_function(GRAD) is None:
        raise click.ClickException(f"the gateway at {c.gateway} has no {GRAD} function: "
                                   "deploy emnist.yml (emnist up, or faas-cli deploy)")
    if c.gw.replicas(GRAD) < replicas:
        c.gw.scale(GRAD, replicas)
        wait_replicas(c.gw, GRAD, replicas)
    return started


def _argv(kw: dict[str, Any]) -> list[str]:
    """The shared peer options, back as command-line arguments for the peer processes."""
    out = []
    for key, value in kw.items():
        flag = "--" + key.replace("_", "-")
        if isinstance(value, bool):
            if value:
                out.append(flag)
        elif value is not None:
            out += [flag, str(value)]
    return out


@p2p.command(cls=SeedSpelling)
@click.option("--size", type=click.IntRange(1), required=True, help="Number of peers.")
@click.option("--data", "data_loc", default=None,
              help="An existing split's location; default: split --dataset locally.")
@click.option("--dataset", default="fashion-mnist", show_default=True,
              help="mnist, fashion-mnist, emnist-<split>, cifar10 (its binary release) ...")
@click.option("--dataset-dir", default=None, help="Where the dataset files are.")
@click.option("--train-samples", type=click.IntRange(1), default=None,
              help="Split only this many training samples (short runs).")
@click.option("--test-samples", type=click.IntRange(1), default=None,
              help="Keep only this many test images (short runs).")
@click.option("--data-root", default=None,
              help="Where to write the split [default: the cache's p2p-data/].")
@click.option("--out", default=None,
              help="Metrics go to OUT/RUN_ID/ [default: the cache's p2p-runs/].")
@click.option("--run-id", default=None, help="Default: p2p-<time>-<random>.")
@click.option("--grad-replicas", type=click.IntRange(1), default=3, show_default=True,
              help="emnist-grad replicas (serverless).")
@click.option("--run-timeout", type=float, default=1800, show_default=True,
              help="Seconds before the peers are stopped.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the summary.")
@click.option("--down", is_flag=True, help="Stop the local stack afterwards if this started it.")
@stack_option
@peer_options
@pass_ctx
@friendly
def run(c: Ctx, size: int, data_loc: str | None, dataset: str, dataset_dir: str | None,
        train_samples: int | None, test_samples: int | None, data_root: str | None,
        out: str | None, run_id: str | None, grad_replicas: int, run_timeout: float,
        json_out: str | None, down: bool, stack: str, **kw) -> None:
    """Start N local peers, wait for them, print the run's summary."""
    from emnist.p2p.broker import open_broker
    from emnist.p2p.report import summarize, table
    from emnist.p2p.split import split, write_batches
    run_id = run_id or time.strftime("p2p-%Y%m%d-%H%M%S-") + secrets.token_hex(3)
    _peer_config(c, run_id, 0, size, data_loc or ".", None, kw)  # validate before starting
    if data_loc is None:
        data_loc = str(split(dataset, dataset_dir, size, data_root or default_data_root(),
                             kw["seed"],
                             batch_size=kw["batch_size"] if kw["serverless"] else None,
                             train_samples=train_samples, test_samples=test_samples))
    elif kw["serverless"] and not data_loc.startswith(("http://", "https://")):
        write_batches(Path(data_loc), kw["batch_size"])
    data_loc = local_location(data_loc)
    started = False
    if kw["serverless"]:
        started = _ensure_gateway(c, stack, kw["store"], grad_replicas, data_loc)
    out_dir = Path(out or cache_dir() / "p2p-runs") / run_id
    out_dir.mkdir(parents=True, exist_ok=True)
    click.echo(f"run {run_id}: {size} peers, {kw['model']} "
               f"({'serverless' if kw['serverless'] else 'p2p'}, "
               f"{kw['compression']}, {kw['broker'].split('://')[0]}); metrics in {out_dir}",
               err=True)
    t0 = time.monotonic()
    try:
        codes = launch_peers(PEER_COMMAND, run_id, size, data_loc, out_dir, _argv(kw),
                             run_timeout, {**os.environ, "OPENFAAS_URL": c.gateway})
    finally:
        try:
            broker = open_broker(kw["broker"], run_id, 0, size)
            broker.cleanup()
            broker.close()
        except Exception as e:  # noqa: BLE001 - cleanup must not hide the run's outcome
            click.echo(f"warning: broker cleanup failed: {e}", err=True)
        if down and started:
            local.stop_all()
    wall = time.monotonic() - t0
    summary = summarize(out_dir)
    summary.update(run_id=run_id, wall_s=wall, exit_codes=codes)
    click.echo(table([summary]))
    write_json(json_out, summary)
    failed = [r for r, code in enumerate(codes) if code != 0]
    if failed:
        tails = []
        for r in failed:
            lines = (out_dir / f"peer-{r}.log").read_text(errors="replace").strip().splitlines()
            tails.append(f"peer {r} (exit {codes[r]}): {lines[-1] if lines else '(no output)'}")
        raise click.ClickException(f"run {run_id}: " + "; ".join(tails))
    target = kw["target_accuracy"]
    reached = summary["time_to_target"] is not None
    verdict = (f"reached {target} in {summary['time_to_target']:.2f}s of training"
               if reached else f"did NOT reach {target}")
    click.echo(f"run {run_id}: {verdict} ({wall:.2f}s wall, {summary['epochs']} epochs)")
    if target and not reached:
        sys.exit(1)


@p2p.command()
@click.argument("runs", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False))
@click.option("--plot", "plot_out", type=click.Path(dir_okay=False), default=None,
              help="Write the PNG plots here (needs the `plot` extra: matplotlib).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write the rows.")
@pass_ctx
@friendly
def report(c: Ctx, runs: tuple[str, ...], plot_out: str | None,
           json_out: str | None) -> None:
    """Compare runs (metrics directories): table, and PNG plots with --plot."""
    from emnist.p2p.report import plot, summarize, table
    rows = [summarize(r) for r in runs]
    click.echo(table(rows))
    write_json(json_out, rows)
    if plot_out:
        click.echo(f"plots written to {plot(rows, plot_out)}")
