"""`emnist build` and `emnist deploy`: function images, and OpenFaaS on Kubernetes (or the
local stack)."""

from __future__ import annotations

import json
import os
import secrets
from pathlib import Path

import click

from emnist.cli.base import Ctx, friendly, pass_ctx, stack_option, store_option
from emnist.cli.stack import bring_up, print_functions
from emnist.cluster import build as builder
from emnist.cluster import k8s
from emnist.gateway.client import deploy_request
from emnist.gateway.stack import load_stack

PASSWORD_ENV = "EMNIST_STORE_PASSWORD"

REGISTRY_OPT = click.option("--registry", envvar="REGISTRY", default=None,
                            help="Image prefix, e.g. ghcr.io/you (env REGISTRY; the stack's "
                                 "${REGISTRY:-docker.io/emnist}).")
TAG_OPT = click.option("--tag", envvar="TAG", default=None, help="Image tag (env TAG; latest).")


@click.command()
@stack_option
@click.option("--shrinkwrap", is_flag=True,
              help="Only write build/<fn>/ contexts (no Docker, no faas-cli).")
@click.option("--push", is_flag=True, help="Push the images after building (faas-cli push).")
@REGISTRY_OPT
@TAG_OPT
@click.option("--filter", "only", multiple=True, metavar="NAME", help="Only these functions.")
@pass_ctx
@friendly
def build(c: Ctx, stack: str, shrinkwrap: bool, push: bool, registry: str | None,
          tag: str | None, only: tuple[str, ...]) -> None:
    """Build the function images (faas-cli build), or only their contexts (--shrinkwrap)."""
    if shrinkwrap and push:
        raise click.UsageError("--push needs images: drop --shrinkwrap")
    env = builder.image_env(os.environ, registry, tag)
    if shrinkwrap:
        for ctx in builder.shrinkwrap(stack, env=env, only=list(only) or None):
            click.echo(f"{ctx.function}: shrink-wrapped to {ctx.path} (image {ctx.image})")
        return
    root = Path(stack).resolve().parent
    filters = [arg for name in only for arg in ("--filter", name)]
    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    builder.faas_cli(["build", "-f", str(Path(stack).resolve()), *filters], env=env, cwd=root,
                     echo=echo)
    if push:
        builder.faas_cli(["push", "-f", str(Path(stack).resolve()), *filters], env=env,
                         cwd=root, echo=echo)
    images = [fn.image for fn in load_stack(stack, env).functions.values()
              if not only or fn.name in only]
    click.echo(("pushed " if push else "built ") + ", ".join(images))


def _password(value: str | None, path: str | None) -> str | None:
    if value and path:
        raise click.UsageError("give --store-password or --store-password-file, not both")
    if path:
        return Path(path).read_text().strip()
    return value or None


@click.command()
@click.option("--target", type=click.Choice(["k8s", "local"]), default="k8s", show_default=True,
              help="k8s: stores via kubectl + functions via the gateway; local: `emnist up`.")
@stack_option
@store_option
@click.option("--namespace", envvar="EMNIST_STORES_NAMESPACE",
              default=k8s.FUNCTIONS_NAMESPACE, show_default=True,
              help="Namespace of the stores (env EMNIST_STORES_NAMESPACE; the functions are "
                   "always in openfaas-fn).")
@click.option("--manifests", default="deploy/k8s", show_default=True,
              type=click.Path(file_okay=False), help="Directory of store manifests.")
@click.option("--store-password", envvar=PASSWORD_ENV, default=None,
              help=f"Redis password for the Secret (env {PASSWORD_ENV}).")
@click.option("--store-password-file", type=click.Path(exists=True, dir_okay=False),
              help="Read the Redis password from this file.")
@click.option("--skip-stores", is_flag=True, help="Deploy only the functions.")
@REGISTRY_OPT
@TAG_OPT
@click.option("--dry-run", is_flag=True,
              help="Print every manifest and gateway request; change nothing.")
@pass_ctx
@friendly
def deploy(c: Ctx, target: str, stack: str, store: str, namespace: str, manifests: str,
           store_password: str | None, store_password_file: str | None, skip_stores: bool,
           registry: str | None, tag: str | None, dry_run: bool) -> None:
    """Deploy the stores (deploy/k8s) and the functions (like faas-cli deploy)."""
    if target == "local":
        if dry_run:
            click.echo(f"would start memcached for {store} if nothing answers there, and the "
                       f"local gateway for {stack} at {c.gateway} if none runs (= emnist up)")
            return
        bring_up(c, stack, store)
        print_functions(c)
        return
    spec = load_stack(stack, builder.image_env(os.environ, registry, tag))
    password = _password(store_password, store_password_file)
    objs: list[dict] = []
    if not skip_stores:
        if password is None and not dry_run and not _secret_exists(namespace):
            password = secrets.token_urlsafe(24)
            click.echo(f"generated a store password into Secret {k8s.SECRET_NAME} in "
                       f"{namespace} (read it with kubectl get secret)", err=True)
        shown = password or ("<generated at deploy>" if dry_run else None)
        objs = k8s.render(k8s.load_manifests(manifests), namespace=namespace, password=shown)
        _validate(objs)
    requests_ = [deploy_request(fn) for fn in spec.functions.values()]
    if dry_run:
        if objs:
            if password is None:
                click.echo(f"# Secret {k8s.SECRET_NAME}: a random password unless it exists "
                           f"(or pass --store-password-file / {PASSWORD_ENV})")
            click.echo(f"# kubectl apply -f - ({len(objs)} objects)")
            click.echo(k8s.to_yaml([k8s.redact(m) for m in objs]))
        for body in requests_:
            click.echo(f"# PUT {c.gateway}/system/functions (then POST if 404)")
            click.echo(json.dumps(body, indent=2, sort_keys=True))
        click.echo(f"dry run: {len(objs)} Kubernetes objects and {len(requests_)} functions; "
                   "nothing was changed")
        return
    if objs:
        click.echo(k8s.apply(objs).rstrip())
    gw = c.gw
    for body in requests_:
        gw.deploy(body)
        click.echo(f"deployed {body['service']} ({body['image']}) to {c.gateway}")
    click.echo("next: emnist scale emnist-train --replicas N; emnist train --workers N")


def _secret_exists(namespace: str) -> bool:
    try:
        k8s.kubectl(["get", "secret", k8s.SECRET_NAME, "-n", namespace, "-o", "name"])
        return True
    except k8s.KubectlError as e:
        if "NotFound" in str(e) or "not found" in str(e):
            return False
        raise


def _validate(objs: list[dict]) -> None:
    """Schema-check every object when kubernetes-validate (the `k8s` extra) is installed."""
    try:
        import kubernetes_validate
    except ImportError:
        click.echo("note: install the `k8s` extra (kubernetes-validate) to schema-check the "
                   "manifests before applying them", err=True)
        return
    version = kubernetes_validate.latest_version()
    for m in objs:
        try:
            kubernetes_validate.validate(m, version, strict=True)
        except kubernetes_validate.ValidationError as e:
            raise k8s.KubectlError(f"{m['kind']} {m['metadata']['name']} is invalid for "
                                   f"Kubernetes {version}: {e.message}") from e
