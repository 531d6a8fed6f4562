"""The invoke-overhead benchmark (emnist.bench.gateway) runs and reports both paths side by
side. It asserts the records' shape and arithmetic only: timing limits belong to the benchmark
run (`emnist bench gateway`), not to a unit test on a shared machine."""

from __future__ import annotations

import pytest

from emnist.bench.gateway import COLUMNS, run


def test_overhead_records_compare_the_same_calls() -> None:
    direct, through, overhead = run(calls=60, rounds=6, warmup=5)
    assert [r["path"] for r in (direct, through, overhead)] == ["direct", "gateway", "overhead"]
    assert direct["calls"] == through["calls"] == 60
    for key in ("p50_ms", "p99_ms", "mean_ms"):
        assert direct[key] > 0 and through[key] > 0
        assert overhead[key] == pytest.approx(through[key] - direct[key])
    assert direct["p50_ms"] <= direct["p99_ms"] and through["p50_ms"] <= through["p99_ms"]
    assert {c[0] for c in COLUMNS} <= set(direct)
