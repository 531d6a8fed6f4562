"""Build contexts (`emnist build --shrinkwrap`): complete, and they run in a fresh virtualenv."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from emnist.cli import main
from emnist.cluster.build import shrinkwrap
from emnist.gateway.stack import load_stack
from tests.conftest import MEMCACHED_URL
from tests.handlers import project_copy

ROOT = Path(__file__).resolve().parents[1]
FUNCTIONS = ["emnist-setup", "emnist-train"]


def _py_files(top: Path) -> set[str]:
    return {str(p.relative_to(top)) for p in top.rglob("*.py") if "__pycache__" not in p.parts}


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
    out = tmp_path_factory.mktemp("build")
    env = {**os.environ, "REGISTRY": "registry.example.com/team", "TAG": "t1"}
    return {c.function: c for c in shrinkwrap(ROOT / "emnist.yml", env=env, out_dir=out)}


def test_contexts_hold_template_handler_requirements_and_package(contexts):
    assert sorted(contexts) == sorted(load_stack(ROOT / "emnist.yml").functions)
    assert set(FUNCTIONS) <= set(contexts)
    template = ROOT / "template" / "python3-http"
    for name, ctx in contexts.items():
        assert ctx.image == f"registry.example.com/team/{name}:t1"
        d = ctx.path
        for f in ("Dockerfile", "index.py", "requirements.txt", "template.yml"):
            assert (d / f).read_bytes() == (template / f).read_bytes(), f
        assert (d / "function" / "handler.py").read_bytes() == \
            (ROOT / "functions" / name / "handler.py").read_bytes()
        assert (d / "function" / "requirements.txt").read_bytes() == \
            (ROOT / "functions" / name / "requirements.txt").read_bytes()
        # configuration.copy: the whole package beside the handler, no caches
        assert _py_files(d / "function" / "emnist") == _py_files(ROOT / "emnist")
        assert not list((d / "function").rglob("__pycache__"))
        dockerfile = (d / "Dockerfile").read_text()
        assert "COPY --chown=app:app function   function" in dockerfile
        assert 'fprocess="python index.py"' in dockerfile
        # everything the package imports at run time is in the function's requirements
        reqs = (d / "function" / "requirements.txt").read_text()
        for dist in ("numpy", "pymemcache", "redis", "requests", "pyyaml", "crc32c"):
            assert dist in reqs


def test_cli_shrinkwrap_and_missing_faas_cli(tmp_path):
    stack = project_copy(tmp_path / "project")
    r = CliRunner().invoke(main, ["build", "--shrinkwrap", "-f", str(stack),
                                  "--registry", "ghcr.io/x", "--tag", "v9"])
    assert r.exit_code == 0, r.output
    assert "emnist-train: shrink-wrapped to" in r.output and "ghcr.io/x/emnist-train:v9" \
        in r.output
    assert (stack.parent / "build" / "emnist-train" / "function" / "emnist" / "train").is_dir()
    # without --shrinkwrap it needs faas-cli: one line naming it, exit 1
    r = CliRunner().invoke(main, ["build", "-f", str(ROOT / "emnist.yml")],
                           env={"PATH": str(tmp_path)})
    assert r.exit_code == 1
    assert "faas-cli is not installed" in r.output and "--shrinkwrap" in r.output
    r = CliRunner().invoke(main, ["build", "--shrinkwrap", "--push"])
    assert r.exit_code == 2


def test_build_runs_faas_cli_build_then_push_with_registry(tmp_path):
    """A stand-in faas-cli first on PATH records what `emnist build --push` runs."""
    log = tmp_path / "calls.jsonl"
    fake = tmp_path / "faas-cli"
    fake.write_text(f"#!{sys.executable}\nimport json, os, sys\n"
                    f"open({str(log)!r}, 'a').write(json.dumps({{'argv': sys.argv[1:], "
                    "'registry': os.environ.get('REGISTRY'), 'tag': os.environ.get('TAG'), "
                    "'cwd': os.getcwd()}) + '\\n')\n")
    fake.chmod(fake.stat().st_mode | stat.S_IEXEC)
    r = CliRunner().invoke(main, ["build", "--push", "-f", str(ROOT / "emnist.yml"),
                                  "--registry", "ghcr.io/me", "--tag", "abc"],
                           env={"PATH": f"{tmp_path}:{os.environ['PATH']}"})
    assert r.exit_code == 0, r.output
    calls = [json.loads(x) for x in log.read_text().splitlines()]
    assert [c["argv"][0] for c in calls] == ["build", "push"]
    assert all(c["argv"][1:] == ["-f", str(ROOT / "emnist.yml")] for c in calls)
    assert all((c["registry"], c["tag"], c["cwd"]) == ("ghcr.io/me", "abc", str(ROOT))
               for c in calls)
    assert "pushed ghcr.io/me/emnist-setup:abc, ghcr.io/me/emnist-train:abc" in r.output


@pytest.fixture(scope="module")
def fresh_venv(tmp_path_factory, contexts):
    """A new virtualenv with only the context's requirements (function + template)."""
    venv = tmp_path_factory.mktemp("venv") / "v"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    ctx = contexts["emnist-setup"].path
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check",
                    "-r", str(ctx / "function" / "requirements.txt"),
                    "-r", str(ctx / "requirements.txt")], check=True, timeout=300,
                   stdout=subprocess.DEVNULL)
    return venv / "bin" / "python"


PROBE = """
import json, index, emnist
client = index.app.test_client()
calls = [client.post('/', data='not json'), client.put('/', json={})]
calls.append(client.get('/?run_id=nosuchrun&store_url=' + %r))
print(json.dumps({'emnist': emnist.__file__, 'handler': index.handler.__file__,
                  'calls': [[c.status_code, c.get_json()] for c in calls]}))
"""


@pytest.mark.parametrize("name", FUNCTIONS)
def test_context_imports_and_answers_in_a_fresh_venv(fresh_venv, contexts, name):
    """The template's index.py imports function.handler, which finds the copied package."""
    ctx = contexts[name].path
    out = subprocess.run([str(fresh_venv), "-c", PROBE % MEMCACHED_URL], cwd=ctx,
                         env={"PATH": "/usr/bin:/bin", "HOSTNAME": "probe"},
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["emnist"].startswith(str(ctx / "function" / "emnist"))
    assert got["handler"] == str(ctx / "function" / "handler.py")
    (s1, b1), (s2, b2), (s3, b3) = got["calls"]
    assert s1 == 400 and "not valid JSON" in b1["error"]
    assert s2 == 405 and "not allowed" in b2["error"]
    if name == "emnist-setup":
        assert s3 == 404 and "nosuchrun" in b3["error"]  # reached memcached through the store
    else:
        assert s3 == 405  # train only takes POST


def test_every_function_requests_and_limits_its_memory():
    """No BestEffort pods: each function of emnist.yml asks for memory and caps it (a torch
    worker needs ~800 MB, within the train limit)."""
    for fn in load_stack(ROOT / "emnist.yml", {}).functions.values():
        assert fn.requests.get("memory") and fn.limits.get("memory"), fn.name
    train = load_stack(ROOT / "emnist.yml", {}).functions["emnist-train"]
    assert train.limits["memory"] == "1Gi"
