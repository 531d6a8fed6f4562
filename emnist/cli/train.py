"""`emnist train` and `emnist status`: a Downpour run through emnist-setup, watched to the end.

Requests carry the training configuration only, never a store: the functions use the store
their deployment configures, and progress is read through emnist-setup's GET.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from emnist.bench.results import WORKER_COLUMNS, format_table
from emnist.cli.base import Ctx, friendly, pass_ctx, stack_option, store_option, write_json
from emnist.cli.stack import bring_up, local_location
from emnist.cluster import local
from emnist.models import canonical_name
from emnist.runner import TRAIN, RunOutcome, resume, start_run, status, wait_replicas, watch
from emnist.train.config import TRAIN_ALGORITHMS

TRAIN_OPTIONS = [
    ("--workers", "number_of_workers", int, "Workers (also the emnist-train replica count)."),
    ("--model", "model", str, "mlp (default), lenet5, cnn, mobilenet_v3_small, squeezenet1_1 "
     "or vgg11 (aliases: squeezenet1.1, 'mobilenet v3 small', lenet-5)."),
    ("--dataset", "dataset", str, "fashion-mnist, mnist, emnist-bymerge, ..., cifar10, "
     "synthetic."),
    ("--target-accuracy", "target_accuracy", float, "Stop when test accuracy reaches this."),
    ("--batch-size", "batch_size", int, "Minibatch size."),
    ("--n-fetch", "n_fetch", int, "Fetch parameters every N minibatches."),
    ("--n-push", "n_push", int, "Push accumulated updates every N minibatches."),
    ("--iterations", "iterations", int, "Passes over each worker's shard, at most."),
    ("--alpha", "alpha", float, "Learning rate."),
    ("--hidden-size", "hidden_size", int, "The mlp's hidden units."),
    ("--dropout", "dropout_percent", float, "The mlp's dropout fraction of hidden units."),
    ("--model-dropout", "model_dropout", float,
     "A torch model's dropout (default: the architecture's published rate)."),
    ("--seed", "seed", int, "Seed for init, shards and dropout."),
    ("--dataset-dir", "dataset_dir", str, "Where the dataset files are."),
    ("--update", "update", str, "atomic (default) or overwrite (the original's lossy push)."),
    ("--execution-type", "execution_type", click.Choice(["1", "2", "3"]),
     "1: one function does everything; 2: one invocation per pass; 3: setup + looping trains."),
    ("--algorithm", "algorithm", click.Choice(list(TRAIN_ALGORITHMS)),
     "Asynchronous Downpour SGD, synchronous parameter averaging, or synchronous SGD by "
     "all-reduce (reduce-scatter + all-gather through the store, every minibatch)."),
    ("--average-every", "average_every", int, "Averaging: minibatches between rounds."),
    ("--barrier-timeout", "barrier_timeout", float,
     "Averaging and allreduce: seconds to wait for the others at a round."),
    ("--momentum", "momentum", float, "Allreduce: SGD momentum, in [0, 0.9999] (default 0.9)."),
    ("--warmup-steps", "warmup_steps", int,
     "Allreduce: minibatches over which the learning rate rises from alpha to alpha x "
     "workers (default: half a pass; 0: none)."),
    ("--scale-lr", "scale_lr", click.BOOL,
     "Allreduce: scale the learning rate to alpha x workers (default true)."),
    ("--checkpoint-url", "checkpoint_url", str, "Checkpoint directory or redis:// URL."),
    ("--checkpoint-every", "checkpoint_every", int, "Passes between checkpoints."),
    ("--max-seconds", "max_seconds", float, "Wall-clock limit (0: none)."),
    ("--slice-seconds", "slice_seconds", float,
     "An emnist-train call trains this long, then hands on to a new call (0: to the end; "
     "below the platform's timeouts)."),
    ("--patience", "patience", int, "Early stopping on validation loss (0: off)."),
    ("--lease-seconds", "lease_seconds", float, "A worker silent this long is taken over."),
    ("--local-store", "local_store_url", str, "Node-local tier URL (memcached://... or local://)."),
    ("--push-top-k", "push_top_k", int, "Sparse pushes: at most K chunks per push."),
    ("--push-threshold", "push_threshold", float, "Sparse pushes: chunk delta RMS to send."),
    ("--chunk-bytes", "chunk_bytes", int, "Parameter chunk size in the store."),
]
# what --resume may be combined with: the run keeps its own configuration
RESUME_KEEPS = ("checkpoint_url",)
LOCATIONS = ("checkpoint_url", "dataset_dir")  # plain paths: made absolute for a local stack


def train_options(fn):
    for flag, dest, typ, help_ in reversed(TRAIN_OPTIONS):
        fn = click.option(flag, dest, type=typ, default=None, help=help_)(fn)
    return fn


def train_config(kwargs: dict[str, Any], gateway: str) -> dict[str, Any]:
    """The request body from the options given (no store: the deployment has one); a model
    alias is sent by its canonical name."""
    out = {k: v for k, v in kwargs.items() if v is not None}
    if "model" in out:
        try:
            out["model"] = canonical_name(out["model"])
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--model") from None
    if "execution_type" in out:
        out["execution_type"] = int(out["execution_type"])
    if local.is_loopback(gateway):
        out.update({k: local_location(out[k]) for k in LOCATIONS if k in out})
    return out


def run_training(c: Ctx, config: dict[str, Any], *, stack: str, store: str, timeout: float,
                 progress: bool = True, down: bool = False) -> RunOutcome:
    """Up (if local and not running), scale emnist-train to the worker count, start, watch.

    With ``down``, stop the local stack afterwards if this call started it. A config with
    ``resume`` relaunches that run's unfinished workers instead of starting a new run.
    """
    started = bring_up(c, stack, store, (),
                       checkpoint_roots=[config.get("checkpoint_url") or ""],
                       data_roots=[config.get("dataset_dir") or ""],
                       allowed_store_urls=[config.get("local_store_url") or ""])
    try:
        return _run(c, config, timeout=timeout, progress=progress)
    finally:
        if down and started:
            local.stop_all()


def _run(c: Ctx, config: dict[str, Any], *, timeout: float, progress: bool) -> RunOutcome:
    gw = c.gw
    workers = config.get("number_of_workers")
    if workers:
        gw.scale(TRAIN, workers)
        wait_replicas(gw, TRAIN, workers)
    if "resume" in config:
        state, invoked = resume(gw, config["resume"], config.get("checkpoint_url"))
    else:
        state, invoked = start_run(gw, config)
    note = lambda m: click.echo(f"\nnote: {m}", err=True)  # noqa: E731
    if not progress:
        return watch(gw, state, invoked, timeout=timeout, on_note=note)
    total = state["config"]["iterations"]
    label = f"run {state['run_id']} ({state['workers']} workers)"
    with click.progressbar(length=total, label=label, show_eta=False,
                           item_show_func=lambda s: s, file=sys.stderr) as bar:
        seen = [0]

        def on_status(st: dict[str, Any]) -> None:
            prog = [p for p in st["progress"] if p]
            it = max((p["iteration"] for p in prog), default=0)
            bar.update(it - seen[0], "  ".join(
                f"w{p['worker_id']} it {p['iteration']} acc {p['accuracy']:.3f}" for p in prog))
            seen[0] = it

        return watch(gw, state, invoked, timeout=timeout, on_status=on_status, on_note=note)


def _flags_given(kw: dict[str, Any], keep: tuple[str, ...]) -> list[str]:
    return [flag for flag, dest, _, _ in TRAIN_OPTIONS if kw.get(dest) is not None
            and dest not in keep]


@click.command()
@train_options
@stack_option
@store_option
@click.option("--timeout", type=float, default=1800, show_default=True, help="Seconds to wait.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write results here.")
@click.option("--down", is_flag=True, help="Stop the local stack afterwards if this started it.")
@click.option("--resume", "resume_id", metavar="RUN_ID",
              help="Resume a run with its own configuration (restoring it from its checkpoint "
                   "if the store lost it); only --checkpoint-url of the training options.")
@pass_ctx
@friendly
def train(c: Ctx, stack: str, store: str, timeout: float, json_out: str | None, down: bool,
          resume_id: str | None, **kw: Any) -> None:
    """Run the main job: local stack up, setup, N workers, results table."""
    if resume_id:
        dropped = _flags_given(kw, RESUME_KEEPS)
        if dropped:
            raise click.UsageError(
                f"--resume {resume_id} continues that run with its own configuration: "
                f"{', '.join(dropped)} cannot change it (drop "
                f"{'it' if len(dropped) == 1 else 'them'}; only --checkpoint-url goes with "
                "--resume)")
        config = {"resume": resume_id,
                  **train_config({"checkpoint_url": kw["checkpoint_url"]}, c.gateway)}
    else:
        config = train_config(kw, c.gateway)
    out = run_training(c, config, stack=stack, store=store, timeout=timeout, down=down)
    rows = sorted(out.results, key=lambda r: r["worker_id"])
    click.echo(format_table(rows, WORKER_COLUMNS))
    verdict = "reached" if out.reached else "did NOT reach"
    click.echo(f"run {out.run_id}: {verdict} target accuracy {out.target} in "
               f"{out.seconds:.2f}s from setup to the last worker")
    for line in out.recoveries:
        click.echo(f"recovery: {line}", err=True)
    write_json(json_out, rows)
    if not out.reached:
        sys.exit(1)


STATUS_COLUMNS = [("worker_id", "worker", ""), ("iteration", "iteration", ""),
                  ("accuracy", "accuracy", ".4f"), ("done", "done", ""),
                  ("silent_s", "last heartbeat (s ago)", ".1f"),
                  ("invocations", "invocations", ""), ("stop_reason", "stopped by", ""),
                  ("hostname", "name", "")]


@click.command("status")
@click.argument("run_id")
@click.option("--store", hidden=True, default=None,
              help="Accepted for old scripts; not used (a note says so).")
@pass_ctx
@friendly
def status_cmd(c: Ctx, run_id: str, store: str | None) -> None:
    """Per-worker progress of a run (through emnist-setup)."""
    if store:
        click.echo("note: --store is not used: emnist-setup reads the run from the store its "
                   "deployment configures", err=True)
    st = status(c.gw, run_id)
    rows = []
    for w, (p, r) in enumerate(zip(st["progress"], st["results"])):
        row = {**(p or {}), **(r or {}), "worker_id": w}
        if p and p.get("heartbeat"):
            row["silent_s"] = st["now"] - p["heartbeat"]
        rows.append(row)
    click.echo(format_table(rows, STATUS_COLUMNS))
