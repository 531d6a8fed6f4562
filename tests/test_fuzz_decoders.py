"""Fuzz every decoder of bytes that cross a boundary: store values, checkpoints, p2p messages,
p2p split files and training shards. Any change to valid bytes must be refused cleanly (the
decoder's own error), never used, never a crash or another exception type."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from emnist.data import DataError, open_shard, open_test
from emnist.p2p import messages
from emnist.p2p.compress import make as make_compressor
from emnist.p2p.split import Location
from emnist.store import codec
from emnist.train import checkpoint

FUZZ = settings(max_examples=1000, deadline=None, derandomize=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def mutated(draw, original: bytes) -> bytes:
    """``original`` changed by a bit flip, an overwrite, a cut, an insertion or an append."""
    n = len(original)
    kind = draw(st.sampled_from(["flip", "overwrite", "truncate", "insert", "append", "random"]))
    data = bytearray(original)
    if kind == "flip":
        at = draw(st.integers(0, n - 1))
        data[at] ^= 1 << draw(st.integers(0, 7))
    elif kind == "overwrite":
        at = draw(st.integers(0, n - 1))
        chunk = draw(st.binary(min_size=1, max_size=16))
        end = min(n, at + len(chunk))
        if bytes(data[at:end]) == chunk[:end - at]:  # same bytes: flip one instead
            chunk = bytes([chunk[0] ^ 0xFF]) + chunk[1:]
        data[at:end] = chunk[:end - at]
    elif kind == "truncate":
        del data[draw(st.integers(0, n - 1)):]
    elif kind == "insert":
        at = draw(st.integers(0, n))
        data[at:at] = draw(st.binary(min_size=1, max_size=16))
    elif kind == "append":
        data += draw(st.binary(min_size=1, max_size=64))
    else:
        data = bytearray(draw(st.binary(max_size=256)))
    out = bytes(data)
    if out == original:
        out = original + b"\0"
    return out


VECTOR = np.arange(97, dtype=np.float32) / 7
VALUE = codec.encode(VECTOR, clock=5)
DOC = codec.encode_doc({"run_id": "r1", "workers": 2, "config": {"alpha": 0.2}})


@FUZZ
@given(data=mutated(VALUE))
def test_codec_refuses_every_corrupted_array(data):
    with pytest.raises(codec.CorruptValue):
        codec.decode("k", data, dtype=np.float32, shape=VECTOR.shape)


@FUZZ
@given(data=mutated(DOC))
def test_codec_refuses_every_corrupted_document(data):
    with pytest.raises(codec.CorruptValue):
        codec.decode_doc("k", data)


BLOB = checkpoint.pack({"run": {"run_id": "r1"}, "workers": {}}, VECTOR)


@FUZZ
@given(data=mutated(BLOB))
def test_checkpoint_refuses_every_corrupted_blob(data):
    with pytest.raises(codec.CorruptValue):
        checkpoint.unpack("ckpt", data)


def _message(compression: str) -> bytes:
    comp = make_compressor(compression, seed=1, ratio=0.1)
    grad = np.linspace(-1, 1, 200, dtype=np.float32)
    return messages.gradient("r1", 3, 1, 0, comp, comp.compress(grad), 200, 0.5)


@pytest.mark.parametrize("compression", ["none", "qsgd", "topk"])
def test_p2p_messages_refuse_every_corruption(compression):
    original = _message(compression)

    @FUZZ
    @given(data=mutated(original))
    def check(data):
        with pytest.raises(messages.BadMessage):
            msg = messages.unpack(data, "peer 0")
            messages.check(msg, run="r1", kind="grad", size=3, step=3, epoch=1)
            messages.read_gradient(msg, make_compressor(compression, seed=1, ratio=0.1), 200)

    # the original itself is accepted: the refusals above are about the corruption
    msg = messages.unpack(original, "peer 0")
    messages.check(msg, run="r1", kind="grad", size=3, step=3, epoch=1)
    assert messages.read_gradient(msg, make_compressor(compression, seed=1, ratio=0.1),
                                  200).shape == (200,)
    check()


def test_p2p_split_files_refuse_every_corruption(tmp_path):
    arr = np.arange(60, dtype=np.uint8).reshape(6, 10)
    original = codec.encode(arr)
    loc = Location(str(tmp_path))
    target = tmp_path / "peer-0" / "train-x"
    target.parent.mkdir()

    @FUZZ
    @given(data=mutated(original))
    def check(data):
        target.write_bytes(data)
        with pytest.raises(DataError):
            loc.array("peer-0/train-x")

    target.write_bytes(original)
    assert np.array_equal(loc.array("peer-0/train-x"), arr)
    check()


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory) -> Path:
    """A real shard set (the synthetic dataset, 2 workers), prepared once."""
    from emnist.data import prepare_shards

    return prepare_shards("synthetic", None, 2, tmp_path_factory.mktemp("shards"), seed=0)


@pytest.mark.parametrize("name", ["worker-0-x.npy", "worker-0-y.npy", "manifest.json"])
def test_shards_refuse_every_corrupted_file(shard_dir, name):
    path = shard_dir / name
    original = path.read_bytes()

    @settings(max_examples=350, deadline=None, derandomize=True,
              suppress_health_check=[HealthCheck.too_slow])
    @given(data=mutated(original))
    def check(data):
        path.write_bytes(data)
        try:
            with pytest.raises(DataError):
                shard = open_shard(shard_dir, 0)
                open_test(shard_dir)
                raise AssertionError(f"corrupted {name} was accepted "
                                     f"({len(shard.y)} samples)")
        finally:
            path.write_bytes(original)

    check()
    shard = open_shard(shard_dir, 0)
    assert json.loads((shard_dir / "manifest.json").read_text())["workers"] == 2
    assert len(shard.y) > 0
