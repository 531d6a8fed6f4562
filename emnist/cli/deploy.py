"""`emnist build` and `emnist deploy`: function images, and OpenFaaS on Kubernetes (or the
local stack)."""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import requests

from emnist.cli.base import Ctx, friendly, pass_ctx, stack_option, store_option
from emnist.cli.stack import STORE_KEY_SECRET, bring_up, print_functions
from emnist.cluster import baseimages, k8s, objectstore
from emnist.cluster import build as builder
from emnist.data.idx import DataError
from emnist.data.s3 import DEFAULT_ACCESS_SECRET, DEFAULT_SECRET_SECRET, parse_s3_url
from emnist.gateway.client import GatewayClient, GatewayError, deploy_request
from emnist.gateway.stack import load_stack
from emnist.paths import cache_dir

PASSWORD_ENV = "EMNIST_STORE_PASSWORD"
S3_ENDPOINT_ENV = "EMNIST_S3_ENDPOINT"  # the functions' endpoint (never the laptop's)
DATA_URL_ENV = "EMNIST_DATA_URL"  # the same name `emnist data prepare --data-url` reads
ACCESS_ENV, SECRET_ENV = "EMNIST_S3_ACCESS_KEY", "EMNIST_S3_SECRET_KEY"
PLACEHOLDER_REGISTRY = "docker.io/emnist/"  # emnist.yml's ${REGISTRY:-docker.io/emnist}

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
@click.option("--podman", is_flag=True,
              help="Build with podman (faas-cli's `docker` is podman; the shipped "
                   "containers.conf unless CONTAINERS_CONF is set).")
@click.option("--base-images", is_flag=True,
              help="With --podman: make local stand-ins of the template's base images from "
                   "Debian's packages when they are missing (offline machines; cached).")
@click.option("--torch", "with_torch", is_flag=True,
              help=f"Install torch's CPU build ({builder.TORCH_VERSION}) in the images, for "
                   "MODEL=lenet5 etc. (setup and grad count a torch model's parameters, so "
                   "all three need it). The wheel comes from the cache, else pip download "
                   "(pip's config, then PyTorch's CPU index). faas-cli by hand: copy the "
                   "wheel into template/python3-http/wheels/ and pass --build-arg "
                   f"ADDITIONAL_PIP={builder.WHEELS_IN_IMAGE}/<wheel file>.")
@click.option("--wheel", "wheels", multiple=True, type=click.Path(dir_okay=False),
              metavar="FILE", help="Install this wheel file in the images too (the same way).")
@click.option("--no-cache", is_flag=True, help="Build without the builder's layer cache.")
@pass_ctx
@friendly
def build(c: Ctx, stack: str, shrinkwrap: bool, push: bool, registry: str | None,
          tag: str | None, only: tuple[str, ...], podman: bool, base_images: bool,
          with_torch: bool, wheels: tuple[str, ...], no_cache: bool) -> None:
    """Build the function images (faas-cli build), or only their contexts (--shrinkwrap)."""
    if shrinkwrap and push:
        raise click.UsageError("--push needs images: drop --shrinkwrap")
    if base_images and not podman:
        raise click.UsageError("--base-images needs --podman")
    env = builder.image_env(os.environ, registry, tag)
    extra = builder.check_wheels(list(wheels))
    if with_torch:
        extra.append(builder.torch_wheel(env, echo=lambda m: click.echo(m, err=True)))
    if podman and not shrinkwrap:
        env = baseimages.container_env(env, cache_dir(env) / "bin")
        if base_images:
            for line in baseimages.ensure_base_images(env, echo=lambda m: click.echo(m, err=True)):
                click.echo(line, err=True)
    if shrinkwrap:
        for ctx in builder.shrinkwrap(stack, env=env, only=list(only) or None, wheels=extra):
            args = "".join(f" --build-arg {k}={v}" for k, v in sorted(ctx.build_args.items()))
            click.echo(f"{ctx.function}: shrink-wrapped to {ctx.path} (image {ctx.image})"
                       + (f", build with{args}" if args else ""))
        return
    root = Path(stack).resolve().parent
    # faas-cli keeps the last of repeated --filter flags: several names go as one --regex
    filters = (["--filter", only[0]] if len(only) == 1
               else ["--regex", "^(" + "|".join(map(re.escape, only)) + ")$"] if only else [])
    echo = lambda m: click.echo(m, err=True)  # noqa: E731
    args = ["build", "-f", str(Path(stack).resolve()), *filters]
    if no_cache:
        args.append("--no-cache")
    if extra:
        args += ["--build-arg", builder.faas_pip_arg(stack, env, list(only) or None, extra)]
    with builder.staged_wheels(stack, env, list(only) or None, extra):
        builder.faas_cli(args, env=env, cwd=root, echo=echo)
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
@click.option("--s3/--no-s3", "use_s3", default=True, show_default=True,
              help="Data sets in S3: MinIO in the cluster (or --s3-endpoint), its endpoint, "
                   f"the secret {objectstore.KEYS_SECRET} and --data-url passed to the "
                   "functions. --no-s3: no MinIO, data_location as the stack says.")
@click.option("--s3-endpoint", envvar=S3_ENDPOINT_ENV, default=None, metavar="URL",
              help="An external S3-compatible endpoint for the functions instead of MinIO "
                   f"(env {S3_ENDPOINT_ENV}).")
@click.option("--data-url", envvar=DATA_URL_ENV, default=objectstore.DEFAULT_DATA_URL,
              show_default=True, metavar="S3URL",
              help=f"s3://bucket/prefix of the prepared sets (env {DATA_URL_ENV}); MinIO's "
                   "setup Job creates the bucket.")
@click.option("--s3-access-key", envvar=ACCESS_ENV, default=None,
              help=f"The functions' S3 access key (env {ACCESS_ENV}); default: generated for "
                   "MinIO when the secret does not exist yet.")
@click.option("--s3-secret-key", envvar=SECRET_ENV, default=None,
              help=f"The functions' S3 secret key (env {SECRET_ENV}: better than the flag, "
                   "which other users see in ps).")
@REGISTRY_OPT
@TAG_OPT
@click.option("--dry-run", is_flag=True,
              help="Print every manifest and gateway request; change nothing.")
@pass_ctx
@friendly
def deploy(c: Ctx, target: str, stack: str, store: str, namespace: str, manifests: str,
           store_password: str | None, store_password_file: str | None, skip_stores: bool,
           use_s3: bool, s3_endpoint: str | None, data_url: str, s3_access_key: str | None,
           s3_secret_key: str | None, registry: str | None, tag: str | None,
           dry_run: bool) -> None:
    """Deploy the stores (deploy/k8s) and the functions (like faas-cli deploy)."""
    if target == "local":
        if dry_run:
            click.echo(f"would start memcached for {store} if nothing answers there, and the "
                       f"local gateway for {stack} at {c.gateway} if none runs (= emnist up)")
            return
        bring_up(c, stack, store)
        print_functions(c)
        return
    plan = _s3_plan(use_s3, s3_endpoint, data_url, namespace)
    env = builder.image_env(os.environ, registry, tag)
    key_secret = env.get("STORE_KEY_SECRET") or STORE_KEY_SECRET
    env["STORE_KEY_SECRET"] = key_secret  # setup and train seal run documents with it
    if plan:
        env.update(objectstore.stack_env(plan, env))
    spec = load_stack(stack, env)
    placeholders = [fn.image for fn in spec.functions.values()
                    if fn.image.startswith(PLACEHOLDER_REGISTRY)]
    if placeholders and not dry_run:
        raise click.UsageError(
            f"no cluster can pull {', '.join(placeholders)} (the stack's placeholder "
            f"registry): push the images (emnist build --push --registry REG) and pass "
            f"--registry REG (or env REGISTRY)")
    password = _password(store_password, store_password_file)
    if password:
        try:
            k8s.store_secret(password)
        except ValueError as e:
            raise click.UsageError(str(e)) from None
    context = None
    if not dry_run and not skip_stores:  # kubectl is used: its cluster must answer first
        context = k8s.check_cluster()
        click.echo(f"kube context {context}: the cluster answers", err=True)
    objs: list[dict] = []
    notes: list[str] = []
    generated: list[str] = []  # said once kubectl has applied them
    if not skip_stores:
        if password is None and not dry_run and not _secret_exists(k8s.SECRET_NAME, namespace):
            password = secrets.token_urlsafe(24)
            generated.append(f"generated a store password into Secret {k8s.SECRET_NAME} in "
                             f"{namespace} (read it with kubectl get secret)")
        if password is None and dry_run:
            notes.append(f"# Secret {k8s.SECRET_NAME}: a random password unless it exists "
                         f"(or pass --store-password-file / {PASSWORD_ENV})")
        shown = password or ("<generated at deploy>" if dry_run else None)
        found = [m for m in k8s.load_manifests(manifests)
                 if (plan and plan.minio) or not objectstore.is_minio(m)]
        extra = _s3_secrets(plan, namespace, s3_access_key, s3_secret_key, dry_run,
                            notes, generated) if plan else []
        objs = k8s.render(found, namespace=namespace, password=shown, secrets=extra)
        if plan:
            objs = objectstore.configure(objs, plan)
        _validate(objs)
    requests_ = [deploy_request(fn) for fn in spec.functions.values()]
    rerun_job = ["delete", "job", objectstore.SETUP_JOB, "-n", namespace, "--ignore-not-found"]
    minio = any(objectstore.is_minio(m) for m in objs)
    if dry_run:
        for image in placeholders:
            click.echo(f"# note: {image} cannot be pulled by a cluster: pass --registry")
        if plan:
            click.echo(f"# functions: data_location {plan.data_url} at {plan.endpoint}, keys "
                       f"from the OpenFaaS secret {objectstore.KEYS_SECRET}")
        if objs:
            for note in notes:
                click.echo(note)
            if minio:
                click.echo(f"# kubectl {' '.join(rerun_job)}  (the setup Job runs again)")
            click.echo(f"# kubectl apply -f - ({len(objs)} objects)")
            click.echo(k8s.to_yaml([k8s.redact(m) for m in objs]))
        click.echo(f"# POST {c.gateway}/system/secrets {key_secret}: a random key unless the "
                   "secret exists")
        for body in requests_:
            click.echo(f"# PUT {c.gateway}/system/functions (then POST if 404)")
            click.echo(json.dumps(body, indent=2, sort_keys=True))
        click.echo(f"dry run: {len(objs)} Kubernetes objects and {len(requests_)} functions; "
                   "nothing was changed")
        return
    if minio:
        k8s.kubectl(rerun_job)
    if objs:
        _apply(objs, context)
        for line in generated:
            click.echo(line, err=True)
    gw = c.gw
    if ensure_gateway_secret(gw, key_secret, lambda: secrets.token_urlsafe(32)):
        click.echo(f"created the OpenFaaS secret {key_secret} (a random key that seals run "
                   f"documents) through {c.gateway}", err=True)
    for body in requests_:
        gw.deploy(body)
        click.echo(f"deployed {body['service']} ({body['image']}) to {c.gateway}")
    if plan and plan.minio and not skip_stores:
        click.echo(f"data: kubectl -n {namespace} port-forward svc/minio {objectstore.MINIO_PORT}"
                   f" & emnist data prepare --data-url {plan.data_url} --s3-endpoint "
                   f"http://127.0.0.1:{objectstore.MINIO_PORT} (keys: docs/deploy.md)")
    if context is not None:
        _check_queue(spec)
    click.echo("next: emnist scale emnist-train --replicas N; emnist train --workers N")


def _check_queue(spec: Any) -> None:
    """Say when the cluster's queue-worker replicas are fewer than the train workers the
    stack asks for (com.openfaas.scale.min): OpenFaaS CE would run them one at a time."""
    train = spec.functions.get("emnist-train")
    wanted = str((train.labels if train else {}).get("com.openfaas.scale.min", ""))
    have = k8s.queue_worker_replicas()
    if have is None:
        click.echo("note: could not read the queue-worker Deployment in openfaas: check that "
                   "its replicas are at least the train workers (docs/deploy.md)", err=True)
    elif wanted.isdigit() and have < int(wanted):
        click.echo(f"note: the queue-worker Deployment runs {have} replica(s) for {wanted} "
                   "train workers: OpenFaaS CE runs one call per queue-worker, so they would "
                   "train one after another; `kubectl scale deployment queue-worker -n "
                   f"openfaas --replicas {wanted}` (docs/deploy.md)", err=True)


def _apply(objs: list[dict], context: str | None) -> None:
    """Apply, then list what kubectl said it applied (its own lines), and fail before the
    functions are deployed if it did not name every object sent: a deploy reports only what
    happened, never the plan."""
    out = k8s.apply(objs)
    applied = k8s.applied_lines(out)
    click.echo(f"applied to kube context {context} ({len(applied)} objects):")
    for ref, action in applied:
        click.echo(f"  {ref} {action}")
    missing = k8s.unreported(objs, applied)
    if missing:
        raise k8s.KubectlError(f"kubectl apply did not report {len(missing)} of the "
                               f"{len(objs)} objects sent ({', '.join(missing)}); the "
                               "functions were not deployed")


def ensure_gateway_secret(gw: GatewayClient, name: str, make: Callable[[], str]) -> bool:
    """Create the OpenFaaS secret ``name`` with ``make()`` through the gateway's
    ``/system/secrets`` (as ``faas-cli secret create`` does) unless it exists; True when
    created. Never overwrites: a key that sealed stored documents must outlive redeploys."""
    def call(method: str, **kwargs: Any) -> Any:
        try:
            resp = gw.session.request(method, gw.url + "/system/secrets", auth=gw.auth,
                                      timeout=gw.timeout, **kwargs)
        except requests.ConnectionError as e:
            raise GatewayError(0, f"the gateway at {gw.url} is not reachable "
                                  f"({type(e).__name__})") from e
        return resp

    resp = call("GET", params={"namespace": k8s.FUNCTIONS_NAMESPACE})
    if not resp.ok:
        raise GatewayError(resp.status_code, f"listing secrets: {resp.text.strip()}")
    if any(item.get("name") == name for item in resp.json() or []):
        return False
    resp = call("POST", json={"name": name, "value": make(),
                              "namespace": k8s.FUNCTIONS_NAMESPACE})
    if resp.status_code == 409:  # created meanwhile: theirs is kept
        return False
    if not resp.ok:
        raise GatewayError(resp.status_code, f"creating secret {name}: {resp.text.strip()}")
    return True


def _s3_plan(use_s3: bool, endpoint: str | None, data_url: str,
             namespace: str) -> objectstore.S3Plan | None:
    if not use_s3:
        if endpoint:
            raise click.UsageError("--s3-endpoint needs --s3 (drop --no-s3)")
        return None
    if not data_url.startswith("s3://"):
        raise click.UsageError(f"--data-url must be s3://bucket/prefix (or --no-s3), not "
                               f"{data_url!r}")
    try:
        parse_s3_url(data_url)
    except DataError as e:
        raise click.UsageError(f"--data-url: {e}") from None
    if endpoint and not endpoint.startswith(("http://", "https://")):
        raise click.UsageError("--s3-endpoint must be an http(s):// URL")
    return objectstore.S3Plan(data_url.rstrip("/"), endpoint or
                              objectstore.minio_endpoint(namespace), minio=not endpoint)


def _s3_secrets(plan: objectstore.S3Plan, namespace: str, access: str | None,
                secret: str | None, dry_run: bool, notes: list[str],
                generated: list[str]) -> list[dict]:
    """The MinIO root Secret and the functions' keys (generated when absent), or nothing for
    what already exists. Keys live in the functions' namespace (OpenFaaS mounts them from
    there) and, for MinIO's setup Job, in the stores' namespace too."""
    if bool(access) != bool(secret):
        raise click.UsageError("give both --s3-access-key and --s3-secret-key, or neither")
    fns, out = k8s.FUNCTIONS_NAMESPACE, []
    placeholder = ("<generated at deploy>",) * 2
    if plan.minio:
        if dry_run:
            notes.append(f"# Secret {objectstore.ROOT_SECRET}: generated unless it exists")
            out.append(objectstore.root_secret(*placeholder, namespace))
        elif not _secret_exists(objectstore.ROOT_SECRET, namespace):
            out.append(objectstore.root_secret(*objectstore.generate_root(), namespace))
            generated.append(f"generated MinIO's administrator into Secret "
                             f"{objectstore.ROOT_SECRET} in {namespace}")
    keys: tuple[str, str] | None = (access, secret) if access and secret else None
    if keys is None and dry_run:
        if plan.minio:
            notes.append(f"# Secret {objectstore.KEYS_SECRET}: generated unless it exists")
            keys = placeholder
        else:
            notes.append(f"# Secret {objectstore.KEYS_SECRET} must exist in {fns} (or pass "
                         f"--s3-access-key/--s3-secret-key)")
    elif keys is None and not _secret_exists(objectstore.KEYS_SECRET, fns):
        if not plan.minio:
            raise click.UsageError(
                f"the functions' S3 keys: pass --s3-access-key/--s3-secret-key (env {ACCESS_ENV}"
                f"/{SECRET_ENV}) or create the Secret {objectstore.KEYS_SECRET} in {fns} with "
                f"the keys {DEFAULT_ACCESS_SECRET} and {DEFAULT_SECRET_SECRET}")
        keys = objectstore.generate_keys()
        generated.append(f"generated the functions' S3 keys into Secret "
                         f"{objectstore.KEYS_SECRET} in {fns}")
    if keys:
        out.append(objectstore.keys_secret(*keys, fns))
        if plan.minio and namespace != fns:
            out.append(objectstore.keys_secret(*keys, namespace))
    return out


def _secret_exists(name: str, namespace: str) -> bool:
    try:
        k8s.kubectl(["get", "secret", name, "-n", namespace, "-o", "name"])
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
