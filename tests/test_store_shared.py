"""One store handle per process and URL, shared by every thread that uses the store.

Several workers run at once in one process, each with an overlapped exchange (its own thread)
and a lease saved from the training thread while that exchange is in flight; two of them go
through node-local tiers (each with a syncer thread) on the same memcached handle. Deltas are
integer-valued, so float32 sums are exact: the global vector must end at exactly init + every
delta, every value must decode, and every lease document must be whole and released.
"""

from __future__ import annotations

import threading

import numpy as np
import pytest

from emnist.store import ParameterStore, codec, open_kv, shared_kv
from emnist.store.shared import MAX_HANDLES
from emnist.store.tiered import TieredStore
from emnist.train.config import TrainConfig
from emnist.train.downpour import Exchange
from emnist.train.state import Lease, state_key
from tests.conftest import BINARY_URL, MEMCACHED_URL, REDIS_URL

N, CHUNK, STEPS = 20_000, 16_384, 120  # 5 chunks
TIERED = {1, 2}  # these workers go through node-local tiers, worker 0 straight to the store


def _worker(url: str, run_id: str, w: int, tier: TieredStore | None) -> tuple[np.ndarray, dict]:
    kv = shared_kv(url)
    store = tier or ParameterStore(kv, run_id)
    if tier is None:
        store.attach()
    lease = Lease(ParameterStore(kv, run_id), w, seconds=60)
    st = lease.acquire(f"host{w}")
    cfg = TrainConfig(n_push=1, n_fetch=1, overlap=True)
    params = np.empty(N, dtype=np.float32)
    store.fetch(params)
    ex = Exchange(store, cfg, st, params, overlap=True)
    rng = np.random.default_rng(w)
    total = np.zeros(N, dtype=np.float32)
    try:
        for step in range(1, STEPS + 1):
            inc = rng.integers(-3, 4, N).astype(np.float32)
            params += inc
            total += inc
            ex.after_step(params, step, step)  # the push goes out on the exchange thread...
            st.step = step
            lease.save(st)  # ...while this thread writes the lease on the same handle
        ex.end_iteration(params)
    finally:
        ex.close()
    lease.save(st, release=True)
    return total, st.to_dict()


@pytest.mark.parametrize("url", [MEMCACHED_URL, BINARY_URL, REDIS_URL])
def test_overlap_lease_and_tier_threads_share_one_handle(url, run_id):
    init = (np.arange(N) % 100).astype(np.float32)
    ParameterStore(shared_kv(url), run_id, chunk_bytes=CHUNK).init(init)
    node = shared_kv(MEMCACHED_URL)  # the node's tier: the very same handle on memcached
    tiers = {w: TieredStore(shared_kv(url), node, run_id, sync_interval=0.001) for w in TIERED}
    for t in tiers.values():
        t.attach()
    results: dict[int, tuple[np.ndarray, dict]] = {}
    errors: list[BaseException] = []

    def work(w: int) -> None:
        try:
            results[w] = _worker(url, run_id, w, tiers.get(w))
        except BaseException as e:  # re-raised below, on the test's thread
            errors.append(e)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for t in tiers.values():
        t.close()  # stops the syncer, flushes what the node has not synchronised
    if errors:
        raise errors[0]
    assert shared_kv(url) is shared_kv(url)

    reader = ParameterStore(open_kv(url), run_id)  # a separate client: what the store holds
    reader.attach()
    final = np.empty(N, dtype=np.float32)
    reader.fetch(final)  # every chunk's header, shape and checksum checked
    expected = init + sum(total for total, _ in results.values())
    assert np.array_equal(final, expected)

    tier_keys = next(iter(tiers.values())).keys
    got = open_kv(MEMCACHED_URL).get_many(tier_keys)
    assert set(got) == set(tier_keys)
    for (a, b), k in zip(reader.bounds, tier_keys):
        rows = codec.decode(k, got[k], dtype=np.float32, shape=(2, b - a)).array
        assert not rows[1].any()  # nothing left unsynchronised
    docs = reader.get_docs([state_key(w) for w in range(3)])
    for w, (_, mine) in results.items():
        doc = docs[state_key(w)]
        assert doc["lease"] == "" and doc["step"] == STEPS
        assert doc["pushes"] == mine["pushes"] >= STEPS


def test_the_registry_is_bounded_and_an_evicted_handle_still_works(run_id):
    first = shared_kv(f"{MEMCACHED_URL}?ttl=600&n=0")
    first.set_many({f"emnist:{run_id}:k": b"v"})
    for i in range(1, MAX_HANDLES + 1):  # push the first handle out
        shared_kv(f"{MEMCACHED_URL}?ttl=600&n={i}")
    assert shared_kv(f"{MEMCACHED_URL}?ttl=600&n=0") is not first  # a new one now
    assert first.get_many([f"emnist:{run_id}:k"]) == {f"emnist:{run_id}:k": b"v"}
