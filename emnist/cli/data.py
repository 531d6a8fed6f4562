"""`emnist data ...`: prepared sets at a data URL (prepare, ls, rm) and partitions of a
dataset for peer-to-peer training (split).

Without ``--data-url`` the prepared-set commands use the stack's data location (emnist-setup's
``data_location`` in the stack file, ``${VAR}`` substituted from this shell as `emnist up`
does), so `emnist data ls` lists what the stack's runs train on: with the default stack that
is ``store:/``, the sets kept in the store (``--store`` / STORE_URL, the store `emnist up`
gives the functions). A stack file that is absent or sets no data location falls back to the
cache's shards/.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any

import click

from emnist.cli.base import DEFAULT_STORE, friendly, write_json
from emnist.cli.p2p import default_data_root


@click.group()
def data() -> None:
    """Datasets: prepared sets at a data URL, partitions for peer-to-peer training."""


@data.command("split")
@click.option("--peers", type=click.IntRange(1), required=True, help="Number of peers.")
@click.option("--batches", "batch_size", type=click.IntRange(1), default=None,
              help="Also write per-batch files of this size (for emnist-grad).")
@click.option("--dataset", default="fashion-mnist", show_default=True)
@click.option("--dataset-dir", default=None, help="Where the dataset files are.")
@click.option("--out", default=None,
              help="Local directory to write the split under (serve it over HTTP for remote "
                   "functions) [default: the cache's p2p-data/].")
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--val-fraction", type=float, default=1 / 12, show_default=True,
              help="Part of each peer's data held out for validation.")
@click.option("--train-samples", type=click.IntRange(1), default=None,
              help="Use only this many training samples (the first of the seeded permutation).")
@click.option("--test-samples", type=click.IntRange(1), default=None,
              help="Keep only this many test images.")
@friendly
def split_cmd(peers: int, batch_size: int | None, dataset: str, dataset_dir: str | None,
              out: str | None, seed: int, val_fraction: float, train_samples: int | None,
              test_samples: int | None) -> None:
    """Partition a dataset for N peers (and per-batch files); prints the split's location."""
    from emnist.p2p.split import split
    click.echo(split(dataset, dataset_dir, peers, out or default_data_root(), seed,
                     val_fraction, batch_size, train_samples, test_samples))


# -- prepared sets: a directory or s3://bucket/prefix ----------------------------------------

DATA_URL_ENV = "EMNIST_DATA_URL"
SETUP = "emnist-setup"


def stack_data_location(stack: str) -> str:
    """emnist-setup's ``data_location`` in the stack file (substituted from this shell's
    environment), "" when the file is absent, unreadable or sets none."""
    from emnist.gateway.stack import StackError, load_stack

    if not os.path.isfile(stack):
        return ""
    try:
        fn = load_stack(stack).functions.get(SETUP)
    except StackError:
        return ""
    return fn.environment.get("data_location", "") if fn is not None else ""


def _data_url(value: str | None, stack: str) -> str:
    from emnist.cli.stack import local_location
    from emnist.train.config import default_data_location

    if value:
        return value
    own = stack_data_location(stack)
    if own.startswith("store:"):
        return own
    return local_location(own) if own else default_data_location()


def _where(url: str, store: str) -> str:
    """``url`` for messages: a store:/ URL with the store it is in (no password)."""
    from emnist.store import redact

    return f"{url} (in {redact(store)})" if url.startswith("store:") else url


def _env(s3_endpoint: str | None, store: str) -> dict[str, str]:
    """This shell's environment (AWS_* keys or a profile, or the emnist S3 secrets) plus the
    endpoint from --s3-endpoint and, for store:/ URLs, the store from --store."""
    env = dict(os.environ)
    if s3_endpoint:
        env["s3_endpoint_url"] = s3_endpoint
    env["store_url"] = store
    return env


def data_url_options(fn: Callable[..., Any]) -> Callable[..., Any]:
    fn = click.option("--store", envvar="STORE_URL", default=DEFAULT_STORE, show_default=True,
                      help="The store that store:/ URLs name (env STORE_URL; what `emnist up` "
                      "gives the functions).")(fn)
    fn = click.option("--stack", "-f", default="emnist.yml", show_default=True,
                      help="Stack file whose emnist-setup data_location is the default "
                      "--data-url.")(fn)
    fn = click.option("--s3-endpoint", envvar="AWS_ENDPOINT_URL_S3", default=None,
                      metavar="URL", help="S3-compatible endpoint for s3:// URLs, e.g. "
                      "http://127.0.0.1:9000 (env AWS_ENDPOINT_URL_S3; keys from "
                      "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or a profile).")(fn)
    return click.option("--data-url", envvar=DATA_URL_ENV, default=None,
                        metavar="DIR|S3URL|store:/...",
                        help=f"Where prepared sets live: a directory, s3://bucket/prefix or "
                        f"store:/[prefix] (in --store) (env {DATA_URL_ENV}) [default: the "
                        "stack's data_location, else the cache's shards/].")(fn)


@data.command("prepare")
@click.option("--dataset", default="fashion-mnist", show_default=True,
              help="A dataset name, or fashion-mnist-gen (with --samples) for the generated "
                   "set.")
@click.option("--samples", type=click.IntRange(1), default=None,
              help="Size of the generated set, e.g. 1300000 (about 1 GB): names it "
                   "fashion-mnist-gen-<N>.")
@click.option("--workers", type=click.IntRange(1), required=True,
              help="Number of shards (train workers).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
              help="Seed of the permutation that cuts the shards (the run's seed).")
@click.option("--dataset-dir", default=None, help="Where the dataset files are.")
@click.option("--processes", type=click.IntRange(1), default=None,
              help="Processes generating images [default: every core].")
@data_url_options
@friendly
def prepare_cmd(dataset: str, samples: int | None, workers: int, seed: int,
                dataset_dir: str | None, processes: int | None, data_url: str | None,
                s3_endpoint: str | None, stack: str, store: str) -> None:
    """Write each worker's shard and the test set once at the data URL (content-addressed,
    published atomically; a rerun resumes an interrupted upload); prints the set's URL."""
    from emnist.data.generated import GEN_PREFIX, canonical_name
    from emnist.data.prepared import prepare_set

    if samples is not None:
        if dataset.rstrip("-") not in (GEN_PREFIX.rstrip("-"), "fashion-mnist"):
            raise click.UsageError("--samples is for the generated set: --dataset "
                                   "fashion-mnist-gen")
        dataset = canonical_name(samples)
    elif dataset.rstrip("-") == GEN_PREFIX.rstrip("-"):
        raise click.UsageError("--dataset fashion-mnist-gen needs --samples N")
    url = _data_url(data_url, stack)
    bar: list[Any] = []
    t0 = time.perf_counter()

    def on_total(total: int) -> None:
        bar.append(click.progressbar(length=total, label=f"{dataset} -> {_where(url, store)}",
                                     file=sys.stderr, show_pos=False, show_percent=True))
        bar[0].__enter__()

    try:
        ps = prepare_set(dataset, workers, url, seed=seed, root=dataset_dir,
                         env=_env(s3_endpoint, store), processes=processes,
                         progress=lambda n: bar[0].update(n) if bar else None,
                         on_total=on_total)
    finally:
        if bar:
            bar[0].__exit__(None, None, None)
    seconds = time.perf_counter() - t0
    mb = ps.nbytes / 1e6
    how = ("already there" if ps.reused else
           f"{mb:.0f} MB in {seconds:.1f} s" + (f", {len(ps.resumed)} files already uploaded"
                                                if ps.resumed else ""))
    click.echo(f"{ps.name}: {workers} shards of {sum(ps.manifest['sizes'])} samples ({how})",
               err=True)
    click.echo(ps.url)


@data.command("ls")
@data_url_options
@click.option("--json", "json_out", type=click.Path(dir_okay=False),
              help="Also write the list here.")
@friendly
def ls_cmd(data_url: str | None, s3_endpoint: str | None, stack: str, store: str,
           json_out: str | None) -> None:
    """List the prepared sets at the data URL (partial: an upload that did not finish)."""
    from dataclasses import asdict

    from emnist.data.prepared import list_sets

    url = _data_url(data_url, stack)
    sets = list_sets(url, _env(s3_endpoint, store))
    write_json(json_out, [asdict(s) for s in sets])
    if not sets:
        click.echo(f"no prepared sets at {_where(url, store)}", err=True)
        return
    click.echo(f"{'name':<48} {'dataset':<24} {'workers':>7} {'seed':>5} {'samples':>9} "
               f"{'MB':>8}  state")
    for s in sets:
        click.echo(f"{s.name:<48} {s.dataset or '?':<24} {s.workers or '?':>7} "
                   f"{s.seed if s.complete else '?':>5} {s.samples or '?':>9} "
                   f"{s.nbytes / 1e6:>8.1f}  {'complete' if s.complete else 'partial'}")


@data.command("rm")
@click.argument("names", nargs=-1, required=True)
@data_url_options
@click.option("--yes", is_flag=True, help="Do not ask for confirmation.")
@friendly
def rm_cmd(names: tuple[str, ...], data_url: str | None, s3_endpoint: str | None,
           stack: str, store: str, yes: bool) -> None:
    """Delete prepared sets (by name, as `emnist data ls` shows them)."""
    from emnist.data.prepared import remove_set

    url = _data_url(data_url, stack)
    if not yes:
        click.confirm(f"delete {len(names)} set(s) at {_where(url, store)}?", abort=True,
                      err=True)
    for name in names:
        count = remove_set(url, name, _env(s3_endpoint, store))
        click.echo(f"{name}: {count} files removed" if count else f"{name}: no such set")
