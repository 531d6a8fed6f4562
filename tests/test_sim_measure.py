"""The barrier measurement behind the simulator's per-core placement, on the real data."""

import json
import math
import os
import subprocess
import sys


def test_barrier_prints_each_process_counts_median_step(tmp_path):
    spec = {"dataset": "fashion-mnist", "data_location": str(tmp_path), "model": "mlp",
            "batch": 32, "steps": 4, "procs": [1, 2]}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-m", "emnist.sim.measure", "barrier", json.dumps(spec)],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    out = json.loads(r.stdout)
    assert sorted(out) == ["1", "2"]
    assert all(math.isfinite(v) and v > 0 for v in out.values()), out
