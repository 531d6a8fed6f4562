"""Refused requests leave nothing behind, and what requests can make a node store is bounded
(issue 19, item 5): emnist-setup checks a config against the dataset before it prepares a set,
and the prepared sets at a data location stay within the operator's ``max_prepared_bytes``,
least recently used evicted first. Real handlers, a real gateway, real memcached and real
files; nothing is mocked."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import requests

from emnist import policy
from emnist.data import DataError
from emnist.data.cache import open_set
from emnist.data.prepared import ensure_set
from emnist.hostaliases import ALIASES_ENV
from emnist.train.config import FIELD_KINDS
from tests.conftest import MEMCACHED_URL
from tests.gateway_tools import wait_for
from tests.handlers import Context, Event, load_handler
from tests.servers import local_gateway

ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC_SET = (4000 + 1000) * (784 + 1)  # one synthetic set's rows: pixels and a label


SETUP = load_handler("emnist-setup", "handler_emnist_setup_side_effects")


def tree(path: Path) -> dict[str, tuple[int, int]]:
    """Every file and directory below ``path`` (hidden ones too): size and modification time."""
    out = {}
    for dirpath, dirs, files in os.walk(path):
        for name in dirs + files:
            full = Path(dirpath) / name
            st = full.lstat()
            out[str(full.relative_to(path))] = (st.st_size, st.st_mtime_ns)
    return out


def disk_bytes(path: Path) -> int:
    return sum(Path(d, f).lstat().st_size for d, _, files in os.walk(path) for f in files)


def sets_in(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))


@pytest.fixture
def fn_env(monkeypatch, tmp_path):
    """The function's environment as a deployment sets it: its store and data location."""
    for name in (*FIELD_KINDS, *policy.POLICY_ENV, ALIASES_ENV, "gateway_url"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("store_url", MEMCACHED_URL)
    monkeypatch.setenv("data_location", str(tmp_path / "shards"))
    monkeypatch.setenv("max_params", "1000000")
    return tmp_path / "shards"


def test_refused_setups_write_nothing_under_the_data_location(fn_env):
    shards = fn_env
    ensure_set("synthetic", 1, str(shards), seed=0)  # a set a legitimate run left there
    before = tree(shards)
    assert len(sets_in(shards)) == 1
    cases = [  # (request, the field its 400 names); every seed a new one: a new set each
        ({"dataset": "fashion-mnist", "num_labels": 11, "seed": 101}, "num_labels"),
        ({"dataset": "synthetic", "num_labels": 47, "seed": 102}, "num_labels"),
        ({"dataset": "synthetic", "pixels_per_image": 100, "seed": 103}, "pixels_per_image"),
        ({"dataset": "fashion-mnist", "model": "vgg11", "seed": 104}, "model"),
        ({"dataset": "synthetic", "hidden_size": 900_000, "seed": 105}, "hidden_size"),
    ]
    for body, field in cases:
        resp = SETUP.handle(Event({**body, "number_of_workers": 1}), Context())
        assert resp["statusCode"] == 400, (body, resp)
        msg = resp["body"]["error"]
        assert msg.startswith(f"{field}: "), (body, msg)
        assert str(shards) not in msg and "Traceback" not in msg
        assert tree(shards) == before, f"{body} left files behind"


def test_a_set_larger_than_the_bound_is_refused_before_it_is_written(tmp_path):
    shards = tmp_path / "shards"
    with pytest.raises(DataError) as err:
        ensure_set("synthetic", 1, str(shards), seed=1,
                   env={"max_prepared_bytes": str(2 << 20)})
    assert err.value.field == "dataset" and "max_prepared_bytes" in err.value.public
    assert str(shards) not in err.value.public
    assert not shards.exists() or disk_bytes(shards) == 0


def test_many_seeds_stay_within_max_prepared_bytes_least_recently_used_first(tmp_path):
    shards, limit = tmp_path / "shards", 10 << 20  # room for two synthetic sets
    env = {"max_prepared_bytes": str(limit)}
    made = []
    for seed in range(6):
        made.append(ensure_set("synthetic", 1, str(shards), seed=seed, env=env))
        assert disk_bytes(shards) <= limit, f"seed {seed}: {disk_bytes(shards)} bytes"
        assert Path(made[-1].url).is_dir()  # the set a run just asked for is kept
    assert sets_in(shards) == sorted(s.name for s in made[-2:])
    assert disk_bytes(shards) > SYNTHETIC_SET  # the bound keeps sets, it does not empty
    # a set a run opens is used: the next prepare evicts the other one, not it
    open_set(made[-2].url)
    newest = ensure_set("synthetic", 1, str(shards), seed=6, env=env)
    assert sets_in(shards) == sorted([made[-2].name, newest.name])
    assert disk_bytes(shards) <= limit
    # finding an existing set writes nothing and keeps the sets as they are
    before = tree(shards)
    again = ensure_set("synthetic", 1, str(shards), seed=6, env=env)
    assert again.reused and set(tree(shards)) == set(before)


def test_sets_at_an_s3_location_stay_within_the_bound_too(tmp_path):
    from emnist.data.location import open_location
    from tests.s3server import moto_server, new_bucket, s3_env

    with moto_server() as endpoint:
        env = {**s3_env(endpoint), "EMNIST_HOME": str(tmp_path / "home"),
               "max_prepared_bytes": str(10 << 20)}
        url = f"s3://{new_bucket(endpoint)}/sets"
        base = open_location(url, env)
        for seed in range(4):
            newest = ensure_set("synthetic", 1, url, seed=seed, env=env)
            stored = sum(i.size for i in base.list())
            assert stored <= 10 << 20, f"seed {seed}: {stored} bytes stored"
            assert newest.name in base.dirs()
        assert len(base.dirs()) == 2


# -- through the real gateway ------------------------------------------------------------------
@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("sidegw")
    env = {"STORE_URL": MEMCACHED_URL, "DATA_LOCATION": str(tmp / "shards"),
           "TRAIN_REPLICAS": "1", "GRAD_REPLICAS": "0"}
    with local_gateway(tmp, env) as gw:
        yield gw, tmp / "shards"


def _post(gw, name: str, body: dict) -> requests.Response:
    return requests.post(f"{gw.url}/function/{name}", data=json.dumps(body), timeout=120)


def test_a_deployed_bound_holds_while_runs_of_many_seeds_still_train(gateway):
    gw, shards = gateway
    limit = 10 << 20
    fn = gw.get_function("emnist-setup")
    # the operator sets the bound by a deploy, as faas-cli would (an allowed setting)
    gw.deploy({"service": "emnist-setup", "image": fn["image"],
               "envVars": {**(fn.get("envVars") or {}), "max_prepared_bytes": str(limit)},
               "annotations": fn.get("annotations") or {}, "labels": fn.get("labels") or {}})
    assert gw.get_function("emnist-setup")["envVars"]["max_prepared_bytes"] == str(limit)
    r = _post(gw, "emnist-setup", {"dataset": "synthetic", "num_labels": 11, "seed": 99,
                                   "number_of_workers": 1})
    assert r.status_code == 400 and r.json()["error"].startswith("num_labels: ")
    assert not shards.exists() or disk_bytes(shards) == 0
    for seed in range(1, 5):
        r = _post(gw, "emnist-setup", {"dataset": "synthetic", "number_of_workers": 1,
                                       "iterations": 1, "target_accuracy": 1.0, "seed": seed,
                                       "store_url": MEMCACHED_URL})
        assert r.status_code == 200, r.text
        run_id = r.json()["run_id"]

        def finished(run_id: str = run_id) -> dict | None:
            st = requests.get(f"{gw.url}/function/emnist-setup", params={"run_id": run_id},
                              timeout=30)
            assert st.status_code == 200, st.text
            return st.json() if st.json()["done"] else None

        try:
            status = wait_for(finished, timeout=180, what=f"run {run_id} (seed {seed})")
        except AssertionError as e:  # say why: the functions' last log lines
            logs = [ln["text"] for name in ("emnist-setup", "emnist-train")
                    for ln in gw.logs(name, tail=20)]
            raise AssertionError(f"{e}; logs: {logs}") from None
        result = status["results"][0]
        assert result["iterations"] == 1 and result["samples"] > 0
        assert result["accuracy"] > 0.5, result  # it trained on its data
        assert disk_bytes(shards) <= limit, f"seed {seed}: {disk_bytes(shards)} bytes on disk"
    assert len(sets_in(shards)) == 2  # four seeds prepared, two evicted
