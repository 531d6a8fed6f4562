"""`emnist dashboard`: the live dashboard for a gateway elsewhere (a real cluster), served from
this machine; the local gateway serves the same pages itself at /ui."""

from __future__ import annotations

import socket

import click

from emnist.cli.base import Ctx, friendly, pass_ctx
from emnist.gateway.client import auth_from_env


def _own_names(host: str) -> list[str]:
    """Host names the browser may use for this server besides loopback."""
    if host in ("0.0.0.0", "::", ""):
        return sorted({socket.gethostname().lower(), socket.getfqdn().lower()})
    return [host]


@click.command()
@click.option("--gateway", "gateway_url", default=None,
              help="The gateway to read runs through [default: the group's --gateway].")
@click.option("--host", default="127.0.0.1", show_default=True,
              help="Address to listen on (not loopback: needs OPENFAAS_PASSWORD).")
@click.option("--port", default=8090, show_default=True, type=click.IntRange(0, 65535),
              help="0 picks a free port.")
@click.option("--p2p-runs", "p2p_dir", type=click.Path(file_okay=False), default=None,
              help="Where p2p metrics directories are [default: the cache's p2p-runs/].")
@click.option("--results", "results", multiple=True, type=click.Path(dir_okay=False),
              help="A benchmark results file (repeatable) [default: "
                   "results/bench-suite.jsonl].")
@pass_ctx
@friendly
def dashboard(c: Ctx, gateway_url: str | None, host: str, port: int, p2p_dir: str | None,
              results: tuple[str, ...]) -> None:
    """Serve the live dashboard for a gateway (runs read through it, never its store)."""
    from emnist.ui.server import Dashboard, serve
    from emnist.ui.sources import default_bench_files, default_p2p_dir

    url = (gateway_url or c.gateway).rstrip("/")
    app = Dashboard(url, auth=auth_from_env(), p2p_dir=p2p_dir or default_p2p_dir(),
                    bench_files=list(results) or default_bench_files(),
                    hosts=_own_names(host))
    try:
        serve(app, host, port, on_ready=lambda u: click.echo(
            f"dashboard for {url} on {u}/ui/ (Ctrl-C stops it)", err=True))
    except KeyboardInterrupt:
        pass
