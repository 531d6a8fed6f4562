"""The operator's policy: what a request may choose beyond the function's own environment.

OpenFaaS calls functions without authentication, so a request body is untrusted. Where a
function connects, reads or writes comes from its environment (the operator's deployment);
a request may pick another value only when the environment allows it by name:

- ``allowed_store_urls``: comma-separated store URLs a request may name (``store_url``,
  ``local_store_url``), besides the environment's own value of that field. URLs compare
  exactly, or equal once the provider's host aliases are applied to both (the same server).
- ``data_roots``: comma-separated directories, ``s3://bucket/prefix``, ``store:[/prefix]`` or
  http(s) URL prefixes under which a request may name ``dataset_dir``, ``data_location`` or
  emnist-grad's ``data``. An s3:// URL names a bucket and key prefix only: the endpoint and
  keys are the function's (``DATA_ENV``), so a request can never point a function at another
  S3 server; a ``store:`` URL names a key prefix of the function's own ``store_url`` only
  (emnist.data.kvlocation), and is never a ``dataset_dir`` (source files are on a disk).
- ``checkpoint_roots``: the same for ``checkpoint_url`` (directories, ``file://`` paths, or
  exact ``redis://`` URLs).
- ``max_params`` (default 150,000,000), ``max_workers`` (default 256): caps on the model size
  and the worker count, whoever asks.
- ``store_key_secret``: the OpenFaaS secret whose value seals the run documents in the store
  (emnist.store.signing; empty: documents unsigned).

The store is no more trusted than a request (memcached has no authentication): what a function
reads back from it (a run document's places and sizes) passes the same checks
(:func:`check_stored_location` for where a run's shards are).

A local path is inside a root only when it is absolute, has no ``..`` part and its real path
(symlinks resolved) is the root's real path or below it. Refusals are :class:`PolicyError`
(a 400 naming the field and the environment name that would allow it, never the value: it
may carry a password). These names are function configuration: a deploy may set them (the
gateway's allow-list of environment names includes ``POLICY_ENV``), a request never can.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from urllib.parse import urlsplit

from emnist.hostaliases import ALIASES_ENV, parse_aliases, resolve_url

__all__ = ["DATA_ENV", "DEFAULT_MAX_PARAMS", "DEFAULT_MAX_WORKERS", "POLICY_ENV", "STORE_SCHEMES",
           "PolicyError", "check_checkpoint_url", "check_data_location", "check_store_url",
           "check_stored_location",
           "env_list", "env_number", "max_params", "max_workers", "resolve"]

# where s3:// data lives and as whom (emnist.data.s3; the keys are secret NAMES), the
# size of a node's shard cache (emnist.data.cache) and of the prepared sets a data location
# keeps (emnist.data.prepared): operator settings like the policy's
DATA_ENV: tuple[str, ...] = ("s3_endpoint_url", "s3_region", "s3_access_key_secret",
                             "s3_secret_key_secret", "s3_range_mb", "s3_readers",
                             "max_cache_bytes", "max_prepared_bytes")
POLICY_ENV: tuple[str, ...] = ("allowed_store_urls", "data_roots", "checkpoint_roots",
                               "max_params", "max_workers", "store_key_secret", *DATA_ENV)
DEFAULT_MAX_PARAMS = 150_000_000  # 600 MB of float32 per copy: the largest model served
DEFAULT_MAX_WORKERS = 256
HARD_MAX_PARAMS = 10_000_000_000  # what an operator may raise max_params to
HARD_MAX_WORKERS = 100_000
STORE_SCHEMES = ("memcached", "memcached+binary", "redis")
MAX_URL = 4096


class PolicyError(ValueError):
    """A request chose something the operator did not allow; the message names the field."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field


def env_list(env: Mapping[str, str], name: str) -> list[str]:
    """A comma-separated environment setting as a list (empty items dropped)."""
    return [item.strip() for item in (env.get(name) or "").split(",") if item.strip()]


def env_number(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    """An integer setting in [low, high] (``1e6``, ``150_000_000`` accepted; nan/inf refused)."""
    raw = (env.get(name) or "").strip()
    if not raw:
        return default
    try:
        value = float(raw) if any(c in raw for c in ".eE") else int(raw)
    except (ValueError, OverflowError):
        value = math.nan
    if not (isinstance(value, int) or math.isfinite(value)) or value != int(value) \
            or not low <= value <= high:
        raise PolicyError(name, f"the function's environment sets {name} to a value that is "
                          f"not a whole number in {low}..{high}")
    return int(value)


def max_params(env: Mapping[str, str]) -> int:
    return env_number(env, "max_params", DEFAULT_MAX_PARAMS, 1, HARD_MAX_PARAMS)


def max_workers(env: Mapping[str, str]) -> int:
    return env_number(env, "max_workers", DEFAULT_MAX_WORKERS, 1, HARD_MAX_WORKERS)


def resolve(env: Mapping[str, str], url: str) -> str:
    """``url`` as this provider reaches it (its host aliases applied): what a function opens."""
    return resolve_url(url, parse_aliases(env.get(ALIASES_ENV, "")))


def check_store_url(env: Mapping[str, str], field: str, url: str, configured: str,
                    extra_schemes: tuple[str, ...] = ()) -> str:
    """``url`` if a request may name it: the environment's own ``configured`` value or one of
    ``allowed_store_urls``. An unknown scheme is refused first (it names no store at all)."""
    if not isinstance(url, str) or len(url) > MAX_URL:
        raise PolicyError(field, f"must be a store URL of at most {MAX_URL} characters")
    scheme = urlsplit(url).scheme if "://" in url else ""
    if scheme not in (*STORE_SCHEMES, *extra_schemes):
        known = ", ".join(f"{s}://" for s in (*STORE_SCHEMES, *extra_schemes))
        raise PolicyError(field, f"must start with one of {known}")
    allowed = [u for u in (configured, *env_list(env, "allowed_store_urls")) if u]
    if url in allowed or resolve(env, url) in {resolve(env, u) for u in allowed}:
        return url
    raise PolicyError(field, "this store is not allowed: a request may name only the "
                      f"function's own {field} or a URL listed in allowed_store_urls "
                      "(both set in the function's environment)")


def _bad_path(path: str) -> bool:
    return "\x00" in path or "\\" in path or ".." in path.split("/")


def _inside(path: str, root: str) -> bool:
    real, top = os.path.realpath(path), os.path.realpath(root)
    return real == top or real.startswith(top.rstrip(os.sep) + os.sep)


def _url_inside(url: str, root: str) -> bool:
    """``url`` is the URL prefix ``root`` or below it (same scheme, host and port; for s3://
    the same bucket)."""
    u, r = urlsplit(url), urlsplit(root)
    if u.query or u.fragment or "@" in u.netloc or "%" in u.path or _bad_path(u.path):
        return False
    if (u.scheme, u.netloc.lower()) != (r.scheme, r.netloc.lower()):
        return False
    top = r.path.rstrip("/") + "/"
    return (u.path.rstrip("/") + "/").startswith(top)


def _store_inside(value: str, root: str) -> bool:
    """``value`` is the ``store:`` location ``root`` or below it (both well-formed)."""
    from emnist.data.idx import DataError
    from emnist.data.kvlocation import parse_store_url

    try:
        sub, top = parse_store_url(value), parse_store_url(root)
    except DataError:
        return False
    return not top or sub == top or sub.startswith(top + "/")


def _schemes(schemes: tuple[str, ...]) -> str:
    return ", ".join("store:/" if s == "store" else f"{s}://" for s in schemes)


def _check_rooted(env: Mapping[str, str], field: str, value: str, configured: str | None,
                  roots_env: str, schemes: tuple[str, ...], own_env: str = "",
                  own_roots: tuple[str, ...] = ()) -> str:
    if not isinstance(value, str) or len(value) > MAX_URL:
        raise PolicyError(field, f"must be a path or URL of at most {MAX_URL} characters")
    if value == "":
        raise PolicyError(field, "must not be empty")
    if value == configured:
        return value  # the function's own setting
    roots = [*own_roots, *env_list(env, roots_env)]
    allow = (f"a request may name only places under {roots_env} (set in the function's "
             "environment)")
    if not roots:
        raise PolicyError(field, f"a request may not choose it: set {own_env or field} in the "
                          f"function's environment, or list allowed places in {roots_env}")
    if value.startswith("store:") and "store" in schemes:  # a prefix of the function's store
        if any(_store_inside(value, r) for r in roots if r.startswith("store:")):
            return value
        raise PolicyError(field, f"this store: location is not allowed: {allow}")
    scheme = urlsplit(value).scheme if "://" in value else ""
    if scheme in ("http", "https", "s3") and scheme in schemes:
        if any(_url_inside(value, r) for r in roots if "://" in r):
            return value
        raise PolicyError(field, f"this URL is not allowed: {allow}")
    if scheme in ("redis",) and scheme in schemes:
        if value in roots:
            return value
        raise PolicyError(field, f"this URL is not allowed: {allow}")
    path = value
    if scheme == "file" and "file" in schemes:
        parts = urlsplit(value)
        if parts.netloc or parts.query or parts.fragment:
            raise PolicyError(field, "a file:// URL must be file:///absolute/path")
        path = parts.path
    elif scheme:
        raise PolicyError(field, "must be an absolute path" + (
            " or one of " + _schemes(schemes) if schemes else ""))
    if not os.path.isabs(path) or _bad_path(path):
        raise PolicyError(field, "must be an absolute path without '..'")
    if any(_inside(path, r) for r in roots if "://" not in r and os.path.isabs(r)):
        return value
    raise PolicyError(field, f"this path is not allowed: {allow}")


def check_data_location(env: Mapping[str, str], field: str, value: str,
                        configured: str | None, urls: bool = False, own_env: str = "") -> str:
    """``value`` (a directory, an s3:// prefix or a ``store:`` prefix, or with ``urls`` also
    an http(s) URL prefix) if it is the environment's own setting (``own_env``, default
    ``field``) or inside one of ``data_roots``. A ``dataset_dir`` is a directory or s3://
    (source files), never ``store:``."""
    schemes = ("s3", "http", "https") if urls else ("s3",)
    if field != "dataset_dir":
        schemes += ("store",)
    return _check_rooted(env, field, value, configured, "data_roots", schemes, own_env)


def check_checkpoint_url(env: Mapping[str, str], value: str, configured: str) -> str:
    """``value`` if it is the environment's own ``checkpoint_url`` or inside one of
    ``checkpoint_roots`` (a directory, ``file://`` path, or an exact ``redis://`` URL)."""
    return _check_rooted(env, "checkpoint_url", value, configured, "checkpoint_roots",
                         ("file", "redis"))


def check_stored_location(env: Mapping[str, str], field: str, value: str, own: str) -> str:
    """``value``, a data location read back from the store (a run document's ``shard_dir``),
    if it is inside the function's own data location ``own`` (a directory, ``file://``,
    s3://, ``store:`` or http(s) prefix) or one of ``data_roots``: a store value names no
    other place."""
    if own.startswith("file://"):
        own = urlsplit(own).path
    return _check_rooted(env, field, value, None, "data_roots",
                         ("s3", "http", "https", "file", "store"), "data_location",
                         (own,) if own else ())
