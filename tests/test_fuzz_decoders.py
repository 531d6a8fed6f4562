"""Fuzz every decoder of bytes that cross a boundary: store values, checkpoints, p2p messages,
p2p split files and training shards. Any change to valid bytes must be refused cleanly (the
decoder's own error), never used, never a crash or another exception type."""

from __future__ import annotations

import json
import tracemalloc
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


# -- store values a function reads back: forged documents and hostile numbers ------------------
# The store is not trusted (anyone who reaches memcached can write it): every document a
# function reads there, changed in any way, must be used within the caps or refused with the
# reader's own error, never an unhandled exception, never a large allocation.
STORE_FUZZ = settings(max_examples=300, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.too_slow])
LEAF = st.one_of(st.none(), st.booleans(), st.integers(-(2**70), 2**70), st.floats(),
                 st.text(max_size=12))
JSON = st.recursive(LEAF, lambda inner: st.lists(inner, max_size=4)
                    | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=10)
HOSTILE = st.one_of(st.sampled_from([
    0, -1, 1, 2, 255, 257, 65_537, 200_000, 2_000_000, 2**31, 2**53 + 1, 10**12, 10**30,
    1e308, float("nan"), float("inf"), "many", "", None, True, False, [], {}, [1, 2, 3],
    "/etc", "../../etc", "file:///etc", "http://127.0.0.1:1/x", "s3://other/x",
    "memcached://127.0.0.1:1", "redis://127.0.0.1:1/0", "local://x"]), JSON)
FUZZ_ENV = {"store_url": "memcached://127.0.0.1:11211", "data_location": "/srv/emnist/shards",
            "data_roots": "/srv/emnist", "checkpoint_roots": "/srv/ckpt", "max_workers": "8",
            "max_params": "100000"}
RUN = "fuzz-run"


@st.composite
def hostile(draw, valid: dict, nested: tuple[str, ...] = ()) -> object:
    """``valid`` with one field replaced, removed or added (or in one of its ``nested``
    objects), or replaced whole by another JSON value."""
    doc = json.loads(json.dumps(valid))
    kind = draw(st.sampled_from(["replace", "replace", "delete", "add", "nested", "whole"]))
    if kind == "whole":
        return draw(JSON)
    if kind == "nested" and nested:
        name = draw(st.sampled_from(nested))
        doc[name] = draw(hostile(valid[name]))
    elif kind == "delete":
        doc.pop(draw(st.sampled_from(sorted(doc))))
    elif kind == "add":
        doc[draw(st.text(max_size=8))] = draw(HOSTILE)
    else:
        doc[draw(st.sampled_from(sorted(doc)))] = draw(HOSTILE)
    return doc


class Peak:
    """Peak Python allocation inside the block."""

    def __enter__(self):
        tracemalloc.start()
        return self

    def __exit__(self, *exc):
        self.bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


@pytest.fixture(scope="module")
def fuzz_run():
    """A valid run in an in-process store: its document, layout and chunks."""
    from emnist.models import param_count
    from emnist.store import ParameterStore, open_kv
    from emnist.train.config import TrainConfig

    kv = open_kv("local://fuzz-store-values")
    cfg = TrainConfig(dataset="synthetic", hidden_size=8, number_of_workers=2,
                      store_url=FUZZ_ENV["store_url"], data_location=FUZZ_ENV["data_location"])
    spec = cfg.model_spec(10, (1, 28, 28))
    n = param_count(spec)
    ParameterStore(kv, RUN, chunk_bytes=4096).init(np.zeros(n, np.float32))
    doc = {"run_id": RUN, "config": cfg.to_dict(), "model": spec.to_dict(), "workers": 2,
           "shard_dir": "/srv/emnist/shards/synthetic-w2", "data_set": "synthetic-w2",
           "num_classes": 10, "image_shape": [1, 28, 28], "num_params": n,
           "steps_per_pass": 5, "started": 1.0}
    return kv, doc


def _put(kv, name: str, doc: object) -> None:
    from emnist.store.keys import key_for

    kv.set_many({key_for(RUN, name): codec.encode_doc(doc)})


@STORE_FUZZ
@given(data=st.data())
def test_forged_run_documents_are_used_within_the_caps_or_refused(fuzz_run, data):
    from emnist.store import MissingState
    from emnist.train.run import UnknownRun, load_run, resume_run, run_model, run_status
    from emnist.train.rundoc import checked_run

    kv, valid = fuzz_run
    doc = data.draw(hostile(valid, nested=("config", "model")))
    _put(kv, "run", doc)
    launched: list = []
    with Peak() as peak:
        try:
            status = run_status(kv, RUN, detail=True, env=FUZZ_ENV)
            assert len(status["progress"]) <= 8
        except (codec.CorruptValue, UnknownRun):
            pass
        try:
            store, state = load_run(kv, RUN, env=FUZZ_ENV)
            _, cfg = checked_run(store.key("run"), RUN, state, FUZZ_ENV)
            assert run_model(state, cfg, (1, 28, 28)).num_params == store.num_params
        except (codec.CorruptValue, MissingState, UnknownRun):
            pass
        try:
            resume_run(kv, RUN, start_worker=launched.append, env=FUZZ_ENV)
        except (codec.CorruptValue, UnknownRun):
            pass
    assert len(launched) <= 8 and peak.bytes < 32 << 20


@STORE_FUZZ
@given(data=st.data())
def test_forged_layouts_size_nothing_past_the_caps(data):
    from emnist.policy import DEFAULT_MAX_PARAMS
    from emnist.store import MissingState, ParameterStore, open_kv

    kv = open_kv("local://fuzz-layouts")
    valid = {"num_params": 1000, "chunk_elems": 64, "dtype": "float32", "created": 1.0}
    _put(kv, "layout", data.draw(hostile(valid)))
    store = ParameterStore(kv, RUN)
    with Peak() as peak:
        try:
            store.attach()
            assert store.num_params <= DEFAULT_MAX_PARAMS and len(store.keys) <= 1 << 16
        except (codec.CorruptValue, MissingState):
            pass
    assert peak.bytes < 16 << 20


@STORE_FUZZ
@given(data=st.data())
def test_forged_index_entries_are_dropped_and_the_listing_answers(data):
    from emnist.store import open_kv
    from emnist.train import runindex

    kv = open_kv("local://fuzz-index")
    good = {"run_id": "good-run", "algorithm": "downpour", "model": "mlp 784-8-10",
            "dataset": "synthetic", "workers": 2, "execution_type": 3, "started": 1.0}
    entries = data.draw(st.lists(hostile({**good, "run_id": "other-run"}), max_size=5))
    kv.set_many({runindex.RUNS: codec.encode_doc({"runs": [good, *entries]})})
    with Peak() as peak:
        listed = runindex.list_runs(kv, limit=100)
    assert "good-run" in [r["run_id"] for r in listed]
    assert all(runindex.valid_entry({k: r[k] for k in good if k in r}) for r in listed)
    assert peak.bytes < 16 << 20


@STORE_FUZZ
@given(data=st.data())
def test_forged_worker_states_and_notes_are_refused_or_resumed(data):
    from emnist.store import ParameterStore, open_kv
    from emnist.train.state import Lease, WorkerBusy, WorkerState, stored_docs

    kv = open_kv("local://fuzz-workers")
    valid = {**WorkerState(0, curve=[[1.0, 1, 0.5, 0.1, 100]],
                           resumes=[{"at": 1.0}]).to_dict(), "lease": "abc"}
    doc = data.draw(hostile(valid, nested=()))
    note = data.draw(st.lists(st.floats(), min_size=14, max_size=14))
    _put(kv, "worker:0", doc)
    kv.set_many({f"emnist:{RUN}:progress:0:abc": codec.encode(np.array(note, np.float64))})
    store = ParameterStore(kv, RUN)
    with Peak() as peak:
        docs = stored_docs(store, [0])
        assert set(docs) <= {"worker:0"}
        for d in docs.values():
            WorkerState.from_dict(d)
        try:
            st_ = Lease(store, 0, 1e-3).acquire("host", wait=0)
            assert st_.worker_id == 0 and isinstance(st_.iteration, int)
        except (codec.CorruptValue, WorkerBusy):
            pass
    assert peak.bytes < 16 << 20


@STORE_FUZZ
@given(data=st.data())
def test_a_sealed_document_changed_in_any_way_does_not_verify(fuzz_run, data):
    from emnist.store import ParameterStore
    from emnist.store.keys import key_for
    from emnist.store.signing import SealedKV, Sealer

    kv, valid = fuzz_run
    sealed = SealedKV(kv, Sealer(b"fuzz-key-0123456789abcdef"))
    ParameterStore(sealed, RUN).put_doc("run", valid)
    key = key_for(RUN, "run")
    stored = codec.decode_doc(key, kv.get_many([key])[key])
    changed = data.draw(hostile(stored, nested=("config", "model")))
    _put(kv, "run", changed)
    if changed == stored:
        return
    with pytest.raises(codec.CorruptValue):
        ParameterStore(sealed, RUN).get_doc("run")
