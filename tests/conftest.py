"""Shared fixtures: real memcached and Redis on loopback (started by .ci/run or `make test`)."""

from __future__ import annotations

import os
import secrets
import socket

import pytest

from emnist import policy
from emnist.hostaliases import ALIASES_ENV
from emnist.store import open_kv
from emnist.train.config import FIELD_KINDS

MEMCACHED_URL = os.environ.get("EMNIST_TEST_MEMCACHED", "memcached://127.0.0.1:11211")
BINARY_URL = MEMCACHED_URL.replace("memcached://", "memcached+binary://")
REDIS_URL = os.environ.get("EMNIST_TEST_REDIS", "redis://127.0.0.1:6379/15")
REDIS_BROKER = os.environ.get("EMNIST_TEST_REDIS_BROKER", "redis://127.0.0.1:6379/14")
AMQP_BROKER = os.environ.get("EMNIST_TEST_AMQP", "amqp://guest:guest@127.0.0.1:5672/%2F")


def need_rabbitmq() -> None:
    """`make test` (and so CI) starts RabbitMQ (scripts/servers.sh): its absence is a failure,
    never a skip, or the RabbitMQ paths would silently go untested."""
    try:
        socket.create_connection(("127.0.0.1", 5672), timeout=1).close()
    except OSError:
        pytest.fail("RabbitMQ is not answering on 127.0.0.1:5672 (scripts/servers.sh start)")


@pytest.fixture
def run_id() -> str:
    """A fresh run id per test: runs never share keys, so no flush is needed on memcached."""
    return "t" + secrets.token_hex(6)


@pytest.fixture
def memcached_kv():
    kv = open_kv(MEMCACHED_URL)
    yield kv
    kv.close()


@pytest.fixture
def redis_kv():
    kv = open_kv(REDIS_URL)
    kv.r.flushdb()
    yield kv
    kv.r.flushdb()
    kv.close()


@pytest.fixture
def binary_kv():
    kv = open_kv(BINARY_URL)
    yield kv
    kv.close()


@pytest.fixture(params=["memcached", "memcached+binary", "redis"])
def kv(request):
    """Every backend, each on a real server."""
    return request.getfixturevalue({"memcached": "memcached_kv", "memcached+binary": "binary_kv",
                                    "redis": "redis_kv"}[request.param])


@pytest.fixture
def trap():
    """A listening socket nobody should connect to: any connection shows in its backlog."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    s.setblocking(False)
    yield s
    s.close()


@pytest.fixture(scope="module")
def module_kv():
    """One memcached handle for a module's tests (runs never share keys)."""
    kv = open_kv(MEMCACHED_URL)
    yield kv
    kv.close()


@pytest.fixture
def fn_env(monkeypatch):
    """The functions' environment, as a deployment sets it: only what the test names."""
    for name in (*FIELD_KINDS, *policy.POLICY_ENV, ALIASES_ENV, "gateway_url", "EMNIST_DATA_DIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("store_url", MEMCACHED_URL)

    def set_env(**values: str) -> None:
        for k, v in values.items():
            monkeypatch.setenv(k, v)
    return set_env
