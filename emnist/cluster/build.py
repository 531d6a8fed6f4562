"""Function images: build contexts like ``faas-cli build --shrinkwrap``, or faas-cli itself.

A context ``build/<fn>/`` is the template folder (``template/<lang>/``: Dockerfile, index.py,
requirements.txt), with the handler folder laid over ``function/`` and every
``configuration.copy`` path copied to ``function/<path>`` - exactly faas-cli's layout, so the
shared ``emnist`` package lands beside the handler, where the handler's import fallback looks.

Extra wheels (``emnist build --wheel`` / ``--torch``) go to the template's ``wheels/`` folder for
one build and are named in the ``ADDITIONAL_PIP`` build argument: the template installs them in
a separate stage, so the wheel files never reach the image. torch's CPU build is not on PyPI
(its default Linux wheel is a multi-GB CUDA build), hence a local wheel, not a requirement.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from emnist.gateway.stack import Stack, load_stack
from emnist.paths import cache_dir

__all__ = ["BuildError", "FAAS_CLI_HINT", "Context", "TORCH_WHEEL", "WHEELS_DIR",
           "check_wheels", "faas_cli", "faas_pip_arg", "image_env", "pip_build_arg",
           "shrinkwrap", "staged_wheels", "torch_wheel"]

FAAS_CLI_HINT = ("faas-cli is not installed: install it (`curl -sSL https://cli.openfaas.com | "
                 "sudo sh`, or `arkade get faas-cli`), or use `emnist build --shrinkwrap` to "
                 "write the build contexts without Docker")
# faas-cli skips these names in a handler folder; we also leave out caches.
SKIP = {"build", "template", "__pycache__", ".pytest_cache", ".ruff_cache"}
WHEELS_DIR = "wheels"  # in the template (so in each context); the Dockerfile's find-links
WHEELS_IN_IMAGE = "/tmp/wheels"  # where the Dockerfile's packages stage copies that folder
PIP_ARG = "ADDITIONAL_PIP"
# torch's CPU build for the image's interpreter and platform (python:3.11 on linux/amd64)
TORCH_VERSION = "2.13.0+cpu"
TORCH_WHEEL = f"torch-{TORCH_VERSION}-cp311-cp311-manylinux_2_28_x86_64.whl"
TORCH_INDEX = "https://download.pytorch.org/whl/cpu"


class BuildError(RuntimeError):
    pass


@dataclass
class Context:
    function: str
    path: Path
    image: str
    build_args: dict[str, str] = field(default_factory=dict)


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
               only: list[str] | None = None,
               wheels: list[Path] | None = None) -> list[Context]:
    """Write ``build/<fn>/`` for each function (``only``: these names) without Docker.

    ``wheels`` go to each context's ``wheels/``; each Context's build_args are what a builder
    must pass (the stack's, plus ADDITIONAL_PIP naming the wheels)."""
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
        args = dict(fn.build_args)
        if wheels:
            for wheel in wheels:
                _link(wheel, ctx / WHEELS_DIR / wheel.name)
            args[PIP_ARG] = pip_build_arg(wheels, fn.build_args.get(PIP_ARG, ""))
        contexts.append(Context(fn.name, ctx, fn.image, args))
    return contexts


def pip_build_arg(wheels: list[Path], stack_value: str = "") -> str:
    """ADDITIONAL_PIP for ``wheels`` staged in wheels/: their paths inside the build (exact
    files, so pip never swaps in an index's build), after the stack's own value."""
    return " ".join([stack_value.strip(), *(f"{WHEELS_IN_IMAGE}/{w.name}" for w in wheels)]
                    ).strip()


def faas_pip_arg(stack_path: str | os.PathLike[str], env: Mapping[str, str],
                 only: list[str] | None, wheels: list[Path]) -> str:
    """faas-cli's ``--build-arg ADDITIONAL_PIP=...`` for ``wheels``: one value for every
    function built (a --build-arg overrides a function's build_args), so the selected
    functions must agree on any ADDITIONAL_PIP of their own."""
    fns = [fn for fn in load_stack(stack_path, env).functions.values()
           if not only or fn.name in only]
    own = {fn.build_args.get(PIP_ARG, "").strip() for fn in fns}
    if len(own) > 1:
        raise BuildError(f"the functions set different {PIP_ARG} build_args: build them one "
                         "at a time (--filter) to add wheels")
    return f"{PIP_ARG}={pip_build_arg(wheels, own.pop() if own else '')}"


def _link(src: Path, dst: Path) -> None:
    """A hard link where the file system allows (a wheel is hundreds of MB), else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    dst.unlink(missing_ok=True)
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def check_wheels(paths: list[str]) -> list[Path]:
    """The given wheel files, resolved; BuildError for anything that is not one."""
    out = []
    for raw in paths:
        path = Path(raw).expanduser().resolve()
        if not path.is_file() or path.suffix != ".whl" or len(path.stem.split("-")) not in (5, 6):
            raise BuildError(f"{raw}: not a wheel file (name-version-python-abi-platform.whl)")
        out.append(path)
    names = [p.name for p in out]
    if len(set(names)) != len(names):
        raise BuildError("two wheels with the same file name")
    return out


@contextmanager
def staged_wheels(stack_path: str | os.PathLike[str], env: Mapping[str, str],
                  only: list[str] | None, wheels: list[Path]) -> Iterator[list[Path]]:
    """Put ``wheels`` into ``template/<lang>/wheels/`` of the selected functions' templates for
    one ``faas-cli build`` (which copies the template into each context), and take away what
    was put there afterwards; a file already there stays. Yields the staged paths."""
    if not wheels:  # nothing to stage (faas-cli may still pull a missing template itself)
        yield []
        return
    stack = load_stack(stack_path, env)
    root = stack.path.parent
    langs = sorted({fn.lang for fn in stack.functions.values() if not only or fn.name in only})
    added: list[Path] = []
    try:
        for lang in langs:
            folder = root / "template" / lang / WHEELS_DIR
            if not (root / "template" / lang / "Dockerfile").is_file():
                raise BuildError(f"template {lang!r} is not at {folder.parent}")
            for wheel in wheels:
                dst = folder / wheel.name
                if dst.exists():
                    if dst.stat().st_size != wheel.stat().st_size:
                        raise BuildError(f"{dst} is there already and differs from {wheel}")
                    continue
                _link(wheel, dst)
                added.append(dst)
        yield added
    finally:
        for dst in added:
            dst.unlink(missing_ok=True)


def torch_wheel(env: Mapping[str, str], echo: Callable[[str], None] = print) -> Path:
    """torch's CPU wheel for the image, kept in the cache's wheels/: when missing, ``pip
    download`` fetches it once (pip's own configuration first, e.g. a find-links folder, then
    PyTorch's CPU index, or $EMNIST_TORCH_INDEX)."""
    folder = cache_dir(env) / WHEELS_DIR
    wheel = folder / TORCH_WHEEL
    if wheel.is_file():
        return wheel
    index = env.get("EMNIST_TORCH_INDEX") or TORCH_INDEX
    echo(f"fetching {TORCH_WHEEL} (once; kept in {folder})")
    folder.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
         "--platform", "manylinux_2_28_x86_64", "--python-version", "3.11",
         "--implementation", "cp", "--abi", "cp311", "--extra-index-url", index,
         "-d", str(folder), f"torch=={TORCH_VERSION}"],
        env=dict(env), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if done.returncode or not wheel.is_file():
        tail = " | ".join((done.stderr or done.stdout).strip().splitlines()[-3:])
        raise BuildError(f"could not get {TORCH_WHEEL} (pip download from {index}): {tail}; "
                         "pass the file with --wheel instead of --torch")
    return wheel


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
