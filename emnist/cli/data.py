"""`emnist data split`: partitions of a dataset for peer-to-peer training."""

from __future__ import annotations

import click

from emnist.cli.base import friendly
from emnist.cli.p2p import default_data_root


@click.group()
def data() -> None:
    """Datasets: partitions for peer-to-peer training."""


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
