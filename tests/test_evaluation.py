"""Pass-end evaluation on a fixed sample of the test set, the whole set where the result can
decide the run: a run stops at the same pass with the same final accuracy as one that
evaluates the whole test set every pass, while the passes far from the target cost a fifth.

Real memcached, real Fashion-MNIST (10,000 test images; the sample is 2,000)."""

from __future__ import annotations

import numpy as np
import pytest

from emnist.data.datasets import load_dataset
from emnist.models import ModelSpec, build_model
from emnist.train import evaluation
from emnist.train.config import TrainConfig
from emnist.train.evaluation import Evaluator
from emnist.train.run import load_run, setup_run, train_worker
from emnist.train.state import WorkerState
from tests.conftest import MEMCACHED_URL

BASE = {"dataset": "fashion-mnist", "batch_size": 100, "alpha": 0.05, "iterations": 8,
        "n_fetch": 5, "n_push": 5, "seed": 5, "store_url": MEMCACHED_URL}


def _run(kv, tmp_path, **kw) -> dict:
    cfg = TrainConfig(**{**BASE, "data_location": str(tmp_path / "shards"), **kw})
    run_id = setup_run(cfg, kv, 1)["run_id"]
    return train_worker(kv, run_id, 0, "h")[1]


def test_a_run_stops_where_whole_evaluations_would_stop_it(memcached_kv, tmp_path,
                                                           monkeypatch):
    sampled = _run(memcached_kv, tmp_path, target_accuracy=0.85)
    monkeypatch.setattr(evaluation, "SAMPLE_SIZE", 10**9)  # no sample: the whole set always
    whole = _run(memcached_kv, tmp_path, target_accuracy=0.85)
    assert sampled["reached"] and whole["reached"]
    assert (sampled["iterations"], sampled["accuracy"]) == (whole["iterations"], whole["accuracy"])
    assert sampled["curve"][-1][1:3] == whole["curve"][-1][1:3]
    # the passes before were judged on the sample: not the whole set's figures
    assert any(a[2] != b[2] for a, b in zip(sampled["curve"][:-1], whole["curve"][:-1],
                                            strict=True)), sampled["curve"]


def test_the_last_pass_and_a_run_that_ends_early_report_the_whole_test_set(memcached_kv,
                                                                           tmp_path):
    cfg = TrainConfig(**{**BASE, "data_location": str(tmp_path / "shards"),
                         "target_accuracy": 0.99, "iterations": 3})
    run_id = setup_run(cfg, memcached_kv, 1)["run_id"]
    rec = train_worker(memcached_kv, run_id, 0, "h")[1]
    store, _ = load_run(memcached_kv, run_id)
    params = np.empty(store.num_params, dtype=np.float32)
    store.fetch(params)  # one worker: its last pass ended with a flush, so these are its own
    data = load_dataset("fashion-mnist")
    model = build_model(ModelSpec.for_dataset("mlp", "fashion-mnist", 10, hidden=100,
                                              dropout=0.0), seed=5)
    ev = Evaluator(model, (data.test_x, data.test_y), None, cfg)
    assert ev.sample is not None and len(ev.sample[1]) == evaluation.SAMPLE_SIZE
    assert rec["iterations"] == 3 and not rec["reached"] and len(rec["curve"]) == 3
    whole, _ = model.evaluate(params, data.test_x, data.test_y)
    part, _ = model.evaluate(params, *ev.sample)
    assert rec["accuracy"] == rec["curve"][-1][2] == whole != part  # the last pass: whole set
    # a run that ends after a sampled pass (a stop signal, the wall clock) gets the whole
    # set's figure for its last point, and a target it did reach counts
    st = WorkerState(0)
    st.iteration = 1
    ev.evaluate(params, st, 1.0)
    assert ev.sampled and st.curve[-1][2] == part
    ev.cfg = TrainConfig(**{**BASE, "target_accuracy": whole})
    ev.final(params, st, 2.0)
    assert not ev.sampled and len(st.curve) == 1 and st.accuracy == whole
    assert st.reached and st.stop_reason == "target"


def test_an_averaging_timeout_note_passes_the_stored_state_check():
    """averaging records ``{"round": r, "missing": [workers]}``: a stored worker document
    holding one must read back (a list of scalars in an entry), a deeper one must not."""
    from emnist.store.codec import CorruptValue
    from emnist.train.state import checked_doc

    doc = WorkerState(1).to_dict()
    doc["barrier_timeouts"] = [{"round": 4, "missing": [0, 2], "at": 1.5}]
    assert checked_doc("k", doc, 1)["barrier_timeouts"][0]["missing"] == [0, 2]
    doc["barrier_timeouts"] = [{"round": 4, "missing": [[0]]}]
    with pytest.raises(CorruptValue):
        checked_doc("k", doc, 1)
