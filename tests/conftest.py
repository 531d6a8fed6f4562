"""Shared fixtures: real memcached and Redis on loopback (started by .ci/run or `make test`)."""

from __future__ import annotations

import os
import secrets

import pytest

from emnist.store import open_kv

MEMCACHED_URL = os.environ.get("EMNIST_TEST_MEMCACHED", "memcached://127.0.0.1:11211")
BINARY_URL = MEMCACHED_URL.replace("memcached://", "memcached+binary://")
REDIS_URL = os.environ.get("EMNIST_TEST_REDIS", "redis://127.0.0.1:6379/15")


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
