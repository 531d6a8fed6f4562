"""``store:`` data locations: prepared sets kept in the parameter store itself, so a stack
without a shared disk (OpenFaaS) trains with nothing but its store.

Real memcached and Redis on loopback, real Fashion-MNIST, the real local gateway running
emnist.yml (whose default data location is ``store:/``). The store is untrusted: forged
headers, chunks and indexes are refused before anything is sized from them, and an evicted
chunk ends a run within seconds with a message that says what happened and how to fix it."""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from crc32c import crc32c

from emnist import policy
from emnist.cli import main
from emnist.data import DataError
from emnist.data import kvlocation as kvl
from emnist.data.cache import open_set
from emnist.data.datasets import FASHION_DEBIAN_ROOT
from emnist.data.kvlocation import CHUNK_BYTES, EVICTED, KVLocation
from emnist.data.location import is_remote, open_location
from emnist.data.npyio import file_crc
from emnist.data.prepared import (
    MANIFEST,
    ensure_set,
    find_set,
    list_sets,
    prepare_set,
    prepared_limit,
    remove_set,
)
from emnist.faas import answer_for
from emnist.store import DEFAULT_STORE_URL, ParameterStore, codec, open_kv
from emnist.train.config import FIELD_KINDS, TrainConfig
from emnist.train.rundoc import RunRefused, checked_run
from tests.conftest import MEMCACHED_URL, REDIS_URL
from tests.handlers import Context, Event, load_handler
from tests.servers import ROOT, free_port, local_gateway, start_memcached

URLS = {"memcached": MEMCACHED_URL, "redis": REDIS_URL}


def _prefix() -> str:
    return f"store:/t{secrets.token_hex(5)}"


@pytest.fixture(scope="module")
def mc() -> Iterator[str]:
    """A memcached of this module's own: a whole set written into the tests' shared one,
    full of every other test's runs, can be evicted while it is written (memcached evicts
    within a slab class that has no free page)."""
    with own_memcached() as url:
        yield url


@pytest.fixture(params=sorted(URLS))
def store_env(request, mc) -> dict[str, str]:
    """A function's environment naming one real store (memcached, or Redis in the tests'
    database)."""
    return {"store_url": mc if request.param == "memcached" else URLS[request.param]}


@pytest.fixture
def loc(store_env):
    where = KVLocation(_prefix(), store_env)
    yield where
    where.delete("")


def _header(loc: KVLocation, name: str) -> dict:
    key = kvl._file_key(loc._path(name))
    return codec.decode_doc(key, loc.kv.get_many([key])[key])


def _chunk_keys(loc: KVLocation, name: str) -> list[str]:
    head = _header(loc, name)
    return [kvl._chunk_key(loc._path(name), head["gen"], i) for i in range(head["chunks"])]


class Spy:
    """A KV that records every key read."""

    def __init__(self, kv) -> None:
        self.kv, self.asked = kv, []
        self.url = kv.url

    def get_many(self, keys):
        self.asked += keys
        return self.kv.get_many(keys)

    def __getattr__(self, name):
        return getattr(self.kv, name)


# -- the location on its own ------------------------------------------------------------------

def test_files_round_trip_through_many_chunks(loc, tmp_path):
    data = np.random.default_rng(1).integers(0, 256, 5 * CHUNK_BYTES + 12345,
                                             dtype=np.uint8).tobytes()
    # pieces that straddle chunk boundaries, an empty one, one bigger than several chunks
    cuts = [0, 7, 7, CHUNK_BYTES - 3, CHUNK_BYTES + 5, 4 * CHUNK_BYTES + 1, len(data)]
    pieces = [memoryview(data)[a:b] for a, b in zip(cuts, cuts[1:])]
    assert loc.put("a/b/big.bin", pieces, len(data)) == crc32c(data)
    assert loc.put("top.txt", [b"hello"], 5) == crc32c(b"hello")
    assert loc.put("empty", [], 0) == 0
    exact = bytes(range(256)) * (2 * CHUNK_BYTES // 256)
    loc.put("a/exact.bin", [exact], len(exact))

    assert _header(loc, "a/b/big.bin")["chunks"] == 6
    assert _header(loc, "a/exact.bin")["chunks"] == 2 and _header(loc, "empty")["chunks"] == 0
    assert all(len(v) <= CHUNK_BYTES + 64 for v in loc.kv.get_many(
        _chunk_keys(loc, "a/b/big.bin")).values())  # below memcached's slab chunk
    assert loc.read("a/b/big.bin", 10 << 20) == data
    assert loc.read("a/exact.bin") == exact and loc.read("empty") == b""
    dest = tmp_path / "big"
    loc.download("a/b/big.bin", dest, len(data), crc32c(data))
    assert dest.read_bytes() == data
    info = loc.stat("a/b/big.bin")
    assert (info.size, info.crc32c) == (len(data), crc32c(data))
    assert loc.stat("a/b/nothing") is None
    assert [i.name for i in loc.list()] == ["a/b/big.bin", "a/exact.bin", "empty", "top.txt"]
    assert [i.name for i in loc.list("a/b")] == ["a/b/big.bin"]
    assert loc.dirs() == ["a"] and loc.child("a").dirs() == ["b"]
    assert [i.name for i in loc.child("a").list()] == ["b/big.bin", "exact.bin"]
    assert loc.child("a").read("b/big.bin", 10 << 20) == data
    with pytest.raises(DataError, match="larger than"):
        loc.read("a/b/big.bin", max_bytes=len(data) - 1)
    with pytest.raises(DataError, match="missing") as e:
        loc.read("a/none")
    assert e.value.missing
    with pytest.raises(DataError, match="planned"):
        loc.put("short", [b"abc"], 4)
    assert loc.stat("short") is None

    assert loc.delete("a/b/") == 1
    assert loc.dirs() == ["a"] and loc.child("a").dirs() == []  # an emptied directory goes
    keys = _chunk_keys(loc, "a/exact.bin")
    assert loc.delete("") == 3 and loc.list() == [] and loc.dirs() == []
    assert loc.kv.get_many(keys) == {}  # chunks deleted with their file


def test_a_rewrite_is_whole_and_drops_the_old_chunks(loc):
    loc.put("f", [b"x" * (CHUNK_BYTES + 1)], CHUNK_BYTES + 1)
    old = _chunk_keys(loc, "f")
    loc.put("f", [b"y" * 10], 10)
    assert loc.read("f") == b"y" * 10
    assert loc.kv.get_many(old) == {}
    assert [i.name for i in loc.list()] == ["f"]


def test_a_tampered_chunk_is_refused(loc, tmp_path):
    data = os.urandom(2 * CHUNK_BYTES + 99)
    loc.put("f", [data], len(data))
    key = _chunk_keys(loc, "f")[1]
    raw = bytearray(loc.kv.get_many([key])[key])
    raw[-1] ^= 1  # a flipped bit: the chunk's own checksum fails
    loc.kv.set_many({key: bytes(raw)})
    with pytest.raises(DataError, match="chunk 1 .* refused"):
        loc.read("f")
    # a replaced chunk that is a valid value on its own: the file's CRC-32C fails
    forged = codec.encode(np.frombuffer(os.urandom(CHUNK_BYTES), dtype=np.uint8))
    loc.kv.set_many({key: forged})
    with pytest.raises(DataError, match="CRC-32C"):
        loc.read("f")
    dest = tmp_path / "f"
    with pytest.raises(DataError, match="CRC-32C"):
        loc.download("f", dest, len(data), crc32c(data))
    assert not dest.exists()  # nothing half-checked is left for a caller to use
    with pytest.raises(DataError, match="expected"):
        loc.download("f", dest, len(data) + 1, crc32c(data))


def _forge(loc: KVLocation, name: str, **fields) -> None:
    good = _header(loc, name)
    key = kvl._file_key(loc._path(name))
    loc.kv.set_many({key: codec.encode_doc({**good, **fields})})


@pytest.mark.parametrize("fields, why", [
    ({"size": 1 << 60, "chunks": (1 << 60) // CHUNK_BYTES}, "size"),
    ({"chunks": 10 ** 12}, "chunks"),
    ({"size": 3 * CHUNK_BYTES}, "chunks"),  # a size its chunk count does not carry
    ({"chunk_bytes": 1}, "chunk_bytes"),
    ({"size": -1}, "size"),
    ({"size": True}, "size"),
    ({"gen": "../../x"}, "gen"),
    ({"path": "other/file"}, "another file"),
    ({"modified": "now"}, "modified"),
])
def test_a_forged_header_is_refused_before_anything_is_sized(loc, tmp_path, fields, why):
    loc.put("f", [b"z" * 100], 100)
    _forge(loc, "f", **fields)
    spy = KVLocation(loc.url, kv=Spy(loc.kv))
    tracemalloc.start()
    try:
        with pytest.raises(DataError, match=f"refused .*{why}"):
            spy.read("f")
        with pytest.raises(DataError, match="refused"):
            spy.download("f", tmp_path / "f", 100, crc32c(b"z" * 100))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 1 << 20, peak
    assert not any(":c:" in k for k in spy.kv.asked)  # no chunk was even asked for
    assert spy.stat("f") is None and spy.list() == []  # a refused header is no file


def test_a_header_within_the_caps_is_still_held_to_what_the_caller_expects(loc, tmp_path):
    loc.put("f", [b"z" * 100], 100)
    big = kvl.MAX_FILE_BYTES
    _forge(loc, "f", size=big, chunks=-(-big // CHUNK_BYTES))
    spy = KVLocation(loc.url, kv=Spy(loc.kv))
    with pytest.raises(DataError, match="larger than"):
        spy.read("f", max_bytes=64 << 20)
    with pytest.raises(DataError, match="where 100 were expected"):
        spy.download("f", tmp_path / "f", 100, crc32c(b"z" * 100))
    assert not any(":c:" in k for k in spy.kv.asked) and not (tmp_path / "f").exists()
    assert spy.stat("f").size == big  # listed as it claims, read never beyond the caller's cap


def test_oversized_or_damaged_values_are_refused_before_decoding(loc):
    loc.put("d/f", [b"1"], 1)
    path = loc._path("d/f")
    fkey = kvl._file_key(path)
    loc.kv.set_many({fkey: codec.encode_doc({"pad": "x" * (kvl.MAX_HEADER_BYTES + 10)})})
    with pytest.raises(DataError, match="a header of .* bytes"):
        loc.read("d/f")
    loc.kv.set_many({fkey: b"not a codec value"})
    with pytest.raises(DataError, match="refused"):
        loc.read("d/f")
    loc.put("d/f", [b"1"], 1)
    dkey = kvl._dir_key(loc._path("d"))
    for forged in (
            codec.encode_doc({"files": ["a" * 200] * 4800, "dirs": []}),  # > MAX_INDEX_BYTES
            codec.encode_doc({"files": [f"n{i}" for i in range(kvl.MAX_DIR_ENTRIES + 1)],
                              "dirs": []}),
            codec.encode_doc({"files": ["../../etc"], "dirs": []}),
            codec.encode_doc({"files": "f", "dirs": []}),
            b"\x00" * 64):
        loc.kv.set_many({dkey: forged})
        assert loc.child("d").list() == [] and loc.list() == []  # read as an empty index
    assert loc.child("d").read("f") == b"1"  # the file itself stays readable by name
    loc.child("d").put("g", [b"2"], 1)  # and a write repairs the index
    assert [i.name for i in loc.child("d").list()] == ["g"]
    loc.child("d").put("f", [b"1"], 1)  # listed again: the fixture removes it


def test_an_evicted_chunk_says_so_and_how_to_fix_it(loc, tmp_path):
    data = os.urandom(3 * CHUNK_BYTES)
    loc.put("f", [data], len(data))
    keys = _chunk_keys(loc, "f")
    loc.kv.delete_many([keys[1]])  # what memcached does when its memory is full
    with pytest.raises(DataError) as e:
        loc.download("f", tmp_path / "f", len(data), crc32c(data))
    err = e.value
    assert "chunk 1 of 3" in str(err) and "evicted" in str(err)
    assert err.public == EVICTED and err.missing and err.field == "data_location"
    assert not (tmp_path / "f").exists()
    # what a worker answers and notes for `emnist train` (record_failure keeps 300 chars)
    answer = answer_for(err, "run_id")
    text = answer["body"]["error"]
    assert answer["statusCode"] == 404 and len(text) <= 300
    assert text.startswith("data_location: the run's data were evicted from the parameter "
                           "store") and "more memory" in text and "s3://" in text
    # the broken file is gone (so the next setup prepares it again), its other chunks too
    assert loc.stat("f") is None and loc.kv.get_many(keys) == {}


def test_the_store_is_the_environments_and_a_url_names_no_host(tmp_path):
    prefix = _prefix()
    in_redis = KVLocation(prefix, {"store_url": REDIS_URL})
    try:
        in_redis.put("f", [b"r"], 1)
        assert KVLocation(prefix, {"store_url": MEMCACHED_URL}).stat("f") is None
        assert open_location(prefix, {"store_url": REDIS_URL}).read("f") == b"r"
    finally:
        in_redis.delete("")
    assert KVLocation("store:/", {}).kv.url == DEFAULT_STORE_URL  # no store_url: the default
    for url in ("store://127.0.0.1:6379/x", "store://evil/x", "store:x", "store:/a/../b",
                "store:/a//b", "store:/a?host=evil", "store:/a#b", "store:/a\\b",
                "store:/" + "a" * 2000):
        with pytest.raises(DataError) as e:
            open_location(url, {"store_url": MEMCACHED_URL})
        assert e.value.field == "data_location" and "store:/" in e.value.public
    with pytest.raises(DataError, match="memcached:// or redis://"):
        open_location("store:/", {"store_url": "file:///etc"})
    assert is_remote("store:/") and is_remote("store:/a") and not is_remote(str(tmp_path))
    assert KVLocation("store:", {}).url == "store:/" and KVLocation("store:/a/", {}).url == \
        "store:/a"
    assert KVLocation("store:/a", {}).child("b").where("c") == "store:/a/b/c"


# -- prepared sets and the worker's reader ----------------------------------------------------

def test_prepare_ensure_and_read_a_set_in_the_store(store_env, tmp_path):
    url = _prefix()
    env = {**store_env, "EMNIST_HOME": str(tmp_path / "setup")}
    try:
        ps = prepare_set("fashion-mnist", 2, url, env=env)
        assert ps.url == f"{url}/{ps.name}" and not ps.reused
        assert not (tmp_path / "setup").exists()  # nothing on the preparing node's disk
        ref = prepare_set("fashion-mnist", 2, str(tmp_path / "dir"), env=env)
        assert (ps.name, ps.manifest) == (ref.name, ref.manifest)  # the same bytes
        again = ensure_set("fashion-mnist", 2, url, env=env)
        assert again.reused and again.url == ps.url
        # no upload markers: a store file's header records its size and CRC-32C itself
        assert sorted(i.name for i in open_location(ps.url, env).list()) == sorted(
            [MANIFEST, *ps.manifest["files"]])
        # a node without the source files finds it by its parameters
        found = find_set(url, "fashion-mnist", 2, 0, root=tmp_path / "nothing", env=env)
        assert found is not None and found.url == ps.url
        [summary] = list_sets(url, env)
        assert summary.complete and summary.name == ps.name and summary.samples == 60000
        # each worker on a node of its own: only its shard and the test set are fetched
        for w in range(2):
            node = {**store_env, "EMNIST_HOME": str(tmp_path / f"node-{w}")}
            reader = open_set(ps.url, node)
            shard = reader.shard(w)
            local = open_set(ref.url, env).shard(w)
            assert np.array_equal(shard.x, local.x) and np.array_equal(shard.y, local.y)
            tx, _ = reader.test()
            assert tx.shape == (10000, 784)
            cache = tmp_path / f"node-{w}" / "sets" / ps.name
            assert sorted(p.name for p in cache.iterdir()) == sorted(
                [MANIFEST, f"worker-{w}-x.npy", f"worker-{w}-y.npy", "test-x.npy",
                 "test-y.npy"])
            assert reader.stats.downloaded == sum(
                ps.manifest["files"][f]["bytes"] for f in reader.stats.fetched)
            assert open_set(ps.url, node).shard(w).x.shape == shard.x.shape  # from the cache
        assert remove_set(url, ps.name, env) == 7 and list_sets(url, env) == []
        assert remove_set(url, ps.name, env) == 0
    finally:
        open_location(url, store_env).delete("")


def test_an_evicted_file_is_prepared_again_and_nothing_else(tmp_path, mc):
    url = _prefix()
    env = {"store_url": mc, "EMNIST_HOME": str(tmp_path / "home")}
    try:
        ps = prepare_set("fashion-mnist", 2, url, env=env)
        loc = open_location(ps.url, env)
        loc.kv.delete_many(_chunk_keys(loc, "worker-1-x.npy")[:3])
        with pytest.raises(DataError, match="evicted"):
            open_set(ps.url, env).shard(1)
        again = ensure_set("fashion-mnist", 2, url, env=env)
        assert not again.reused and again.manifest == ps.manifest
        assert sorted(again.resumed) == sorted(set(ps.manifest["files"]) - {"worker-1-x.npy"})
        shard = open_set(ps.url, {**env, "EMNIST_HOME": str(tmp_path / "other")}).shard(1)
        ref = prepare_set("fashion-mnist", 2, str(tmp_path / "dir"), env=env)
        assert np.array_equal(shard.x, open_set(ref.url, env).shard(1).x)
    finally:
        open_location(url, env).delete("")


def test_the_sets_in_the_store_stay_within_their_bound(tmp_path, mc):
    url = _prefix()
    env = {"store_url": mc, "max_prepared_bytes": str(80 << 20)}
    assert prepared_limit({}, "store:/") == 128 << 20 and prepared_limit({}, "/d") == 16 << 30
    assert prepared_limit(env, url) == 80 << 20
    try:
        first = ensure_set("fashion-mnist", 2, url, env=env)
        second = ensure_set("fashion-mnist", 2, url, seed=1, env=env)  # 2 x 55 MB > 80 MB
        assert [s.name for s in list_sets(url, env)] == [second.name]
        assert open_location(first.url, env).list() == []  # evicted whole
        with pytest.raises(DataError, match="max_prepared_bytes") as e:
            ensure_set("fashion-mnist", 2, url, seed=2, env={**env, "max_prepared_bytes":
                                                                 str(40 << 20)})
        assert "store's memory" in e.value.public and e.value.field == "dataset"
        assert [s.name for s in list_sets(url, env)] == [second.name]
    finally:
        open_location(url, env).delete("")


# -- the policy: a request may name store: only where the operator allows ------------------------

def test_a_request_may_name_a_store_location_only_where_the_operator_allows():
    own_dir = {"store_url": MEMCACHED_URL, "data_location": "/srv/data"}
    with pytest.raises(policy.PolicyError) as e:
        TrainConfig.from_request(own_dir, {"data_location": "store:/"})
    assert e.value.field == "data_location"
    own_store = {"store_url": MEMCACHED_URL, "data_location": "store:/"}
    assert TrainConfig.from_request(own_store, {"data_location": "store:/"}).data_location == \
        "store:/"
    for other in ("store:/other", "store:", "/srv/data", "s3://bucket/x"):
        with pytest.raises(policy.PolicyError):
            TrainConfig.from_request(own_store, {"data_location": other})
    rooted = {**own_dir, "data_roots": "store:/shared"}
    for ok in ("store:/shared", "store:/shared/", "store:/shared/run/x"):
        assert TrainConfig.from_request(rooted, {"data_location": ok}).data_location == ok
    for bad in ("store:/sharedx", "store:/shared/../x", "store://evil:11211/shared",
                "store:/", "store:shared"):
        with pytest.raises(policy.PolicyError):
            TrainConfig.from_request(rooted, {"data_location": bad})
    # source files are on a disk: never a store: dataset_dir, whatever data_roots says
    with pytest.raises(policy.PolicyError):
        TrainConfig.from_request({**rooted, "data_roots": "store:/"},
                                 {"dataset_dir": "store:/x"})
    with pytest.raises(policy.PolicyError):  # nor a checkpoint place
        policy.check_checkpoint_url({"checkpoint_roots": "store:/"}, "store:/x", "")


def test_a_stored_run_document_names_a_store_location_only_where_the_function_keeps_its_own():
    run_id = "r" + secrets.token_hex(4)
    cfg = TrainConfig(data_location="store:/").to_dict()
    doc = {"run_id": run_id, "workers": 2, "started": 1.0, "num_params": 100,
           "steps_per_pass": 1, "shard_dir": "store:/fashion-mnist-w2-s0-0123456789ab",
           "config": cfg}
    own = {"store_url": DEFAULT_STORE_URL, "data_location": "store:/"}
    assert checked_run("k", run_id, doc, own)[0]["shard_dir"] == doc["shard_dir"]
    for env, shard_dir in ((own, "store:/../x"), (own, "store://evil:1/set"),
                           ({**own, "data_location": "store:/mine"}, "store:/theirs/set"),
                           ({**own, "data_location": "/srv/data"}, doc["shard_dir"])):
        cfg_env = {**cfg, "data_location": env["data_location"]}
        with pytest.raises(RunRefused, match="shard_dir"):
            checked_run("k", run_id, {**doc, "config": cfg_env, "shard_dir": shard_dir}, env)




def test_the_setup_function_refuses_a_store_location_its_operator_did_not_allow(
        monkeypatch, tmp_path):
    for name in (*FIELD_KINDS, *policy.POLICY_ENV, "gateway_url"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("store_url", MEMCACHED_URL)
    monkeypatch.setenv("data_location", str(tmp_path / "own"))
    handler = load_handler("emnist-setup", "store_data_setup_handler")
    url = _prefix()
    for body in ({"data_location": url, "number_of_workers": 2},
                 {"data_location": url + "/x", "number_of_workers": 2}):
        resp = handler.handle(Event(body), Context())
        assert resp["statusCode"] == 400, resp
        assert resp["body"]["error"].startswith("data_location: ")
    monkeypatch.setenv("data_location", "store:/mine")
    resp = handler.handle(Event({"data_location": url, "number_of_workers": 2}), Context())
    assert resp["statusCode"] == 400 and "data_location" in resp["body"]["error"]
    assert open_location(url, {"store_url": MEMCACHED_URL}).list() == []  # nothing written
    assert not (tmp_path / "own").exists()


# -- no shared disk: separate nodes, and the real local stack ----------------------------------

def test_workers_on_separate_nodes_train_from_the_store_alone(tmp_path, monkeypatch, run_id, mc):
    """Setup on one node, each worker on a node of its own (own cache, no dataset files):
    the data reach the workers only through the store."""
    from emnist.train.run import run_status, setup_run

    url = _prefix()
    empty = tmp_path / "no-datasets"
    empty.mkdir()
    monkeypatch.setenv("EMNIST_HOME", str(tmp_path / "setup-node"))
    monkeypatch.setenv("store_url", mc)
    monkeypatch.delenv("EMNIST_DATA_DIR", raising=False)
    try:
        cfg = TrainConfig(store_url=mc, dataset="fashion-mnist", data_location=url,
                          iterations=2, target_accuracy=0.99, number_of_workers=2)
        state = setup_run(cfg, open_kv(mc), 2, run_id=run_id)
        assert state["shard_dir"].startswith(url + "/") and not (tmp_path / "setup-node").exists()
        procs = []
        for w in range(2):
            node = {**os.environ, "EMNIST_HOME": str(tmp_path / f"node-{w}"),
                    "EMNIST_DATA_DIR": str(empty), "store_url": mc,
                    "PYTHONPATH": str(ROOT), "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "emnist.bench.dataworker", mc, run_id, str(w)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=node))
        for w, p in enumerate(procs):
            out, err = p.communicate(timeout=300)
            assert p.returncode == 0, err[-3000:]
            o = json.loads(out.strip().splitlines()[-1])
            assert o["iterations"] == 2 and o["accuracy"] > 0.5
            cache = tmp_path / f"node-{w}" / "sets" / state["data_set"]
            assert sorted(f.name for f in cache.iterdir()) == sorted(
                [MANIFEST, f"worker-{w}-x.npy", f"worker-{w}-y.npy", "test-x.npy",
                 "test-y.npy"])
            assert o["downloaded"] == sum(f.stat().st_size for f in cache.iterdir()
                                          if f.name != MANIFEST)
        assert run_status(open_kv(mc), run_id)["done"]
    finally:
        open_location(url, {"store_url": mc}).delete("")


@contextmanager
def own_memcached() -> Iterator[str]:
    """A memcached of the test's own, as large as `emnist up`'s: the stack's store:/ in a
    shared one is shared with whatever else runs, which may evict a set in use meanwhile."""
    port = free_port()
    proc = start_memcached(port, 256)
    try:
        yield f"memcached://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def _stack_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The local stack with its defaults (no DATA_LOCATION: emnist.yml's store:/), the
    replicas' home (and so their cache) in ``tmp``, nothing of an earlier run's cache."""
    env = {"STORE_URL": MEMCACHED_URL, "TRAIN_REPLICAS": "2", "GRAD_REPLICAS": "1",
           "HOME": str(tmp / "home"), **extra}
    for name in ("DATA_LOCATION", "DATASET_DIR", "DATA_ROOTS", "EMNIST_HOME",
                 "XDG_CACHE_HOME", "EMNIST_DATA_DIR"):
        env.setdefault(name, "")
    return env


def _train(gw_url: str, *args: str) -> tuple[object, float]:
    t0 = time.monotonic()
    r = CliRunner().invoke(main, ["--gateway", gw_url, "train", "--workers", "2",
                                  "--dataset", "fashion-mnist", *args])
    return r, time.monotonic() - t0


@pytest.mark.slow
def test_the_default_stack_trains_through_the_store(tmp_path):
    """`emnist train --workers 2` on the local stack with nothing but its defaults: setup
    keeps the set in the store (nothing on disk), each worker fetches its shard from there."""
    home = tmp_path / "home"
    with own_memcached() as url:
        with local_gateway(tmp_path, _stack_env(tmp_path, STORE_URL=url)) as gw:
            r, seconds = _train(gw.url, "--timeout", "240", "--json",
                                str(tmp_path / "rows.json"))
        assert r.exit_code == 0, r.output
        rows = json.loads((tmp_path / "rows.json").read_text())
        state = ParameterStore(open_kv(url), rows[0]["run_id"]).get_doc("run")
    assert len(rows) == 2 and all(row["accuracy"] > 0.5 for row in rows)
    assert state["config"]["data_location"] == "store:/"
    assert state["shard_dir"] == f"store:/{state['data_set']}"
    cache = home / ".cache" / "emnist"
    assert not (cache / "shards").exists()  # setup prepared nothing on a disk
    manifest = json.loads((cache / "sets" / state["data_set"] / MANIFEST).read_text())
    for w in range(2):  # each worker's shard arrived from the store, verified
        f = cache / "sets" / state["data_set"] / f"worker-{w}-x.npy"
        assert file_crc(f) == manifest["files"][f.name]["crc32c"]
    print(f"2-worker Fashion-MNIST run through the store: {seconds:.1f} s")


@pytest.mark.slow
def test_workers_whose_data_were_evicted_end_the_run_within_seconds(tmp_path):
    """The set is in the store but memcached dropped a shard's chunks: `emnist train` ends
    with the workers' reason within seconds, and the next run prepares the file again."""
    url = _prefix()
    with own_memcached() as store:
        env = {"store_url": store}
        ps = prepare_set("fashion-mnist", 2, url, env=env, root=FASHION_DEBIAN_ROOT)
        loc = open_location(ps.url, env)
        loc.kv.delete_many(_chunk_keys(loc, "worker-1-x.npy"))
        stack = _stack_env(tmp_path, STORE_URL=store, DATA_LOCATION=url)
        with local_gateway(tmp_path, stack) as gw:
            r, seconds = _train(gw.url, "--timeout", "120")
            assert r.exit_code == 1, r.output
            assert "worker 1 failed: data_location: the run's data were evicted from the " \
                   "parameter store" in r.output, r.output
            assert seconds < 20, seconds  # the reason, not the timeout
            assert loc.stat("worker-1-x.npy") is None  # removed: the next setup rewrites it
            r, _ = _train(gw.url, "--timeout", "240")
            assert r.exit_code == 0, r.output
        assert loc.stat("worker-1-x.npy").size == ps.manifest["files"]["worker-1-x.npy"]["bytes"]


def test_a_set_the_store_cannot_hold_fails_at_setup_saying_so(tmp_path):
    """A memcached too small for the set (8 MB for 55 MB) evicts its first chunks while its
    last are written: preparing fails at once with the reason (not every worker later), and
    leaves no header behind, so nothing reads the half-kept file."""
    port = free_port()
    proc = start_memcached(port, 8)
    try:
        env = {"store_url": f"memcached://127.0.0.1:{port}",
               "EMNIST_HOME": str(tmp_path / "home")}
        url = _prefix()
        with pytest.raises(DataError, match="evicted") as e:
            prepare_set("fashion-mnist", 2, url, env=env)
        assert e.value.public == kvl.EVICTED_WRITE and e.value.field == "data_location"
        assert open_location(url, env).list() == []
    finally:
        proc.terminate()
        proc.wait(10)
