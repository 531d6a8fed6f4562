"""What every command shares: the context object, the one error decorator, shared options and
the JSON/CSV writers.

Exit codes: 0 success, 1 an expected failure (one line on stderr; ``--debug`` re-raises it for
the traceback), 2 a usage error (click's own).
"""

from __future__ import annotations

import csv
import json
import sys
from collections.abc import Callable
from functools import wraps
from pathlib import Path
from typing import Any, TypeVar

import click

from emnist.gateway.client import GatewayClient, auth_from_env
from emnist.store.kv import DEFAULT_STORE_URL

__all__ = ["DEFAULT_GATEWAY", "DEFAULT_STORE", "Ctx", "friendly", "pass_ctx", "stack_option",
           "store_option", "write_json", "write_rows"]

DEFAULT_GATEWAY = "http://127.0.0.1:8080"
DEFAULT_STORE = DEFAULT_STORE_URL  # the local stack's memcached

F = TypeVar("F", bound=Callable[..., Any])


class Ctx:
    """The gateway URL, ``--debug``, and a GatewayClient built on first use (so ``--help`` and
    purely local commands never build one), with the credentials of :func:`auth_from_env`
    (OPENFAAS_USER / OPENFAAS_PASSWORD)."""

    def __init__(self, gateway: str, debug: bool) -> None:
        self.gateway, self.debug = gateway, debug
        self._gw: GatewayClient | None = None

    @property
    def gw(self) -> GatewayClient:
        if self._gw is None:
            self._gw = GatewayClient(self.gateway, auth=auth_from_env())
        return self._gw


pass_ctx = click.make_pass_decorator(Ctx)


def expected_errors() -> tuple[type[BaseException], ...]:
    """Failures a user can cause or fix (unreachable servers, bad input, a failed run); any
    other exception is a bug and keeps its traceback. Imported on demand: only a failing
    command pays for it."""
    from emnist.cluster import build, k8s, local
    from emnist.data import DataError
    from emnist.gateway.client import GatewayError
    from emnist.gateway.stack import StackError
    from emnist.p2p.broker import BrokerError
    from emnist.p2p.launch import LaunchTimeout
    from emnist.p2p.peer import PeerTimeout
    from emnist.p2p.report import PlotUnavailable
    from emnist.p2p.serverless import GradFunctionError
    from emnist.runner import RunError
    from emnist.store import StoreError
    return (GatewayError, RunError, StoreError, local.LocalStackError, k8s.KubectlError,
            build.BuildError, StackError, DataError, BrokerError, PeerTimeout, LaunchTimeout,
            PlotUnavailable, GradFunctionError, OSError, ValueError)


def friendly(fn: F) -> F:
    """The one error decorator: an expected failure is one ``Error: ...`` line on stderr and
    exit 1; with ``--debug`` it is re-raised (traceback). Usage errors stay click's (exit 2)."""
    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except click.ClickException:
            raise
        except Exception as e:
            obj = click.get_current_context().find_object(Ctx)
            if (obj is not None and obj.debug) or not isinstance(e, expected_errors()):
                raise
            click.echo(f"Error: {one_line(e)}", err=True)
            sys.exit(1)
    return wrapper  # type: ignore[return-value]


def one_line(e: BaseException) -> str:
    """An error's message on one line (a gateway log tail or a kubectl message can span several;
    the full text is in the traceback with --debug)."""
    lines = [ln.strip() for ln in str(e).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    return lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"


def stack_option(fn: F) -> F:
    return click.option("--stack", "-f", default="emnist.yml", show_default=True,
                        help="OpenFaaS stack file.")(fn)


def store_option(fn: F) -> F:
    return click.option("--store", envvar="STORE_URL", default=DEFAULT_STORE, show_default=True,
                        help="Parameter store URL for a local stack this command starts "
                             "(env STORE_URL); functions behind a running gateway use the "
                             "store of their deployment.")(fn)


def write_json(path: str | None, records: Any) -> None:
    """``--json FILE`` outputs: the records as indented JSON (parent dirs made)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(records, indent=1))


def write_rows(rows: list[dict[str, Any]], json_out: str | None, csv_out: str | None,
               keys: list[str]) -> None:
    """``--json`` and ``--csv`` outputs of a results table."""
    write_json(json_out, rows)
    if csv_out:
        Path(csv_out).parent.mkdir(parents=True, exist_ok=True)
        with open(csv_out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)
