"""Data layer tests: files are written in the exact release formats, then read back."""

from __future__ import annotations

import gzip
import json
import multiprocessing as mp
import os
from pathlib import Path

import numpy as np
import pytest

from emnist.data import (
    DATASETS,
    DataError,
    load_dataset,
    load_emnist_idx,
    load_emnist_mat,
    make_synthetic,
    open_shard,
    open_test,
    prepare_shards,
    read_idx,
    write_idx,
)
from emnist.data.shards import load_manifest

FASHION = Path("/usr/share/datasets/fashion-mnist")


# ---------------------------------------------------------------- IDX


@pytest.mark.parametrize("dtype", ["uint8", "int8", "int16", "int32", "float32", "float64"])
@pytest.mark.parametrize("compress", [True, False])
def test_idx_round_trip(tmp_path: Path, dtype: str, compress: bool) -> None:
    rng = np.random.default_rng(0)
    a = (rng.normal(0, 50, size=(3, 5, 7))).astype(dtype)
    p = write_idx(tmp_path / "a.idx", a, gzip=compress)
    raw = p.read_bytes()
    assert (raw[:2] == b"\x1f\x8b") == compress
    b = read_idx(p)
    assert b.dtype == np.dtype(dtype).newbyteorder("=")
    assert b.shape == a.shape
    np.testing.assert_array_equal(a, b)
    assert b.flags.writeable


def test_idx_exact_bytes_and_big_endian(tmp_path: Path) -> None:
    p = write_idx(tmp_path / "x", np.array([[1, 258]], dtype=np.int32), gzip=False)
    assert p.read_bytes() == bytes([0, 0, 0x0C, 2]) + (
        b"\x00\x00\x00\x01\x00\x00\x00\x02" + b"\x00\x00\x00\x01\x00\x00\x01\x02"
    )


def test_idx_gzip_detected_by_magic_not_extension(tmp_path: Path) -> None:
    a = np.arange(12, dtype=np.uint8).reshape(3, 4)
    plain = write_idx(tmp_path / "plain.gz", a, gzip=False)
    packed = write_idx(tmp_path / "packed.idx", a, gzip=True)
    np.testing.assert_array_equal(read_idx(plain), a)
    np.testing.assert_array_equal(read_idx(packed), a)


def _header(code: int, dims: tuple[int, ...]) -> bytes:
    return bytes([0, 0, code, len(dims)]) + b"".join(d.to_bytes(4, "big") for d in dims)


@pytest.mark.parametrize(
    "blob, match",
    [
        (b"\x01\x00\x08\x01\x00\x00\x00\x01\x00", "magic"),
        (_header(0x0A, (2,)) + b"\x00\x00", "dtype code"),
        (_header(0x08, ()), "0 dimensions"),
        (b"\x00\x00\x08\x02\x00\x00", "truncated IDX header"),
        (_header(0x08, (2, 3)) + bytes(5), "payload"),
        (_header(0x0C, (2,)) + bytes(7), "payload"),
        (_header(0x08, (2,)) + bytes(3), "trailing"),
        (b"\x00", "magic"),
    ],
)
@pytest.mark.parametrize("compress", [True, False])
def test_idx_corrupt(tmp_path: Path, blob: bytes, match: str, compress: bool) -> None:
    p = tmp_path / "bad-file.idx"
    p.write_bytes(gzip.compress(blob) if compress else blob)
    with pytest.raises(DataError, match=match) as e:
        read_idx(p)
    assert "bad-file.idx" in str(e.value)


def test_idx_truncated_gzip_stream(tmp_path: Path) -> None:
    p = write_idx(
        tmp_path / "t.gz", np.random.default_rng(0).integers(0, 255, (50, 50)).astype(np.uint8)
    )
    p.write_bytes(p.read_bytes()[:-30])
    with pytest.raises(DataError, match="t.gz"):
        read_idx(p)


def test_idx_missing_file(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="nope.gz"):
        read_idx(tmp_path / "nope.gz")


def test_write_idx_rejects_unsupported_dtype(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="IDX"):
        write_idx(tmp_path / "u", np.zeros(3, dtype=np.uint16))


# ---------------------------------------------------------------- EMNIST


def _upright_images(n: int, seed: int = 0) -> np.ndarray:
    """(n, 28, 28) images with a horizontal bar at the top-left: a transpose makes it vertical."""
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 40, size=(n, 28, 28)).astype(np.uint8)
    imgs[:, 1:3, 0:20] = 255
    for i in range(n):  # a per-image marker too, so image order is checked
        imgs[i, 27, i % 28] = 200
    return imgs


def _write_emnist_idx(
    d: Path,
    split: str,
    labels_train: np.ndarray,
    labels_test: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    d.mkdir(parents=True, exist_ok=True)
    tr, te = _upright_images(len(labels_train), 1), _upright_images(len(labels_test), 2)
    for part, imgs, labels in (("train", tr, labels_train), ("test", te, labels_test)):
        # The release stores each image transposed.
        write_idx(d / f"emnist-{split}-{part}-images-idx3-ubyte.gz", imgs.transpose(0, 2, 1))
        write_idx(d / f"emnist-{split}-{part}-labels-idx1-ubyte.gz", labels.astype(np.uint8))
    return tr.reshape(len(tr), 784), te.reshape(len(te), 784)


def _write_emnist_mat(
    path: Path,
    train_imgs: np.ndarray,
    train_labels: np.ndarray,
    test_imgs: np.ndarray,
    test_labels: np.ndarray,
    mapping: np.ndarray,
) -> None:
    import scipy.io as sio  # the `mat` extra, in the dev extra `make test` installs

    def part(imgs: np.ndarray, labels: np.ndarray) -> np.ndarray:
        s = np.empty((1, 1), dtype=[("images", object), ("labels", object)])
        # Each row is the image flattened column-major (Fortran order), as in the release.
        s[0, 0]["images"] = imgs.reshape(len(imgs), -1, order="F").astype(np.uint8)
        s[0, 0]["labels"] = labels.reshape(-1, 1).astype(np.float64)
        return s

    ds = np.empty((1, 1), dtype=[("train", object), ("test", object), ("mapping", object)])
    ds[0, 0]["train"] = part(train_imgs, train_labels)
    ds[0, 0]["test"] = part(test_imgs, test_labels)
    ds[0, 0]["mapping"] = mapping.astype(np.float64)
    path.parent.mkdir(parents=True, exist_ok=True)
    sio.savemat(str(path), {"dataset": ds})


def test_emnist_idx_is_returned_upright(tmp_path: Path) -> None:
    ytr = np.arange(30) % 10
    yte = np.arange(12) % 10
    tr, te = _write_emnist_idx(tmp_path, "digits", ytr, yte)
    ds = load_emnist_idx("digits", tmp_path)
    assert ds.train_x.dtype == np.uint8 and ds.train_x.shape == (30, 784)
    assert ds.train_x.flags.c_contiguous
    np.testing.assert_array_equal(ds.train_x, tr)
    np.testing.assert_array_equal(ds.test_x, te)
    np.testing.assert_array_equal(ds.train_y, ytr)
    assert ds.num_classes == 10 and ds.name == "emnist-digits"
    img = ds.train_x[0].reshape(28, 28)
    assert img[1, 15] == 255 and img[15, 1] < 255  # the bar is horizontal


def test_emnist_letters_idx_labels_shifted(tmp_path: Path) -> None:
    ytr = np.arange(52) % 26 + 1
    yte = np.arange(26) + 1
    _write_emnist_idx(tmp_path / "gzip", "letters", ytr, yte)
    ds = load_dataset("emnist-letters", tmp_path)  # found under root/gzip
    assert ds.num_classes == 26
    np.testing.assert_array_equal(ds.train_y, ytr - 1)
    assert ds.test_y.min() == 0 and ds.test_y.max() == 25


def test_emnist_letters_rejects_zero_label(tmp_path: Path) -> None:
    _write_emnist_idx(tmp_path, "letters", np.arange(26), np.arange(26) + 1)
    with pytest.raises(DataError, match="1..26"):
        load_emnist_idx("letters", tmp_path)


def test_emnist_mat_is_returned_upright(tmp_path: Path) -> None:
    ytr, yte = np.arange(40) % 26 + 1, np.arange(10) + 1
    tr, te = _upright_images(40, 3), _upright_images(10, 4)
    mapping = np.stack([np.arange(1, 27), np.arange(65, 91), np.arange(97, 123)], axis=1)
    path = tmp_path / "matlab" / "emnist-letters.mat"
    _write_emnist_mat(path, tr, ytr, te, yte, mapping)
    ds = load_dataset("emnist-letters", tmp_path)  # found under root/matlab
    assert ds.train_x.dtype == np.uint8 and ds.train_x.shape == (40, 784)
    np.testing.assert_array_equal(ds.train_x, tr.reshape(40, 784))
    np.testing.assert_array_equal(ds.test_x, te.reshape(10, 784))
    np.testing.assert_array_equal(ds.train_y, ytr - 1)
    assert ds.train_y.dtype == np.uint8
    assert ds.mapping is not None and ds.mapping[0] == ord("A") and ds.mapping[25] == ord("Z")
    assert ds.num_classes == 26
    img = ds.train_x[5].reshape(28, 28)
    assert img[1, 15] == 255 and img[15, 1] < 255


def test_emnist_mat_balanced_and_split_from_name(tmp_path: Path) -> None:
    ytr, yte = np.arange(47), np.arange(47)[::-1]
    tr, te = _upright_images(47, 5), _upright_images(47, 6)
    mapping = np.stack([np.arange(47), 48 + np.arange(47)], axis=1)
    path = tmp_path / "emnist-balanced.mat"
    _write_emnist_mat(path, tr, ytr, te, yte, mapping)
    ds = load_emnist_mat(path)
    assert ds.num_classes == 47 and ds.name == "emnist-balanced"
    np.testing.assert_array_equal(ds.test_y, yte)
    np.testing.assert_array_equal(ds.test_x, te.reshape(47, 784))


def test_emnist_mat_wrong_layout(tmp_path: Path) -> None:
    import scipy.io as sio

    p = tmp_path / "emnist-digits.mat"
    sio.savemat(str(p), {"something": np.zeros((2, 2))})
    with pytest.raises(DataError, match="emnist-digits.mat"):
        load_emnist_mat(p)


def test_emnist_missing_names_paths(tmp_path: Path) -> None:
    with pytest.raises(DataError) as e:
        load_dataset("emnist-byclass", tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "gzip") in msg and "emnist-byclass.mat" in msg


# ---------------------------------------------------------------- registry


def test_registry_names() -> None:
    assert {"mnist", "fashion-mnist", "synthetic", "emnist-bymerge", "emnist-mnist"} <= set(
        DATASETS
    )
    with pytest.raises(ValueError, match="known"):
        load_dataset("cifar")


def test_mnist_missing_and_env_override(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EMNIST_DATA_DIR", str(tmp_path))
    with pytest.raises(DataError) as e:
        load_dataset("fashion-mnist")
    assert str(tmp_path / "fashion-mnist" / "train-images-idx3-ubyte.gz") in str(e.value)
    assert "dataset-fashion-mnist" in str(e.value)
    d = tmp_path / "mnist"
    d.mkdir()
    imgs = _upright_images(20)
    write_idx(d / "train-images-idx3-ubyte.gz", imgs)
    write_idx(d / "train-labels-idx1-ubyte.gz", (np.arange(20) % 10).astype(np.uint8))
    write_idx(d / "t10k-images-idx3-ubyte.gz", imgs[:5])
    write_idx(d / "t10k-labels-idx1-ubyte.gz", np.arange(5, dtype=np.uint8))
    ds = load_dataset("mnist")
    np.testing.assert_array_equal(ds.train_x, imgs.reshape(20, 784))  # MNIST is not transposed
    assert ds.test_y.tolist() == [0, 1, 2, 3, 4]


def test_synthetic_deterministic_and_learnable() -> None:
    a, b = make_synthetic(), load_dataset("synthetic")
    np.testing.assert_array_equal(a.train_x, b.train_x)
    np.testing.assert_array_equal(a.test_y, b.test_y)
    assert a.train_x.dtype == np.uint8 and a.train_x.shape[1] == 784
    assert set(np.unique(a.train_y)) == set(range(10))
    # Nearest class mean from the training set classifies the test set well.
    x = a.train_x.astype(np.float32)
    means = np.stack([x[a.train_y == c].mean(0) for c in range(10)])
    d = ((a.test_x.astype(np.float32)[:, None, :] - means[None]) ** 2).sum(-1)
    assert (d.argmin(1) == a.test_y).mean() > 0.9


def test_fashion_mnist_upright() -> None:
    """`make test` installs dataset-fashion-mnist: a missing dataset fails here, loudly."""
    assert FASHION.is_dir(), f"{FASHION} is missing: apt-get install dataset-fashion-mnist"
    ds = load_dataset("fashion-mnist")
    assert ds.train_x.shape == (60000, 784) and ds.test_x.shape == (10000, 784)
    assert ds.train_x.dtype == np.uint8 and ds.train_y.dtype == np.uint8
    assert set(np.unique(ds.train_y)) == set(range(10)) and ds.num_classes == 10
    trouser = ds.train_x[ds.train_y == 1].astype(np.float64).mean(0).reshape(28, 28)
    thresh = 0.25 * trouser.max()
    rows = np.flatnonzero(trouser.max(1) > thresh)  # vertical extent
    cols = np.flatnonzero(trouser.max(0) > thresh)  # horizontal extent
    assert (rows[-1] - rows[0]) > (cols[-1] - cols[0]) + 5


# ---------------------------------------------------------------- shards


def test_shards_partition(tmp_path: Path) -> None:
    ds = make_synthetic()
    p = prepare_shards("synthetic", None, 3, tmp_path, seed=7)
    assert p.parent == tmp_path and p.name.startswith("synthetic-w3-s7-")
    shards = [open_shard(p, i) for i in range(3)]
    sizes = [len(s.y) for s in shards]
    assert sum(sizes) == len(ds.train_y) and max(sizes) - min(sizes) <= 1
    perm = np.random.default_rng(7).permutation(len(ds.train_y))
    np.testing.assert_array_equal(np.concatenate([s.x for s in shards]), ds.train_x[perm])
    np.testing.assert_array_equal(np.concatenate([s.y for s in shards]), ds.train_y[perm])
    for s in shards:
        assert isinstance(s.x, np.memmap) and isinstance(s.y, np.memmap)
        assert s.x.dtype == np.uint8 and s.x.shape[1] == 784 and not s.x.flags.writeable
        assert s.num_classes == 10 and s.workers == 3
    tx, ty = open_test(p)
    assert isinstance(tx, np.memmap)
    np.testing.assert_array_equal(tx, ds.test_x)
    np.testing.assert_array_equal(ty, ds.test_y)
    m = load_manifest(p)
    assert m["sizes"] == sizes and m["workers"] == 3 and m["seed"] == 7
    assert m["dataset"] == "synthetic" and m["num_classes"] == 10
    assert [q.name for q in tmp_path.iterdir()] == [p.name]  # no temp dirs left


def test_shards_uneven_sizes(tmp_path: Path) -> None:
    p = prepare_shards("synthetic", None, 7, tmp_path, seed=0)  # 4000 = 7*571 + 3
    sizes = load_manifest(p)["sizes"]
    assert sizes == [572, 572, 572, 571, 571, 571, 571]


def test_shards_deterministic_by_seed(tmp_path: Path) -> None:
    a = open_shard(prepare_shards("synthetic", None, 2, tmp_path / "a", seed=1), 0)
    b = open_shard(prepare_shards("synthetic", None, 2, tmp_path / "b", seed=1), 0)
    c = open_shard(prepare_shards("synthetic", None, 2, tmp_path / "c", seed=2), 0)
    np.testing.assert_array_equal(a.x, b.x)
    np.testing.assert_array_equal(a.y, b.y)
    assert not np.array_equal(a.y, c.y)


def test_shards_idempotent(tmp_path: Path) -> None:
    p1 = prepare_shards("synthetic", None, 2, tmp_path, seed=0)
    for f in p1.iterdir():  # a known old stamp: any rewrite would replace it
        os.utime(f, ns=(1, 1))
    files = {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in p1.iterdir()}
    p2 = prepare_shards("synthetic", None, 2, tmp_path, seed=0)
    assert p1 == p2
    assert {f.name: (f.stat().st_ino, f.stat().st_mtime_ns) for f in p2.iterdir()} == files
    assert {mtime for _, mtime in files.values()} == {1}


def test_shards_rebuild_damaged(tmp_path: Path) -> None:
    p = prepare_shards("synthetic", None, 2, tmp_path, seed=0)
    (p / "worker-1-x.npy").write_bytes(b"junk")
    assert prepare_shards("synthetic", None, 2, tmp_path, seed=0) == p
    assert open_shard(p, 1).x.shape == (2000, 784)
    assert sorted(q.name for q in tmp_path.iterdir()) == [p.name]


def test_shards_fingerprint_follows_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = tmp_path / "data" / "mnist"
    d.mkdir(parents=True)
    imgs = _upright_images(10)
    for name, arr in (
        ("train-images-idx3-ubyte.gz", imgs),
        ("train-labels-idx1-ubyte.gz", np.arange(10, dtype=np.uint8)),
        ("t10k-images-idx3-ubyte.gz", imgs[:2]),
        ("t10k-labels-idx1-ubyte.gz", np.arange(2, dtype=np.uint8)),
    ):
        write_idx(d / name, arr)
    monkeypatch.setenv("EMNIST_DATA_DIR", str(tmp_path / "data"))
    p1 = prepare_shards("mnist", None, 2, tmp_path / "out", seed=0)
    write_idx(d / "train-labels-idx1-ubyte.gz", np.arange(10, dtype=np.uint8)[::-1].copy())
    os.utime(d / "train-labels-idx1-ubyte.gz", ns=(1, 1))
    p2 = prepare_shards("mnist", None, 2, tmp_path / "out", seed=0)
    assert p1 != p2


def test_open_shard_errors(tmp_path: Path) -> None:
    p = prepare_shards("synthetic", None, 2, tmp_path, seed=0)
    with pytest.raises(ValueError, match=r"0\.\.1"):
        open_shard(p, 2)
    with pytest.raises(ValueError, match=r"0\.\.1"):
        open_shard(p, -1)
    with pytest.raises(DataError, match="manifest"):
        open_shard(tmp_path, 0)
    with pytest.raises(ValueError):
        prepare_shards("synthetic", None, 0, tmp_path, seed=0)


def test_shards_concurrent_processes(tmp_path: Path) -> None:
    ctx = mp.get_context("spawn")
    args = [("synthetic", None, 3, str(tmp_path), 5)] * 3
    with ctx.Pool(3) as pool:
        paths = pool.starmap(prepare_shards, args)
    assert len(set(paths)) == 1
    p = Path(paths[0])
    assert [q.name for q in tmp_path.iterdir()] == [p.name]
    m = json.loads((p / "manifest.json").read_text())
    assert sum(m["sizes"]) == 4000
    ys = np.concatenate([open_shard(p, i).y for i in range(3)])
    perm = np.random.default_rng(5).permutation(4000)
    np.testing.assert_array_equal(ys, make_synthetic().train_y[perm])


def test_shards_lost_race_keeps_winner(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A caller that built its set while another published first keeps the published one."""
    import emnist.data.prepared as prepared_mod

    p = prepare_shards("synthetic", None, 2, tmp_path, seed=3)
    stamps = {f.name: f.stat().st_mtime_ns for f in p.iterdir()}
    real = prepared_mod._complete
    calls: list = []

    def first_check_misses(loc, expected: dict):
        calls.append(loc)  # the first check misses, as if the winner had not yet renamed
        return real(loc, expected) if len(calls) > 1 else None

    monkeypatch.setattr(prepared_mod, "_complete", first_check_misses)
    assert prepare_shards("synthetic", None, 2, tmp_path, seed=3) == p
    assert {f.name: f.stat().st_mtime_ns for f in p.iterdir()} == stamps
    assert [q.name for q in tmp_path.iterdir()] == [p.name]
    assert len(calls) == 2  # the rename failed and the winner's set was checked
