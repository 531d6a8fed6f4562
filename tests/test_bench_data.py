"""`emnist bench data` for real at a small size (20k samples): every piece against a moto S3
server and memcached, through the CLI; checks the records' fields and invariants, never
timings."""

from __future__ import annotations

import json
import math

from click.testing import CliRunner

from emnist.cli import main
from tests.conftest import MEMCACHED_URL
from tests.s3server import moto_server


def _finite(*values: float) -> bool:
    return all(isinstance(v, int | float) and math.isfinite(v) and v > 0 for v in values)


def test_bench_data_small(tmp_path):
    out = tmp_path / "bench-data.json"
    with moto_server() as endpoint:
        r = CliRunner().invoke(main, [
            "bench", "data", "--samples", "20000", "--rss-workers", "2,3", "--models", "mlp",
            "--passes", "mlp=1", "--rounds", "1", "--processes", "1", "--s3-endpoint",
            endpoint, "--store", MEMCACHED_URL, "--work-dir", str(tmp_path), "--json",
            str(out)],
            env={"EMNIST_HOME": str(tmp_path / "home")})
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    assert doc["pieces"] == ["gen", "load", "rss", "runs"] and doc["samples"] == 20000
    assert len(doc["loadavg_start"]) == 3 and len(doc["loadavg_end"]) == 3
    by = {p: [x for x in doc["records"] if x["piece"] == p] for p in doc["pieces"]}
    assert all(len(x["loadavg"]) == 3 for x in doc["records"])
    # gen: the directory and S3 prepares, the upload alone, and the 3-worker set for rss
    assert [(x["what"], x["workers"]) for x in by["gen"]] == [
        ("generate + write to a directory", 2), ("generate + upload to S3", 2),
        ("upload only (S3 multipart)", 2), ("generate + upload to S3", 3)]
    sizes = {x["bytes"] for x in by["gen"][:3]}
    assert len(sizes) == 1  # the same set's bytes, however they were written
    assert all(_finite(x["mb_s"], x["seconds"]) for x in by["gen"])
    # load: every way read exactly the worker's shard files
    assert len(by["load"]) == 6
    shard = by["load"][0]["shard_bytes"]
    assert shard == 2 * 128 + 10_000 * 785  # two .npy headers, 10k images and labels
    assert all(x["bytes"] == x["shard_bytes"] == shard and _finite(x["mb_s"])
               for x in by["load"])
    assert all(x["vs_raw"] > 0 for x in by["load"])
    # rss: one record per worker, each within its bound, bounded by its own shard
    assert [(x["workers"], x["worker"]) for x in by["rss"]] == [(2, 0), (2, 1), (3, 0), (3, 1),
                                                               (3, 2)]
    for x in by["rss"]:
        assert x["downloaded"] >= x["shard_file_bytes"] > x["shard_bytes"] > 0
        assert x["peak_rss"] >= x["rss_before_data"] > 0 and x["iterations"] == 1
        assert x["bound"] == x["shard_bytes"] + (150 << 20)
        assert x["within"] == (x["peak_rss"] <= x["bound"])
    # runs: the same budget of samples on both sets, curves that account for it
    assert [x["dataset"] for x in by["runs"]] == ["fashion-mnist-gen-20k", "fashion-mnist"]
    for x in by["runs"]:
        assert x["samples_done"] == x["budget_samples"] and x["evaluations"] == x["passes"]
        assert 0.1 < x["best_accuracy"] <= 1 and _finite(x["wall_seconds"])
        assert (x["seconds_to_target"] is None) == (x["samples_to_target"] is None)
    assert by["runs"][0]["budget_samples"] == 20_000 and by["runs"][1]["passes"] == 1
    t = doc["targets"]
    assert t["rss_within_shard_plus_150mib"] == all(x["within"] for x in by["rss"])
    assert isinstance(t["s3_stream_vs_raw_at_least_50pct"], bool)
    assert "| what" in r.output and "targets:" in r.output


def test_bench_data_refuses_unknown_pieces():
    r = CliRunner().invoke(main, ["bench", "data", "--only", "gen,nope"])
    assert r.exit_code == 2 and "--only" in r.output and "Traceback" not in r.output
