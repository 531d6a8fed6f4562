"""Function images: build contexts like ``faas-cli build --shrinkwrap``, or faas-cli itself.

A context ``build/<fn>/`` is the template folder (``template/<lang>/``: Dockerfile, index.py,
requirements.txt), with the handler folder laid over ``function/`` and every
``configuration.copy`` path copied to ``function/<path>`` - exactly faas-cli's layout, so the
shared ``emnist`` package lands beside the handler, where the handler's import fallback looks.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from emnist.gateway.stack import Stack, load_stack

__all__ = ["BuildError", "FAAS_CLI_HINT", "Context", "faas_cli", "image_env", "shrinkwrap"]

FAAS_CLI_HINT = ("faas-cli is not installed: install it (`curl -sSL https://cli.openfaas.com | "
                 "sudo sh`, or `arkade get faas-cli`), or use `emnist build --shrinkwrap` to "
                 "write the build contexts without Docker")
# faas-cli skips these names in a handler folder; we also leave out caches.
SKIP = {"build", "template", "__pycache__", ".pytest_cache", ".ruff_cache"}


class BuildError(RuntimeError):
    pass


@dataclass
class Context:
    function: str
    path: Path
    image: str


def image_env(env: Mapping[str, str], registry: str | None, tag: str | None) -> dict[str, str]:
    """The environment the stack is read with: REGISTRY / TAG flags win over the env."""
    out = dict(env)
    if registry:
        out["REGISTRY"] = registry.rstrip("/")
    if tag:
        out["TAG"] = tag
    return out


def _ignore(_dir: str, names: list[str]) -> set[str]:
    return {n for n in names if n in SKIP or n.endswith((".pyc", ".pyo"))}


def _copy(src: Path, dst: Path) -> None:
    if src.is_dir():
        shutil.copytree(src, dst, ignore=_ignore, dirs_exist_ok=True)
    else:
        dst.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dst)


def _copy_paths(stack: Stack) -> list[str]:
    paths = stack.configuration.get("copy") or []
    if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
        raise BuildError(f"{stack.path}: configuration.copy must be a list of paths")
    return paths


def shrinkwrap(stack_path: str | os.PathLike[str], *, env: Mapping[str, str] | None = None,
               out_dir: str | os.PathLike[str] | None = None,
               only: list[str] | None = None) -> list[Context]:
    """Write ``build/<fn>/`` for each function (``only``: these names) without Docker."""
    stack = load_stack(stack_path, os.environ if env is None else env)
    root = stack.path.parent
    build = Path(out_dir) if out_dir else root / "build"
    unknown = set(only or []) - set(stack.functions)
    if unknown:
        raise BuildError(f"not in {stack.path}: {', '.join(sorted(unknown))}")
    contexts = []
    for fn in stack.functions.values():
        if only and fn.name not in only:
            continue
        template = root / "template" / fn.lang
        if not (template / "Dockerfile").is_file():
            raise BuildError(f"template {fn.lang!r} is not at {template}: faas-cli needs "
                             f"./template/{fn.lang} (`faas-cli template store pull {fn.lang}`)")
        ctx = build / fn.name
        shutil.rmtree(ctx, ignore_errors=True)
        _copy(template, ctx)  # the template, its function/ skeleton included
        function = ctx / "function"
        for item in sorted(fn.handler.iterdir()):
            if item.name not in SKIP:
                _copy(item, function / item.name)
        for extra in _copy_paths(stack):
            src = (root / extra).resolve()
            if root.resolve() not in (src, *src.parents):
                raise BuildError(f"configuration.copy path {extra} is outside {root}")
            if not src.exists():
                raise BuildError(f"configuration.copy path {extra} does not exist")
            _copy(src, function / src.relative_to(root.resolve()))
        contexts.append(Context(fn.name, ctx, fn.image))
    return contexts


def faas_cli(args: list[str], *, env: Mapping[str, str], cwd: str | os.PathLike[str],
             echo: Callable[[str], None] = print) -> None:
    """Run ``faas-cli ARGS`` (output streams through); BuildError naming faas-cli if absent."""
    binary = shutil.which("faas-cli", path=env.get("PATH"))
    if binary is None:
        raise BuildError(FAAS_CLI_HINT)
    echo("$ faas-cli " + " ".join(args))
    code = subprocess.run([binary, *args], env=dict(env), cwd=cwd,
                          stdin=subprocess.DEVNULL).returncode
    if code:
        raise BuildError(f"faas-cli {args[0]} failed with exit code {code}")
