"""A checkpoint write stays under the directory its request was accepted for (issue 19, item
7): a symbolic link created below the operator's checkpoint root after the request was
accepted (the run's directory, a parent, the file's name) makes the write fail, with nothing
written outside the root, instead of redirecting it. Real files, a real run in real memcached
and its worker; nothing is mocked."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from emnist import policy
from emnist.hostaliases import ALIASES_ENV
from emnist.store import open_kv
from emnist.train.checkpoint import Checkpoints
from emnist.train.config import FIELD_KINDS, ConfigError, TrainConfig
from emnist.train.run import setup_run, train_worker
from tests.conftest import MEMCACHED_URL

PARAMS = np.arange(100, dtype=np.float32)


def everything(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


@pytest.fixture
def places(monkeypatch, tmp_path):
    """An operator's checkpoint root (in the environment, as a deployment sets it) and a
    directory outside it that must stay empty."""
    for name in (*FIELD_KINDS, *policy.POLICY_ENV, ALIASES_ENV, "gateway_url"):
        monkeypatch.delenv(name, raising=False)
    root, outside = tmp_path / "ckpt-root", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    monkeypatch.setenv("checkpoint_roots", str(root))
    monkeypatch.setenv("store_url", MEMCACHED_URL)
    return root, outside


def _refused(write) -> ConfigError:
    with pytest.raises(ConfigError) as err:
        write()
    assert err.value.field == "checkpoint_url"
    assert str(err.value).startswith("checkpoint_url: ") and "/" not in str(err.value)
    return err.value


@pytest.mark.parametrize("swap", ["run directory", "parent", "root's child"])
def test_a_directory_swapped_for_a_link_after_acceptance_is_refused(places, swap):
    root, outside = places
    url = str(root / "team" / "runs" / "r1")
    env = dict(os.environ)
    assert policy.check_checkpoint_url(env, url, "") == url  # accepted: inside the root
    ck = Checkpoints(url)
    ck.write("r1", {"run": {"a": 1}}, PARAMS)  # the directory as it was accepted works
    docs, back = ck.read("r1")
    assert docs == {"run": {"a": 1}} and np.array_equal(back, PARAMS)
    victim = {"run directory": root / "team" / "runs" / "r1",
              "parent": root / "team" / "runs", "root's child": root / "team"}[swap]
    victim.rename(victim.with_name(victim.name + "-moved"))
    victim.symlink_to(outside, target_is_directory=True)
    _refused(lambda: Checkpoints(url).write("r1", {"run": {"a": 2}}, PARAMS))
    _refused(lambda: Checkpoints(url).read("r1"))
    assert everything(outside) == []


def test_a_link_at_the_checkpoint_file_is_replaced_not_followed(places):
    root, outside = places
    target = outside / "victim.ckpt"
    target.write_bytes(b"the operator's file")
    (root / "r2").mkdir()
    (root / "r2" / "r2.ckpt").symlink_to(target)
    _refused(lambda: Checkpoints(str(root / "r2")).read("r2"))
    Checkpoints(str(root / "r2")).write("r2", {"run": {}}, PARAMS)
    assert target.read_bytes() == b"the operator's file"
    assert not (root / "r2" / "r2.ckpt").is_symlink()
    assert np.array_equal(Checkpoints(str(root / "r2")).read("r2")[1], PARAMS)
    assert everything(outside) == ["victim.ckpt"]


def test_a_directory_no_longer_under_the_root_is_refused(places, tmp_path):
    root, outside = places
    (tmp_path / "link-to-root").symlink_to(root, target_is_directory=True)
    url = str(tmp_path / "link-to-root" / "r3")  # accepted: its real path is inside the root
    assert policy.check_checkpoint_url(dict(os.environ), url, "") == url
    Checkpoints(url).write("r3", {"run": {}}, PARAMS)
    assert (root / "r3" / "r3.ckpt").is_file()
    (root / "r3").rename(root / "r3-moved")
    (root / "r3").symlink_to(outside, target_is_directory=True)
    _refused(lambda: Checkpoints(url).write("r3", {"run": {}}, PARAMS))
    assert everything(outside) == []


def test_a_run_whose_checkpoint_directory_became_a_link_writes_nothing_outside(
        places, tmp_path, run_id):
    """The worker's own write, after its run was accepted (by setup, and by the train
    invocation that started it): the link appears while the run trains."""
    root, outside = places
    url = str(root / "runs" / run_id)
    env = {**os.environ, "data_location": str(tmp_path / "shards")}
    cfg = TrainConfig.from_request(env, {  # emnist-setup's check of the request: accepted
        "dataset": "synthetic", "number_of_workers": 1, "iterations": 2,
        "target_accuracy": 1.0, "checkpoint_url": url})
    kv = open_kv(MEMCACHED_URL)
    try:
        setup_run(cfg, kv, 1, run_id=run_id)
        (root / "runs").mkdir(exist_ok=True)
        (root / "runs").rename(root / "runs-moved")
        (root / "runs").symlink_to(outside, target_is_directory=True)
        err = _refused(lambda: train_worker(kv, run_id, 0, "emnist-train-test-0"))
        assert "symbolic link" in str(err)
    finally:
        kv.close()
    assert everything(outside) == []
