"""CIFAR-10 binary release loader, on files written here in the release's exact layout."""

from pathlib import Path

import numpy as np
import pytest

from emnist.data.cifar import (
    IMAGE_SHAPE,
    RECORDS_PER_FILE,
    TEST_FILE,
    TRAIN_FILES,
    load_cifar10,
    read_batch,
    read_meta,
)
from emnist.data.idx import DataError

NAMES = ["airplane", "automobile", "bird", "cat", "deer",
         "dog", "frog", "horse", "ship", "truck"]


def _images(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(n, 3, 32, 32) uint8 images and labels 0..9."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8),
            rng.integers(0, 10, n, dtype=np.uint8))


def _write_batch(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """The release's record: 1 label byte, then R, G, B planes of 32x32 row-major bytes."""
    with open(path, "wb") as f:
        for img, label in zip(images, labels, strict=True):
            f.write(bytes([int(label)]))
            for c in range(3):
                for row in range(32):
                    f.write(bytes(img[c, row].tolist()))


def _write_release(root: Path, per_file: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    root.mkdir(parents=True, exist_ok=True)
    written = {}
    for i, name in enumerate((*TRAIN_FILES, TEST_FILE)):
        images, labels = _images(per_file, seed=i)
        _write_batch(root / name, images, labels)
        written[name] = (images, labels)
    (root / "batches.meta.txt").write_text("\n".join(NAMES) + "\n\n")
    return written


def test_loads_the_release_layout_channel_major(tmp_path):
    written = _write_release(tmp_path / "cifar-10-batches-bin", per_file=7)
    ds = load_cifar10(tmp_path, records=7)  # root or root/cifar-10-batches-bin both work
    assert ds.name == "cifar10" and ds.num_classes == 10
    assert ds.train_x.dtype == np.uint8 and ds.train_x.shape == (35, 3072)
    assert ds.test_x.shape == (7, 3072) and ds.train_y.shape == (35,)
    want_x = np.concatenate([written[f][0] for f in TRAIN_FILES])
    want_y = np.concatenate([written[f][1] for f in TRAIN_FILES])
    np.testing.assert_array_equal(ds.train_x.reshape(-1, *IMAGE_SHAPE), want_x)
    np.testing.assert_array_equal(ds.train_y, want_y)
    np.testing.assert_array_equal(ds.test_x.reshape(-1, *IMAGE_SHAPE), written[TEST_FILE][0])
    np.testing.assert_array_equal(ds.test_y, written[TEST_FILE][1])
    # one pixel by hand: record 3 of the test file, green plane, row 5, column 9
    raw = (tmp_path / "cifar-10-batches-bin" / TEST_FILE).read_bytes()
    assert ds.test_x[3, 1024 + 5 * 32 + 9] == raw[3 * 3073 + 1 + 1024 + 5 * 32 + 9]
    assert read_meta(tmp_path / "cifar-10-batches-bin" / "batches.meta.txt") == NAMES


def test_full_size_release_is_accepted_by_default(tmp_path):
    """The default is strict: 10000 records per file, as in the real release."""
    labels = (np.arange(RECORDS_PER_FILE) % 10).astype(np.uint8)
    rows = np.zeros((RECORDS_PER_FILE, 3073), dtype=np.uint8)
    rows[:, 0] = labels
    rows[:, 1:] = (np.arange(RECORDS_PER_FILE)[:, None] + np.arange(3072)) % 251
    for name in (*TRAIN_FILES, TEST_FILE):
        rows.tofile(tmp_path / name)
    (tmp_path / "batches.meta.txt").write_text("\n".join(NAMES))
    assert (tmp_path / TEST_FILE).stat().st_size == 30_730_000
    ds = load_cifar10(tmp_path)
    assert ds.train_x.shape == (50000, 3072) and ds.test_x.shape == (10000, 3072)
    assert ds.train_y[12345] == (12345 - 10000) % 10  # second file, record 2345
    np.testing.assert_array_equal(ds.test_x, rows[:, 1:])


def test_wrong_record_count_is_refused_by_default(tmp_path):
    _write_release(tmp_path, per_file=3)
    with pytest.raises(DataError, match="data_batch_1.bin: 3 records, the CIFAR-10 release has"):
        load_cifar10(tmp_path)


def test_size_not_a_multiple_of_the_record_is_refused(tmp_path):
    _write_release(tmp_path, per_file=2)
    with open(tmp_path / "data_batch_3.bin", "ab") as f:
        f.write(b"\x00" * 5)
    with pytest.raises(DataError, match="data_batch_3.bin: size 6151 is not a whole number"):
        load_cifar10(tmp_path, records=None)
    (tmp_path / "empty.bin").write_bytes(b"")
    with pytest.raises(DataError, match="empty.bin: size 0"):
        read_batch(tmp_path / "empty.bin", records=None)


def test_label_outside_0_to_9_is_refused(tmp_path):
    images, labels = _images(4, seed=1)
    labels[2] = 10
    _write_batch(tmp_path / "b.bin", images, labels)
    with pytest.raises(DataError, match="b.bin: record 2 has label 10, outside 0..9"):
        read_batch(tmp_path / "b.bin", records=4)


def test_missing_files_and_bad_meta_are_named(tmp_path):
    _write_release(tmp_path, per_file=1)
    (tmp_path / "data_batch_4.bin").unlink()
    with pytest.raises(DataError, match="missing data_batch_4.bin"):
        load_cifar10(tmp_path, records=1)
    _write_release(tmp_path, per_file=1)
    (tmp_path / "batches.meta.txt").write_text("cat\ndog\n")
    with pytest.raises(DataError, match="expected 10 class names, found 2"):
        load_cifar10(tmp_path, records=1)
    with pytest.raises(DataError, match="nope.bin: cannot read"):
        read_batch(tmp_path / "nope.bin")
