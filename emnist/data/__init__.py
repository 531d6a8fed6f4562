"""Datasets (MNIST, Fashion-MNIST, EMNIST, CIFAR-10, synthetic) and per-worker memory-mapped
shards."""

from .datasets import DATA_DIR_ENV, DATASETS, Dataset, dataset_files, load_dataset, make_synthetic
from .emnist import EMNIST_SPLITS, load_emnist, load_emnist_idx, load_emnist_mat
from .idx import DataError, read_idx, write_idx
from .shards import Shard, load_manifest, open_shard, open_test, prepare_shards, shard_sizes

__all__ = [
    "DATASETS",
    "DATA_DIR_ENV",
    "EMNIST_SPLITS",
    "DataError",
    "Dataset",
    "Shard",
    "dataset_files",
    "load_dataset",
    "load_emnist",
    "load_emnist_idx",
    "load_emnist_mat",
    "load_manifest",
    "make_synthetic",
    "open_shard",
    "open_test",
    "prepare_shards",
    "read_idx",
    "shard_sizes",
    "write_idx",
]
