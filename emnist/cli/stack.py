"""`emnist up` and `emnist down`: the local stack (memcached + the local gateway).

The CLI manages a stack only on this machine and only when no gateway answers: against a
running gateway, local or remote, it talks to the gateway alone (its functions use the store
their deployment configures), so it never needs to reach a cluster's store.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

import click

from emnist.cli.base import Ctx, friendly, pass_ctx, stack_option, store_option
from emnist.cluster import local
from emnist.gateway.callbacks import ENV as CALLBACK_ENV
from emnist.gateway.secretstore import ensure_secret
from emnist.paths import cache_dir

# Operator allow-lists (emnist.policy) the local stack's functions get through the stack
# file's ${VAR} substitution: where a request may name checkpoints, data and stores.
POLICY_VARS = {"checkpoint_roots": "CHECKPOINT_ROOTS", "data_roots": "DATA_ROOTS",
               "allowed_store_urls": "ALLOWED_STORE_URLS"}


def stack_path(stack: str) -> Path:
    path = Path(stack).resolve()
    if not path.exists():
        raise click.BadParameter(f"{stack} not found", param_hint="--stack")
    return path


def local_location(value: str) -> str:
    """A plain path as the local stack's replicas must see it (absolute); URLs unchanged."""
    return value if "://" in value else str(Path(value).expanduser().resolve())


def default_allowed() -> dict[str, list[str]]:
    """What the local stack allows without being told: the cache's checkpoints and p2p data."""
    home = cache_dir()
    return {"checkpoint_roots": [str(home / "checkpoints")],
            "data_roots": [str(home / "p2p-data")], "allowed_store_urls": []}


def policy_env(**given: Iterable[str]) -> dict[str, str]:
    """CHECKPOINT_ROOTS, DATA_ROOTS, ALLOWED_STORE_URLS for the local gateway: what the
    caller's environment already says, the defaults, and what is given (keyword per policy
    name; plain paths made absolute, empty items dropped)."""
    out = {}
    for key, var in POLICY_VARS.items():
        items = [r.strip() for r in os.environ.get(var, "").split(",") if r.strip()]
        for r in default_allowed()[key] + [local_location(g) for g in given.get(key, ()) if g]:
            if r not in items:
                items.append(r)
        out[var] = ",".join(items)
    return out


def callback_env(hosts: Iterable[str] = ()) -> dict[str, str]:
    """EMNIST_CALLBACK_HOSTS for the local gateway: the caller's environment's plus ``hosts``
    (empty unless asked: a request's X-Callback-Url may then name no host at all)."""
    items = os.environ.get(CALLBACK_ENV, "").replace(",", " ").split()
    items += [h.strip() for h in hosts if h.strip() and h.strip() not in items]
    return {CALLBACK_ENV: ",".join(items)}


STORE_KEY_SECRET = "emnist-store-key"  # the OpenFaaS secret whose value seals run documents


def store_key_env() -> dict[str, str]:
    """STORE_KEY_SECRET (the stack file lists it under setup's and train's ``secrets:`` and
    sets their ``store_key_secret``) and the gateway's state directory, after creating that
    secret there with a random key if it does not exist: the local stack always seals its run
    documents (emnist.store.signing), and keeps one key across restarts."""
    name = os.environ.get("STORE_KEY_SECRET") or STORE_KEY_SECRET
    state = os.environ.get("EMNIST_GATEWAY_STATE") or str(cache_dir() / "gateway")
    ensure_secret(Path(state) / "secrets", name, lambda: secrets.token_urlsafe(32).encode())
    return {"STORE_KEY_SECRET": name, "EMNIST_GATEWAY_STATE": state}


def bring_up(c: Ctx, stack: str, store: str, replicas: Iterable[str] = (),
             callback_hosts: Iterable[str] = (), *, gateway_hosts: Iterable[str] = (),
             runtime: str | None = None, container_user: str = "",
             **allowed: Iterable[str]) -> bool:
    """Start the local stack if no gateway answers; True when this call started it.

    Only then is memcached started (for a loopback ``store``) and the store given to the
    functions (STORE_URL into the stack file), with what requests may name besides:
    ``allowed`` is ``checkpoint_roots=``, ``data_roots=``, ``allowed_store_urls=``, and
    ``callback_hosts`` the hosts an async call's X-Callback-Url may name; ``gateway_hosts``
    the names the gateway answers to besides loopback (a gateway in front of it may address
    it by one). ``runtime`` (default ``$EMNIST_RUNTIME``, else ``process``): ``container``
    runs the replicas as containers of the built images, with the store in a container too.
    """
    if local.gateway_alive(c.gateway):
        if store_given():
            click.echo(f"note: --store is not used: the functions behind {c.gateway} use the "
                       "store their deployment configures", err=True)
        return False
    if not local.is_loopback(c.gateway):
        raise local.LocalStackError(f"no gateway answers at {c.gateway} (not a local "
                                    "address: start OpenFaaS there, or use --gateway)")
    path = stack_path(stack)
    unknown = set(allowed) - set(POLICY_VARS)
    if unknown:
        raise TypeError(f"bring_up: unknown policy names {sorted(unknown)}")
    port = urlsplit(c.gateway).port or 8080
    runtime = runtime or os.environ.get("EMNIST_RUNTIME") or "process"
    if runtime == "container":
        env = local.container_stack_env(path, port, store if store_given() else None,
                                        container_user, echo=lambda m: click.echo(m, err=True))
    else:
        msg = local.ensure_memcached(store)
        if msg:
            click.echo(msg, err=True)
        env = {"STORE_URL": store}
    env.update({**policy_env(**allowed), **callback_env(callback_hosts), **store_key_env()})
    info = local.start_gateway(path, port, env, list(replicas), allowed_hosts=gateway_hosts)
    click.echo(f"local gateway on {info['url']} (pid {info['pid']}); `emnist down` stops it",
               err=True)
    return True


def store_given() -> bool:
    """True when this command's ``--store`` was typed on the command line."""
    ctx = click.get_current_context(silent=True)
    return (ctx is not None and "store" in ctx.params
            and ctx.get_parameter_source("store") == click.core.ParameterSource.COMMANDLINE)


def print_functions(c: Ctx) -> None:
    for fn in c.gw.list_functions():
        click.echo(f"{fn['name']}: {fn.get('availableReplicas', 0)}/{fn['replicas']} replicas")


@click.command()
@stack_option
@store_option
@click.option("--replicas", multiple=True, metavar="NAME=N", help="Initial replicas.")
@click.option("--checkpoint-root", "checkpoint_roots", multiple=True, metavar="DIR|URL",
              help="Let requests name checkpoints under this (repeatable; always allowed: "
                   "the cache's checkpoints/).")
@click.option("--data-root", "data_roots", multiple=True, metavar="DIR|URL",
              help="Let requests name datasets and data under this (repeatable; always "
                   "allowed: the cache's p2p-data/).")
@click.option("--callback-host", "callback_hosts", multiple=True, metavar="HOST[:PORT]",
              help="Let async calls' X-Callback-Url name this host (repeatable; any port "
                   "unless given). None by default.")
@click.option("--allowed-host", "allowed_hosts", multiple=True, metavar="NAME",
              help="A Host name the gateway answers to besides loopback, e.g. the name an "
                   "OpenFaaS gateway in front of it uses (repeatable).")
@click.option("--runtime", type=click.Choice(["process", "container"]), envvar="EMNIST_RUNTIME",
              default="process", show_default=True,
              help="Replicas as processes of this Python (fast), or as podman containers of "
                   "the images `emnist build --podman` made, as OpenFaaS runs them (store and "
                   "gateway relay in containers too, on a network of their own).")
@click.option("--container-user", default="", metavar="UID[:GID]",
              help="container runtime: run replicas as this UID instead of the image's "
                   "user, as OpenShift assigns one.")
@pass_ctx
@friendly
def up(c: Ctx, stack: str, store: str, replicas: tuple[str, ...],
       checkpoint_roots: tuple[str, ...], data_roots: tuple[str, ...],
       callback_hosts: tuple[str, ...], allowed_hosts: tuple[str, ...], runtime: str,
       container_user: str) -> None:
    """Start a local memcached and the local OpenFaaS gateway (if no gateway answers)."""
    if not bring_up(c, stack, store, replicas, callback_hosts, gateway_hosts=allowed_hosts,
                    runtime=runtime, container_user=container_user,
                    checkpoint_roots=checkpoint_roots, data_roots=data_roots):
        click.echo(f"a gateway already answers at {c.gateway}: using it", err=True)
    print_functions(c)


@click.command()
@friendly
def down() -> None:
    """Stop the local gateway, its replicas and the memcached `up` started (nothing else)."""
    for line in local.stop_all() or ["nothing was running"]:
        click.echo(line)
