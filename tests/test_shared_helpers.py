"""The shared helpers every module uses: the cache-directory rule, wait_until and the atomic
directory publish (with real concurrent publishers)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from emnist.paths import cache_dir
from emnist.publish import publish_dir, temp_dir_for
from emnist.wait import wait_until
from tests.servers import start_together

ROOT = Path(__file__).resolve().parents[1]


def test_cache_dir_rule():
    assert cache_dir({"EMNIST_HOME": "/e", "XDG_CACHE_HOME": "/x"}) == Path("/e")
    assert cache_dir({"XDG_CACHE_HOME": "/x"}) == Path("/x/emnist")
    assert cache_dir({"EMNIST_HOME": "", "XDG_CACHE_HOME": ""}) == \
        Path.home() / ".cache" / "emnist"


def test_wait_until_returns_the_first_truthy_value():
    values = iter([None, 0, {"run": 1}, {"run": 2}])
    assert wait_until(lambda: next(values), 60, "never", interval=0) == {"run": 1}


class Late(Exception):
    pass


def test_wait_until_raises_the_given_error_with_the_message_after_a_last_check():
    calls = []
    with pytest.raises(Late, match="^nothing came$"):
        wait_until(lambda: calls.append(1), 0, "nothing came", error=Late)
    assert calls == [1]  # checked once even with no time at all


def test_wait_until_lets_the_predicates_own_error_through():
    def exited():
        raise RuntimeError("the process exited")
    with pytest.raises(RuntimeError, match="exited"):
        wait_until(exited, 60, "unused")


def _complete(d: Path) -> bool:
    return (d / "done").exists()


def _build(final: Path, tag: str) -> Path:
    tmp = temp_dir_for(final)
    (tmp / "data").write_text(tag)
    (tmp / "done").write_text("")
    return tmp


def test_publish_renames_into_place_readable_by_others(tmp_path):
    final = tmp_path / "sub" / "set"
    tmp = _build(final, "a")
    assert tmp.parent == final.parent and (tmp.stat().st_mode & 0o777) == 0o755
    publish_dir(tmp, final, _complete)
    assert (final / "data").read_text() == "a" and not tmp.exists()
    assert sorted(p.name for p in final.parent.iterdir()) == ["set"]


def test_publish_keeps_a_concurrent_publishers_complete_copy(tmp_path):
    final = tmp_path / "set"
    publish_dir(_build(final, "first"), final, _complete)
    second = _build(final, "second")
    publish_dir(second, final, _complete)
    assert (final / "data").read_text() == "first" and not second.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


def test_publish_replaces_a_stale_copy(tmp_path):
    final = tmp_path / "set"
    final.mkdir()
    (final / "data").write_text("half written, no done marker")
    publish_dir(_build(final, "fresh"), final, _complete)
    assert (final / "data").read_text() == "fresh"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]  # nothing set aside remains


PUBLISHER = """
import sys
from pathlib import Path
from emnist.publish import publish_dir, temp_dir_for
final, tag = Path(sys.argv[1]), sys.argv[2]
tmp = temp_dir_for(final)
for i in range(50):
    (tmp / f"part-{i}").write_text(tag)
(tmp / "done").write_text(tag)
print("ready", flush=True)
sys.stdin.readline()
publish_dir(tmp, final, lambda d: (d / "done").exists())
"""


def test_concurrent_publishers_all_succeed_and_leave_one_whole_copy(tmp_path):
    final = tmp_path / "set"
    procs = [subprocess.Popen([sys.executable, "-c", PUBLISHER, str(final), f"p{i}"], cwd=ROOT,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, "PYTHONPATH": str(ROOT)}) for i in range(4)]
    start_together(procs)
    tags = {p.read_text() for p in final.iterdir()}
    assert len(tags) == 1 and len(list(final.iterdir())) == 51  # one publisher's whole set
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]
