"""emnist: train neural networks on OpenFaaS functions, locally or on Kubernetes.

The click group, and the one place where the commands are registered. Each command group
lives in its own module (stack, functions, train, bench, deploy, p2p, data) and imports only
emnist.cli.base (and its siblings), never this module, so every one imports on its own.

Exit codes: 0 success, 1 failure (one line on stderr; --debug for a traceback), 2 usage.
"""

from __future__ import annotations

import click

from emnist.cli import bench, dashboard, data, deploy, functions, p2p, sim, stack, train
from emnist.cli.base import DEFAULT_GATEWAY, Ctx

__all__ = ["main"]


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--gateway", envvar="OPENFAAS_URL", default=DEFAULT_GATEWAY, show_default=True,
              help="OpenFaaS gateway URL (env OPENFAAS_URL).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="emnist")
@click.pass_context
def main(ctx: click.Context, gateway: str, debug: bool) -> None:
    """Serverless distributed training (Downpour SGD) on OpenFaaS."""
    ctx.obj = Ctx(gateway.rstrip("/"), debug)


for command in (stack.up, stack.down, functions.invoke, functions.scale, functions.logs,
                train.train, train.status_cmd, deploy.build, deploy.deploy, bench.bench,
                p2p.p2p, data.data, dashboard.dashboard, sim.sim):
    main.add_command(command)
