"""A local OpenFaaS-compatible gateway: the embedded default for one machine (like faasd).

It serves the OpenFaaS gateway REST API on 127.0.0.1 and runs each function's replicas as OS
processes (see :mod:`.supervisor`) hosting the handler like the python3-http template does, so
``faas-cli`` and :class:`~.client.GatewayClient` work against it unchanged. This module is the
process: options, listening, serving until a signal, cleaning up. The jobs live elsewhere:
:mod:`.wsgi` (guards and the invoke fast path), :mod:`.handlers` (the /system endpoints),
:mod:`.state` (deployments), :mod:`.validate` (what a deploy may set), :mod:`.proxy` (calls),
:mod:`.queue` (the async queues, as CE's NATS Streaming and queue-workers), :mod:`.spool` (queued
bodies), :mod:`.callbacks` (where X-Callback-Url may
point), :mod:`.httpserver` (waitress against slow clients), :mod:`.secretstore`, :mod:`.logs`,
:mod:`.auth`.

Async calls and timeouts default to OpenFaaS CE's: one queue-worker taking one call at a time,
redelivery after ``ack_wait`` 30s, the gateway's upstream timeout 1m (502); `emnist up` sets
them as docs/deploy.md tells operators to.

Differences from OpenFaaS CE, on purpose: deploy/scale return 202 only once the replicas are
healthy (errors are reported instead of hidden); scale-function accepts 0..--max-replicas
(default 64; CE clamps to 1..5); invoking a function scaled to zero scales it to one first; an
async call to a queue no ``--queue`` serves is refused (500) instead of waiting for ever.
"""

from __future__ import annotations

import atexit
import json
import logging
import math
import os
import signal
import socket
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import click

from emnist.hostaliases import parse_aliases

from .auth import is_loopback, load_auth
from .callbacks import ENV as CALLBACK_ENV
from .httpserver import (
    DEFAULT_MAX_CONNECTIONS,
    DEFAULT_REQUEST_TIMEOUT,
    add_unix_socket,
    make_server,
)
from .queue import DEFAULT_ACK_WAIT, QueueSettings, parse_queue
from .stack import Stack, StackError, load_stack, parse_duration
from .state import (
    DEFAULT_MAX_REPLICAS,
    DEFAULT_UPSTREAM_TIMEOUT,
    Deployment,
    Gateway,
    function_timeout,
)
from .supervisor import ReplicaError
from .wsgi import build_app

__all__ = ["Deployment", "Gateway", "create_app", "function_timeout", "listen", "load_auth",
           "serve"]

log = logging.getLogger("emnist.gateway")


def create_app(stack: Stack, *, base_env: Mapping[str, str],
               auth: tuple[str, str] | None = None, **options: Any) -> Gateway:
    """A Gateway for ``stack`` (nothing deployed yet; see :func:`serve`)."""
    return Gateway(stack, base_env, auth, **options)


def listen(gateway: Gateway, host: str = "127.0.0.1", port: int = 8080,
           threads: int = 64, *, request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
           max_connections: int = DEFAULT_MAX_CONNECTIONS,
           unix_socket: str | os.PathLike[str] | None = None) -> str:
    """Bind the HTTP server (port 0 picks a free one), and the unix socket if given (the
    container runtime's relay: containers reach the gateway there, as gateway.openfaas);
    returns the gateway URL."""
    app: list[Callable[..., Any]] = []
    server = make_server(
        lambda environ, start_response: app[0](environ, start_response),
        host=host, port=port, threads=max(32, threads), max_body=gateway.max_body,
        request_timeout=request_timeout, max_connections=max_connections,
        channel_request_lookahead=4, ident="emnist-gateway",
        clear_untrusted_proxy_headers=False,  # pass X-Forwarded-* on, as OpenFaaS does
        send_bytes=1,  # answer from the worker thread at once, not on the next loop turn
    )
    bound_port = int(server.effective_port)
    url = f"http://127.0.0.1:{bound_port}" if host in ("127.0.0.1", "0.0.0.0", "::", "") \
        else f"http://{host}:{bound_port}"
    gateway.set_url(url, bound_port)
    app.append(build_app(gateway))
    if unix_socket is not None:
        add_unix_socket(server, lambda environ, start_response: app[0](environ, start_response),
                        str(unix_socket), request_timeout)
    gateway._server = server
    return url


def serve(gateway: Gateway, *, host: str = "127.0.0.1", port: int = 8080,
          replicas: Mapping[str, int] | None = None,
          ready_file: str | os.PathLike[str] | None = None, threads: int = 64,
          on_ready: Callable[[str], None] | None = None,
          request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
          max_connections: int = DEFAULT_MAX_CONNECTIONS,
          unix_socket: str | os.PathLike[str] | None = None) -> None:
    """Listen, deploy the stack, write the ready file, serve until SIGTERM/SIGINT, clean up."""
    atexit.register(gateway.close)
    previous = signal.signal(signal.SIGTERM, _raise_exit) \
        if threading.current_thread() is threading.main_thread() else None
    ready_path = Path(ready_file) if ready_file else None
    try:
        if not is_loopback(host) and gateway.auth is None:
            raise ValueError(f"--host {host} would expose /system/* (which runs code) to the "
                             "network without a password: set OPENFAAS_PASSWORD or "
                             "--basic-auth-file")
        url = listen(gateway, host, port, threads, request_timeout=request_timeout,
                     max_connections=max_connections, unix_socket=unix_socket)
        gateway.deploy_stack(replicas)
        if ready_path is not None:
            tmp = ready_path.with_name(ready_path.name + ".tmp")
            tmp.write_text(json.dumps({"url": url, "pid": os.getpid()}), encoding="utf-8")
            tmp.replace(ready_path)
        log.info("gateway ready on %s (%d functions)", url, len(gateway.functions))
        if on_ready is not None:
            on_ready(url)
        gateway._server.run()
    finally:
        gateway.close()
        if ready_path is not None:
            ready_path.unlink(missing_ok=True)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)


def _raise_exit(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def _parse_replicas(values: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in values:
        name, sep, count = item.partition("=")
        if not sep or not count.isdigit():
            raise click.BadParameter(f"{item!r} is not NAME=COUNT", param_hint="--replicas")
        out[name] = int(count)
    return out


def _own_names(host: str) -> tuple[str, ...]:
    """Host names this gateway answers to besides loopback: the bound address, and for a
    wildcard bind the machine's own names (other addresses: --allowed-host)."""
    if host in ("0.0.0.0", "::", ""):
        return tuple({socket.gethostname().lower(), socket.getfqdn().lower()})
    return (host,)


def _parse_queues(values: Sequence[str]) -> dict[str, int]:
    out: dict[str, int] = {}
    for item in values:
        try:
            name, workers = parse_queue(item)
        except ValueError as e:
            raise click.BadParameter(str(e), param_hint="--queue") from None
        out[name] = workers
    return out


class Duration(click.ParamType):
    """Seconds, as a number (fractions too) or a Go duration (``30s``, ``1m``, ``1m30s``)."""

    name = "DURATION"

    def convert(self, value: Any, param: click.Parameter | None,
                ctx: click.Context | None) -> float:
        try:
            seconds = parse_duration(value)
        except ValueError:
            self.fail(f"{value!r} is not a duration (seconds, or like 30s, 1m, 1m30s)",
                      param, ctx)
        if not (math.isfinite(seconds) and seconds > 0):
            self.fail(f"{value!r}: must be more than 0", param, ctx)
        return seconds


def _parse_alias_args(values: Sequence[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in values:
        parsed = parse_aliases(item)
        if len(parsed) != 1 or not all(":" in x for kv in parsed.items() for x in kv):
            raise click.BadParameter(f"{item!r} is not HOST:PORT=HOST:PORT",
                                     param_hint="--alias")
        out.update(parsed)
    return out


@click.command()
@click.option("--stack", "stack_path", required=True, envvar="EMNIST_STACK",
              type=click.Path(exists=True, dir_okay=False), help="OpenFaaS stack file.")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (not loopback: needs a password).")
@click.option("--port", default=8080, show_default=True, type=int, help="0 picks a free port.")
@click.option("--replicas", "replica_args", multiple=True, metavar="NAME=N",
              help="Initial replicas of a function (repeatable).")
@click.option("--basic-auth-file", type=click.Path(exists=True),
              help="Secrets dir (basic-auth-password) or password file; else $OPENFAAS_PASSWORD.")
@click.option("--ready-file", type=click.Path(dir_okay=False),
              help='Write {"url", "pid"} here once every initial replica is healthy.')
@click.option("--state-dir", type=click.Path(file_okay=False), envvar="EMNIST_GATEWAY_STATE",
              help="Where secrets are kept (default $EMNIST_HOME/gateway).")
@click.option("--store", "store_url", envvar="STORE_URL", default=None,
              help="The store replicas reach as memcached.openfaas-fn / redis.openfaas-fn "
                   "(env STORE_URL).")
@click.option("--alias", "alias_args", multiple=True, metavar="HOST:PORT=HOST:PORT",
              help="A service name replicas resolve to a local address (repeatable).")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="A Host name besides loopback this gateway answers to (repeatable).")
@click.option("--allowed-origin", "allowed_origins", multiple=True, metavar="URL",
              help="A browser origin allowed to call this gateway (repeatable).")
@click.option("--max-body", default=16 << 20, show_default=True, type=click.IntRange(1),
              help="Largest request body in bytes (413 beyond).")
@click.option("--max-replicas", default=DEFAULT_MAX_REPLICAS, show_default=True,
              type=click.IntRange(1),
              help="Most replicas of one function.")
@click.option("--max-functions", default=64, show_default=True, type=click.IntRange(1),
              help="Most deployed functions.")
@click.option("--queue-workers", default=1, show_default=True, type=click.IntRange(1),
              envvar="EMNIST_GATEWAY_QUEUE_WORKERS",
              help="Queue-workers of the default queue, each running one async call at a "
                   "time (the CE chart's queueWorker.replicas).")
@click.option("--queue", "queue_args", multiple=True, metavar="NAME=WORKERS",
              envvar="EMNIST_GATEWAY_QUEUES",
              help="A named queue (a function's com.openfaas.queue annotation) and its "
                   "queue-workers (repeatable).")
@click.option("--ack-wait", default=f"{DEFAULT_ACK_WAIT:g}s", show_default=True,
              type=Duration(), envvar="EMNIST_GATEWAY_ACK_WAIT",
              help="An async call not acknowledged this long after its delivery (its call "
                   "and callback not done) is delivered again (the queue-worker's ack_wait).")
@click.option("--upstream-timeout", default=f"{DEFAULT_UPSTREAM_TIMEOUT:g}s",
              show_default=True, type=Duration(), envvar="EMNIST_GATEWAY_UPSTREAM_TIMEOUT",
              help="The gateway gives up on a call after this (502; the function goes on), as "
                   "the OpenFaaS gateway's upstream_timeout.")
@click.option("--queue-max", default=1024, show_default=True, type=click.IntRange(1),
              help="Most queued async calls (429 beyond).")
@click.option("--threads", default=64, show_default=True, type=int, help="HTTP threads (>=32).")
@click.option("--callback-host", "callback_hosts", multiple=True, metavar="HOST[:PORT]",
              envvar=CALLBACK_ENV,
              help="A host X-Callback-Url may name, any port unless given (repeatable or a "
                   f"comma list; env {CALLBACK_ENV}). None by default: no callbacks.")
@click.option("--request-timeout", default=DEFAULT_REQUEST_TIMEOUT, show_default=True,
              type=click.FloatRange(0.5), envvar="EMNIST_GATEWAY_REQUEST_TIMEOUT",
              help="Seconds a client has to send a whole request (head and body); slower "
                   "connections are closed (slowloris).")
@click.option("--max-connections", default=DEFAULT_MAX_CONNECTIONS, show_default=True,
              type=click.IntRange(16), envvar="EMNIST_GATEWAY_MAX_CONNECTIONS",
              help="Most open client connections (also bounded by the open-file limit); at "
                   "the limit the slowest are closed.")
@click.option("--runtime", type=click.Choice(["process", "container"]), default="process",
              show_default=True, envvar="EMNIST_GATEWAY_RUNTIME",
              help="Replicas as processes in this Python (fast), or as podman containers of "
                   "the stack's images, as OpenFaaS runs them (needs --network).")
@click.option("--network", envvar="EMNIST_GATEWAY_NETWORK",
              help="container runtime: the podman network replicas join (where the stack's "
                   "service names resolve).")
@click.option("--container-user", default="", envvar="EMNIST_GATEWAY_CONTAINER_USER",
              help="container runtime: run replicas as this UID[:GID] instead of the image's "
                   "user (as OpenShift assigns one).")
@click.option("--stack-label", default="", envvar="EMNIST_GATEWAY_STACK_LABEL",
              help="container runtime: the label value marking this stack's containers "
                   "(default: the network's name).")
@click.option("--unix-socket", type=click.Path(dir_okay=False),
              help="Also serve on this unix socket (mode 0600): the container runtime's relay "
                   "forwards gateway.openfaas:8080 there.")
@click.option("--echo-logs", is_flag=True, help="Copy replica output to stderr.")
@click.option("--debug", is_flag=True, help="Verbose logs and tracebacks.")
def main(stack_path: str, host: str, port: int, replica_args: tuple[str, ...],
         basic_auth_file: str | None, ready_file: str | None, state_dir: str | None,
         store_url: str | None, alias_args: tuple[str, ...], allowed_hosts: tuple[str, ...],
         allowed_origins: tuple[str, ...], max_body: int, max_replicas: int,
         max_functions: int, queue_workers: int, queue_args: tuple[str, ...],
         ack_wait: float, upstream_timeout: float, queue_max: int, threads: int,
         callback_hosts: tuple[str, ...], request_timeout: float, max_connections: int,
         runtime: str, network: str | None, container_user: str, stack_label: str,
         unix_socket: str | None, echo_logs: bool, debug: bool) -> None:
    """Run the local OpenFaaS-compatible gateway for a stack file."""
    logging.basicConfig(level=logging.DEBUG if debug else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s gateway %(levelname)s %(message)s")
    logging.getLogger("waitress").setLevel(logging.WARNING)
    try:
        stack = load_stack(stack_path)
        auth = load_auth(basic_auth_file)
        replica_runtime = None
        if runtime == "container":
            if not network:
                raise click.BadParameter("the container runtime needs --network",
                                         param_hint="--network")
            from .podman import ContainerRuntime, ContainerSettings

            replica_runtime = ContainerRuntime(ContainerSettings(
                network=network, stack=stack_label or network, user=container_user))
        gateway = create_app(
            stack, base_env={}, auth=auth, queue_max=queue_max,
            queues=QueueSettings(queue_workers, ack_wait, _parse_queues(queue_args)),
            upstream_timeout=upstream_timeout,
            echo_logs=echo_logs, max_body=max_body, max_replicas=max_replicas,
            max_functions=max_functions, state_dir=state_dir, store_url=store_url,
            aliases=_parse_alias_args(alias_args),
            allowed_hosts=(*allowed_hosts, *_own_names(host)),
            allowed_origins=allowed_origins, callback_hosts=callback_hosts,
            runtime=replica_runtime,
        )
        serve(gateway, host=host, port=port, replicas=_parse_replicas(replica_args),
              ready_file=ready_file, threads=threads, request_timeout=request_timeout,
              max_connections=max_connections, unix_socket=unix_socket)
    except (StackError, ReplicaError, OSError, ValueError) as e:
        if debug:
            raise
        click.echo(f"gateway: error: {e}", err=True)
        sys.exit(1)
    except (KeyboardInterrupt, SystemExit):
        pass


if __name__ == "__main__":
    main()
