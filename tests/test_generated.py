"""The generated dataset (fashion-mnist-gen-<N>): sample i is one image whatever computes it."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
from crc32c import crc32c

from emnist.data import load_dataset
from emnist.data.cache import open_set
from emnist.data.generated import (
    GEN_VERSION,
    Generator,
    canonical_name,
    generate,
    generated_samples,
    labels_for,
)
from emnist.data.prepared import prepare_set
from tests.servers import ROOT


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion-mnist")


def test_the_first_60000_samples_are_the_training_set(fashion):
    idx = np.array([0, 1, 59_999, 31_337])
    assert np.array_equal(generate(fashion.train_x, idx), fashion.train_x[idx])
    assert np.array_equal(labels_for(fashion.train_y, idx + 60_000), fashion.train_y[idx])


def test_later_samples_are_deformed_copies_of_their_base(fashion):
    idx = np.arange(60_000, 62_000)
    out = generate(fashion.train_x, idx)
    base = fashion.train_x[idx % 60_000].astype(np.float64)
    assert (out != fashion.train_x[:2000]).mean() > 0.3  # really transformed
    # ... but still the same garment: far closer to its own base than to another class's
    own = np.abs(out - base).mean(axis=1)
    other = np.abs(out - fashion.train_x[(idx + 1) % 60_000].astype(np.float64)).mean(axis=1)
    assert (own < other).mean() > 0.8
    assert abs(out.mean() - base.mean()) < 5  # no systematic brightening or cropping


def test_sample_i_is_the_same_whatever_the_chunking_or_order(fashion):
    idx = np.arange(60_000, 63_100)
    whole = generate(fashion.train_x, idx)
    perm = np.random.default_rng(7).permutation(len(idx))
    assert np.array_equal(generate(fashion.train_x, idx[perm]), whole[perm])
    pieces = [generate(fashion.train_x, idx[s:s + n]) for s, n in
              ((0, 1), (1, 1023), (1024, 1025), (2049, 1051))]
    assert np.array_equal(np.concatenate(pieces), whole)
    one = [generate(fashion.train_x, [i])[0] for i in idx[[0, 1500, 3099]]]
    assert np.array_equal(np.stack(one), whole[[0, 1500, 3099]])


def test_processes_give_the_same_images(fashion):
    idx = np.random.default_rng(1).permutation(np.arange(60_000, 60_000 + 20_000))
    with Generator(fashion.train_x, processes=2) as gen:  # spawned processes
        parallel = np.concatenate(list(gen.rows(idx)))
    assert np.array_equal(parallel, generate(fashion.train_x, idx))


def test_another_interpreter_computes_the_same_pinned_bytes(fashion):
    """The images are a pure function of the sample number: pinned, so any change to the
    generator shows here (and must bump GEN_VERSION, which changes every set's key)."""
    code = ("import numpy as np; from crc32c import crc32c; from emnist.data import "
            "load_dataset; from emnist.data.generated import generate; "
            "x = load_dataset('fashion-mnist').train_x; "
            "print('%08x' % crc32c(generate(x, np.arange(60000, 60256)).tobytes()))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout.strip()
    here = f"{crc32c(generate(fashion.train_x, np.arange(60_000, 60_256)).tobytes()):08x}"
    assert out == here == "cd8aef23" and GEN_VERSION == 1


def test_names():
    assert generated_samples("fashion-mnist-gen-1300k") == 1_300_000
    assert generated_samples("Fashion-MNIST-gen-2m") == 2_000_000
    assert generated_samples("fashion-mnist-gen-70001") == 70_001
    assert generated_samples("fashion-mnist") is None
    assert canonical_name(1_300_000) == "fashion-mnist-gen-1300k"
    assert canonical_name(2_000_000) == "fashion-mnist-gen-2m"
    for bad in ("fashion-mnist-gen-0", "fashion-mnist-gen-999999999m"):
        with pytest.raises(ValueError):
            generated_samples(bad)


def test_a_prepared_generated_set_holds_the_permuted_samples(fashion, tmp_path):
    env = {"EMNIST_HOME": str(tmp_path / "home")}
    ps = prepare_set("fashion-mnist-gen-64000", 2, str(tmp_path), seed=3, env=env,
                     processes=2)
    again = prepare_set("fashion-mnist-gen-64k", 2, str(tmp_path), seed=3, env=env)
    assert again.reused and again.name == ps.name
    perm = np.random.default_rng(3).permutation(64_000)
    r = open_set(ps.url, env)
    s1 = r.shard(1)
    idx = perm[32_000:]
    assert np.array_equal(s1.y, labels_for(fashion.train_y, idx))
    assert np.array_equal(s1.x, generate(fashion.train_x, idx))
    tx, ty = r.test()  # the real test set stays the test set
    assert np.array_equal(tx, fashion.test_x) and np.array_equal(ty, fashion.test_y)
