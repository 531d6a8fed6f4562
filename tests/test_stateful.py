import subprocess
import sys

import numpy as np
import pytest

from emnist.store import CorruptValue, open_kv
from emnist.store.keys import key_for
from emnist.store.stateful import stateful
from tests.conftest import MEMCACHED_URL, REDIS_URL
from tests.servers import start_together


def test_loads_before_and_persists_after(kv, run_id):
    @stateful("weights", "meta", kv=kv, run_id=run_id)
    def step(x, *, weights, meta):
        weights = np.zeros(3, np.float32) if weights is None else weights
        meta = meta or {"calls": 0}
        return float(weights.sum()), {"weights": weights + x, "meta": {"calls": meta["calls"] + 1}}

    assert step(1.0) == 0.0
    assert step(2.0) == 3.0  # saw the first call's weights
    assert step(0.0) == 9.0

    @stateful("weights", "meta", kv=kv, run_id=run_id)
    def peek(*, weights, meta):
        return (weights.tolist(), meta), {}

    assert peek() == ([3.0, 3.0, 3.0], {"calls": 3})


def test_an_exception_persists_nothing(memcached_kv, run_id):
    @stateful("n", kv=memcached_kv, run_id=run_id)
    def boom(*, n):
        raise RuntimeError("no")

    with pytest.raises(RuntimeError):
        boom()
    assert memcached_kv.get_many([key_for(run_id, "state", "n")]) == {}


def test_corrupt_state_is_refused(memcached_kv, run_id):
    memcached_kv.set_many({key_for(run_id, "state", "n"): b"not a codec value at all......."})

    @stateful("n", kv=memcached_kv, run_id=run_id)
    def f(*, n):
        return n, {}

    with pytest.raises(CorruptValue):
        f()


def test_undeclared_update_is_an_error(memcached_kv, run_id):
    @stateful("n", kv=memcached_kv, run_id=run_id)
    def f(*, n):
        return None, {"other": 1}

    with pytest.raises(ValueError, match="undeclared"):
        f()


COUNTER = """
import sys
from emnist.store import open_kv
from emnist.store.stateful import stateful
url, run_id, calls = sys.argv[1], sys.argv[2], int(sys.argv[3])

@stateful("count", kv=open_kv(url), run_id=run_id)
def incr(*, count):
    return None, {"count": (count or 0) + 1}

print("ready", flush=True)
sys.stdin.readline()
for _ in range(calls):
    incr()
"""


@pytest.mark.parametrize("url", [MEMCACHED_URL, REDIS_URL])
def test_concurrent_calls_lose_no_update(url, run_id, redis_kv):
    procs = [subprocess.Popen([sys.executable, "-c", COUNTER, url, run_id, "100"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
             for _ in range(4)]
    start_together(procs)

    @stateful("count", kv=open_kv(url), run_id=run_id)
    def read(*, count):
        return count, {}

    assert read() == 400
