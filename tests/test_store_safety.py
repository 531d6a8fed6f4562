"""A write whose reply is lost is never applied twice, and a claim is never lost or doubled.

A small TCP proxy in front of the real memcached / Redis parses the commands going in and the
replies coming out, and once drops the client's connection either right after the server
executed a chosen command (its reply withheld: the client cannot know it ran) or right before
it (the command withheld: it never ran). The client must end with the push applied exactly
once and the claim held by exactly one caller, on every backend.
"""

from __future__ import annotations

import numpy as np
import pytest

from emnist.store import OutcomeUnknown, ParameterStore, claim, codec, open_kv
from tests.dropproxy import BACKENDS, DropProxy


@pytest.fixture(params=list(BACKENDS))
def backend(request):
    """(the server's url, a function making a proxy for one kind of command and its url)."""
    b = BACKENDS[request.param]
    proxies = []

    def proxy(op: str, when: str = "after", hook=None) -> tuple[DropProxy, str]:
        p = DropProxy(b["port"], b["protocol"], b[op], when, hook)
        proxies.append(p)
        return p, b["url"].format(p.port)

    yield b["url"].format(b["port"]), proxy
    for p in proxies:
        p.close()


N = 3000  # floats: one chunk of 4096 bytes, three of them


def _run(direct: str, run_id: str) -> tuple[ParameterStore, np.ndarray]:
    ps = ParameterStore(open_kv(direct), run_id, chunk_bytes=4096)
    init = np.arange(N, dtype=np.float32)
    ps.init(init)
    return ps, init


def _attach(url: str, run_id: str) -> ParameterStore:
    ps = ParameterStore(open_kv(url), run_id)
    ps.attach()
    return ps


def _final(ps: ParameterStore) -> tuple[np.ndarray, int]:
    out = np.empty(N, dtype=np.float32)
    clock, _ = ps.fetch(out)
    return out, clock


DELTA = np.full(N, 5, dtype=np.float32)


@pytest.mark.parametrize("when", ["after", "before"])
def test_push_whose_reply_is_lost_is_applied_exactly_once(backend, run_id, when):
    direct, proxy = backend
    ps, init = _run(direct, run_id)
    p, url = proxy("cas", when)
    stats = _attach(url, run_id).push(DELTA)
    assert p.fired == 1
    out, clock = _final(ps)
    assert np.array_equal(out, init + DELTA) and clock == 1 and stats.clock == 1


def test_push_lost_reply_then_another_writer_is_refused_not_repeated(backend, run_id):
    """The key changed after our write ran: whether it ran cannot be told, so it is not sent
    again; both writes are in the store once each."""
    direct, proxy = backend
    ps, init = _run(direct, run_id)
    other = np.full(N, 100, dtype=np.float32)
    p, url = proxy("cas", "after", hook=lambda: ps.push(other))
    with pytest.raises(OutcomeUnknown, match="outcome unknown"):
        _attach(url, run_id).push(DELTA)
    assert p.fired == 1
    out, clock = _final(ps)
    assert np.array_equal(out, init + DELTA + other) and clock == 2


def test_push_with_the_new_vector_back_is_exact_after_a_lost_reply(backend, run_id):
    direct, proxy = backend
    ps, init = _run(direct, run_id)
    p, url = proxy("cas", "after")
    back = np.empty(N, dtype=np.float32)
    _attach(url, run_id).push(DELTA, out=back)
    assert p.fired == 1 and np.array_equal(back, init + DELTA)
    assert np.array_equal(_final(ps)[0], init + DELTA)


@pytest.mark.parametrize("when", ["after", "before"])
def test_claim_whose_reply_is_lost_is_still_ours(backend, run_id, when):
    direct, proxy = backend
    key = f"emnist:{run_id}:init-claim"
    p, url = proxy("add", when)
    assert claim(open_kv(url), key) is True
    assert p.fired == 1
    assert claim(open_kv(direct), key) is False  # a second claimant loses
    doc = codec.decode_doc(key, open_kv(direct).get_many([key])[key])
    assert len(doc["owner"]) == 16


def test_claim_lost_before_the_server_while_another_claims_is_not_doubled(backend, run_id):
    direct, proxy = backend
    key = f"emnist:{run_id}:ckpt-claim:1"
    others: list[bool] = []
    p, url = proxy("add", "before", hook=lambda: others.append(claim(open_kv(direct), key)))
    assert claim(open_kv(url), key) is False
    assert p.fired == 1 and others == [True]  # exactly one claimant holds it


def test_reads_are_retried_on_a_fresh_connection(backend, run_id):
    direct, proxy = backend
    ps, init = _run(direct, run_id)
    p, url = proxy("read", "after")
    reader = ParameterStore(open_kv(url), run_id)
    reader.attach()  # the layout read loses its reply: read again
    assert p.fired == 1
    assert np.array_equal(_final(reader)[0], init)
