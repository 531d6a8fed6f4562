"""Vectors of hundreds of MB through the store, checkpoints and averaging in bounded batches.

A VGG11-sized vector (128.8M float32, 515 MB) round-trips through a memcached of its own
(-m 1200: the shared one has 256 MB) and Redis (a db of its own, flushed): fetch, atomic push
(integer-valued contents and deltas, so global == init + delta exactly), checkpoint write and
read; every round trip is counted by the KV's own counters (``kv.io``) and peak memory is
measured with tracemalloc in a subprocess (numpy's allocations are traced). The batching
rules themselves are checked at small scale with tiny chunks on every backend.
"""

from __future__ import annotations

import json
import math
import secrets
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import redis

from emnist.store import OutcomeUnknown, ParameterStore, open_kv
from emnist.store.params import DEFAULT_BATCH_BYTES, DEFAULT_BATCH_VALUES
from emnist.train.checkpoint import Checkpoints
from tests.conftest import MEMCACHED_URL
from tests.dropproxy import BACKENDS, DropProxy
from tests.servers import free_port, start_memcached, start_together

ROOT = Path(__file__).resolve().parents[1]
BIG_REDIS = "redis://127.0.0.1:6379/12"  # this module's own db, flushed around its tests
VGG11 = 128_807_306  # vgg11's parameters for 10 classes (the published 132,863,336 at 1000)
MB = 1 << 20


@pytest.fixture
def big_redis():
    kv = open_kv(BIG_REDIS)
    kv.r.flushdb()
    yield kv
    kv.r.flushdb()
    kv.close()


def small(kv, run_id, n=10_000, per=4, **kw) -> tuple[ParameterStore, np.ndarray]:
    """A store of 1 KiB chunks (40 of them for n=10,000), ``per`` chunks per round trip."""
    ps = ParameterStore(kv, run_id, chunk_bytes=1024, batch_values=per, **kw)
    init = (np.arange(n) % 1000).astype(np.float32)
    ps.init(init)
    return ps, init


# -- the batching rules, small --------------------------------------------------------------
def test_batched_fetch_and_push_move_at_most_one_batch_per_round_trip(kv, run_id):
    ps, init = small(kv, run_id)
    assert len(ps.keys) == 40 and ps.per_batch == 4
    out = np.empty_like(init)
    kv.io.reset()
    clock, docs = ps.fetch(out, ("layout",))
    assert np.array_equal(out, init) and clock == 0 and docs["layout"]["num_params"] == 10_000
    io = kv.io.snapshot()
    assert io["trips"] == 10 and io["values_max"] == 5  # 4 chunks, + the doc in the first
    assert io["bytes_received"] > 40_000 and io["bytes_max"] < 4 * 1100 + 400
    delta = ((np.arange(10_000) % 7) - 3).astype(np.float32)
    kv.io.reset()
    stats = ps.push(delta, out=out)
    assert np.array_equal(out, init + delta) and stats.clock == 1
    assert kv.io.snapshot()["values_max"] <= 4 and kv.io.snapshot()["bytes_max"] < 4 * 1100
    # a sparse push that doubles as a fetch: the other chunks read back, batch by batch
    stats = ps.push(delta, out=out, chunks=range(0, 40, 3))
    want = init + delta
    for i in range(0, 40, 3):
        want[256 * i:256 * (i + 1)] += delta[256 * i:256 * (i + 1)]
    assert np.array_equal(out, want) and stats.clock == 1
    fresh = np.empty_like(init)
    assert ps.fetch(fresh)[0] == 1 and np.array_equal(fresh, want)
    ps.push(delta)  # without out
    ps.fetch(fresh)
    assert np.array_equal(fresh, want + delta)


def test_a_vector_that_fits_one_batch_moves_in_one_round_trip(kv, run_id):
    """The reference MLP (79,510 float32: one 384 KiB chunk), as before batching."""
    ps = ParameterStore(kv, run_id)
    ps.init(np.zeros(79_510, dtype=np.float32))
    out = np.empty(79_510, dtype=np.float32)
    kv.io.reset()
    ps.fetch(out, ("layout",))
    assert kv.io.snapshot()["trips"] == 1
    kv.io.reset()
    ps.push(np.ones(79_510, dtype=np.float32), out=out)
    assert kv.io.snapshot()["trips"] == 2  # read + cas, or WATCH/MGET + MULTI/EXEC


class Refused(Exception):
    pass


def test_redis_batched_push_and_its_note_land_together_or_not_at_all(redis_kv, run_id):
    ps, init = small(redis_kv, run_id)
    note_key, lease = ps.key("note"), ps.key("layout")
    delta = np.full(10_000, 2, dtype=np.float32)
    seen = []
    ps.push(delta, note={note_key: b"one"}, check=(lease, lambda k, v: seen.append(v)))
    assert seen and seen[0] is not None
    assert redis_kv.get_many([note_key]) == {note_key: b"one"}

    def refuse(key, value):
        raise Refused

    with pytest.raises(Refused):
        ps.push(delta, note={note_key: b"two"}, check=(lease, refuse))
    out = np.empty_like(init)
    ps.fetch(out)
    assert np.array_equal(out, init + delta)  # the refused push changed nothing
    assert redis_kv.get_many([note_key]) == {note_key: b"one"}
    redis_kv.io.reset()
    ps.push(delta, note={note_key: b"three"}, check=(lease, lambda k, v: None))
    # one transaction: WATCH, the lease + note batch and 10 chunk batches read (MGET), the
    # same 11 batches queued after MULTI, EXEC
    assert redis_kv.io.snapshot()["trips"] == 1 + 11 + 11 + 1
    assert redis_kv.get_many([note_key]) == {note_key: b"three"}


PUSHER = """
import sys, numpy as np
from emnist.store import ParameterStore, open_kv
url, run_id, worker, pushes = sys.argv[1:5]
ps = ParameterStore(open_kv(url), run_id, batch_values=4)
ps.attach()
delta = np.full(ps.num_params, int(worker) + 1, dtype=np.float32)
print("ready", flush=True)
sys.stdin.readline()
for _ in range(int(pushes)):
    ps.push(delta)
"""


@pytest.mark.parametrize("url", [MEMCACHED_URL, BIG_REDIS])
def test_concurrent_batched_pushes_lose_nothing(url, run_id, big_redis):
    ps, init = small(open_kv(url), run_id, n=6_000)
    procs = [subprocess.Popen([sys.executable, "-c", PUSHER, url, run_id, str(w), "15"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, cwd=ROOT)
             for w in range(3)]
    start_together(procs)
    out = np.empty_like(init)
    clock, _ = ps.fetch(out)
    assert np.array_equal(out, init + 15 * (1 + 2 + 3)) and clock == 45


@pytest.mark.parametrize("when", ["after", "before"])
def test_redis_batched_push_whose_exec_reply_is_lost_is_applied_once(run_id, when):
    b = BACKENDS["redis"]
    direct = b["url"].format(b["port"])
    ps, init = small(open_kv(direct), run_id)
    proxy = DropProxy(b["port"], "resp", b["cas"], when)
    try:
        pusher = ParameterStore(open_kv(b["url"].format(proxy.port)), run_id, batch_values=4)
        pusher.attach()
        back = np.empty_like(init)
        pusher.push(np.full(10_000, 5, dtype=np.float32), out=back)
        assert proxy.fired == 1 and np.array_equal(back, init + 5)
    finally:
        proxy.close()
    out = np.empty_like(init)
    assert ps.fetch(out)[0] == 1 and np.array_equal(out, init + 5)


def test_redis_batched_push_lost_reply_then_another_writer_is_not_repeated(run_id):
    b = BACKENDS["redis"]
    direct = b["url"].format(b["port"])
    ps, init = small(open_kv(direct), run_id)
    other = np.full(10_000, 100, dtype=np.float32)
    proxy = DropProxy(b["port"], "resp", b["cas"], "after", hook=lambda: ps.push(other))
    try:
        pusher = ParameterStore(open_kv(b["url"].format(proxy.port)), run_id, batch_values=4)
        pusher.attach()
        with pytest.raises(OutcomeUnknown, match="outcome unknown"):
            pusher.push(np.full(10_000, 5, dtype=np.float32))
    finally:
        proxy.close()
    out = np.empty_like(init)
    assert ps.fetch(out)[0] == 2 and np.array_equal(out, init + 5 + other)


def test_checkpoints_in_pieces_round_trip_and_replace_whole(tmp_path, big_redis, monkeypatch):
    import emnist.train.checkpoint as ck
    monkeypatch.setattr(ck, "PIECE_BYTES", 4096)
    monkeypatch.setattr(ck, "BATCH_BYTES", 3 * 4096)
    params = (np.arange(50_000) % 977).astype(np.float32)
    for url in (str(tmp_path), BIG_REDIS):
        c = Checkpoints(url)
        c.write("r1", {"run": {"n": 1}}, params)
        docs, back = c.read("r1")
        assert docs == {"run": {"n": 1}} and np.array_equal(back, params)
        c.write("r1", {"run": {"n": 2}}, params[:100])
        docs, back = c.read("r1")
        assert docs == {"run": {"n": 2}} and np.array_equal(back, params[:100])
    pieces = big_redis.r.keys("emnist:r1:checkpoint:*")
    assert len(pieces) == 2  # the replaced generation is gone: the head and one piece
    # a damaged piece is refused, never used
    key = sorted(pieces)[-1]
    value = bytearray(big_redis.r.get(key))
    value[-1] ^= 1
    big_redis.r.set(key, bytes(value))
    with pytest.raises(ValueError, match="checksum"):
        Checkpoints(BIG_REDIS).read("r1")


# -- a VGG11-sized vector -------------------------------------------------------------------
BIG = """
import json, sys, time, tracemalloc
import numpy as np
from emnist.store import ParameterStore, open_kv
from emnist.train.checkpoint import Checkpoints
url, ckpt, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
kv = open_kv(url)
tracemalloc.start()
init = (np.arange(n, dtype=np.int64) % 1000).astype(np.float32)
delta = ((np.arange(n, dtype=np.int64) % 7) - 3).astype(np.float32)
out = np.empty(n, dtype=np.float32)
out[:] = 0.0
report = {}

def measured(name, fn, kv=kv):
    base = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    kv.io.reset()
    t = time.perf_counter()
    result = fn()
    report[name] = {"s": time.perf_counter() - t,
                    "extra_mb": (tracemalloc.get_traced_memory()[1] - base) / 2**20,
                    **kv.io.snapshot()}
    return result

def equal(a, b, plus=None):
    step = 1 << 22
    for i in range(0, n, step):
        want = b[i:i + step] if plus is None else b[i:i + step] + plus[i:i + step]
        if not np.array_equal(a[i:i + step], want):
            return False
    return True

ps = ParameterStore(kv, "big" + sys.argv[4])
measured("init", lambda: ps.init(init))
report["chunks"], report["per_batch"] = len(ps.keys), ps.per_batch
measured("fetch", lambda: ps.fetch(out))
report["fetch_ok"] = equal(out, init)
stats = measured("push_out", lambda: ps.push(delta, out=out))
report["push_out_ok"] = equal(out, init, delta) and stats.clock == 1
measured("push", lambda: ps.push(delta))
out[:] = 0.0
clock = measured("fetch2", lambda: ps.fetch(out))[0]
report["push_ok"] = clock == 2 and equal(out, init, 2 * delta)
ck = Checkpoints(ckpt)
ckv = ck.kv or kv  # a file checkpoint moves nothing through the store
measured("ckpt_write", lambda: ck.write("big" + sys.argv[4], {"run": {"n": n}}, out), ckv)
docs, back = measured("ckpt_read", lambda: ck.read("big" + sys.argv[4]), ckv)
report["ckpt_ok"] = docs == {"run": {"n": n}} and equal(back, out)
ps.delete(["layout"])
print(json.dumps(report))
"""


def _big(url: str, ckpt: str) -> dict:
    r = subprocess.run([sys.executable, "-c", BIG, url, ckpt, str(VGG11), secrets.token_hex(4)],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def _assert_bounded(rep: dict, redis_push: bool) -> None:
    vector_mb = 4 * VGG11 / MB
    batch = DEFAULT_BATCH_BYTES + DEFAULT_BATCH_VALUES * 64 + 4096  # + headers, docs
    assert rep["chunks"] == math.ceil(VGG11 / (96 * 1024)) and rep["per_batch"] == 42
    batches = math.ceil(rep["chunks"] / rep["per_batch"])
    for name in ("fetch_ok", "push_out_ok", "push_ok", "ckpt_ok"):
        assert rep[name] is True, name
    for op in ("init", "fetch", "fetch2", "push_out", "push"):
        assert rep[op]["bytes_max"] <= batch and rep[op]["values_max"] <= 64, (op, rep[op])
    assert rep["fetch"]["trips"] == batches and rep["init"]["trips"] == batches
    assert rep["fetch"]["bytes_received"] > 4 * VGG11
    # memory beside the test's own vectors: a batch or two of values...
    for op in ("init", "fetch", "push_out", "ckpt_write"):
        assert rep[op]["extra_mb"] < 64, (op, rep[op])
    # ... a push without `out` on Redis holds the new vector between its two phases (one copy)
    assert rep["push"]["extra_mb"] < (vector_mb + 64 if redis_push else 64), rep["push"]
    # reading a checkpoint allocates the vector it returns, and nothing more of its size
    assert rep["ckpt_read"]["extra_mb"] < vector_mb + 64, rep["ckpt_read"]


def test_a_vgg11_sized_vector_round_trips_through_memcached(tmp_path):
    port = free_port()
    proc = start_memcached(port, memory_mb=1200)
    try:
        rep = _big(f"memcached://127.0.0.1:{port}", str(tmp_path / "ckpt"))
    finally:
        proc.terminate()
        proc.wait(10)
    _assert_bounded(rep, redis_push=False)
    # per-chunk cas: one gets per batch, one cas per chunk
    assert rep["push"]["trips"] == math.ceil(rep["chunks"] / 42) + rep["chunks"]
    print("\nmemcached", json.dumps({k: v for k, v in rep.items() if isinstance(v, dict)}))


def test_a_vgg11_sized_vector_round_trips_through_redis(big_redis):
    rep = _big(BIG_REDIS, BIG_REDIS)
    _assert_bounded(rep, redis_push=True)
    # each push: WATCH, an MGET per batch, MULTI + the SETs per batch, EXEC: ONE transaction
    batches = math.ceil(rep["chunks"] / 42)
    assert rep["push"]["trips"] == rep["push_out"]["trips"] == 2 * batches + 2
    for op in ("ckpt_write", "ckpt_read"):  # 8 MiB pieces, 4 per round trip
        assert 0 < rep[op]["bytes_max"] <= 32 * MB + 4096 and rep[op]["trips"] >= 16, rep[op]
    print("\nredis", json.dumps({k: v for k, v in rep.items() if isinstance(v, dict)}))
    assert redis.Redis.from_url(BIG_REDIS).dbsize() > 0  # the checkpoint; flushed after


def test_bench_store_takes_sizes_in_mb(tmp_path):
    from click.testing import CliRunner

    from emnist.bench.store import raw_echo, reps_for
    from emnist.cli import main

    out = tmp_path / "store.json"
    r = CliRunner().invoke(main, ["bench", "store", "--store", MEMCACHED_URL, "--chunk-bytes",
                                  "393216", "--vector-mb", "0.5", "--reps", "10", "--json",
                                  str(out)])
    assert r.exit_code == 0, r.output
    (rec,) = json.loads(out.read_text())
    assert rec["vector_bytes"] == 500_000 and rec["chunks"] == 2 and rec["push_mb_per_s"] > 0
    assert reps_for(515_000_000, 300) == (3, 1) and reps_for(6_000_000, 300) == (300, 20)
    assert len(raw_echo(64 * MB, 2, 1)) == 2  # bigger than the socket buffers: no deadlock
