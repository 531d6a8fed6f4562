"""Start a run's peer processes on this machine and wait for all of them.

The peers are separate processes (their own interpreter and BLAS thread), each running the
given command line with its rank; a run that outlives its timeout is stopped, not abandoned.
"""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Mapping
from pathlib import Path

from emnist.wait import wait_until

__all__ = ["LaunchTimeout", "launch_peers"]

ONE_THREAD = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class LaunchTimeout(RuntimeError):
    """The peers were still running at the run's timeout (they were stopped)."""


def launch_peers(command: list[str], run_id: str, size: int, data_loc: str, out_dir: Path,
                 argv: list[str], timeout: float, env: Mapping[str, str]) -> list[int]:
    """Run ``command --rank R --size N --run-id ... *argv`` for every rank (output in
    ``out_dir/peer-R.log``); returns their exit codes."""
    procs = []
    for rank in range(size):
        with open(out_dir / f"peer-{rank}.log", "wb") as log:
            procs.append(subprocess.Popen(
                [*command, "--rank", str(rank), "--size", str(size), "--run-id", run_id,
                 "--data", data_loc, "--metrics-dir", str(out_dir), *argv],
                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env={**env, **ONE_THREAD}))
    try:
        wait_until(lambda: all(p.poll() is not None for p in procs), timeout,
                   f"run {run_id}: peers still running after {timeout:g}s; stopped them",
                   interval=0.1, error=LaunchTimeout)
    finally:
        for p in procs:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    return [p.returncode for p in procs]
