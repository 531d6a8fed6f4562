"""`emnist bench store` measures real servers and writes the records it promises."""

import json

from click.testing import CliRunner

from emnist.bench.store import measure, raw_echo
from emnist.cli import main
from tests.conftest import MEMCACHED_URL, REDIS_URL

KEYS = {"backend", "chunk_bytes", "vector_bytes", "fetch_p50_ms", "fetch_p99_ms", "push_p50_ms",
        "push_p99_ms", "fetch_mb_per_s", "raw_ceiling_mb_per_s"}


def test_measure_reports_consistent_figures():
    r = measure(MEMCACHED_URL, 10_000, 8192, reps=20)
    assert r["chunks"] == 5 and r["vector_bytes"] == 40_000
    assert 0 < r["fetch_p50_ms"] <= r["fetch_p99_ms"] and 0 < r["push_p50_ms"] <= r["push_p99_ms"]
    assert len(raw_echo(40_000, reps=10)) == 10


def test_cli_writes_table_and_json(tmp_path):
    out = tmp_path / "store.json"
    r = CliRunner().invoke(main, ["bench", "store", "--store", MEMCACHED_URL, "--store", REDIS_URL,
                                  "--chunk-bytes", "65536", "--scale", "0.1", "--reps", "10",
                                  "--json", str(out)])
    assert r.exit_code == 0, r.output
    records = json.loads(out.read_text())
    assert [x["backend"] for x in records] == ["memcached", "redis"]
    assert all(KEYS <= set(x) for x in records)
    assert "| memcached" in r.output and "raw TCP MB/s" in r.output
