"""Deploy validation: what a ``POST``/``PUT /system/functions`` may set, and nothing more.

A deploy may choose only the function's own configuration. Its ``envVars`` names must be on an
allow-list: the stack function's own ``environment`` names, the training configuration's field
names, the operator's policy names, the watchdog's settings and the BLAS thread counts. Names
that steer the interpreter, the loader or the provider (``PATH``, ``PYTHON*``, ``LD_*``,
``BROWSER``, ``HOME``, ``*_PROXY``, ``EMNIST_*``, ``OPENFAAS_URL``, ``HOSTNAME``, ...) are refused
even when a stack lists them: one of them is enough to make a Python replica run any command.
``envProcess`` may only repeat the stack's (or its template's) ``fprocess``. Every refusal is a
:class:`BadRequest` (400) that names the field.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from emnist.policy import POLICY_ENV
from emnist.secrets import valid_secret_name
from emnist.train.config import FIELD_KINDS

from .logs import NAMESPACE
from .stack import FunctionSpec

__all__ = ["SAFE_ENV", "SCALE_MIN_LABEL", "BadRequest", "allowed_env", "check_env",
           "check_process", "parse_deploy", "provider_only", "scale_min", "valid_service"]

SCALE_MIN_LABEL = "com.openfaas.scale.min"
# of-watchdog's settings a function may tune (the ones that pick what runs are refused below).
WATCHDOG_ENV = ("read_timeout", "write_timeout", "exec_timeout", "max_inflight",
                "healthcheck_interval", "prefix_logs", "log_buffer_size", "write_debug",
                "combine_output", "WAITRESS_THREADS")
THREAD_ENV = ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS")
FUNCTION_ENV = ("gateway_url",)  # read by emnist-setup/-train: which gateway to call
SAFE_ENV: frozenset[str] = frozenset(
    (*FIELD_KINDS, *POLICY_ENV, *WATCHDOG_ENV, *THREAD_ENV, *FUNCTION_ENV)
)

# Never settable by a deploy, whatever the stack says. Names are case-sensitive (so are the
# interpreter's and the loader's); only the *_proxy variables are honoured in either case.
_PROVIDER_EXACT = frozenset({
    "PATH", "HOME", "HOSTNAME", "BROWSER", "SHELL", "ENV", "BASH_ENV", "IFS", "CDPATH", "PWD",
    "OLDPWD", "TMPDIR", "TMP", "TEMP", "USER", "LOGNAME", "EDITOR", "VISUAL", "PAGER",
    "TERMINFO", "GCONV_PATH", "LOCPATH", "NLSPATH", "HOSTALIASES", "RESOLV_HOST_CONF",
    "LOCALDOMAIN", "RES_OPTIONS", "TZDIR", "SSL_CERT_FILE", "SSL_CERT_DIR",
    "REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE", "VIRTUAL_ENV",
    # of-watchdog settings that choose what runs or where it listens
    "fprocess", "function_process", "mode", "upstream_url", "http_upstream_url", "port",
    "suppress_lock", "static_path", "ready_path",
})
_PROVIDER_PREFIXES = ("PYTHON", "LD_", "DYLD_", "EMNIST_", "OPENFAAS_", "MALLOC_", "GLIBC_",
                      "XDG_", "PIP_", "CONDA", "PERL", "RUBY", "NODE_", "JAVA_", "GIT_", "SSH_")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_SERVICE = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
MAX_ENTRIES = 256  # envVars, labels, annotations: each
MAX_VALUE = 64 * 1024
MAX_KEY = 253
MAX_SECRETS = 64
MAX_IMAGE = 512


class BadRequest(ValueError):
    """A request the API rejects with 400 (the message names the field)."""


def provider_only(name: str) -> bool:
    """True for names the provider owns or that steer the interpreter/loader (never allowed)."""
    return (name in _PROVIDER_EXACT or name.startswith(_PROVIDER_PREFIXES)
            or name.lower().endswith("_proxy"))


def allowed_env(fn: FunctionSpec) -> frozenset[str]:
    """The envVars names a deploy of ``fn``'s code may set (before the provider-only veto)."""
    return SAFE_ENV | frozenset(fn.environment)


_QUANTITY = re.compile(r"^([0-9]{1,15})(?:\.([0-9]{1,6}))?(Ki|Mi|Gi|Ti|k|M|G|T)?$")
_FACTOR = {None: 1, "k": 10**3, "M": 10**6, "G": 10**9, "T": 10**12,
           "Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40}
MIN_MEMORY, MAX_MEMORY = 6 << 20, 1 << 40  # podman's floor; a sanity ceiling


def memory_bytes(quantity: str) -> int:
    """A Kubernetes memory quantity (``1Gi``, ``128Mi``, ``500M``, ``1048576``) in bytes."""
    m = _QUANTITY.match(quantity.strip())
    if not m:
        raise ValueError(f"{_short(quantity)!r} is not a quantity (like 128Mi or 1Gi)")
    whole, frac, unit = m.groups()
    factor = _FACTOR[unit]
    return int(whole) * factor + (int(frac) * factor // 10 ** len(frac) if frac else 0)


def check_env(env: Mapping[str, str], fn: FunctionSpec) -> None:
    """Refuse any name that is provider-only or not on ``fn``'s allow-list."""
    allowed = allowed_env(fn)
    for name in env:
        if provider_only(name):
            raise BadRequest(f"envVars: {name} is set by the provider and cannot be deployed")
        if name not in allowed:
            raise BadRequest(
                f"envVars: {name} is not a setting of function {fn.name} (allowed: its stack "
                "environment, the training configuration, policy, watchdog and thread settings)"
            )


def check_process(env_process: str, fn: FunctionSpec, template_fprocess: str = "") -> None:
    """``envProcess`` may only name what the stack runs already (no other command)."""
    if env_process and env_process not in {fn.fprocess, template_fprocess} - {""}:
        allowed = fn.fprocess or template_fprocess or "the template's default"
        raise BadRequest(f"envProcess: only the stack's process ({allowed}) may run for "
                         f"function {fn.name}")


def valid_service(name: object) -> bool:
    return isinstance(name, str) and len(name) <= 63 and bool(_SERVICE.match(name))


def _short(value: str, limit: int = 60) -> str:
    return value if len(value) <= limit else value[:limit] + "..."


def _str_map(value: Any, field: str, key_check: Callable[[str], bool] | None = None
             ) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise BadRequest(f"{field} must be an object of strings")
    if len(value) > MAX_ENTRIES:
        raise BadRequest(f"{field} has more than {MAX_ENTRIES} entries")
    out: dict[str, str] = {}
    for k, v in value.items():
        if v is None:
            v = ""
        if not isinstance(v, str | int | float | bool):
            raise BadRequest(f"{field}.{_short(k)} must be a string")
        v = str(v)
        if not k or len(k) > MAX_KEY or (key_check is not None and not key_check(k)):
            raise BadRequest(f"{field}: {_short(k)!r} is not a valid name")
        if len(v) > MAX_VALUE or "\x00" in v:
            raise BadRequest(f"{field}.{_short(k)}: value too long or contains a NUL byte")
        out[k] = v
    return out


def _str_list(value: Any, field: str, limit: int) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise BadRequest(f"{field} must be a list of strings")
    if len(value) > limit:
        raise BadRequest(f"{field} has more than {limit} entries")
    return list(value)


def parse_deploy(data: Mapping[str, Any]) -> dict[str, Any]:
    """Check a deploy body's shape (types.FunctionDeployment) into a normalised dict."""
    service, image = data.get("service"), data.get("image")
    if not isinstance(service, str) or not service:
        raise BadRequest("validation failed: service: is required")
    if not valid_service(service):
        raise BadRequest(f"validation failed: service: ({_short(service)}) is invalid, must be "
                         "a valid DNS entry")
    if not isinstance(image, str) or not image.strip() or len(image) > MAX_IMAGE:
        raise BadRequest("validation failed: image: is required")
    namespace = data.get("namespace")
    if namespace not in (None, "", NAMESPACE):
        raise BadRequest(f"namespace must be: {NAMESPACE}")
    env_process = data.get("envProcess") or ""
    if not isinstance(env_process, str) or len(env_process) > 1024:
        raise BadRequest("envProcess must be a string")
    req: dict[str, Any] = {"service": service, "image": image.strip(), "namespace": NAMESPACE,
                           "envProcess": env_process,
                           "envVars": _str_map(data.get("envVars"), "envVars",
                                               lambda k: bool(_ENV_NAME.match(k)))}
    for key in ("labels", "annotations", "limits", "requests"):
        req[key] = _str_map(data.get(key), key)
    for key in ("limits", "requests"):
        unknown = set(req[key]) - {"memory", "cpu"}
        if unknown:
            raise BadRequest(f"{key}: only memory and cpu may be set")
        if req[key].get("memory"):  # the container runtime sizes a cgroup with it
            try:
                size = memory_bytes(req[key]["memory"])
            except ValueError as e:
                raise BadRequest(f"{key}: memory: {e}") from None
            if not MIN_MEMORY <= size <= MAX_MEMORY:
                raise BadRequest(f"{key}: memory: between 6Mi and 1Ti")
    req["secrets"] = _str_list(data.get("secrets"), "secrets", MAX_SECRETS)
    for name in req["secrets"]:
        if not valid_secret_name(name):
            raise BadRequest(f"secrets: {_short(name)!r} is not a secret name")
    req["constraints"] = _str_list(data.get("constraints"), "constraints", MAX_ENTRIES)
    ro = data.get("readOnlyRootFilesystem", False)
    if not isinstance(ro, bool):
        raise BadRequest("readOnlyRootFilesystem must be true or false")
    req["readOnlyRootFilesystem"] = ro
    return req


def check_secrets(names: Iterable[str], exists: Callable[[str], bool]) -> None:
    """A deploy may list only secrets that exist (faas-netes answers 400 the same way)."""
    for name in names:
        if not exists(name):
            raise BadRequest(f'unable to fetch secrets: secret "{name}" not found')


def scale_min(labels: Mapping[str, str], max_replicas: int) -> int | None:
    """Initial replicas from ``com.openfaas.scale.min`` (None when absent); bounded."""
    raw = labels.get(SCALE_MIN_LABEL)
    if raw is None:
        return None
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"labels: {SCALE_MIN_LABEL} must be an integer") from None
    if value > max_replicas:
        raise BadRequest(f"labels: {SCALE_MIN_LABEL} is set too high (at most {max_replicas} "
                         "replicas on this gateway)")
    return max(1, value)  # as faas-netes: a value <= 0 means the default, 1
