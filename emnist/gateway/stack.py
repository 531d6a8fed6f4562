"""Read an OpenFaaS stack file (``stack.yml``) the way faas-cli does.

The local gateway runs functions straight from their handler folders, so it needs the same view
of the stack that ``faas-cli deploy`` has: ``${VAR:-default}`` substitution on the raw text,
``environment_file`` merged in, values stringified.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "FunctionSpec",
    "Stack",
    "StackError",
    "load_stack",
    "parse_duration",
    "substitute",
]

DEFAULT_GATEWAY = "http://127.0.0.1:8080"


class StackError(ValueError):
    """The stack file is missing, unreadable or not a valid OpenFaaS stack."""


@dataclass
class FunctionSpec:
    """One entry of ``functions:`` with paths resolved and values stringified."""

    name: str
    lang: str
    handler: Path
    image: str
    environment: dict[str, str] = field(default_factory=dict)
    labels: dict[str, str] = field(default_factory=dict)
    annotations: dict[str, str] = field(default_factory=dict)
    limits: dict[str, str] = field(default_factory=dict)
    requests: dict[str, str] = field(default_factory=dict)
    secrets: list[str] = field(default_factory=list)
    constraints: list[str] = field(default_factory=list)
    readonly_root_filesystem: bool = False
    namespace: str = ""
    fprocess: str = ""
    build_args: dict[str, str] = field(default_factory=dict)


@dataclass
class Stack:
    """A parsed stack file."""

    path: Path
    gateway: str
    functions: dict[str, FunctionSpec]
    configuration: dict[str, Any] = field(default_factory=dict)


# drone/envsubst (used by faas-cli) syntax; only the braced forms are substituted.
_VAR = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-=])([^}]*))?\}")


def substitute(text: str, env: Mapping[str, str]) -> str:
    """Replace ``${VAR}``, ``${VAR:-default}`` and ``${VAR-default}`` like faas-cli.

    ``:-`` uses the default when VAR is unset or empty, ``-`` only when it is unset; an unset
    VAR without a default becomes the empty string (faas-cli does the same).
    """

    def repl(m: re.Match[str]) -> str:
        name, op, default = m.group(1), m.group(2), m.group(3) or ""
        value = env.get(name)
        if op in (":-", ":="):
            return value if value else default
        if op in ("-", "="):
            return value if value is not None else default
        return value or ""

    return _VAR.sub(repl, text)


_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|ms|s|m|h)")
_UNIT = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str | int | float) -> float:
    """Seconds in a Go duration (``10m``, ``1h5m``, ``1.5s``); a bare number means seconds.

    of-watchdog accepts both forms for its ``*_timeout`` variables, so we do too.
    """
    if isinstance(text, bool):
        raise ValueError(f"invalid duration {text!r}")
    if isinstance(text, int | float):
        return float(text)
    s = text.strip()
    try:
        return float(s)
    except ValueError:
        pass
    sign = 1.0
    if s[:1] in "+-" and s:
        sign = -1.0 if s[0] == "-" else 1.0
        s = s[1:]
    pos, total = 0, 0.0
    while pos < len(s):
        m = _DURATION_PART.match(s, pos)
        if not m:
            raise ValueError(f"invalid duration {text!r}")
        total += float(m.group(1)) * _UNIT[m.group(2)]
        pos = m.end()
    if not s:
        raise ValueError(f"invalid duration {text!r}")
    return sign * total


def _str_value(value: Any) -> str:
    """Stringify a YAML scalar the way Go's yaml.v2 fills a map[string]string."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _str_map(value: Any, where: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise StackError(f"{where}: expected a map, got {type(value).__name__}")
    return {str(k): _str_value(v) for k, v in value.items()}


def _str_list(value: Any, where: str) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise StackError(f"{where}: expected a list, got {type(value).__name__}")
    return [_str_value(v) for v in value]


def _read_yaml(path: Path, what: str) -> Any:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as e:
        raise StackError(f"cannot read {what} {path}: {e.strerror or e}") from e
    return text


def _parse_yaml(text: str, what: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise StackError(f"{what} is not valid YAML: {e}") from e


def _environment_files(files: list[str], base: Path, where: str) -> dict[str, str]:
    merged: dict[str, str] = {}
    for name in files:
        path = (base / name).resolve()
        data = _parse_yaml(_read_yaml(path, f"{where} file"), f"{where} file {path}")
        if data is None:
            continue
        if not isinstance(data, Mapping) or "environment" not in data:
            raise StackError(f"{where}: {path} must contain an 'environment:' map")
        merged.update(_str_map(data["environment"], f"{where} {path}: environment"))
    return merged


def _resources(value: Any, where: str) -> dict[str, str]:
    res = _str_map(value, where)
    unknown = set(res) - {"memory", "cpu"}
    if unknown:
        raise StackError(f"{where}: unknown keys {sorted(unknown)} (expected memory, cpu)")
    return res


def _function(name: str, raw: Any, base: Path) -> FunctionSpec:
    where = f"function {name!r}"
    if not isinstance(raw, Mapping):
        raise StackError(f"{where}: expected a map of settings")
    for key in ("lang", "handler", "image"):
        if not isinstance(raw.get(key), str) or not raw[key].strip():
            raise StackError(f"{where}: field {key!r} is required (a non-empty string)")
    handler = (base / raw["handler"]).resolve()
    if not handler.is_dir():
        raise StackError(f"{where}: field 'handler': directory {handler} does not exist")
    ro = raw.get("readonly_root_filesystem", False)
    if not isinstance(ro, bool):
        raise StackError(f"{where}: field 'readonly_root_filesystem' must be true or false")
    env = _str_map(raw.get("environment"), f"{where}: field 'environment'")
    env_files = _str_list(raw.get("environment_file"), f"{where}: field 'environment_file'")
    # faas-cli merges environment_file over environment (compileEnvironment/mergeMap).
    env.update(_environment_files(env_files, base, f"{where}: field 'environment_file'"))
    return FunctionSpec(
        name=name,
        lang=raw["lang"].strip(),
        handler=handler,
        image=raw["image"].strip(),
        environment=env,
        labels=_str_map(raw.get("labels"), f"{where}: field 'labels'"),
        annotations=_str_map(raw.get("annotations"), f"{where}: field 'annotations'"),
        limits=_resources(raw.get("limits"), f"{where}: field 'limits'"),
        requests=_resources(raw.get("requests"), f"{where}: field 'requests'"),
        # faas-cli drops an empty entry (a ${VAR:-} left unset), so a stack may list
        # optional secrets
        secrets=[n for n in _str_list(raw.get("secrets"), f"{where}: field 'secrets'") if n],
        constraints=_str_list(raw.get("constraints"), f"{where}: field 'constraints'"),
        readonly_root_filesystem=ro,
        namespace=_str_value(raw.get("namespace")),
        fprocess=_str_value(raw.get("fprocess")),
        build_args=_str_map(raw.get("build_args"), f"{where}: field 'build_args'"),
    )


_NAME = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def load_stack(path: str | os.PathLike[str], env: Mapping[str, str] | None = None) -> Stack:
    """Parse the stack file at ``path``, substituting variables from ``env`` (os.environ)."""
    path = Path(path).resolve()
    what = f"stack file {path}"
    text = substitute(_read_yaml(path, "stack file"), os.environ if env is None else env)
    data = _parse_yaml(text, what)
    if not isinstance(data, Mapping):
        raise StackError(f"{what}: expected a map at the top level")
    if str(data.get("version", "")) != "1.0":
        raise StackError(f"{what}: field 'version' must be 1.0, got {data.get('version')!r}")
    provider = data.get("provider")
    if not isinstance(provider, Mapping):
        raise StackError(f"{what}: field 'provider' is required (a map with name: openfaas)")
    if provider.get("name") != "openfaas":
        raise StackError(
            f"{what}: provider.name must be 'openfaas', got {provider.get('name')!r}"
        )
    gateway = _str_value(provider.get("gateway")) or DEFAULT_GATEWAY
    raw_functions = data.get("functions") or {}
    if not isinstance(raw_functions, Mapping):
        raise StackError(f"{what}: field 'functions' must be a map of name -> settings")
    functions: dict[str, FunctionSpec] = {}
    for name, raw in raw_functions.items():
        name = str(name)
        if not _NAME.match(name) or len(name) > 63:
            raise StackError(
                f"{what}: function name {name!r} must be a DNS-1123 label "
                "(lowercase letters, digits and '-')"
            )
        functions[name] = _function(name, raw, path.parent)
    configuration = data.get("configuration") or {}
    if not isinstance(configuration, Mapping):
        raise StackError(f"{what}: field 'configuration' must be a map")
    return Stack(
        path=path, gateway=gateway, functions=functions, configuration=dict(configuration)
    )
