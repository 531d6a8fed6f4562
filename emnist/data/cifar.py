"""CIFAR-10 from its binary release (``cifar-10-batches-bin``), validated strictly.

Each record is 1 label byte (0..9) and 3072 pixel bytes: the 1024 red values, then green,
then blue, each plane a row-major 32x32 image. The release has ``data_batch_1.bin`` ..
``data_batch_5.bin`` (training) and ``test_batch.bin``, 10000 records each (30,730,000
bytes), and ``batches.meta.txt`` with the 10 class names, one a line.

Returned layout (the same as the other datasets: uint8, one row per image): ``train_x`` is
(50000, 3072) and ``test_x`` (10000, 3072), each row the record's pixels unchanged, i.e.
channel-major (3, 32, 32) flattened: ``x.reshape(-1, 3, 32, 32)`` gives (N, C, H, W).
``IMAGE_SHAPE`` records that shape. Nothing is downloaded.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .datasets import Dataset
from .idx import DataError

__all__ = [
    "IMAGE_SHAPE",
    "RECORDS_PER_FILE",
    "TEST_FILE",
    "TRAIN_FILES",
    "find_cifar10",
    "load_cifar10",
    "read_batch",
    "read_meta",
    "release_files",
]

IMAGE_SHAPE = (3, 32, 32)
PIXELS = 3 * 32 * 32
RECORD = 1 + PIXELS
RECORDS_PER_FILE = 10000
TRAIN_FILES = tuple(f"data_batch_{i}.bin" for i in range(1, 6))
TEST_FILE = "test_batch.bin"
META_FILE = "batches.meta.txt"
RELEASE_DIR = "cifar-10-batches-bin"


def read_batch(path: str | os.PathLike[str],
               records: int | None = RECORDS_PER_FILE) -> tuple[np.ndarray, np.ndarray]:
    """One batch file -> (uint8 (N, 3072) pixels, uint8 (N,) labels).

    ``records`` is the record count required (the release's 10000); None accepts any
    whole number of records. Raises DataError naming the file on any mismatch.
    """
    p = Path(path)
    try:
        size = p.stat().st_size
    except OSError as e:
        raise DataError(f"{p.name}: cannot read ({e.strerror or e})") from None
    if size == 0 or size % RECORD:
        raise DataError(f"{p.name}: size {size} is not a whole number of {RECORD}-byte "
                        "CIFAR-10 records (1 label byte + 3072 pixel bytes)")
    n = size // RECORD
    if records is not None and n != records:
        raise DataError(f"{p.name}: {n} records, the CIFAR-10 release has {records} per file")
    raw = np.fromfile(p, dtype=np.uint8)
    if raw.size != size:  # the file changed between stat and read
        raise DataError(f"{p.name}: read {raw.size} bytes, expected {size}")
    rows = raw.reshape(n, RECORD)
    labels = rows[:, 0].copy()
    if labels.max() > 9:
        bad = int(np.argmax(labels > 9))
        raise DataError(f"{p.name}: record {bad} has label {labels[bad]}, outside 0..9")
    return np.ascontiguousarray(rows[:, 1:]), labels


def read_meta(path: str | os.PathLike[str]) -> list[str]:
    """The 10 class names of ``batches.meta.txt`` (blank lines ignored)."""
    p = Path(path)
    try:
        text = p.read_text(encoding="ascii")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{p.name}: cannot read class names ({e})") from None
    names = [line.strip() for line in text.splitlines() if line.strip()]
    if len(names) != 10:
        raise DataError(f"{p.name}: expected 10 class names, found {len(names)}")
    return names


def find_cifar10(root: str | os.PathLike[str]) -> Path:
    """The directory holding the release's files: ``root`` or ``root/cifar-10-batches-bin``."""
    base = Path(root).expanduser()
    needed = (*TRAIN_FILES, TEST_FILE, META_FILE)
    for cand in (base, base / RELEASE_DIR):
        if all((cand / f).is_file() for f in needed):
            return cand
    missing = [f for f in needed if not (base / f).is_file() and not (base / RELEASE_DIR / f)
               .is_file()]
    raise DataError(f"cifar10: missing {', '.join(missing or needed)} in {base} or "
                    f"{base / RELEASE_DIR} (the binary release; nothing is downloaded)",
                    missing=True)


def release_files(root: str | os.PathLike[str]) -> list[Path]:
    """The release's files under ``root`` (see ``find_cifar10``), training files first."""
    d = find_cifar10(root)
    return [d / f for f in (*TRAIN_FILES, TEST_FILE, META_FILE)]


def load_cifar10(root: str | os.PathLike[str],
                 records: int | None = RECORDS_PER_FILE) -> Dataset:
    """The release under ``root`` as a Dataset (layout in the module docstring).

    ``mapping`` is None; the class names are ``read_meta(find_cifar10(root) / META_FILE)``.
    """
    d = find_cifar10(root)
    read_meta(d / META_FILE)
    total = sum((d / f).stat().st_size // RECORD for f in TRAIN_FILES)
    train_x = np.empty((total, PIXELS), dtype=np.uint8)
    train_y = np.empty(total, dtype=np.uint8)
    at = 0
    for f in TRAIN_FILES:  # file by file into the final arrays: one file's copy at a time
        x, y = read_batch(d / f, records)
        if at + len(y) > total:
            raise DataError(f"{f}: grew while loading")
        train_x[at : at + len(y)], train_y[at : at + len(y)] = x, y
        at += len(y)
    if at != total:
        raise DataError("cifar10: training files shrank while loading")
    test_x, test_y = read_batch(d / TEST_FILE, records)
    return Dataset(train_x, train_y, test_x, test_y, 10, "cifar10", image_shape=IMAGE_SHAPE)
