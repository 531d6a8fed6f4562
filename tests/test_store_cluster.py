"""Several memcached servers: chunks spread by consistent hashing, and a restarted server's
chunks are reported missing, never read as zeros."""

from __future__ import annotations

import shutil
import subprocess
import time

import numpy as np
import pytest

from emnist.store import MissingState, ParameterStore, StoreError, open_kv
from tests.servers import free_port, start_memcached, wait_port


@pytest.fixture
def servers():
    ports = [free_port() for _ in range(3)]
    procs = {p: start_memcached(p) for p in ports}
    yield ports, procs
    for proc in procs.values():
        proc.terminate()
        proc.wait(10)


@pytest.mark.parametrize("scheme", ["memcached", "memcached+binary"])
def test_chunks_spread_and_restart_is_reported(servers, scheme):
    ports, procs = servers
    url = f"{scheme}://" + ",".join(f"127.0.0.1:{p}" for p in ports)
    kv = open_kv(url)
    params = np.random.default_rng(0).random(60_000).astype(np.float32)
    ps = ParameterStore(kv, "cluster", chunk_bytes=4096)  # 59 chunks
    ps.init(params)
    # every server holds some chunks, and together they hold all of them exactly once
    held = {p: set(open_kv(f"memcached://127.0.0.1:{p}").get_many(ps.keys)) for p in ports}
    assert all(len(h) >= 5 for h in held.values()), {p: len(h) for p, h in held.items()}
    assert sum(len(h) for h in held.values()) == len(ps.keys)
    assert set().union(*held.values()) == set(ps.keys)
    out = np.empty_like(params)
    ps.fetch(out)
    assert np.array_equal(out, params)

    victim = ports[1]
    procs[victim].terminate()
    procs[victim].wait(10)
    procs[victim] = start_memcached(victim)  # back, empty
    with pytest.raises(MissingState) as e:
        deadline = time.monotonic() + 5
        while True:  # a client may first report the broken connection, then reconnect
            try:
                ps.fetch(out)
            except MissingState:
                raise
            except StoreError:
                assert time.monotonic() < deadline
                time.sleep(0.05)
    assert f"{len(held[victim])} of {len(ps.keys)} parameter chunks missing" in str(e.value)
    with pytest.raises(MissingState):
        ps.push(np.ones_like(params))


def test_redis_password_from_an_openfaas_secret_file(tmp_path, monkeypatch):
    port = free_port()
    proc = subprocess.Popen([shutil.which("redis-server"), "--bind", "127.0.0.1", "--port",
                             str(port), "--requirepass", "s3cret", "--save", "",
                             "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        wait_port(port)
        (tmp_path / "redis-password").write_text("s3cret\n")
        monkeypatch.setenv("EMNIST_SECRETS_DIR", str(tmp_path))
        kv = open_kv(f"redis://127.0.0.1:{port}/0?password_file=redis-password")
        kv.set_many({"k": b"v"})
        assert kv.get_many(["k"]) == {"k": b"v"}
        inline = open_kv(f"redis://:s3cret@127.0.0.1:{port}/0")
        assert "s3cret" not in inline.url and inline.get_many(["k"]) == {"k": b"v"}
        with pytest.raises(StoreError, match="(?i)auth"):
            open_kv(f"redis://127.0.0.1:{port}/0").get_many(["k"])
        with pytest.raises(StoreError, match="secret missing is not mounted"):
            open_kv(f"redis://127.0.0.1:{port}/0?password_file=missing")
        # a path is never read: the attack that sent any file to any host as the password
        (tmp_path / "private").write_text("s3cret\n")
        for path in (str(tmp_path / "private"), "../private", "/etc/passwd", "a/b"):
            with pytest.raises(StoreError, match="not a secret name"):
                open_kv(f"redis://127.0.0.1:{port}/0?password_file={path}")
    finally:
        proc.terminate()
        proc.wait(10)
