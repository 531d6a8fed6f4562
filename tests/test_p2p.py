"""P2P building blocks against real Redis and RabbitMQ on loopback: compression, messages,
brokers (refusing malformed and stale messages), partitions (local and over HTTP), reports."""

from __future__ import annotations

import functools
import http.server
import logging
import re
import sys
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

from emnist.p2p import compress, messages
from emnist.p2p.broker import BrokerError, open_broker
from emnist.p2p.messages import BadMessage
from emnist.p2p.peer import collect
from emnist.p2p.split import Location, batch_name, load_partition, split, write_batches
from tests.conftest import AMQP_BROKER, REDIS_BROKER, need_rabbitmq


@pytest.fixture(params=["redis", "rabbitmq"])
def broker_url(request):
    if request.param == "rabbitmq":
        need_rabbitmq()
        return AMQP_BROKER
    return REDIS_BROKER


@pytest.fixture(scope="session")
def split_dir(tmp_path_factory):
    return split("fashion-mnist", None, 3, tmp_path_factory.mktemp("split"), seed=0,
                 batch_size=100)


# -- compression ---------------------------------------------------------------------------------
def test_qsgd_decompression_is_unbiased():
    rng = np.random.default_rng(1)
    g = (rng.standard_normal(3000) * rng.uniform(0.01, 1, 3000)).astype(np.float32)
    q = compress.QSGD(levels=4, bucket=256, seed=7)  # few levels: a lot of rounding noise
    draws = 4000
    total = np.zeros_like(g, dtype=np.float64)
    for _ in range(draws):
        total += q.decompress(q.compress(g), g.size)
    mean = total / draws
    # each draw's error is at most one level (norm / s); its mean shrinks as 1/sqrt(draws)
    norms = np.repeat(np.abs(np.pad(g, (0, 72))).reshape(-1, 256).max(axis=1), 256)[:g.size]
    bound = 5 * (norms / 4) / 2 / np.sqrt(draws)
    assert np.all(np.abs(mean - g) <= bound + 1e-7)
    # and it is not the identity: single draws do differ from g
    assert not np.allclose(q.decompress(q.compress(g), g.size), g)


def test_qsgd_keeps_signs_zeros_and_the_int8_payload():
    q = compress.QSGD(levels=127, seed=0)
    g = np.array([0.0, -1.0, 0.5, 1e-9, -0.25], dtype=np.float32)
    norms, levels = q.compress(g)
    assert levels.dtype == np.int8 and norms.dtype == np.float32
    out = q.decompress([norms, levels], g.size)
    assert out[0] == 0 and out[1] == -1.0 and np.sign(out[2]) == 1
    assert abs(out[2] - 0.5) <= 1 / 127 + 1e-7


def test_topk_sends_k_values_and_loses_nothing_with_error_feedback():
    rng = np.random.default_rng(2)
    t = compress.TopK(ratio=0.05)
    grads = [rng.standard_normal(1000).astype(np.float32) for _ in range(20)]
    sent = np.zeros(1000, dtype=np.float64)
    for g in grads:
        idx, values = t.compress(g)
        assert idx.shape == (50,) and values.shape == (50,) and idx.dtype == np.int32
        sent += t.decompress([idx, values], 1000)
    # what was sent plus what is still held back is exactly what was computed
    np.testing.assert_allclose(sent + t.residual, np.sum(grads, axis=0), atol=1e-4)


@pytest.mark.parametrize("parts, n, what", [
    ([np.zeros(10, np.float64)], 10, "float32"),
    ([np.zeros(9, np.float32)], 10, "(10,)"),
    ([np.zeros(10, np.float32), np.zeros(1, np.float32)], 10, "1 part"),
])
def test_decompress_refuses_wrong_parts(parts, n, what):
    with pytest.raises(compress.CompressionError, match=re.escape(what)):
        compress.Compressor().decompress(parts, n)


def test_topk_refuses_indices_out_of_range():
    t = compress.TopK(ratio=0.5)
    with pytest.raises(compress.CompressionError, match="index"):
        t.decompress([np.array([0, 9], np.int32), np.ones(2, np.float32)], 4)


# -- messages ------------------------------------------------------------------------------------
def _grad_msg(run="r1", step=3, epoch=1, sender=1, n=10, comp=None, grad=None):
    comp = comp or compress.Compressor()
    g = np.arange(n, dtype=np.float32) if grad is None else grad
    return messages.gradient(run, step, epoch, sender, comp, comp.compress(g), n, 0.5)


def test_message_round_trip_and_checks():
    comp = compress.Compressor()
    msg = messages.unpack(_grad_msg())
    messages.check(msg, run="r1", kind="grad", size=3, step=3, epoch=1)
    np.testing.assert_array_equal(messages.read_gradient(msg, comp, 10), np.arange(10))
    for kw, word in [({"run": "r2"}, "run"), ({"step": 4}, "step"), ({"epoch": 2}, "epoch")]:
        with pytest.raises(BadMessage, match=word):
            messages.check(msg, **{"run": "r1", "kind": "grad", "size": 3, "step": 3,
                                   "epoch": 1, **kw})
    with pytest.raises(BadMessage, match="sender"):
        messages.check(msg, run="r1", kind="grad", size=1)
    with pytest.raises(BadMessage, match="shape"):
        messages.read_gradient(msg, comp, 11)
    with pytest.raises(BadMessage, match="compression"):
        messages.read_gradient(msg, compress.TopK(0.5), 10)


def test_message_refuses_corrupt_and_foreign_bytes():
    data = bytearray(_grad_msg())
    data[-3] ^= 0xFF
    with pytest.raises(BadMessage, match="checksum"):
        messages.unpack(bytes(data))
    with pytest.raises(BadMessage):
        messages.unpack(b"\x05\x00\x00\x00hello")
    with pytest.raises(BadMessage, match="past the end"):
        messages.unpack(b"\xff\x00\x00\x00abc")
    with pytest.raises(BadMessage, match="empty"):
        messages.unpack(b"")


# -- brokers -------------------------------------------------------------------------------------
def test_broker_delivers_by_topic_and_refuses_malformed_and_stale(broker_url, run_id, caplog):
    """Every bad message is logged and skipped; the collector keeps waiting for the good one."""
    me, other = open_broker(broker_url, run_id, 0, 3), open_broker(broker_url, run_id, 1, 3)
    third = open_broker(broker_url, run_id, 2, 3)
    comp, n = compress.Compressor(), 10
    try:
        bad = [
            _grad_msg(run="another-run", step=3),  # foreign run
            _grad_msg(run=run_id, step=2),  # stale step, published on this step's topic
            _grad_msg(run=run_id, step=3, epoch=0),  # wrong epoch
            _grad_msg(run=run_id, step=3, n=11, grad=np.zeros(11, np.float32)),  # wrong shape
            messages.pack({"run": run_id, "kind": "grad", "step": 3, "epoch": 1, "sender": 1,
                           "shape": [n], "dtype": "float32", "compression": comp.spec()},
                          [np.zeros(n, np.float64)]),  # wrong dtype
            b"\x00\x01garbage",  # not a message at all
            _grad_msg(run=run_id, step=3, sender=7),  # no such peer
        ]
        for data in bad:
            other.publish("g.3", data, [0])
        other.publish("g.2", _grad_msg(run=run_id, step=2, grad=np.ones(n, np.float32)), [0])
        good = np.full(n, 2.0, np.float32)

        def late():
            """The good messages go only once the collector has refused every bad one: it
            must still be waiting then."""
            deadline = time.monotonic() + 20
            while sum("refused" in r.getMessage() for r in caplog.records) < len(bad):
                assert time.monotonic() < deadline, "the bad messages were not all refused"
                time.sleep(0.01)
            third.publish("g.3", _grad_msg(run=run_id, step=3, sender=2, grad=good * 2), [0])
            other.publish("g.3", _grad_msg(run=run_id, step=3, grad=good), [0])

        def accept(msg):
            messages.check(msg, run=run_id, kind="grad", size=3, step=3, epoch=1)
            return messages.read_gradient(msg, comp, n)

        with caplog.at_level(logging.ERROR, logger="emnist.p2p"), \
                ThreadPoolExecutor(1) as pool:
            publisher = pool.submit(late)
            got, refused = collect(me, "g.3", {1, 2}, time.monotonic() + 30, accept)
            publisher.result()  # joined; its error, if any, raised here
        assert sorted(got) == [1, 2] and refused == len(bad)
        np.testing.assert_array_equal(got[1], good)
        np.testing.assert_array_equal(got[2], good * 2)
        text = caplog.text
        for word in ("another-run", "step 2", "epoch 0", "shape", "float64", "sender 7"):
            assert word in text, word
        # the step-2 message stayed on its own topic
        got2, _ = collect(me, "g.2", {1}, time.monotonic() + 10, lambda m: m.meta["step"])
        assert got2 == {1: 2}
    finally:
        for b in (me, other, third):
            b.cleanup()
            b.close()


def test_collect_gives_up_at_the_deadline(broker_url, run_id):
    b = open_broker(broker_url, run_id, 0, 3)
    try:
        deadline = time.monotonic() + 1.0
        got, refused = collect(b, "g.0", {1, 2}, deadline, lambda m: m)
        # nothing came: it returned empty-handed, and not before the deadline
        assert got == {} and refused == 0 and time.monotonic() >= deadline
    finally:
        b.cleanup()
        b.close()


def test_redis_broker_cleans_up_its_streams(run_id):
    import redis
    b = open_broker(REDIS_BROKER, run_id, 0, 2)
    b.publish("g.0", b"x", [1])
    b.publish("g.1", b"y", [1])
    r = redis.Redis.from_url(REDIS_BROKER)
    assert len(r.keys(f"emnist:p2p:{run_id}:*")) == 2
    b.finished("g.0")
    b.finished("g.1")  # the previous topic's stream goes once the next one is done
    assert r.keys(f"emnist:p2p:{run_id}:*") == [f"emnist:p2p:{run_id}:g.1".encode()]
    b.cleanup()
    assert r.keys(f"emnist:p2p:{run_id}:*") == []


def test_amqp_without_pika_names_the_extra(monkeypatch, run_id):
    monkeypatch.setitem(sys.modules, "pika", None)
    with pytest.raises(BrokerError, match=r"emnist\[rabbitmq\]"):
        open_broker(AMQP_BROKER, run_id, 0, 2)


def test_unknown_broker_scheme(run_id):
    with pytest.raises(BrokerError, match="redis://"):
        open_broker("kafka://127.0.0.1:9092", run_id, 0, 2)


# -- partitions ----------------------------------------------------------------------------------
def test_split_partitions_are_disjoint_and_complete(split_dir):
    man = Location(str(split_dir)).manifest()
    assert man["peers"] == 3 and sum(man["train_sizes"]) + sum(man["val_sizes"]) == 60000
    parts = [load_partition(str(split_dir), r) for r in range(3)]
    assert all(p.train_x.dtype == np.uint8 and p.train_x.shape[1] == 784 for p in parts)
    assert len(parts[0].test_y) == 10000
    # the same split again is not rewritten
    mtime = (split_dir / "manifest.json").stat().st_mtime_ns
    assert split("fashion-mnist", None, 3, split_dir.parent, seed=0) == split_dir
    assert (split_dir / "manifest.json").stat().st_mtime_ns == mtime


def test_batch_files_are_the_partitions_rows(split_dir):
    loc = Location(str(split_dir))
    part = load_partition(str(split_dir), 1)
    xy = loc.array(batch_name(100, 1, 7))
    np.testing.assert_array_equal(xy[:, :-1], part.train_x[700:800])
    np.testing.assert_array_equal(xy[:, -1], part.train_y[700:800])
    assert write_batches(split_dir, 100) == split_dir / "batches-100"


def test_partition_reads_over_http(split_dir):
    handler = functools.partial(http.server.SimpleHTTPRequestHandler,
                                directory=str(split_dir))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    pool = ThreadPoolExecutor(1)
    serving = pool.submit(server.serve_forever)
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        remote, local = load_partition(url, 2), load_partition(str(split_dir), 2)
        np.testing.assert_array_equal(remote.train_x, local.train_x)
        np.testing.assert_array_equal(remote.val_y, local.val_y)
        np.testing.assert_array_equal(Location(url).array(batch_name(100, 2, 3)),
                                      Location(str(split_dir)).array(batch_name(100, 2, 3)))
        from emnist.data import DataError
        with pytest.raises(DataError, match="404"):
            Location(url).array("peer-9/train-x")
    finally:
        server.shutdown()
        serving.result(10)  # joined; serve_forever's own error, if any, raised here
        pool.shutdown()
        server.server_close()


def test_corrupt_partition_file_is_refused(tmp_path, split_dir):
    import shutil

    from emnist.data import DataError
    copy = tmp_path / "copy"
    shutil.copytree(split_dir / "peer-0", copy / "peer-0")
    data = bytearray((copy / "peer-0" / "train-y").read_bytes())
    data[-1] ^= 1
    (copy / "peer-0" / "train-y").write_bytes(bytes(data))
    with pytest.raises(DataError, match="checksum"):
        Location(str(copy)).array("peer-0/train-y")


# -- frames: big messages in bounded pieces ------------------------------------------------------
def _frames(n=100_000, sender=1, max_frame=30_000, step=3):
    comp = compress.Compressor()
    g = np.arange(n, dtype=np.float32)
    return list(messages.gradient_frames("r1", step, 1, sender, comp, comp.compress(g), n, 0.5,
                                         max_frame))


def test_frames_reassemble_in_any_order_and_interleaved():
    whole = _grad_msg(n=100_000, grad=np.arange(100_000, dtype=np.float32))
    a, b = _frames(sender=1), _frames(sender=2)
    assert len(a) == 14 and all(len(f) <= 30_000 + 200 for f in a)
    asm = messages.Assembler(500_000, {1, 2})
    done = [asm.feed(f) for pair in zip(reversed(a), b) for f in pair]
    complete = [d for d in done if d is not None]
    assert len(complete) == 2 and bytes(complete[0]) == whole  # peer 1's, reversed, first
    msg = messages.unpack(complete[1])
    assert msg.sender == 2 and messages.read_gradient(
        msg, compress.Compressor(), 100_000)[99_999] == 99_999
    assert _frames(n=10) == [_grad_msg(n=10, grad=np.arange(10, dtype=np.float32))]  # as before


def test_frames_are_bounded_and_checked():
    a = _frames()
    with pytest.raises(BadMessage, match="more than the 100000 accepted"):
        messages.Assembler(100_000, {1}).feed(a[0])  # the announced size, before any buffer
    with pytest.raises(BadMessage, match="not a peer"):
        messages.Assembler(500_000, {2}).feed(a[0])
    asm = messages.Assembler(500_000, {1})
    asm.feed(a[0])
    with pytest.raises(BadMessage, match="twice"):
        asm.feed(a[0])
    with pytest.raises(BadMessage, match="another message"):
        asm.feed(_frames()[1])  # a second message's frame from the same sender
    bad = bytearray(a[2])
    bad[-1] ^= 1
    with pytest.raises(BadMessage, match="checksum"):
        asm.feed(bytes(bad))
    with pytest.raises(BadMessage, match="more than the 1000 accepted"):
        messages.Assembler(1000, {1}).feed(_grad_msg(n=1000))  # a whole message, too


def test_a_big_gradient_crosses_the_broker_in_frames(broker_url, run_id):
    """64 MiB (16M float32) in 9 frames of at most 8 MiB: RabbitMQ's and Redis's limits on one
    message (128 MB, 512 MB) are no limit on a gradient."""
    n = 16 << 20
    comp = compress.Compressor()
    g = (np.arange(n) % 4096).astype(np.float32)
    sender, me = open_broker(broker_url, run_id, 1, 2), open_broker(broker_url, run_id, 0, 2)
    try:
        frames = list(messages.gradient_frames(run_id, 0, 1, 1, comp, comp.compress(g), n, 0.0))
        assert len(frames) == 9 and max(len(f) for f in frames) <= (8 << 20) + 300
        sent = sum(sender.publish("g.0", f, [0]) for f in frames)
        del frames

        def accept(msg):
            messages.check(msg, run=run_id, kind="grad", size=2, step=0, epoch=1)
            return messages.read_gradient(msg, comp, n)

        got, refused = collect(me, "g.0", {1}, time.monotonic() + 60, accept,
                               comp.max_bytes(n) + messages.HEADROOM)
        assert refused == 0 and np.array_equal(got[1], g) and sent >= 4 * n
    finally:
        for b in (me, sender):
            b.cleanup()
            b.close()
