import subprocess
import sys
import threading

import numpy as np
import pytest

from emnist.store import CorruptValue, MissingState, ParameterStore, StoreError, codec, open_kv
from emnist.store.keys import key_for
from tests.conftest import BINARY_URL, MEMCACHED_URL, REDIS_URL
from tests.servers import start_together

DTYPES = ["float32", "float64", "float16", "int8", "uint8", "int16", "int32", "int64", "uint16",
          "uint32", "uint64", "bool"]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(0,), (5,), (3, 4), (2, 3, 4)])
def test_codec_round_trip(dtype, shape):
    a = (np.arange(int(np.prod(shape))) % 7).astype(dtype).reshape(shape)
    d = codec.decode("k", codec.encode(a, clock=42), dtype=dtype, shape=shape)
    assert d.clock == 42 and d.array.dtype == np.dtype(dtype) and np.array_equal(d.array, a)


def test_codec_big_endian_input_is_stored_little_endian():
    a = np.arange(5, dtype=">f4")
    assert np.array_equal(codec.decode("k", codec.encode(a)).array, a)


def test_codec_documents():
    assert codec.decode_doc("k", codec.encode_doc({"a": [1, 2]})) == {"a": [1, 2]}


@pytest.mark.parametrize("mutate, reason", [
    (lambda b: b"XXXX" + b[4:], "foreign"),
    (lambda b: b[:10], "truncated header"),
    (lambda b: b[:-1], "payload"),
    (lambda b: b[:-4] + bytes([b[-4] ^ 1]) + b[-3:], "checksum"),
    (lambda b: b[:4] + bytes([9]) + b[5:], "version"),
    (lambda b: b[:20] + bytes([b[20] ^ 2]) + b[21:], "payload|checksum"),
    (lambda b: b"", "truncated"),
])
def test_codec_refuses_damaged_values(mutate, reason):
    good = codec.encode(np.ones(10, dtype=np.float32))
    with pytest.raises(CorruptValue, match=reason) as e:
        codec.decode("emnist:r:w:0", mutate(good))
    assert e.value.key == "emnist:r:w:0"


def test_codec_refuses_wrong_shape_and_dtype():
    v = codec.encode(np.ones(10, dtype=np.float32))
    with pytest.raises(CorruptValue, match="shape"):
        codec.decode("k", v, shape=(11,))
    with pytest.raises(CorruptValue, match="dtype"):
        codec.decode("k", v, dtype=np.float64)
    with pytest.raises(CorruptValue, match="document"):
        codec.decode_doc("k", v)


def test_keys_are_prefixed_and_validated():
    assert key_for("abc", "w", 3) == "emnist:abc:w:3"
    with pytest.raises(ValueError, match="run id"):
        key_for("bad id with spaces")


def test_fetch_round_trip_in_chunks(kv, run_id):
    params = np.random.default_rng(0).random(100_003).astype(np.float32)
    ps = ParameterStore(kv, run_id, chunk_bytes=64 * 1024)
    ps.init(params)
    assert len(ps.keys) == 7  # 16384 floats per chunk
    out = np.empty_like(params)
    reader = ParameterStore(kv, run_id)
    reader.attach()
    clock, docs = reader.fetch(out, ("nothing",))
    assert clock == 0 and docs == {} and np.array_equal(out, params)


def test_push_adds_and_advances_clock(kv, run_id):
    ps = ParameterStore(kv, run_id, chunk_bytes=1024)
    ps.init(np.zeros(1000, dtype=np.float32))
    delta = np.arange(1000, dtype=np.float32)
    ps.push(delta)
    ps.push(delta)
    out = np.empty(1000, dtype=np.float32)
    clock, _ = ps.fetch(out)
    assert clock == 2 and np.array_equal(out, 2 * delta)


def test_corrupt_chunk_is_refused_not_used(kv, run_id):
    ps = ParameterStore(kv, run_id, chunk_bytes=1024)
    ps.init(np.zeros(1000, dtype=np.float32))
    kv.set_many({ps.keys[1]: b"garbage that is long enough to have a header......"})
    with pytest.raises(CorruptValue) as e:
        ps.fetch(np.empty(1000, dtype=np.float32))
    assert e.value.key == ps.keys[1]
    with pytest.raises(CorruptValue):
        ps.push(np.ones(1000, dtype=np.float32))


def test_missing_chunk_is_reported(kv, run_id):
    ps = ParameterStore(kv, run_id, chunk_bytes=1024)
    ps.init(np.zeros(1000, dtype=np.float32))
    kv.delete_many([ps.keys[2]])
    with pytest.raises(MissingState, match="1 of 4 parameter chunks missing"):
        ps.fetch(np.empty(1000, dtype=np.float32))
    with pytest.raises(MissingState, match="missing"):
        ps.push(np.ones(1000, dtype=np.float32))


def test_attach_unknown_run(kv, run_id):
    with pytest.raises(MissingState, match="no parameters"):
        ParameterStore(kv, run_id).attach()


PUSHER = """
import sys, numpy as np
from emnist.store import ParameterStore, open_kv
url, run_id, worker, pushes, mode = sys.argv[1:6]
ps = ParameterStore(open_kv(url), run_id)
ps.attach()
delta = np.full(ps.num_params, int(worker) + 1, dtype=np.float32)
print("ready", flush=True)
sys.stdin.readline()  # start together: the parent releases every pusher at once
for _ in range(int(pushes)):
    ps.push(delta, mode)
"""


def _concurrent_pushes(url, run_id, mode, workers=4, pushes=50):
    """Separate processes (no shared client, no pickle) pushing known deltas at once."""
    kv = open_kv(url)
    ps = ParameterStore(kv, run_id, chunk_bytes=4096)
    ps.init(np.zeros(3000, dtype=np.float32))
    procs = [subprocess.Popen([sys.executable, "-c", PUSHER, url, run_id, str(w), str(pushes),
                               mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for w in range(workers)]
    start_together(procs)
    out = np.empty(3000, dtype=np.float32)
    ps.fetch(out)
    return out, pushes * sum(range(1, workers + 1))


@pytest.mark.parametrize("url", [MEMCACHED_URL, BINARY_URL, REDIS_URL])
def test_concurrent_atomic_pushes_lose_nothing(url, run_id, redis_kv):
    out, expected = _concurrent_pushes(url, run_id, "atomic")
    assert np.all(out == expected)


class Interleaved:
    """A KV whose pushers each read, then wait until the other has read too, then write:
    two pushes interleaved as read 1, read 2, write 1, write 2, every time."""

    def __init__(self, kv, barrier: threading.Barrier) -> None:
        self.kv, self.url, self.barrier = kv, kv.url, barrier

    def get_many(self, keys):
        return self.kv.get_many(keys)

    def set_many(self, values):  # overwrite mode: the write after its read
        self.barrier.wait()
        self.kv.set_many(values)

    def update_many(self, keys, fn, read=()):  # atomic mode: between the read and the cas
        first = [True]

        def gated(key, old):
            if first[0]:
                first[0] = False
                self.barrier.wait()
            return fn(key, old)
        return self.kv.update_many(keys, gated, read)


def _interleaved_pushes(url, run_id, mode):
    ParameterStore(open_kv(url), run_id, chunk_bytes=4096).init(np.zeros(1000, np.float32))
    barrier = threading.Barrier(2, timeout=30)
    deltas = [np.full(1000, 1, np.float32), np.full(1000, 10, np.float32)]
    stats, errors = [], []

    def push(delta):
        try:
            ps = ParameterStore(Interleaved(open_kv(url), barrier), run_id)  # a client each
            ps.attach()
            stats.append(ps.push(delta, mode))
        except BaseException as e:  # re-raised on the test's thread
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=push, args=(d,)) for d in deltas]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    out = np.empty(1000, np.float32)
    ParameterStore(open_kv(url), run_id, num_params=1000, chunk_bytes=4096).fetch(out)
    return out, stats


@pytest.mark.parametrize("url", [MEMCACHED_URL, BINARY_URL, REDIS_URL])
def test_overwrite_mode_loses_an_interleaved_update(url, run_id):
    """The original's read-add-write: the second write replaces the first one's sum."""
    out, _ = _interleaved_pushes(url, run_id, "overwrite")
    assert np.all(out == 1) or np.all(out == 10)  # one of the two updates is gone


@pytest.mark.parametrize("url", [MEMCACHED_URL, BINARY_URL, REDIS_URL])
def test_atomic_mode_keeps_both_interleaved_updates(url, run_id):
    out, stats = _interleaved_pushes(url, run_id, "atomic")
    assert np.all(out == 11)
    assert sorted(s.retries for s in stats) == [0, 1]  # the second cas saw the first, re-read


def test_unknown_scheme_is_refused():
    with pytest.raises(StoreError, match="unknown store URL scheme"):
        open_kv("ftp://x")


def test_binary_protocol_without_pylibmc_names_the_extra():
    code = ("import sys; sys.modules['pylibmc'] = None\n"
            "from emnist.store import open_kv, StoreError\n"
            "try:\n    open_kv('memcached+binary://127.0.0.1:11211')\n"
            "except StoreError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert "pip install 'emnist[binary]'" in out.stdout


def test_unreachable_memcached_is_a_store_error():
    kv = open_kv("memcached://127.0.0.1:1?timeout=0.5")
    with pytest.raises(StoreError, match="unreachable"):
        kv.get_many(["a"])


def test_push_can_return_the_new_global_vector(kv, run_id):
    ps = ParameterStore(kv, run_id, chunk_bytes=1024)
    ps.init(np.ones(1000, dtype=np.float32))
    other = ParameterStore(kv, run_id)
    other.attach()
    other.push(np.full(1000, 2, dtype=np.float32))  # a concurrent worker's update
    out = np.empty(1000, dtype=np.float32)
    stats = ps.push(np.arange(1000, dtype=np.float32), out=out)
    assert stats.clock == 2 and np.array_equal(out, 3 + np.arange(1000, dtype=np.float32))
