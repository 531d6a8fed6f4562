"""`emnist invoke`, `emnist scale`, `emnist logs`: a function through the gateway API."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from emnist.bench.results import WORKER_COLUMNS, format_table
from emnist.cli.base import Ctx, friendly, pass_ctx, write_rows
from emnist.cluster import k8s
from emnist.runner import TRAIN, wait_replicas

LOG_COLUMNS = WORKER_COLUMNS + [("run_id", "run", ""), ("pod", "pod", ""), ("node", "node", "")]


def kubectl_option(help_: str):
    return click.option("--kubectl/--no-kubectl", "use_kubectl", default=None, help=help_)


namespace_option = click.option("--namespace", envvar="EMNIST_NAMESPACE",
                                default=k8s.FUNCTIONS_NAMESPACE, show_default=True,
                                help="The functions' namespace, for kubectl "
                                     "(env EMNIST_NAMESPACE).")


@click.command()
@click.argument("name")
@click.option("--data", "-d", default=None, help="Request body: JSON text, @FILE, or - (stdin).")
@click.option("--method", default="POST", show_default=True)
@click.option("--async", "is_async", is_flag=True, help="Use /async-function (202).")
@pass_ctx
@friendly
def invoke(c: Ctx, name: str, data: str | None, method: str, is_async: bool) -> None:
    """Invoke a function through the gateway and print its response."""
    if data == "-":
        data = sys.stdin.read()
    elif data and data.startswith("@"):
        data = Path(data[1:]).read_text()
    if is_async:
        click.echo(f"accepted, call id {c.gw.invoke_async(name, data)}")
        return
    resp = c.gw.invoke(name, data, method=method.upper(), check=False)
    click.echo(resp.text)
    if resp.status_code >= 400:
        sys.exit(1)


@click.command()
@click.argument("name")
@click.option("--replicas", "-r", type=click.IntRange(0), required=True)
@click.option("--wait/--no-wait", default=True, help="Wait until the replicas are available.")
@kubectl_option("Scale the Deployment with kubectl (default: only above 5 replicas on a real "
                "OpenFaaS, whose scale endpoint stops at 5).")
@namespace_option
@click.option("--timeout", type=float, default=120, show_default=True,
              help="Seconds to wait for the replicas.")
@pass_ctx
@friendly
def scale(c: Ctx, name: str, replicas: int, wait: bool, use_kubectl: bool | None,
          namespace: str, timeout: float) -> None:
    """Set a function's replica count (gateway scale endpoint; kubectl above 5 on OpenFaaS)."""
    via = k8s.scale_function(c.gw, name, replicas, use_kubectl=use_kubectl,
                             namespace=namespace, echo=lambda m: click.echo(m, err=True))
    if wait:
        wait_replicas(c.gw, name, replicas, timeout=timeout)
    click.echo(f"{name}: {replicas} replicas (via {via})")


@click.command()
@click.argument("name", default=TRAIN)
@click.option("--tail", type=int, default=None, help="Only the last N lines per replica.")
@click.option("--raw", is_flag=True, help="Print the log lines instead of the results table.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write results here.")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), help="Write results here.")
@kubectl_option("Read each pod's logs with kubectl (default: only when the gateway has no "
                "/system/logs, 404/501).")
@namespace_option
@pass_ctx
@friendly
def logs(c: Ctx, name: str, tail: int | None, raw: bool, json_out: str | None,
         csv_out: str | None, use_kubectl: bool | None, namespace: str) -> None:
    """Collect every replica's logs and print the workers' results, with pod and node."""
    from emnist.bench.suite import worker_results
    lines, source = k8s.collect_logs(c.gw, name, tail=tail, use_kubectl=use_kubectl,
                                     namespace=namespace)
    if source == "kubectl":
        click.echo(f"(logs read with kubectl logs, namespace {namespace})", err=True)
    if raw:
        for ln in lines:
            click.echo(f"{ln.get('timestamp', '')} {ln.get('instance', '')} {ln.get('text', '')}")
        return
    rows = worker_results(lines)
    click.echo(format_table(rows, LOG_COLUMNS) if rows else "no worker results in the logs")
    write_rows(rows, json_out, csv_out, [k for k, _, _ in LOG_COLUMNS])
