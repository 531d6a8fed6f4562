"""The CLI's own behaviour: help everywhere, and `up`/`down` of the embedded default."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from click.testing import CliRunner

from emnist.cli import main
from emnist.cluster import local
from tests.servers import free_port

ROOT = Path(__file__).resolve().parents[1]


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))


@pytest.mark.parametrize("path", [(), *_commands(main)])
def test_every_command_has_help(path):
    r = CliRunner().invoke(main, [*path, "--help"])
    assert r.exit_code == 0 and "Usage:" in r.output


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_up_starts_memcached_and_gateway_and_down_stops_them(tmp_path, monkeypatch):
    monkeypatch.setenv("EMNIST_HOME", str(tmp_path))
    monkeypatch.chdir(ROOT)
    mc_port, gw_port = free_port(), free_port()
    gateway = f"http://127.0.0.1:{gw_port}"
    store = f"memcached://127.0.0.1:{mc_port}"
    runner = CliRunner()
    r = runner.invoke(main, ["--gateway", gateway, "up", "--store", store])
    try:
        assert r.exit_code == 0, r.output
        assert f"started memcached on 127.0.0.1:{mc_port}" in r.output
        assert "emnist-train: 2/2 replicas" in r.output
        assert local.port_open("127.0.0.1", mc_port) and local.gateway_alive(gateway)
        gw_pid = json.loads((tmp_path / "gateway.json").read_text())["pid"]
        # a second `up` reuses what runs
        r2 = runner.invoke(main, ["--gateway", gateway, "up", "--store", store])
        assert r2.exit_code == 0 and "started" not in r2.output
        assert json.loads((tmp_path / "gateway.json").read_text())["pid"] == gw_pid
    finally:
        down = runner.invoke(main, ["down"])
    assert down.exit_code == 0 and "stopped gateway" in down.output
    assert "stopped memcached" in down.output
    assert not local.gateway_alive(gateway) and not local.port_open("127.0.0.1", mc_port)
    assert not _pid_alive(gw_pid)
    assert runner.invoke(main, ["down"]).output.strip() == "nothing was running"


def test_missing_memcached_names_the_apt_package(tmp_path, monkeypatch):
    monkeypatch.setenv("EMNIST_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no memcached binary on it
    r = CliRunner().invoke(main, ["--gateway", f"http://127.0.0.1:{free_port()}", "up",
                                  "--store", f"memcached://127.0.0.1:{free_port()}"])
    assert r.exit_code == 1
    assert "apt-get install memcached" in r.output


def test_unreachable_gateway_is_one_line_and_exit_1():
    r = CliRunner().invoke(main, ["--gateway", f"http://127.0.0.1:{free_port()}", "scale",
                                  "emnist-train", "-r", "2"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "Error:" in r.output
