"""The functions' trust boundary: OpenFaaS calls them without authentication, so each attack
below (a request choosing where a function connects, reads or writes, or how much it
allocates) is reproduced against the real handlers and seen refused, with a 4xx naming the
field and nothing of the server's files in the answer. Handlers are called directly, the way
the python3-http template calls them, and a few through the real local gateway."""

from __future__ import annotations

import base64
import json
import socket
import time
import tracemalloc
from pathlib import Path
from urllib.parse import urlsplit

import numpy as np
import pytest
import requests

from emnist import policy
from emnist.faas import guarded, redacted, resolved_config
from emnist.hostaliases import ALIASES_ENV
from emnist.model import MLP, MLPShape, init_params, to_float
from emnist.store import codec
from emnist.train.config import TrainConfig
from tests.conftest import MEMCACHED_URL
from tests.handlers import Context, Event, call, error_of, load_handler
from tests.servers import local_gateway

ROOT = Path(__file__).resolve().parents[1]
MC = urlsplit(MEMCACHED_URL)
EVIL_REDIS = "redis://evil:6379/0?password_file=/etc/passwd"


SETUP, TRAIN, GRAD = (load_handler("emnist-setup"), load_handler("emnist-train"),
                      load_handler("emnist-grad"))


def no_connection(trap: socket.socket) -> None:
    with pytest.raises(BlockingIOError):
        conn, _ = trap.accept()
        conn.close()


def trap_url(trap: socket.socket, scheme: str = "memcached") -> str:
    return f"{scheme}://127.0.0.1:{trap.getsockname()[1]}" + ("/0" if scheme == "redis" else "")


GRAD_SHAPE = {"inputs": 784, "hidden": 8, "classes": 10}
SMALL = MLPShape(784, 8, 10)


def inline_params(shape: MLPShape = SMALL) -> str:
    return base64.b64encode(codec.encode(init_params(shape, 1))).decode()


# -- the policy on its own (fake environments) -------------------------------------------------
def test_store_urls_a_request_may_name():
    env = {"allowed_store_urls": "redis://10.0.0.5:6379/1, memcached://a:1,memcached://b:2"}
    own = "memcached://m:11211"
    assert policy.check_store_url(env, "store_url", own, own) == own
    assert policy.check_store_url(env, "store_url", "redis://10.0.0.5:6379/1", own)
    assert policy.check_store_url(env, "store_url", "memcached://b:2", own)
    for bad in ("memcached://m:11212", "memcached://a:1,evil:1", "redis://10.0.0.5:6379/2",
                EVIL_REDIS, "redis://:hunter2@evil:6379/0"):
        with pytest.raises(policy.PolicyError) as e:
            policy.check_store_url(env, "store_url", bad, own)
        assert e.value.field == "store_url" and "allowed_store_urls" in str(e.value)
        assert "evil" not in str(e.value) and "hunter2" not in str(e.value)
    with pytest.raises(policy.PolicyError, match="^store_url: must start with one of"):
        policy.check_store_url(env, "store_url", "ftp://m:11211", own)


def test_store_urls_compare_through_the_providers_host_aliases():
    env = {ALIASES_ENV: "memcached.openfaas-fn:11211=127.0.0.1:11211"}
    own = "memcached://memcached.openfaas-fn:11211"
    assert policy.check_store_url(env, "store_url", "memcached://127.0.0.1:11211", own)
    assert policy.resolve(env, own) == "memcached://127.0.0.1:11211"
    with pytest.raises(policy.PolicyError):
        policy.check_store_url({}, "store_url", "memcached://127.0.0.1:11211", own)


def test_paths_must_resolve_inside_a_root(tmp_path):
    root = tmp_path / "data"
    (root / "sub").mkdir(parents=True)
    (root / "escape").symlink_to("/etc")
    (tmp_path / "data-evil").mkdir()
    env = {"data_roots": f"{root},http://files.example:8000/splits"}

    def check(value: str) -> str:
        return policy.check_data_location(env, "data", value, "", urls=True)

    assert check(str(root)) and check(str(root / "sub")) and check(str(root / "new" / "dir"))
    assert check("http://files.example:8000/splits/fashion-p3")
    assert policy.check_data_location(env, "data", "/srv/own", "/srv/own") == "/srv/own"
    refused = ["/etc", "relative/dir", str(root / "sub" / ".." / ".." / "x"),
               str(root / "escape"), str(root / "escape" / "passwd"), str(tmp_path / "data-evil"),
               str(root) + "\x00", "http://files.example:8000/other",
               "http://files.example:8000/splits/../../etc", "http://evil:8000/splits",
               "http://files.example:8000/splits%2f..%2f..", "http://u@files.example:8000/splits",
               "http://files.example:8000/splits?x=1", "s3://bucket/splits", "file:///etc"]
    for value in refused:
        with pytest.raises(policy.PolicyError) as e:
            check(value)
        assert e.value.field == "data", value
        assert "/etc" not in str(e.value) and str(tmp_path) not in str(e.value)
    with pytest.raises(policy.PolicyError, match="data_roots"):
        policy.check_data_location({}, "dataset_dir", str(root), None)
    # a directory-only field takes no URL even under a URL root
    with pytest.raises(policy.PolicyError):
        policy.check_data_location(env, "dataset_dir", "http://files.example:8000/splits", None)


def test_checkpoint_urls_must_be_under_a_checkpoint_root(tmp_path):
    env = {"checkpoint_roots": f"{tmp_path},redis://127.0.0.1:6379/3"}
    ok = [str(tmp_path / "ck"), f"file://{tmp_path}/ck", "redis://127.0.0.1:6379/3"]
    for value in ok:
        assert policy.check_checkpoint_url(env, value, "") == value
    for value in ("/var/tmp/ck", f"file://host{tmp_path}", "redis://127.0.0.1:6379/4",
                  "redis://evil:6379/3", "file:///etc/cron.d"):
        with pytest.raises(policy.PolicyError, match="^checkpoint_url: "):
            policy.check_checkpoint_url(env, value, "")
    with pytest.raises(policy.PolicyError, match="checkpoint_roots"):
        policy.check_checkpoint_url({}, str(tmp_path), "")
    with pytest.raises(policy.PolicyError, match="^checkpoint_url: must not be empty"):
        policy.check_checkpoint_url(env, "", "")
    assert policy.check_checkpoint_url({}, "/srv/ck", "/srv/ck") == "/srv/ck"


# -- emnist-setup --------------------------------------------------------------------------
def test_password_file_store_url_is_refused_naming_store_url(fn_env, trap):
    status, msg = error_of(SETUP, {"store_url": EVIL_REDIS})
    assert status == 400 and msg.startswith("store_url: ") and "passwd" not in msg
    url = trap_url(trap, "redis") + "?password_file=/etc/passwd"
    assert error_of(SETUP, {"store_url": url})[0] == 400
    assert error_of(SETUP, "", "GET", {"run_id": "r1", "store_url": url})[0] == 400
    no_connection(trap)


def test_setup_never_connects_to_a_store_the_request_names(fn_env, trap):
    url = trap_url(trap)
    for status, msg in (error_of(SETUP, {"store_url": url}),
                        error_of(SETUP, {"store_url": url, "number_of_workers": 1}),
                        error_of(SETUP, {"resume": "r1", "store_url": url}),
                        error_of(SETUP, "", "GET", {"run_id": "r1", "store_url": url})):
        assert status == 400 and msg.startswith("store_url: ") and "allowed_store_urls" in msg
        assert str(trap.getsockname()[1]) not in msg
    no_connection(trap)


def test_allowed_store_urls_and_aliases_are_accepted(fn_env):
    other = f"memcached://localhost:{MC.port}"  # the test memcached, spelled another way
    fn_env(allowed_store_urls=other)
    status, msg = error_of(SETUP, "", "GET", {"run_id": "no-such-run", "store_url": other})
    assert status == 404 and "unknown run id" in msg  # the store was asked
    fn_env(store_url="memcached://memcached.openfaas-fn:11211",
           **{ALIASES_ENV: f"memcached.openfaas-fn:11211={MC.hostname}:{MC.port}"})
    assert error_of(SETUP, "", "GET", {"run_id": "no-such-run"})[0] == 404
    assert error_of(SETUP, "", "GET", {"run_id": "no-such-run",
                                       "store_url": MEMCACHED_URL})[0] == 404


@pytest.mark.parametrize("where", ["body", "query"])
def test_unknown_store_scheme_is_400_not_502(fn_env, where):
    if where == "body":
        status, msg = error_of(SETUP, {"store_url": "ftp://files:21"})
    else:
        status, msg = error_of(SETUP, "", "GET", {"run_id": "r1", "store_url": "ftp://files:21"})
    assert status == 400 and msg.startswith("store_url: must start with one of")


def test_dataset_dir_outside_the_data_roots_is_refused(fn_env, tmp_path):
    root = tmp_path / "roots"
    root.mkdir()
    (root / "etc").symlink_to("/etc")
    body = {"dataset": "mnist", "number_of_workers": 1}
    for d in ("/etc", str(root)):  # no data_roots yet: nothing may be named
        status, msg = error_of(SETUP, {**body, "dataset_dir": d})
        assert status == 400 and msg.startswith("dataset_dir: ") and "data_roots" in msg
    fn_env(data_roots=str(root))
    for d in ("/etc", str(root / "etc"), f"{root}/../roots-x", "etc"):
        status, msg = error_of(SETUP, {**body, "dataset_dir": d})
        assert status == 400 and msg.startswith("dataset_dir: "), (d, msg)
    # inside the root but empty: a 404 naming the field, no path, no file names
    (root / "empty").mkdir()
    status, msg = error_of(SETUP, {**body, "dataset_dir": str(root / "empty")})
    assert status == 404 and msg.startswith("dataset_dir: the data files are not there")
    assert str(tmp_path) not in msg and "ubyte" not in msg


def test_data_location_outside_the_roots_is_not_created(fn_env, tmp_path):
    target = tmp_path / "made-by-caller" / "deep"
    status, msg = error_of(SETUP, {"dataset": "synthetic", "number_of_workers": 1,
                                   "data_location": str(target)})
    assert status == 400 and msg.startswith("data_location: ") and "data_roots" in msg
    fn_env(data_roots=str(tmp_path / "roots"))
    assert error_of(SETUP, {"dataset": "synthetic", "number_of_workers": 1,
                            "data_location": str(target)})[0] == 400
    assert not (tmp_path / "made-by-caller").exists()


def test_checkpoint_url_outside_the_roots_is_refused_and_not_created(fn_env, tmp_path):
    for url in (str(tmp_path / "ck"), f"file://{tmp_path}/ck", "redis://127.0.0.1:6379/9"):
        status, msg = error_of(SETUP, {"dataset": "synthetic", "number_of_workers": 1,
                                       "checkpoint_url": url})
        assert status == 400 and msg.startswith("checkpoint_url: ") and "checkpoint_roots" in msg
        status, msg = error_of(SETUP, {"resume": "r1", "checkpoint_url": url})
        assert status == 400 and msg.startswith("checkpoint_url: ")
    assert not (tmp_path / "ck").exists()


@pytest.mark.parametrize("handler", [SETUP, TRAIN, GRAD], ids=["setup", "train", "grad"])
@pytest.mark.parametrize("text", ['{"alpha": NaN}', '{"alpha": Infinity}',
                                  '{"alpha": -Infinity}', '{"alpha": 1e999}',
                                  '{"run_id": "r", "worker_id": 0, "step": NaN}',
                                  "[" * 100_000])
def test_non_finite_and_pathological_json_is_400(fn_env, handler, text):
    status, msg = error_of(handler, text)
    assert status == 400 and msg.startswith("body: ")


def test_an_oversized_body_is_413(fn_env):
    status, msg = error_of(SETUP, b"{" + b" " * (8 << 20) + b"}")
    assert status == 413 and msg.startswith("body: larger than")


def test_huge_model_is_refused_before_any_allocation(fn_env):
    tracemalloc.start()
    try:
        status, msg = error_of(SETUP, {"hidden_size": 100_000_000, "number_of_workers": 1})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 400 and msg.startswith("hidden_size: ")
    assert peak < 16 << 20  # the 296 GiB model was never allocated
    status, msg = error_of(SETUP, {"hidden_size": 1_000_000, "number_of_workers": 1})
    assert status == 400 and msg.startswith("hidden_size: ") and "max_params" in msg
    fn_env(max_params="1000")
    assert error_of(SETUP, {"number_of_workers": 1})[0] == 400  # the stack's 100 hidden > cap


def test_worker_count_is_capped(fn_env):
    status, msg = error_of(SETUP, {"number_of_workers": 100_000})
    assert status == 400 and msg.startswith("number_of_workers: at most 256")
    fn_env(max_workers="4")
    assert error_of(SETUP, {"number_of_workers": 5})[0] == 400
    assert error_of(TRAIN, {"run_id": "r1", "worker_id": 4})[0] == 400


def test_messages_speak_json_not_python(fn_env):
    status, msg = error_of(SETUP, {"batch_size": True})
    assert status == 400 and msg == "batch_size: must be an integer, got true"
    status, msg = error_of(GRAD, {**GRAD_SHAPE, "hidden": None})
    assert msg == "hidden: must be an integer, got null"
    status, msg = error_of(TRAIN, {"run_id": "r1", "worker_id": [0]})
    assert msg == "worker_id: must be an integer, got an array"


def test_unexpected_failures_are_a_generic_500_with_the_details_in_the_log(capfd):
    @guarded()
    def broken(event, context):
        raise RuntimeError("secret detail at /srv/private/file")

    resp = broken(Event(), Context())
    assert resp["statusCode"] == 500
    assert resp["body"] == {"error": "internal error (see the function's logs)"}
    err = capfd.readouterr().err
    assert "Traceback" in err and "/srv/private/file" in err


def test_a_store_failure_is_502_without_exception_text(fn_env):
    free = socket.socket()
    free.bind(("127.0.0.1", 0))
    port = free.getsockname()[1]
    free.close()  # nothing listens there now
    fn_env(store_url=f"memcached://127.0.0.1:{port}")
    status, msg = error_of(SETUP, "", "GET", {"run_id": "r1"})
    assert status == 502 and msg.startswith("store_url: the store failed or cannot be reached")
    assert "Error" not in msg and str(port) not in msg


def test_a_damaged_checkpoint_in_an_allowed_root_is_a_409_naming_checkpoint_url(fn_env,
                                                                                 tmp_path):
    fn_env(checkpoint_roots=str(tmp_path))
    (tmp_path / "lost-run.ckpt").write_bytes(b"\x10" + b"garbage /etc/shadow" * 3)
    status, msg = error_of(SETUP, {"resume": "lost-run", "checkpoint_url": str(tmp_path)})
    assert status == 409 and msg.startswith("checkpoint_url: the checkpoint of run lost-run")
    assert str(tmp_path) not in msg and "shadow" not in msg
    status, msg = error_of(SETUP, {"resume": "other-run", "checkpoint_url": str(tmp_path)})
    assert status == 404 and msg.startswith("resume: unknown run id other-run")
    assert str(tmp_path) not in msg


def test_answers_carry_no_store_password_and_configs_are_alias_resolved():
    doc = {"run_id": "r", "config": {"store_url": "redis://:hunter2@db:6379/0",
                                      "local_store_url": "", "checkpoint_url": "/srv/ck"}}
    out = redacted(doc)
    assert out["config"]["store_url"] == "redis://:***@db:6379/0"
    assert "hunter2" not in json.dumps(out) and doc["config"]["store_url"].count("hunter2")
    env = {ALIASES_ENV: "memcached.openfaas-fn:11211=127.0.0.1:1,redis.openfaas-fn:6379="
                        "127.0.0.1:2"}
    cfg = resolved_config(TrainConfig(store_url="memcached://memcached.openfaas-fn:11211",
                                      local_store_url="memcached://memcached.openfaas-fn:11211",
                                      checkpoint_url="redis://redis.openfaas-fn:6379/1"), env)
    assert (cfg.store_url, cfg.local_store_url, cfg.checkpoint_url) == (
        "memcached://127.0.0.1:1", "memcached://127.0.0.1:1", "redis://127.0.0.1:2/1")


# -- emnist-train --------------------------------------------------------------------------
def test_train_refuses_request_stores_and_type1_config_places(fn_env, trap, tmp_path):
    url = trap_url(trap)
    status, msg = error_of(TRAIN, {"run_id": "r1", "worker_id": 0, "store_url": url})
    assert status == 400 and msg.startswith("store_url: ")
    status, msg = error_of(TRAIN, {"run_id": "r1", "worker_id": 0, "store_url": EVIL_REDIS})
    assert status == 400 and msg.startswith("store_url: ") and "passwd" not in msg
    assert error_of(TRAIN, {"run_id": "r1", "worker_id": 0, "store_url": "ftp://x"})[0] == 400
    config = {"execution_type": 1, "number_of_workers": 1, "dataset": "synthetic"}
    cases = [({"store_url": url}, "store_url"),
             ({"checkpoint_url": str(tmp_path / "ck")}, "checkpoint_url"),
             ({"data_location": str(tmp_path / "shards")}, "data_location"),
             ({"dataset_dir": "/etc"}, "dataset_dir"),
             ({"hidden_size": 1_000_000}, "hidden_size"),
             ({"number_of_workers": 100_000}, "number_of_workers")]
    for over, field in cases:
        status, msg = error_of(TRAIN, {"run_id": "r1", "worker_id": 0,
                                       "config": {**config, **over}})
        assert status == 400 and msg.startswith(f"{field}: "), (over, msg)
    assert not (tmp_path / "ck").exists() and not (tmp_path / "shards").exists()
    no_connection(trap)
    assert error_of(TRAIN, {"run_id": "../etc", "worker_id": 0})[0] == 400


# -- emnist-grad ---------------------------------------------------------------------------
def test_grad_does_not_read_or_probe_files_outside_the_data_roots(fn_env):
    body = {**GRAD_SHAPE, "params": inline_params(), "data": "/etc", "batch": "passwd"}
    status, msg = error_of(GRAD, body)
    assert status == 400 and msg.startswith("data: ") and "data_roots" in msg
    assert "/etc" not in msg and "passwd" not in msg and "root:" not in msg
    status2, msg2 = error_of(GRAD, {**body, "batch": "no-such-file"})
    assert (status2, msg2) == (status, msg)  # an existing and a missing file look alike


def test_grad_batch_errors_show_no_path_or_content(fn_env, tmp_path):
    root = tmp_path / "data"
    (root / "split").mkdir(parents=True)
    (root / "split" / "secret").write_bytes(b"TOPSECRET-4242 and more")
    (root / "split" / "dir").mkdir()
    (root / "etc").symlink_to("/etc")
    fn_env(data_roots=str(root))
    body = {**GRAD_SHAPE, "params": inline_params(), "data": str(root / "split")}
    status, msg = error_of(GRAD, {**body, "batch": "secret"})
    assert status == 400 and msg.startswith("batch: not a valid batch file")
    status, msg2 = error_of(GRAD, {**body, "batch": "dir"})
    assert status == 400 and msg2 == msg
    status, msg3 = error_of(GRAD, {**body, "batch": "missing"})
    assert status == 404 and msg3.startswith("batch: missing")
    for m in (msg, msg2, msg3):
        assert "TOPSECRET" not in m and str(tmp_path) not in m and "EMNS" not in m
    status, msg = error_of(GRAD, {**body, "data": str(root / "etc"), "batch": "passwd"})
    assert status == 400 and msg.startswith("data: ")  # a symlink out of the root
    for batch in ("../secret", "/etc/passwd", "a/../../b", "x" * 65):
        assert error_of(GRAD, {**body, "batch": batch})[0] == 400
    status, msg = error_of(GRAD, {**body, "data": "", "batch": "secret"})
    assert status == 400 and msg.startswith("data: ")  # "" is not the current directory


def test_grad_computes_from_an_allowed_data_root(fn_env, tmp_path):
    root = tmp_path / "data"
    rng = np.random.default_rng(0)
    xy = np.concatenate([rng.integers(0, 256, (4, 784)), rng.integers(0, 10, (4, 1))],
                        axis=1).astype(np.uint8)
    (root / "split" / "batches-4" / "peer-0").mkdir(parents=True)
    (root / "split" / "batches-4" / "peer-0" / "00000").write_bytes(codec.encode(xy))
    fn_env(data_roots=str(root))
    shape = MLPShape(784, 8, 10)
    status, body = call(GRAD, {**GRAD_SHAPE, "params": inline_params(shape), "step": 3,
                               "data": str(root / "split"), "batch": "batches-4/peer-0/00000"})
    assert status == 200, body
    got = codec.decode("g", body, dtype=np.float32, shape=(shape.num_params,))
    _, want = MLP(shape).loss_and_grad(init_params(shape, 1), to_float(xy[:, :-1]), xy[:, -1])
    np.testing.assert_allclose(got.array, want, rtol=1e-5, atol=1e-7)
    assert got.clock == 3
    # the function's own data_location needs no root
    fn_env(data_roots="", data_location=str(root / "split"))
    status, _ = call(GRAD, {**GRAD_SHAPE, "params": inline_params(shape),
                            "batch": "batches-4/peer-0/00000"})
    assert status == 200


def test_grad_refuses_request_stores_and_accepts_allowed_ones(fn_env, trap):
    body = {**GRAD_SHAPE, "params_key": "emnist:no-such-run:p2p:params:0:0",
            "batch_data": base64.b64encode(codec.encode(np.zeros((1, 785), np.uint8))).decode()}
    for url in (trap_url(trap), trap_url(trap, "redis") + "?password_file=/etc/passwd"):
        status, msg = error_of(GRAD, {**body, "store_url": url})
        assert status == 400 and msg.startswith("store_url: ")
    no_connection(trap)
    assert error_of(GRAD, {**body, "store_url": "ftp://x"})[0] == 400
    assert error_of(GRAD, body)[0] == 404  # the function's own store: asked, key not there
    other = f"memcached://localhost:{MC.port}"
    fn_env(allowed_store_urls=other)
    status, msg = error_of(GRAD, {**body, "store_url": other})
    assert status == 404 and msg == "params_key: not found in the store"


@pytest.mark.parametrize("over, field", [
    ({"hidden": 100_000_000}, "hidden"),
    ({"hidden": 500_000}, "hidden"),  # inside the hard limit, over max_params
    ({"inputs": 0}, "inputs"),
    ({"classes": 10**30}, "classes"),
    ({"step": -1}, "step"),
    ({"step": 2**64}, "step"),
    ({"params": "A" * (2 << 20)}, "params"),
    ({"params": "not base64!"}, "params"),
])
def test_grad_bounds_every_number_and_size(fn_env, over, field):
    tracemalloc.start()
    try:
        status, msg = error_of(GRAD, {**GRAD_SHAPE, "params": inline_params(),
                                      "batch_data": base64.b64encode(codec.encode(np.zeros(
                                          (1, 785), np.uint8))).decode(), **over})
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert status == 400 and msg.startswith(f"{field}: "), msg
    assert peak < 64 << 20


# -- through the real local gateway --------------------------------------------------------
@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("secgw")
    (tmp / "data").mkdir()
    (tmp / "ckpt").mkdir()
    env = {"STORE_URL": MEMCACHED_URL, "DATA_LOCATION": str(tmp / "data" / "shards"),
           "DATA_ROOTS": str(tmp / "data"), "CHECKPOINT_ROOTS": str(tmp / "ckpt"),
           "TRAIN_REPLICAS": "1", "GRAD_REPLICAS": "1"}
    with local_gateway(tmp, env) as gw:
        yield gw, tmp


def _post(gw, name: str, body) -> requests.Response:
    data = body if isinstance(body, str) else json.dumps(body)
    return requests.post(f"{gw.url}/function/{name}", data=data, timeout=60)


def test_gateway_refuses_the_attacks(gateway):
    gw, tmp = gateway
    r = _post(gw, "emnist-setup", {"store_url": EVIL_REDIS})
    assert r.status_code == 400 and r.json()["error"].startswith("store_url: ")
    r = _post(gw, "emnist-grad", {**GRAD_SHAPE, "params": inline_params(), "data": "/etc",
                                  "batch": "passwd"})
    assert r.status_code == 400 and r.json()["error"].startswith("data: ")
    assert "root:" not in r.text
    for name in ("emnist-setup", "emnist-train", "emnist-grad"):
        r = _post(gw, name, '{"alpha": NaN}')
        assert r.status_code == 400 and r.json()["error"].startswith("body: "), (name, r.text)
    r = requests.get(f"{gw.url}/function/emnist-setup",
                     params={"run_id": "r1", "store_url": "ftp://x"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"].startswith("store_url: ")
    r = _post(gw, "emnist-setup", {"data_location": str(tmp / "elsewhere"),
                                   "number_of_workers": 1})
    assert r.status_code == 400 and not (tmp / "elsewhere").exists()
    r = _post(gw, "emnist-setup", {"number_of_workers": 100_000})
    assert r.status_code == 400 and r.json()["error"].startswith("number_of_workers: ")


def test_gateway_accepts_places_inside_the_operators_roots(gateway):
    gw, tmp = gateway
    shards, ckpt = tmp / "data" / "mine", tmp / "ckpt" / "mine"
    r = _post(gw, "emnist-setup", {"dataset": "synthetic", "number_of_workers": 1,
                                   "iterations": 2, "target_accuracy": 1.0,
                                   "data_location": str(shards), "checkpoint_url": str(ckpt),
                                   "store_url": MEMCACHED_URL})
    assert r.status_code == 200, r.text
    run_id = r.json()["run_id"]
    assert "shard_dir" not in r.json()  # the server-side path stays on the server
    assert len([p for p in shards.iterdir() if not p.name.startswith(".")]) == 1
    deadline = time.monotonic() + 120
    while True:  # the worker checkpoints into the allowed root, then finishes
        st = requests.get(f"{gw.url}/function/emnist-setup", params={"run_id": run_id},
                          timeout=30)
        assert st.status_code == 200, st.text
        if st.json()["done"]:
            break
        assert time.monotonic() < deadline, "the run did not finish"
        time.sleep(0.1)
    assert (ckpt / f"{run_id}.ckpt").exists()
    r = _post(gw, "emnist-setup", {"resume": run_id, "checkpoint_url": str(ckpt)})
    assert r.status_code == 200 and r.json()["resumed_workers"] == []


@pytest.mark.parametrize("handler", [SETUP, TRAIN, GRAD], ids=["setup", "train", "grad"])
def test_a_control_character_body_is_not_an_empty_body(handler):
    """Python's str.strip() takes \\x1c-\\x1f for whitespace, JSON does not: such a body is
    malformed JSON (400), never the empty body that means {} (found by test_fuzz_http)."""
    for body in (b"\x1c", b" \x1f\n"):
        status, _ = call(handler, body)
        assert status == 400, (body, status)
