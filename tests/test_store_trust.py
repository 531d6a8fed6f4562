"""The store is not trusted: memcached has no authentication, so anyone who reaches it can write
a run's documents. Each forged document below is written to the real memcached as an attacker
would (raw codec values, no key), and the real functions behind the real local gateway running
emnist.yml must refuse it with a 4xx naming the field, leaving nothing written, fetched or
pushed where the document points. With the local stack's store key (`emnist up` creates it)
run documents are sealed, and unsigned, wrongly signed or replayed ones are refused too.
Stored numbers are checked before they size anything: a refusal's error comes before the
allocation it would have caused, and the process's peak memory shows it."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import stat
import threading
import tracemalloc
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest import mock

import numpy as np
import pytest
import requests

from emnist.store import CorruptValue, ParameterStore, codec, open_kv
from emnist.store.keys import key_for
from emnist.train import runindex
from emnist.train.config import TrainConfig
from emnist.train.run import run_status, setup_run
from tests.conftest import MEMCACHED_URL
from tests.servers import free_port, local_gateway, start_memcached

SMALL = {"dataset": "synthetic", "number_of_workers": 1, "iterations": 1,
         "target_accuracy": 1.0, "hidden_size": 16}


# -- the attacker's tools -----------------------------------------------------------------------
def raw_doc(kv, key: str) -> Any:
    return codec.decode_doc(key, kv.get_many([key])[key])


def put_raw(kv, key: str, doc: Any) -> None:
    """Write a document as any process that reaches memcached can: no key, no checks."""
    kv.set_many({key: codec.encode_doc(doc)})


def forge(kv, run_id: str, config: dict | None = None, **fields: Any) -> None:
    key = key_for(run_id, "run")
    doc = raw_doc(kv, key)
    doc.update(fields)
    doc["config"].update(config or {})
    doc.pop("seal", None)
    put_raw(kv, key, doc)


class Recorder:
    """An HTTP server on a loopback port 0 that records every request it gets."""

    def __init__(self) -> None:
        seen: list[tuple[str, str]] = []
        self.seen = seen

        class Handler(BaseHTTPRequestHandler):
            def _any(self) -> None:
                seen.append((self.command, self.path))
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD = do_POST = do_PUT = _any  # noqa: N815 - http.server's naming

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def recorder():
    r = Recorder()
    yield r
    r.close()


@pytest.fixture
def other_memcached():
    """A second real memcached: the forged local_store_url."""
    port = free_port()
    proc = start_memcached(port)
    yield f"memcached://127.0.0.1:{port}"
    proc.kill()
    proc.wait(10)


# -- the stack ----------------------------------------------------------------------------------
def _stack_env(tmp: Path) -> dict[str, str]:
    for d in ("data", "ckpt", "state"):
        (tmp / d).mkdir(exist_ok=True)
    return {"STORE_URL": MEMCACHED_URL, "DATA_LOCATION": str(tmp / "data" / "shards"),
            "DATA_ROOTS": str(tmp / "data"), "CHECKPOINT_ROOTS": str(tmp / "ckpt"),
            "ALLOWED_STORE_URLS": "", "TRAIN_REPLICAS": "1", "GRAD_REPLICAS": "1",
            "EMNIST_GATEWAY_STATE": str(tmp / "state"), "STORE_KEY_SECRET": ""}


@pytest.fixture(scope="module")
def plain(tmp_path_factory):
    """emnist.yml on the local gateway without a store key (an operator who created none)."""
    tmp = tmp_path_factory.mktemp("plain")
    with local_gateway(tmp, _stack_env(tmp)) as gw:
        yield gw, tmp


@pytest.fixture(scope="module")
def keyed(tmp_path_factory):
    """emnist.yml on the local gateway with a store key in its secrets, as `emnist up` (or
    `faas-cli secret create emnist-store-key`) leaves it."""
    tmp = tmp_path_factory.mktemp("keyed")
    env = _stack_env(tmp)
    key = secrets.token_urlsafe(32).encode()
    (tmp / "state" / "secrets").mkdir(mode=0o700)
    (tmp / "state" / "secrets" / "emnist-store-key").write_bytes(key)
    with local_gateway(tmp, {**env, "STORE_KEY_SECRET": "emnist-store-key"}) as gw:
        yield gw, tmp, key


@pytest.fixture
def kv():
    kv = open_kv(MEMCACHED_URL)
    yield kv
    kv.close()


def new_run(kv, tmp: Path, **over: Any) -> str:
    """A run as setup writes it (no worker started), its shards under the stack's data."""
    run_id = "st" + secrets.token_hex(6)
    cfg = TrainConfig(**{**SMALL, "store_url": MEMCACHED_URL,
                         "data_location": str(tmp / "data" / "shards"), **over})
    setup_run(cfg, kv, 1, run_id=run_id)
    return run_id


def train(gw, run_id: str) -> requests.Response:
    return requests.post(f"{gw.url}/function/emnist-train",
                         data=json.dumps({"run_id": run_id, "worker_id": 0}), timeout=120)


def refused(r: requests.Response, run_id: str, field: str) -> str:
    assert r.status_code == 409, (r.status_code, r.text)
    msg = r.json()["error"]
    assert msg.startswith(f"run_id: a stored document of run {run_id} is refused"), msg
    assert field in msg, msg
    return msg


def untouched(kv, run_id: str) -> None:
    """The refusal came before the worker took its state: nothing of it was written."""
    assert kv.get_many([key_for(run_id, "worker:0")]) == {}


# -- (a) places named by a forged run document: the policy refuses them, key or no key --------
def test_a_forged_checkpoint_url_writes_nothing_outside_the_roots(plain, kv):
    gw, tmp = plain
    run_id = new_run(kv, tmp)
    outside = tmp / "outside-ck"
    forge(kv, run_id, config={"checkpoint_url": str(outside), "checkpoint_every": 1})
    msg = refused(train(gw, run_id), run_id, "checkpoint_url")
    assert str(outside) not in msg and not outside.exists()
    untouched(kv, run_id)


def test_a_forged_http_shard_dir_is_never_fetched(plain, kv, recorder):
    gw, tmp = plain
    run_id = new_run(kv, tmp)
    forge(kv, run_id, shard_dir=f"{recorder.url}/sets/forged")
    refused(train(gw, run_id), run_id, "shard_dir")
    assert recorder.seen == []
    untouched(kv, run_id)


@pytest.mark.parametrize("where", ["etc", "copy"])
def test_a_forged_local_shard_dir_outside_the_roots_is_not_opened(plain, kv, where):
    gw, tmp = plain
    run_id = new_run(kv, tmp)
    shard_dir = Path(raw_doc(kv, key_for(run_id, "run"))["shard_dir"])
    target = Path("/etc")
    if where == "copy":  # a complete, valid set: only the policy stands in the way
        target = tmp / "outside-sets" / shard_dir.name
        shutil.copytree(shard_dir, target, dirs_exist_ok=True)
    forge(kv, run_id, shard_dir=str(target))
    msg = refused(train(gw, run_id), run_id, "shard_dir")
    assert str(target) not in msg
    untouched(kv, run_id)


def test_a_forged_local_store_url_gets_no_parameters(plain, kv, other_memcached):
    gw, tmp = plain
    run_id = new_run(kv, tmp)
    forge(kv, run_id, config={"local_store_url": other_memcached})
    refused(train(gw, run_id), run_id, "local_store_url")
    other = open_kv(other_memcached)
    assert other.get_many([key_for(run_id, "tier", 0), key_for(run_id, "w", 0)]) == {}
    untouched(kv, run_id)


@pytest.mark.parametrize("field", ["store_url", "data_location", "dataset_dir"])
def test_other_forged_places_are_refused(plain, kv, trap, field):
    gw, tmp = plain
    run_id = new_run(kv, tmp)
    value = {"store_url": f"memcached://127.0.0.1:{trap.getsockname()[1]}",
             "data_location": str(tmp / "outside-data"), "dataset_dir": "/etc"}[field]
    forge(kv, run_id, config={field: value})
    refused(train(gw, run_id), run_id, field)
    with pytest.raises(BlockingIOError):  # nothing connected to the forged store
        trap.accept()[0].close()
    assert not (tmp / "outside-data").exists()
    untouched(kv, run_id)


def test_resuming_a_forged_run_launches_nothing(plain, kv):
    gw, tmp = plain
    run_id = new_run(kv, tmp)
    forge(kv, run_id, config={"checkpoint_url": str(tmp / "outside-ck")})
    r = requests.post(f"{gw.url}/function/emnist-setup", data=json.dumps({"resume": run_id}),
                      timeout=60)
    assert r.status_code == 409, r.text
    assert r.json()["error"].startswith(f"resume: the run document of {run_id} is refused")
    untouched(kv, run_id)


def test_an_unforged_run_trains_on_the_same_stack(plain, kv):
    """The control: the refusals above are about the forged fields, not the stack."""
    gw, tmp = plain
    run_id = new_run(kv, tmp, checkpoint_url=str(tmp / "ckpt" / "mine"))
    r = train(gw, run_id)
    assert r.status_code == 200, r.text
    assert r.json()["done"] and (tmp / "ckpt" / "mine" / f"{run_id}.ckpt").exists()


# -- (b) sealed documents: the local stack's key --------------------------------------------------
def _sealed(kv, key: bytes):
    from emnist.store.signing import SealedKV, Sealer

    return SealedKV(kv, Sealer(key))


def test_emnist_up_creates_the_store_key_once(tmp_path):
    from emnist.cli.stack import store_key_env

    with mock.patch.dict(os.environ, {"EMNIST_GATEWAY_STATE": str(tmp_path / "state"),
                                      "STORE_KEY_SECRET": ""}):
        env = store_key_env()
        path = tmp_path / "state" / "secrets" / "emnist-store-key"
        key = path.read_bytes()
        assert env == {"STORE_KEY_SECRET": "emnist-store-key",
                       "EMNIST_GATEWAY_STATE": str(tmp_path / "state")}
        assert len(key) >= 32 and stat.S_IMODE(path.stat().st_mode) == 0o600
        assert store_key_env() == env and path.read_bytes() == key  # kept across restarts


def test_the_local_stack_seals_its_run_documents_and_trains_them(keyed, kv):
    gw, tmp, _ = keyed
    r = requests.post(f"{gw.url}/function/emnist-setup", data=json.dumps(SMALL), timeout=60)
    assert r.status_code == 200, r.text
    run_id = r.json()["run_id"]
    for name in ("run", "layout"):
        assert raw_doc(kv, key_for(run_id, name))["seal"].startswith("v1:")
    status = None
    for _ in range(600):  # the worker verifies the seals, then trains to the end
        status = requests.get(f"{gw.url}/function/emnist-setup", params={"run_id": run_id},
                              timeout=30)
        assert status.status_code == 200, status.text
        if status.json()["done"]:
            break
        threading.Event().wait(0.1)
    assert status is not None and status.json()["done"]


def test_unsigned_wrongly_signed_and_replayed_documents_are_refused(keyed, kv):
    gw, tmp, key = keyed
    unsigned = new_run(kv, tmp)  # written without the key, as any process could
    refused(train(gw, unsigned), unsigned, "not sealed")
    st = requests.get(f"{gw.url}/function/emnist-setup", params={"run_id": unsigned},
                      timeout=30)
    assert st.status_code == 409 and st.json()["error"].startswith("run_id: ")

    sealed = _sealed(kv, key)
    rewritten = new_run(sealed, tmp)
    forge(kv, rewritten)  # a sealed document, rewritten without the key
    refused(train(gw, rewritten), rewritten, "not sealed")

    wrong = new_run(_sealed(kv, b"another key, not the stack's!"), tmp)
    refused(train(gw, wrong), wrong, "does not verify")

    # a sealed layout of another run (same size: it would train), copied under this run
    victim, other = new_run(sealed, tmp), new_run(sealed, tmp)
    layout = key_for(other, "layout")
    kv.set_many({key_for(victim, "layout"): kv.get_many([layout])[layout]})
    refused(train(gw, victim), victim, "does not verify")
    # and a sealed run document replayed under another run id
    kv.set_many({key_for(victim, "run"): kv.get_many([key_for(other, "run")])[
        key_for(other, "run")]})
    refused(train(gw, victim), victim, "does not verify")
    for run_id in (unsigned, rewritten, wrong, victim):
        untouched(kv, run_id)
    r = train(gw, other)  # the control: the untouched sealed run trains
    assert r.status_code == 200 and r.json()["done"], r.text


def test_a_sealed_document_still_passes_the_policy(keyed, kv):
    gw, tmp, key = keyed
    outside = tmp / "outside-ck"
    run_id = new_run(_sealed(kv, key), tmp, checkpoint_url=str(outside))
    refused(train(gw, run_id), run_id, "checkpoint_url")
    assert not outside.exists()


def test_seals_bind_the_store_key_and_the_key_name():
    from emnist.store.signing import Sealer, StoreKeyError

    a, b = Sealer(b"k" * 32), Sealer(b"j" * 32)
    doc = {"run_id": "r1", "workers": 2, "config": {"alpha": 0.5}}
    sealed = a.seal("emnist:r1:run", doc)
    assert a.open("emnist:r1:run", sealed) == doc
    for sealer, key, value in ((b, "emnist:r1:run", sealed), (a, "emnist:r2:run", sealed),
                               (a, "emnist:r1:layout", sealed),
                               (a, "emnist:r1:run", {**sealed, "workers": 3}),
                               (a, "emnist:r1:run", doc), (a, "emnist:r1:run", [1])):
        with pytest.raises(CorruptValue):
            sealer.open(key, value)
    assert Sealer(None).open("emnist:r1:run", sealed) == doc  # no key: read unchecked
    with pytest.raises(StoreKeyError):  # a configured key too short to be one: refused
        Sealer(b"short")


# -- (c) stored numbers are checked before they size anything ------------------------------------
class Peak:
    """The peak of Python allocations inside the block (tracemalloc)."""

    def __enter__(self) -> Peak:
        tracemalloc.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bytes = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()


@pytest.mark.parametrize("layout, field", [
    ({"num_params": 200_000, "chunk_elems": 1}, "chunk_elems"),  # 200,000 one-value chunks
    ({"num_params": 300_000_000, "chunk_elems": 98_304}, "num_params"),  # over max_params
    ({"num_params": 100, "chunk_elems": "many"}, "chunk_elems"),
    ({"num_params": 100, "chunk_elems": 0}, "chunk_elems"),
    ({"num_params": True, "chunk_elems": 16}, "num_params"),
    ({"num_params": 100.5, "chunk_elems": 16}, "num_params"),
])
def test_a_hostile_layout_is_refused_before_it_sizes_the_keys(kv, run_id, layout, field):
    put_raw(kv, key_for(run_id, "layout"), {**layout, "dtype": "float32"})
    store = ParameterStore(kv, run_id)
    with Peak() as peak, pytest.raises(CorruptValue) as e:
        store.attach()
    assert e.value.key == key_for(run_id, "layout") and e.value.reason.startswith(f"{field}: ")
    assert peak.bytes < 4 << 20


def test_run_status_refuses_a_run_claiming_more_workers_than_the_cap(kv, run_id, plain):
    gw, _ = plain
    put_raw(kv, key_for(run_id, "run"), {"run_id": run_id, "workers": 200_000, "started": 1.0,
                                         "config": {}})
    with Peak() as peak, pytest.raises(CorruptValue, match="workers: must be a whole number"):
        run_status(kv, run_id)
    assert peak.bytes < 4 << 20
    r = requests.get(f"{gw.url}/function/emnist-setup", params={"run_id": run_id}, timeout=60)
    assert r.status_code == 409 and len(r.content) < 2048, (r.status_code, len(r.content))
    assert r.json()["error"].startswith(f"run_id: the stored run document of {run_id} is "
                                        "refused: not a valid run document: workers: ")


@pytest.fixture
def index(kv):
    """The store-wide run index, restored after the test (it is shared by every run)."""
    old = kv.get_many([runindex.RUNS]).get(runindex.RUNS)
    yield
    if old is None:
        kv.delete_many([runindex.RUNS])
    else:
        kv.set_many({runindex.RUNS: old})


def _entry(run_id: str, **over: Any) -> dict:
    return {"run_id": run_id, "algorithm": "downpour", "model": "mlp 784-16-10",
            "dataset": "synthetic", "workers": 1, "execution_type": 3, "started": 1.0, **over}


def test_hostile_index_entries_are_dropped_before_they_size_the_listing(kv, index):
    good = _entry("good-run")
    hostile = [_entry("big-run", workers=2_000_000), _entry("many-run", workers="many"),
               _entry("when-run", started="yesterday"), _entry("huge-run", workers=20_000_000),
               _entry("type-run", execution_type=[1]), _entry("name-run", model="m" * 5000)]
    put_raw(kv, runindex.RUNS, {"runs": [good, *hostile]})
    with Peak() as peak:
        listed = runindex.list_runs(kv, limit=100)
    assert [r["run_id"] for r in listed] == ["good-run"]
    assert peak.bytes < 4 << 20


def test_a_malformed_index_entry_leaves_the_runs_listing_answering(plain, kv, index):
    gw, tmp = plain
    run_id = new_run(kv, tmp)  # indexed as setup indexes it
    runs = raw_doc(kv, runindex.RUNS)["runs"]
    put_raw(kv, runindex.RUNS, {"runs": [*runs, _entry("bad-run", workers="many")]})
    r = requests.get(f"{gw.url}/function/emnist-setup", params={"runs": "1"}, timeout=60)
    assert r.status_code == 200, r.text
    listed = [e["run_id"] for e in r.json()["runs"]]
    assert run_id in listed and "bad-run" not in listed


# -- worker documents and progress notes --------------------------------------------------------
def test_a_hostile_worker_state_is_refused_by_its_worker_and_skipped_by_status(plain, kv):
    gw, tmp = plain
    run_id = new_run(kv, tmp)
    put_raw(kv, key_for(run_id, "worker:0"), {"worker_id": 0, "iteration": "many"})
    r = train(gw, run_id)
    assert r.status_code == 409 and "iteration: " in r.json()["error"], r.text
    for doc in ([1, 2], {"worker_id": 0, "lease": "x y\r\nflush_all"}, "junk"):
        put_raw(kv, key_for(run_id, "worker:0"), doc)
        st = requests.get(f"{gw.url}/function/emnist-setup", params={"run_id": run_id},
                          timeout=30)
        assert st.status_code == 200 and st.json()["progress"] == [None], st.text


def test_a_forged_progress_note_is_ignored(plain, kv):
    gw, tmp = plain
    run_id = new_run(kv, tmp)
    put_raw(kv, key_for(run_id, "worker:0"), {"worker_id": 0, "iteration": 0, "step": 1,
                                              "lease": "abc", "heartbeat": 1.0})
    kv.set_many({key_for(run_id, "progress:0:abc"): codec.encode(
        np.full(14, np.nan, dtype=np.float64))})
    st = requests.get(f"{gw.url}/function/emnist-setup", params={"run_id": run_id}, timeout=30)
    assert st.status_code == 200, st.text
    assert st.json()["progress"][0]["iteration"] == 0  # the document's, not the note's
    r = train(gw, run_id)  # the worker resumes from its document and finishes
    assert r.status_code == 200 and r.json()["done"], r.text
