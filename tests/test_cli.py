"""The CLI's own behaviour: the package layout, help everywhere, one-line errors, `up`/`down`
of the embedded default (and only what it started), `--resume` misuse, and a CLI that talks
only to the gateway when one runs (never to the functions' store)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from emnist.cli import main
from emnist.cluster import local, procs
from emnist.gateway.client import GatewayClient, GatewayError
from emnist.wait import wait_until
from tests.conftest import MEMCACHED_URL
from tests.servers import free_port, local_gateway

ROOT = Path(__file__).resolve().parents[1]
CLI_MODULES = ["emnist.cli", *(f"emnist.cli.{p.stem}" for p in (ROOT / "emnist" / "cli").glob(
    "*.py") if p.stem not in ("__init__", "__main__"))]
NOWHERE = "memcached://nonexistent.invalid:11211"  # a store URL that cannot even resolve


def _commands(group, prefix=()):
    for name, cmd in group.commands.items():
        yield (*prefix, name)
        if hasattr(cmd, "commands"):
            yield from _commands(cmd, (*prefix, name))


# -- layout -----------------------------------------------------------------------------------
@pytest.mark.parametrize("module", CLI_MODULES)
def test_each_cli_module_imports_on_its_own(module):
    r = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_nothing_outside_the_cli_imports_it():
    offenders = []
    for path in (ROOT / "emnist").rglob("*.py"):
        if (ROOT / "emnist" / "cli") in path.parents:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            if any(n == "emnist.cli" or n.startswith("emnist.cli.") for n in names):
                offenders.append(str(path.relative_to(ROOT)))
    assert offenders == []
    assert len(CLI_MODULES) >= 8  # the glob found the package's modules


def test_every_command_registered_once_in_the_group():
    assert {"up", "down", "invoke", "scale", "logs", "train", "status", "build", "deploy",
            "bench", "p2p", "data", "dashboard", "sim"} == set(main.commands)
    assert {"store", "faults", "train", "run", "report", "gateway", "data", "runtimes"} == \
        set(main.commands["bench"].commands)
    assert {"peer", "run", "report"} == set(main.commands["p2p"].commands)


@pytest.mark.parametrize("path", [(), *_commands(main)])
def test_every_command_has_help(path):
    r = CliRunner().invoke(main, [*path, "--help"])
    assert r.exit_code == 0 and "Usage:" in r.output


@pytest.mark.parametrize("path", [(), *_commands(main)])
def test_every_option_name_has_dashes_not_underscores(path):
    cmd = main
    for name in path:
        cmd = cmd.commands[name]
    options = [p for p in cmd.params if isinstance(p, click.Option)]
    for param in options:
        for opt in param.opts + param.secondary_opts:
            assert opt.startswith("-") and "_" not in opt, (path, opt)


def test_python_m_emnist_cli_runs_the_cli():
    r = subprocess.run([sys.executable, "-m", "emnist.cli", "p2p", "peer", "--help"], cwd=ROOT,
                       capture_output=True, text=True)
    assert r.returncode == 0 and "--rank" in r.stdout


# -- errors -----------------------------------------------------------------------------------
def test_unreachable_gateway_is_one_line_and_exit_1():
    r = CliRunner().invoke(main, ["--gateway", f"http://127.0.0.1:{free_port()}", "scale",
                                  "emnist-train", "-r", "2"])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "Error:" in r.output


def test_debug_keeps_the_traceback():
    r = CliRunner().invoke(main, ["--gateway", f"http://127.0.0.1:{free_port()}", "--debug",
                                  "scale", "emnist-train", "-r", "2"])
    assert r.exit_code == 1 and isinstance(r.exception, GatewayError)


def test_missing_memcached_names_the_apt_package(tmp_path, monkeypatch):
    monkeypatch.setenv("EMNIST_HOME", str(tmp_path))
    monkeypatch.setenv("PATH", str(tmp_path))  # no memcached binary on it
    r = CliRunner().invoke(main, ["--gateway", f"http://127.0.0.1:{free_port()}", "up",
                                  "--store", f"memcached://127.0.0.1:{free_port()}"])
    assert r.exit_code == 1
    assert "apt-get install memcached" in r.output


# -- --resume ---------------------------------------------------------------------------------
def test_resume_with_training_options_is_a_usage_error_naming_them():
    r = CliRunner().invoke(main, ["--gateway", f"http://127.0.0.1:{free_port()}", "train",
                                  "--resume", "20260101-000000-abcdef", "--workers", "3",
                                  "--alpha", "0.1", "--checkpoint-url", "/tmp/ckpt"])
    assert r.exit_code == 2, r.output
    assert "--workers" in r.output and "--alpha" in r.output
    assert "--checkpoint-url," not in r.output  # the one training option it keeps


def test_resume_with_only_its_own_options_goes_on_to_the_gateway(tmp_path):
    # past the usage check: it fails (exit 1) only because no gateway answers
    r = CliRunner().invoke(main, ["--gateway", "http://gateway.invalid:8080", "train",
                                  "--resume", "20260101-000000-abcdef", "--checkpoint-url",
                                  str(tmp_path), "--timeout", "5", "--json",
                                  str(tmp_path / "r.json")])
    assert r.exit_code == 1, r.output
    assert "no gateway answers at http://gateway.invalid:8080" in r.output


# -- the store belongs to the functions' deployment -------------------------------------------
def test_remote_gateway_down_is_reported_without_touching_the_store():
    # no gateway, not a local address: the CLI must not look for (or start) the store first
    r = CliRunner().invoke(main, ["--gateway", "http://gateway.invalid:8080", "train",
                                  "--workers", "1", "--store", NOWHERE])
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "no gateway answers" in r.output and "memcached" not in r.output


@pytest.fixture(scope="module")
def gateway(tmp_path_factory):
    """A real local gateway whose functions use the real test memcached."""
    tmp = tmp_path_factory.mktemp("cli-gw")
    env = {"STORE_URL": MEMCACHED_URL, "DATA_LOCATION": str(tmp / "shards"),
           "TRAIN_REPLICAS": "1", "GRAD_REPLICAS": "0"}
    with local_gateway(tmp, env) as gw:
        yield gw


def test_train_and_status_through_a_gateway_never_use_the_clis_store(gateway, tmp_path,
                                                                      monkeypatch):
    """The CLI's --store (and STORE_URL) name a host that does not resolve: had the CLI
    reached for the store, or sent it to the functions, the run could not start."""
    monkeypatch.setenv("STORE_URL", NOWHERE)
    out = tmp_path / "rows.json"
    r = CliRunner().invoke(main, ["--gateway", gateway.url, "train", "--workers", "1",
                                  "--target-accuracy", "0.7", "--store", NOWHERE,
                                  "--json", str(out), "--timeout", "300"])
    assert r.exit_code == 0, r.output
    assert "note: --store is not used" in r.output
    rows = json.loads(out.read_text())
    assert rows[0]["reached"]
    st = CliRunner().invoke(main, ["--gateway", gateway.url, "status", rows[0]["run_id"]])
    assert st.exit_code == 0, st.output
    assert "True" in st.output  # worker 0 done
    old = CliRunner().invoke(main, ["--gateway", gateway.url, "status", rows[0]["run_id"],
                                    "--store", NOWHERE])
    assert old.exit_code == 0 and "note: --store is not used" in old.output


# -- up / down --------------------------------------------------------------------------------
def _pid_alive(pid: int) -> bool:
    return procs.identity(pid) is not None


def test_up_starts_memcached_and_gateway_and_down_stops_them(tmp_path, monkeypatch):
    home = tmp_path / "home"
    monkeypatch.setenv("EMNIST_HOME", str(home))
    monkeypatch.delenv("CHECKPOINT_ROOTS", raising=False)
    monkeypatch.chdir(ROOT)
    mc_port, gw_port = free_port(), free_port()
    gateway = f"http://127.0.0.1:{gw_port}"
    store = f"memcached://127.0.0.1:{mc_port}"
    ckpt = tmp_path / "ckpt"
    runner = CliRunner()
    r = runner.invoke(main, ["--gateway", gateway, "up", "--store", store,
                             "--checkpoint-root", str(ckpt)])
    try:
        assert r.exit_code == 0, r.output
        assert f"started memcached on 127.0.0.1:{mc_port}" in r.output
        assert "emnist-train: 2/2 replicas" in r.output
        assert local.port_open("127.0.0.1", mc_port) and local.gateway_alive(gateway)
        gw_pid = json.loads((home / "gateway.json").read_text())["pid"]
        assert procs.read_record(home / "gateway.proc.json")["pid"] == gw_pid
        # the functions got the store and the allowed checkpoint roots from the stack file
        env = GatewayClient(gateway).get_function("emnist-setup")["envVars"]
        assert env["store_url"] == store
        assert env["checkpoint_roots"].split(",") == [str(home / "checkpoints"), str(ckpt)]
        # a second `up` reuses what runs
        r2 = runner.invoke(main, ["--gateway", gateway, "up", "--store", store])
        assert r2.exit_code == 0 and "started" not in r2.output
        assert json.loads((home / "gateway.json").read_text())["pid"] == gw_pid
    finally:
        down = runner.invoke(main, ["down"])
    assert down.exit_code == 0 and "stopped gateway" in down.output
    assert "stopped memcached" in down.output
    assert not local.gateway_alive(gateway) and not local.port_open("127.0.0.1", mc_port)
    assert not _pid_alive(gw_pid)
    assert runner.invoke(main, ["down"]).output.strip() == "nothing was running"


@pytest.fixture
def sleeper():
    proc = subprocess.Popen(["sleep", "600"])
    # right after exec the kernel may briefly show no command line
    wait_until(lambda: procs.identity(proc.pid), 5, "sleep did not start", interval=0.01)
    yield proc
    proc.kill()
    proc.wait()


def _records(home: Path, **recs) -> None:
    home.mkdir(parents=True, exist_ok=True)
    for name, rec in recs.items():
        (home / name).write_text(json.dumps(rec))


@pytest.mark.parametrize("case", ["other-cmdline", "other-start", "no-record"])
def test_down_leaves_an_unrelated_process_named_by_a_stale_state_file_alive(
        tmp_path, monkeypatch, sleeper, case):
    monkeypatch.setenv("EMNIST_HOME", str(tmp_path))
    real = procs.identity(sleeper.pid)
    gateway_cmd = [sys.executable, "-m", "emnist.gateway.server", "--stack", "emnist.yml"]
    if case == "other-cmdline":  # the pid now runs something else
        _records(tmp_path, **{"gateway.proc.json": {**real, "cmdline": gateway_cmd},
                              "gateway.json": {"url": "http://127.0.0.1:1", "pid": sleeper.pid}})
    elif case == "other-start":  # same command line, but not the process that was started
        _records(tmp_path, **{"memcached.proc.json": {**real, "start": real["start"] - 1}})
        (tmp_path / "memcached.pid").write_text(str(sleeper.pid))
    else:  # only the file the process writes itself: nothing says who it is
        _records(tmp_path, **{"gateway.json": {"url": "http://127.0.0.1:1", "pid": sleeper.pid}})
    r = CliRunner().invoke(main, ["down"])
    assert r.exit_code == 0, r.output
    assert "stopped nothing" in r.output and "stopped gateway" not in r.output
    assert f"pid {sleeper.pid}" in r.output
    assert sleeper.poll() is None  # still alive
    assert list(tmp_path.iterdir()) == []  # the stale files are gone


def test_down_stops_a_process_its_record_still_matches(tmp_path, monkeypatch, sleeper):
    """The control for the test above: the same check lets a matching record through."""
    monkeypatch.setenv("EMNIST_HOME", str(tmp_path))
    procs.write_record(tmp_path / "memcached.proc.json", sleeper.pid, ["sleep", "600"])
    r = CliRunner().invoke(main, ["down"])
    assert r.exit_code == 0 and f"stopped memcached (pid {sleeper.pid})" in r.output
    assert sleeper.wait(10) is not None


def test_train_starting_the_local_stack_allows_its_checkpoint_url(tmp_path, monkeypatch):
    """`train --checkpoint-url DIR` that starts the stack lets the functions write there (the
    operator's checkpoint_roots), checkpoints the run, and `--down` stops what it started."""
    home = tmp_path / "home"
    monkeypatch.setenv("EMNIST_HOME", str(home))
    monkeypatch.delenv("CHECKPOINT_ROOTS", raising=False)
    monkeypatch.setenv("DATA_LOCATION", str(tmp_path / "shards"))
    monkeypatch.chdir(ROOT)
    gateway = f"http://127.0.0.1:{free_port()}"
    ckpt = tmp_path / "ckpt"
    out = tmp_path / "rows.json"
    r = CliRunner().invoke(main, ["--gateway", gateway, "train", "--workers", "1",
                                  "--target-accuracy", "0.7", "--checkpoint-url", str(ckpt),
                                  "--store", f"memcached://127.0.0.1:{free_port()}",
                                  "--json", str(out), "--timeout", "300", "--down"])
    try:
        assert r.exit_code == 0, r.output
        run_id = json.loads(out.read_text())[0]["run_id"]
        assert (ckpt / f"{run_id}.ckpt").exists()
        assert not local.gateway_alive(gateway)
        assert not (home / "gateway.proc.json").exists()
    finally:
        CliRunner().invoke(main, ["down"])
