"""emnist: train neural networks on OpenFaaS functions, locally or on Kubernetes.

Exit codes: 0 success, 1 failure (one line on stderr; --debug for a traceback), 2 usage.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from functools import wraps
from pathlib import Path
from typing import Any

import click

from emnist.bench.results import WORKER_COLUMNS, format_table
from emnist.cluster import local
from emnist.gateway.client import GatewayClient, GatewayError
from emnist.runner import TRAIN, RunError, resume, start_run, status, wait_replicas, watch
from emnist.store import StoreError

DEFAULT_GATEWAY = "http://127.0.0.1:8080"
DEFAULT_STORE = "memcached://127.0.0.1:11211"
EXPECTED = (GatewayError, RunError, StoreError, local.LocalStackError, OSError, ValueError)


class Ctx:
    def __init__(self, gateway: str, debug: bool) -> None:
        self.gateway, self.debug = gateway, debug

    def client(self) -> GatewayClient:
        password = os.environ.get("OPENFAAS_PASSWORD")
        return GatewayClient(self.gateway, auth=("admin", password) if password else None)


pass_ctx = click.make_pass_decorator(Ctx)


def friendly(fn):
    """One stderr line per expected failure, exit 1; the traceback only with --debug."""
    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except EXPECTED as e:
            if click.get_current_context().find_object(Ctx).debug:
                raise
            click.echo(f"Error: {e}", err=True)
            sys.exit(1)
    return wrapper


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--gateway", envvar="OPENFAAS_URL", default=DEFAULT_GATEWAY, show_default=True,
              help="OpenFaaS gateway URL (env OPENFAAS_URL).")
@click.option("--debug", is_flag=True, help="Show tracebacks.")
@click.version_option(package_name="emnist")
@click.pass_context
def main(ctx: click.Context, gateway: str, debug: bool) -> None:
    """Serverless distributed training (Downpour SGD) on OpenFaaS."""
    ctx.obj = Ctx(gateway.rstrip("/"), debug)


# -- the local stack ---------------------------------------------------------------------------
def _stack_path(stack: str) -> Path:
    path = Path(stack).resolve()
    if not path.exists():
        raise click.BadParameter(f"{stack} not found", param_hint="--stack")
    return path


def bring_up(c: Ctx, stack: str, store: str, replicas: tuple[str, ...]) -> bool:
    """Start what is missing; True when this call started the gateway."""
    msg = local.ensure_memcached(store)
    if msg:
        click.echo(msg, err=True)
    if local.gateway_alive(c.gateway):
        return False
    host, _, port = c.gateway.split("://", 1)[-1].partition(":")
    if host not in ("127.0.0.1", "localhost"):
        raise local.LocalStackError(f"no gateway answers at {c.gateway} (not a local address)")
    info = local.start_gateway(_stack_path(stack), int(port or 8080),
                               {"STORE_URL": store}, list(replicas))
    click.echo(f"local gateway on {info['url']} (pid {info['pid']}); `emnist down` stops it",
               err=True)
    return True


STACK_OPT = click.option("--stack", "-f", default="emnist.yml", show_default=True,
                         help="OpenFaaS stack file.")
STORE_OPT = click.option("--store", envvar="STORE_URL", default=DEFAULT_STORE, show_default=True,
                         help="Parameter store URL (env STORE_URL).")


@main.command()
@STACK_OPT
@STORE_OPT
@click.option("--replicas", multiple=True, metavar="NAME=N", help="Initial replicas.")
@pass_ctx
@friendly
def up(c: Ctx, stack: str, store: str, replicas: tuple[str, ...]) -> None:
    """Start a local memcached and the local OpenFaaS gateway."""
    bring_up(c, stack, store, replicas)
    for fn in c.client().list_functions():
        click.echo(f"{fn['name']}: {fn.get('availableReplicas', 0)}/{fn['replicas']} replicas")


@main.command()
@friendly
def down() -> None:
    """Stop the local gateway, its replicas and the memcached `up` started."""
    for line in local.stop_all() or ["nothing was running"]:
        click.echo(line)


# -- functions ---------------------------------------------------------------------------------
@main.command()
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
    gw = c.client()
    if is_async:
        click.echo(f"accepted, call id {gw.invoke_async(name, data)}")
        return
    resp = gw.invoke(name, data, method=method.upper(), check=False)
    click.echo(resp.text)
    if resp.status_code >= 400:
        sys.exit(1)


@main.command()
@click.argument("name")
@click.option("--replicas", "-r", type=click.IntRange(0), required=True)
@click.option("--wait/--no-wait", default=True, help="Wait until the replicas are available.")
@click.option("--kubectl/--no-kubectl", "use_kubectl", default=None,
              help="Scale the Deployment with kubectl (default: only above 5 replicas on a "
                   "real OpenFaaS, whose scale endpoint stops at 5).")
@click.option("--namespace", default="openfaas-fn", show_default=True,
              help="The functions' namespace (for kubectl).")
@click.option("--timeout", type=float, default=120, show_default=True,
              help="Seconds to wait for the replicas.")
@pass_ctx
@friendly
def scale(c: Ctx, name: str, replicas: int, wait: bool, use_kubectl: bool | None,
          namespace: str, timeout: float) -> None:
    """Set a function's replica count (gateway scale endpoint; kubectl above 5 on OpenFaaS)."""
    from emnist.cluster import k8s
    gw = c.client()
    try:
        via = k8s.scale_function(gw, name, replicas, use_kubectl=use_kubectl,
                                 namespace=namespace, echo=lambda m: click.echo(m, err=True))
    except k8s.KubectlError as e:
        raise click.ClickException(str(e)) from e
    if wait:
        wait_replicas(gw, name, replicas, timeout=timeout)
    click.echo(f"{name}: {replicas} replicas (via {via})")


LOG_COLUMNS = WORKER_COLUMNS + [("run_id", "run", ""), ("pod", "pod", ""), ("node", "node", "")]


@main.command()
@click.argument("name", default=TRAIN)
@click.option("--tail", type=int, default=None, help="Only the last N lines per replica.")
@click.option("--raw", is_flag=True, help="Print the log lines instead of the results table.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write results here.")
@click.option("--csv", "csv_out", type=click.Path(dir_okay=False), help="Write results here.")
@click.option("--kubectl/--no-kubectl", "use_kubectl", default=None,
              help="Read each pod's logs with kubectl (default: only when the gateway has no "
                   "/system/logs, 404/501).")
@click.option("--namespace", default="openfaas-fn", show_default=True,
              help="The functions' namespace (for kubectl).")
@pass_ctx
@friendly
def logs(c: Ctx, name: str, tail: int | None, raw: bool, json_out: str | None,
         csv_out: str | None, use_kubectl: bool | None, namespace: str) -> None:
    """Collect every replica's logs and print the workers' results, with pod and node."""
    from emnist.bench.suite import worker_results
    from emnist.cluster import k8s
    try:
        lines, source = k8s.collect_logs(c.client(), name, tail=tail, use_kubectl=use_kubectl,
                                         namespace=namespace)
    except k8s.KubectlError as e:
        raise click.ClickException(str(e)) from e
    if source == "kubectl":
        click.echo(f"(logs read with kubectl logs, namespace {namespace})", err=True)
    if raw:
        for ln in lines:
            click.echo(f"{ln.get('timestamp', '')} {ln.get('instance', '')} {ln.get('text', '')}")
        return
    rows = worker_results(lines)
    click.echo(format_table(rows, LOG_COLUMNS) if rows else "no worker results in the logs")
    _write_rows(rows, json_out, csv_out, [k for k, _, _ in LOG_COLUMNS])


def write_json(path: str | None, records: Any) -> None:
    """``--json FILE`` outputs: the records as indented JSON (parent dirs made)."""
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(json.dumps(records, indent=1))


def _write_rows(rows: list[dict[str, Any]], json_out: str | None, csv_out: str | None,
                keys: list[str]) -> None:
    write_json(json_out, rows)
    if csv_out:
        with open(csv_out, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=keys, extrasaction="ignore")
            w.writeheader()
            w.writerows(rows)


# -- training ----------------------------------------------------------------------------------
TRAIN_OPTIONS = [
    ("--workers", "number_of_workers", int, "Workers (also the emnist-train replica count)."),
    ("--dataset", "dataset", str, "fashion-mnist, mnist, emnist-bymerge, ..., synthetic."),
    ("--target-accuracy", "target_accuracy", float, "Stop when test accuracy reaches this."),
    ("--batch-size", "batch_size", int, "Minibatch size."),
    ("--n-fetch", "n_fetch", int, "Fetch parameters every N minibatches."),
    ("--n-push", "n_push", int, "Push accumulated updates every N minibatches."),
    ("--iterations", "iterations", int, "Passes over each worker's shard, at most."),
    ("--alpha", "alpha", float, "Learning rate."),
    ("--hidden-size", "hidden_size", int, "Hidden units."),
    ("--dropout", "dropout_percent", float, "Dropout fraction of hidden units."),
    ("--seed", "seed", int, "Seed for init, shards and dropout."),
    ("--dataset-dir", "dataset_dir", str, "Where the dataset files are."),
    ("--update", "update", str, "atomic (default) or overwrite (the original's lossy push)."),
    ("--execution-type", "execution_type", click.Choice(["1", "2", "3"]),
     "1: one function does everything; 2: one invocation per pass; 3: setup + looping trains."),
    ("--algorithm", "algorithm", click.Choice(["downpour", "averaging"]),
     "Asynchronous Downpour SGD or synchronous parameter averaging."),
    ("--average-every", "average_every", int, "Averaging: minibatches between rounds."),
    ("--barrier-timeout", "barrier_timeout", float, "Averaging: seconds to wait at a round."),
    ("--checkpoint-url", "checkpoint_url", str, "Checkpoint directory or redis:// URL."),
    ("--checkpoint-every", "checkpoint_every", int, "Passes between checkpoints."),
    ("--max-seconds", "max_seconds", float, "Wall-clock limit (0: none)."),
    ("--patience", "patience", int, "Early stopping on validation loss (0: off)."),
    ("--lease-seconds", "lease_seconds", float, "A worker silent this long is taken over."),
    ("--local-store", "local_store_url", str, "Node-local tier URL (memcached://... or local://)."),
    ("--push-top-k", "push_top_k", int, "Sparse pushes: at most K chunks per push."),
    ("--push-threshold", "push_threshold", float, "Sparse pushes: chunk delta RMS to send."),
    ("--chunk-bytes", "chunk_bytes", int, "Parameter chunk size in the store."),
]


def train_options(fn):
    for flag, dest, typ, help_ in reversed(TRAIN_OPTIONS):
        fn = click.option(flag, dest, type=typ, default=None, help=help_)(fn)
    return fn


def _config(kwargs: dict[str, Any], store: str) -> dict[str, Any]:
    out = {k: v for k, v in kwargs.items() if v is not None}
    if "execution_type" in out:
        out["execution_type"] = int(out["execution_type"])
    return {**out, "store_url": store}


def run_training(c: Ctx, config: dict[str, Any], *, stack: str, store: str, timeout: float,
                 progress: bool = True, down: bool = False):
    """Up (if local), scale emnist-train to the worker count, start, watch, return the outcome.

    With ``down``, stop the local stack afterwards if this call started it. A config with
    ``resume`` relaunches that run's unfinished workers instead of starting a new run.
    """
    started = bring_up(c, stack, store, ())
    try:
        return _run(c, config, store=store, timeout=timeout, progress=progress)
    finally:
        if down and started:
            local.stop_all()


def _run(c: Ctx, config: dict[str, Any], *, store: str, timeout: float, progress: bool):
    gw = c.client()
    workers = config.get("number_of_workers")
    if workers:
        gw.scale(TRAIN, workers)
        wait_replicas(gw, TRAIN, workers)
    if "resume" in config:
        state, invoked = resume(gw, config["resume"], store, config.get("checkpoint_url"))
    else:
        state, invoked = start_run(gw, config)
    if not progress:
        return watch(gw, state, invoked, timeout=timeout, store_url=store)
    total = state["config"]["iterations"]
    label = f"run {state['run_id']} ({state['workers']} workers)"
    with click.progressbar(length=total, label=label, show_eta=False,
                           item_show_func=lambda s: s, file=sys.stderr) as bar:
        seen = [0]

        def on_status(st: dict[str, Any]) -> None:
            prog = [p for p in st["progress"] if p]
            it = max((p["iteration"] for p in prog), default=0)
            bar.update(it - seen[0], "  ".join(
                f"w{p['worker_id']} it {p['iteration']} acc {p['accuracy']:.3f}" for p in prog))
            seen[0] = it

        return watch(gw, state, invoked, timeout=timeout, store_url=store, on_status=on_status)


@main.command()
@train_options
@STACK_OPT
@STORE_OPT
@click.option("--timeout", type=float, default=1800, show_default=True, help="Seconds to wait.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write results here.")
@click.option("--down", is_flag=True, help="Stop the local stack afterwards if this started it.")
@click.option("--resume", "resume_id", metavar="RUN_ID",
              help="Resume a run (restoring it from its checkpoint if the store lost it).")
@pass_ctx
@friendly
def train(c: Ctx, stack: str, store: str, timeout: float, json_out: str | None, down: bool,
          resume_id: str | None, **kw) -> None:
    """Run the main job: local stack up, setup, N workers, results table."""
    config = _config(kw, store)
    if resume_id:
        config = {"resume": resume_id, "checkpoint_url": kw.get("checkpoint_url")}
    out = run_training(c, config, stack=stack, store=store, timeout=timeout, down=down)
    rows = sorted(out.results, key=lambda r: r["worker_id"])
    click.echo(format_table(rows, WORKER_COLUMNS))
    verdict = "reached" if out.reached else "did NOT reach"
    click.echo(f"run {out.run_id}: {verdict} target accuracy {out.target} in "
               f"{out.seconds:.2f}s from setup to the last worker")
    for line in out.recoveries:
        click.echo(f"recovery: {line}", err=True)
    write_json(json_out, rows)
    if not out.reached:
        sys.exit(1)


@main.command("status")
@click.argument("run_id")
@STORE_OPT
@pass_ctx
@friendly
def status_cmd(c: Ctx, run_id: str, store: str) -> None:
    """Per-worker progress of a run (through emnist-setup)."""
    st = status(c.client(), run_id, store)
    rows = []
    for w, (p, r) in enumerate(zip(st["progress"], st["results"])):
        row = {**(p or {}), **(r or {}), "worker_id": w}
        if p and p.get("heartbeat"):
            row["silent_s"] = st["now"] - p["heartbeat"]
        rows.append(row)
    click.echo(format_table(rows, [("worker_id", "worker", ""), ("iteration", "iteration", ""),
                                   ("accuracy", "accuracy", ".4f"), ("done", "done", ""),
                                   ("silent_s", "last heartbeat (s ago)", ".1f"),
                                   ("invocations", "invocations", ""),
                                   ("stop_reason", "stopped by", ""),
                                   ("hostname", "name", "")]))


@main.group()
def bench() -> None:
    """Benchmarks (results written to files, never timed tests)."""


@bench.command("store")
@click.option("--store", "urls", multiple=True,
              help="Store URL to measure (repeatable); default: local memcached (text, and "
                   "binary if pylibmc is installed) and Redis.")
@click.option("--chunk-bytes", default="65536,262144,393216,524288", show_default=True,
              help="Comma-separated chunk sizes.")
@click.option("--scale", "scales", default="1,10", show_default=True,
              help="Vector sizes as multiples of the 784-100-47 model (333 KB).")
@click.option("--reps", type=click.IntRange(10), default=300, show_default=True)
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write records here.")
@friendly
def bench_store_cmd(urls: tuple[str, ...], chunk_bytes: str, scales: str, reps: int,
                    json_out: str | None) -> None:
    """Fetch and atomic-push latency and MB/s per backend, against raw loopback TCP."""
    from emnist.bench.store import COLUMNS, REFERENCE, bench_store, default_urls
    chunks = [int(x) for x in chunk_bytes.split(",") if x.strip()]
    vectors = [int(float(x) * REFERENCE) for x in scales.split(",") if x.strip()]
    records = bench_store(list(urls) or default_urls(), chunks, vectors, reps,
                          echo=lambda m: click.echo(m, err=True))
    click.echo(format_table(records, COLUMNS))
    write_json(json_out, records)


@bench.command("faults")
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True)
@click.option("--checkpoint-dir", default=None, help="Default: $EMNIST_HOME/checkpoints.")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write records here.")
@STACK_OPT
@STORE_OPT
@pass_ctx
@friendly
def bench_faults_cmd(c: Ctx, rounds: int, checkpoint_dir: str | None, json_out: str | None,
                     stack: str, store: str) -> None:
    """Time to 0.84 per execution type x algorithm; cost of a SIGKILL and a memcached restart."""
    from emnist.bench.faults import COLUMNS, bench_faults, restart_memcached
    bring_up(c, stack, store, ())
    pidfile = local.home() / "memcached.pid"
    if not pidfile.exists():
        raise local.LocalStackError("bench faults restarts the memcached `emnist up` started; "
                                    "stop yours (or `emnist down`) so `up` starts its own")
    restart = restart_memcached(pidfile, lambda: local.ensure_memcached(store))
    records = bench_faults(c.client(), store, rounds,
                           checkpoint_dir or str(local.home() / "checkpoints"), restart,
                           echo=lambda m: click.echo(m, err=True))
    click.echo(format_table(records, COLUMNS))
    write_json(json_out, records)


@bench.command("train")
@click.option("--workers", "worker_counts", default="1,2", show_default=True,
              help="Comma-separated worker counts for the emnist runs.")
@click.option("--target-accuracy", type=float, default=0.85, show_default=True)
@click.option("--dataset", default="fashion-mnist", show_default=True)
@click.option("--n-fetch", type=int, default=10, show_default=True)
@click.option("--n-push", type=int, default=10, show_default=True)
@click.option("--rounds", type=click.IntRange(1), default=3, show_default=True,
              help="Timed runs per configuration (the median is reported).")
@click.option("--json", "json_out", type=click.Path(dir_okay=False), help="Write records here.")
@STACK_OPT
@STORE_OPT
@pass_ctx
@friendly
def bench_train(c: Ctx, worker_counts: str, target_accuracy: float, dataset: str, n_fetch: int,
                n_push: int, rounds: int, json_out: str | None, stack: str, store: str) -> None:
    """A plain numpy loop against `emnist train` with 1..N workers, same model and data."""
    from emnist.bench.train import bench_train as run_bench
    counts = [int(x) for x in worker_counts.split(",") if x.strip()]
    records = run_bench(lambda cfg: run_training(c, cfg, stack=stack, store=store, timeout=600,
                                                 progress=False),
                        counts, target_accuracy, dataset, n_fetch, n_push, store, rounds,
                        echo=lambda m: click.echo(m, err=True))
    from emnist.bench.train import COLUMNS
    click.echo(format_table(records, COLUMNS))
    write_json(json_out, records)


# Commands kept in their own modules: bench run/report and build/deploy attach themselves to
# the groups above when imported; the p2p groups are added here.
from emnist.bench import commands as _bench_commands  # noqa: E402,F401,I001
from emnist.cluster import commands as _cluster_commands  # noqa: E402,F401,I001
from emnist.p2p.commands import data, p2p  # noqa: E402,I001

main.add_command(data)
main.add_command(p2p)
