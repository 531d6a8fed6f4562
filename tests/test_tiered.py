"""The node-local tier: fast local reads and writes, background sync, nothing lost."""

from __future__ import annotations

import secrets

import numpy as np
import pytest

from emnist.model import init_params
from emnist.store import ParameterStore, open_kv
from emnist.store.tiered import TieredStore
from emnist.train.config import TrainConfig
from tests.conftest import MEMCACHED_URL, REDIS_URL
from tests.downpour_tools import SHAPE, plain_sgd, run


def _global(kv, run_id, n=5000):
    ps = ParameterStore(kv, run_id, chunk_bytes=4096)
    ps.init(np.zeros(n, dtype=np.float32))
    return ps


@pytest.fixture
def local_url():
    return f"local://{secrets.token_hex(4)}"


def test_two_nodes_converge_to_the_global_state(redis_kv, run_id):
    _global(redis_kv, run_id)
    nodes = [TieredStore(open_kv(REDIS_URL), open_kv(f"local://{run_id}-n{i}"), run_id, 0.01)
             for i in range(2)]
    for node in nodes:
        node.attach()
    for i, node in enumerate(nodes):
        for _ in range(10):
            node.push(np.full(5000, i + 1, dtype=np.float32))
    for node in nodes:
        node.close()  # stops the syncer, flushes
    glob = np.empty(5000, dtype=np.float32)
    ParameterStore(redis_kv, run_id, num_params=5000, chunk_bytes=4096).fetch(glob)
    assert np.all(glob == 10 * 1 + 10 * 2)
    for node in nodes:  # after one more sync each local tier equals the global vector
        node.sync_once()
        local = np.empty(5000, dtype=np.float32)
        node.fetch(local)
        assert np.array_equal(local, glob)
    assert all(node.syncs >= 2 for node in nodes)


def test_reads_and_writes_are_local_until_a_sync(memcached_kv, run_id, local_url):
    _global(memcached_kv, run_id)
    node = TieredStore(open_kv(MEMCACHED_URL), open_kv(local_url), run_id, sync_interval=3600)
    node.attach()
    out = np.empty(5000, dtype=np.float32)
    node.push(np.ones(5000, dtype=np.float32), out=out)
    assert np.all(out == 1)  # the local view has it at once
    glob = np.empty(5000, dtype=np.float32)
    node.g.fetch(glob)
    assert np.all(glob == 0)  # the global store does not, until a sync
    node.close()  # shutdown flushes
    node.g.fetch(glob)
    assert np.all(glob == 1)


def test_shared_node_memcached_tier(redis_kv, run_id):
    """Two workers on one node share a memcached tier; each has its own syncer."""
    _global(redis_kv, run_id)
    workers = [TieredStore(open_kv(REDIS_URL), open_kv(MEMCACHED_URL), run_id, 0.005)
               for _ in range(2)]
    for w in workers:
        w.attach()
    for _ in range(50):
        for i, w in enumerate(workers):
            w.push(np.full(5000, i + 1, dtype=np.float32))
    for w in workers:
        w.close()
    glob = np.empty(5000, dtype=np.float32)
    ParameterStore(redis_kv, run_id, num_params=5000, chunk_bytes=4096).fetch(glob)
    assert np.all(glob == 50 * 3)


def test_downpour_through_the_tier_is_stillplain_sgd(memcached_kv, run_id, local_url):
    cfg = TrainConfig(dataset="synthetic", batch_size=50, alpha=0.1, iterations=2,
                      target_accuracy=1.0, n_fetch=5, n_push=5, local_store_url=local_url,
                      sync_interval=0.01)
    ParameterStore(memcached_kv, run_id, chunk_bytes=8192).init(init_params(SHAPE, 0))
    tier = TieredStore(open_kv(MEMCACHED_URL), open_kv(local_url), run_id, cfg.sync_interval)
    tier.attach()
    run(cfg, tier)
    tier.close()
    final = np.empty(SHAPE.num_params, dtype=np.float32)
    ps = ParameterStore(memcached_kv, run_id)
    ps.attach()
    ps.fetch(final)
    np.testing.assert_allclose(final, plain_sgd(cfg, 2), atol=2e-5)
    assert tier.syncs > 0
