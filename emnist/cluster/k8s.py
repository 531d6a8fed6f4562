"""Kubernetes: the store manifests in ``deploy/k8s/``, and a thin ``kubectl`` wrapper.

Manifests are plain YAML that ``kubectl apply -f deploy/k8s`` also accepts; :func:`render` only
moves them to another namespace and adds the store password Secret, built here from a value the
user passes (flag, env or file) so that no password is ever committed, and the S3 Secrets that
:mod:`emnist.cluster.objectstore` builds.
"""

from __future__ import annotations

import copy
import json
import os
import re
import shutil
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = ["FUNCTIONS_NAMESPACE", "KUBECTL_HINT", "KubectlError", "Pod", "SECRET_NAME",
           "apply", "applied_lines", "check_cluster", "kubectl", "load_manifests", "object_ref",
           "pod_logs", "pods", "redact", "render", "scale_command", "scale_deployment",
           "store_secret", "to_yaml", "unreported"]

FUNCTIONS_NAMESPACE = "openfaas-fn"
SECRET_NAME = "emnist-store-password"  # also the key: OpenFaaS mounts it at
# /var/openfaas/secrets/emnist-store-password (STORE_URL ...?password_file=emnist-store-password)
KUBECTL_HINT = ("kubectl is not installed or not on PATH: install it "
                "(https://kubernetes.io/docs/tasks/tools/) and point it at the cluster")
CHECK_TIMEOUT = 5  # seconds kubectl may take to reach the API server in check_cluster
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "PersistentVolume",
                  "StorageClass", "CustomResourceDefinition"}


class KubectlError(RuntimeError):
    pass


# -- manifests ---------------------------------------------------------------------------------

def load_manifests(directory: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """Every object of every ``*.yaml``/``*.yml`` file in ``directory``, in file-name order."""
    d = Path(directory)
    files = sorted([*d.glob("*.yaml"), *d.glob("*.yml")])
    if not files:
        raise KubectlError(f"no manifests (*.yaml) in {d}")
    out = []
    for f in files:
        try:
            docs = list(yaml.safe_load_all(f.read_text()))
        except yaml.YAMLError as e:
            raise KubectlError(f"{f} is not valid YAML: {e}") from e
        for doc in docs:
            if doc is None:
                continue
            if not isinstance(doc, dict) or "kind" not in doc or "apiVersion" not in doc:
                raise KubectlError(f"{f}: every document needs apiVersion and kind")
            out.append(doc)
    return out


def store_secret(password: str, namespace: str = FUNCTIONS_NAMESPACE) -> dict[str, Any]:
    """The store password as a Secret (an OpenFaaS secret too when in the functions' ns).

    Redis reads it from a config file as ``requirepass "<password>"`` (redis.yaml), where a
    double quote, a backslash or a control character would end or alter the value: refused.
    """
    if not password:
        raise ValueError("the store password is empty")
    if any(ch in password for ch in '"\\') or any(ord(ch) < 32 or ord(ch) == 127
                                                 for ch in password):
        raise ValueError("the store password may not contain a double quote, a backslash or "
                         "a control character (Redis reads it from a quoted config line)")
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": SECRET_NAME, "namespace": namespace,
                         "labels": {"app.kubernetes.io/part-of": "emnist"}},
            "type": "Opaque", "stringData": {SECRET_NAME: password}}


def render(manifests: list[dict[str, Any]], *, namespace: str = FUNCTIONS_NAMESPACE,
           functions_namespace: str = FUNCTIONS_NAMESPACE, password: str | None = None,
           secrets: Sequence[dict[str, Any]] = ()) -> list[dict[str, Any]]:
    """Copies placed in ``namespace``; NetworkPolicies admit ``functions_namespace`` only.

    With a ``password`` the store Secret comes first, then ``secrets`` (already placed, e.g.
    the S3 keys in the functions' namespace): the pods read them at start.
    """
    out = [store_secret(password, namespace)] if password else []
    out += [copy.deepcopy(s) for s in secrets]
    for m in manifests:
        m = copy.deepcopy(m)
        if m["kind"] not in CLUSTER_SCOPED:
            m.setdefault("metadata", {})["namespace"] = namespace
        if m["kind"] == "NetworkPolicy":
            for rule in m.get("spec", {}).get("ingress", []):
                for peer in rule.get("from", []):
                    if "namespaceSelector" in peer:
                        peer["namespaceSelector"] = {"matchLabels": {
                            "kubernetes.io/metadata.name": functions_namespace}}
        out.append(m)
    return out


def redact(m: Mapping[str, Any]) -> dict[str, Any]:
    """A copy safe to print: Secret values replaced."""
    m = copy.deepcopy(dict(m))
    if m.get("kind") == "Secret":
        for key in ("data", "stringData"):
            if key in m:
                m[key] = {k: "<redacted>" for k in m[key]}
    return m


class _Dumper(yaml.SafeDumper):
    """Multi-line strings (a Job's script) as ``|`` blocks, readable in dry-run output."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_Dumper.add_representer(str, _str)


def to_yaml(manifests: list[Mapping[str, Any]]) -> str:
    return "---\n".join(yaml.dump(dict(m), Dumper=_Dumper, sort_keys=False, width=100)
                         for m in manifests)


# -- kubectl -----------------------------------------------------------------------------------

def kubectl(args: list[str], *, input: str | None = None, capture: bool = True,
            env: Mapping[str, str] | None = None, timeout: float | None = None) -> str:
    """Run ``kubectl ARGS``; its stdout (when captured). KubectlError on failure, absence, or
    no answer within ``timeout`` seconds."""
    env = dict(os.environ if env is None else env)
    binary = shutil.which("kubectl", path=env.get("PATH"))
    if binary is None:
        raise KubectlError(KUBECTL_HINT)
    try:
        proc = subprocess.run([binary, *args], input=input, text=True, env=env,
                              stdin=None if input is not None else subprocess.DEVNULL,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.PIPE, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise KubectlError(f"kubectl {' '.join(args[:3])} did not answer within "
                           f"{timeout:g}s") from None
    if proc.returncode:
        err = (proc.stderr or "").strip().splitlines()
        raise KubectlError(f"kubectl {' '.join(args[:3])} failed ({proc.returncode}): "
                           f"{err[-1] if err else 'no output'}")
    return proc.stdout or ""


def check_cluster(timeout: float = CHECK_TIMEOUT) -> str:
    """The current kube context, once its API server has answered ``/readyz``.

    Run before anything is generated or applied, so that a wrong or missing context, or a
    cluster that is down, fails with one line naming the context instead of half a deploy.
    """
    why = "it printed nothing"
    try:
        context = kubectl(["config", "current-context"], timeout=timeout).strip()
    except KubectlError as e:
        if str(e) == KUBECTL_HINT:
            raise
        context, why = "", str(e)
    if not context:
        raise KubectlError(f"no kube context is set ({why}): `kubectl config use-context "
                           "NAME` for the cluster to deploy to; nothing was deployed")
    try:
        kubectl(["get", "--raw", "/readyz", f"--request-timeout={timeout:g}s"],
                timeout=timeout + 5)
    except KubectlError as e:
        raise KubectlError(f"the cluster of kube context {context!r} does not answer: {e}; "
                           "nothing was deployed") from e
    return context


QUEUE_WORKER = ("deployment", "queue-worker", "openfaas")  # the chart's queue-worker


def queue_worker_replicas(timeout: float = CHECK_TIMEOUT) -> int | None:
    """Replicas of OpenFaaS's queue-worker Deployment, or None when it cannot be read. On
    CE each takes one async call at a time, so fewer than the train workers serialise them."""
    kind, name, namespace = QUEUE_WORKER
    try:
        out = kubectl(["get", kind, name, "-n", namespace, "-o", "jsonpath={.spec.replicas}"],
                      timeout=timeout).strip()
    except KubectlError:
        return None
    return int(out) if out.isdigit() else None


def object_ref(m: Mapping[str, Any]) -> str:
    """How ``kubectl apply`` names an object in its output: ``kind[.group]/name``."""
    api = str(m.get("apiVersion", ""))
    group = api.split("/")[0] if "/" in api else ""
    kind = str(m["kind"]).lower()
    return f"{kind}.{group}/{m['metadata']['name']}" if group else f"{kind}/{m['metadata']['name']}"


_APPLIED = re.compile(r"^(\S+/\S+) (created|configured|unchanged|serverside-applied)"
                      r"(?: \(.*\))?$")


def applied_lines(output: str) -> list[tuple[str, str]]:
    """``(kind[.group]/name, action)`` for every object ``kubectl apply`` said it applied."""
    return [(m.group(1), m.group(2)) for m in map(_APPLIED.match, output.splitlines()) if m]


def unreported(manifests: list[Mapping[str, Any]], applied: list[tuple[str, str]]) -> list[str]:
    """The objects sent that kubectl's output does not name (each line accounts for one)."""
    left = [ref for ref, _ in applied]
    missing = []
    for m in manifests:
        ref = object_ref(m)
        if ref in left:
            left.remove(ref)
        else:
            missing.append(ref)
    return missing


def apply(manifests: list[dict[str, Any]]) -> str:
    """``kubectl apply -f -`` with the manifests on stdin (the Secret never touches disk)."""
    return kubectl(["apply", "-f", "-"], input=to_yaml(manifests))


def scale_command(name: str, replicas: int, namespace: str = FUNCTIONS_NAMESPACE) -> list[str]:
    return ["scale", "deployment", name, "-n", namespace, "--replicas", str(int(replicas))]


def scale_deployment(name: str, replicas: int, namespace: str = FUNCTIONS_NAMESPACE) -> str:
    """Scale a function's Deployment directly (OpenFaaS CE's scale endpoint stops at 5)."""
    return kubectl(scale_command(name, replicas, namespace)).strip()


@dataclass
class Pod:
    name: str
    node: str


def pods(function: str, namespace: str = FUNCTIONS_NAMESPACE) -> list[Pod]:
    """The pods of an OpenFaaS function (faas-netes labels them ``faas_function=NAME``)."""
    out = kubectl(["get", "pods", "-n", namespace, "-l", f"faas_function={function}",
                   "-o", "json"])
    try:
        items = json.loads(out or "{}").get("items", [])
    except ValueError as e:
        raise KubectlError(f"kubectl get pods gave invalid JSON: {e}") from e
    return [Pod(it["metadata"]["name"], it.get("spec", {}).get("nodeName", ""))
            for it in items]


def pod_logs(function: str, namespace: str = FUNCTIONS_NAMESPACE,
             tail: int | None = None) -> list[dict[str, Any]]:
    """Every pod's log lines as ``/system/logs`` messages, plus the pod's node."""
    found = pods(function, namespace)
    if not found:
        raise KubectlError(f"no pods of {function} in namespace {namespace}")
    lines = []
    for pod in found:
        args = ["logs", pod.name, "-n", namespace, "--timestamps"]
        if tail is not None and tail > 0:
            args += ["--tail", str(tail)]
        for text in kubectl(args).splitlines():
            stamp, _, rest = text.partition(" ")
            lines.append({"name": function, "namespace": namespace, "instance": pod.name,
                          "node": pod.node, "timestamp": stamp, "text": rest})
    return lines


# -- the gateway first, kubectl where OpenFaaS CE stops ----------------------------------------

LOCAL_PROVIDER = "emnist-local"  # what the local gateway's /system/info names as provider
CE_MAX_REPLICAS = 5  # OpenFaaS CE clamps /system/scale-function to 1..5


def gateway_provider(gw: Any) -> str:
    """``/system/info``'s provider name ('' when the gateway does not say)."""
    from emnist.gateway.client import GatewayError

    try:
        return str(gw.info().get("provider", {}).get("provider", ""))
    except (GatewayError, ValueError, AttributeError):
        return ""


def scale_with_kubectl(replicas: int, provider: str, use_kubectl: bool | None) -> bool:
    """kubectl when asked (True), never when told not to (False); otherwise only above CE's
    limit on a real OpenFaaS (the local gateway scales to any count)."""
    if use_kubectl is not None:
        return use_kubectl
    return replicas > CE_MAX_REPLICAS and provider != LOCAL_PROVIDER


def scale_function(gw: Any, name: str, replicas: int, *, use_kubectl: bool | None = None,
                   namespace: str = FUNCTIONS_NAMESPACE,
                   echo: Any = lambda msg: None) -> str:
    """Scale through the gateway, or kubectl (see :func:`scale_with_kubectl`); says which."""
    provider = gateway_provider(gw)
    if scale_with_kubectl(replicas, provider, use_kubectl):
        cmd = scale_command(name, replicas, namespace)
        echo(f"scaling with `kubectl {' '.join(cmd)}` (OpenFaaS CE's scale endpoint stops at "
             f"{CE_MAX_REPLICAS} replicas)")
        kubectl(cmd)
        return "kubectl"
    if replicas > CE_MAX_REPLICAS and provider != LOCAL_PROVIDER:
        echo(f"warning: OpenFaaS CE clamps {replicas} replicas to {CE_MAX_REPLICAS} "
             "(drop --no-kubectl to scale the Deployment with kubectl)")
    gw.scale(name, replicas)
    return "gateway"


def collect_logs(gw: Any, name: str, *, tail: int | None = None,
                 use_kubectl: bool | None = None,
                 namespace: str = FUNCTIONS_NAMESPACE) -> tuple[list[dict[str, Any]], str]:
    """Every replica's log lines and where they came from ('gateway' or 'kubectl').

    The gateway's ``/system/logs`` first; ``kubectl logs`` per pod when asked, or when a real
    gateway answers 404/501 (providers without logs). Lines carry ``instance`` (the pod) and,
    where known, ``node``.
    """
    from emnist.gateway.client import GatewayError

    if use_kubectl:
        return pod_logs(name, namespace, tail), "kubectl"
    provider = gateway_provider(gw)
    try:
        lines = list(gw.logs(name, tail=tail))
    except GatewayError as e:
        if use_kubectl is False or provider == LOCAL_PROVIDER or e.status not in (404, 501):
            raise
        try:
            return pod_logs(name, namespace, tail), "kubectl"
        except KubectlError as k:
            raise KubectlError(f"the gateway has no logs for {name} ({e}) and the kubectl "
                               f"fallback failed: {k}") from k
    if provider == LOCAL_PROVIDER:
        node = os.uname().nodename  # the local gateway's replicas all run on this machine
        for ln in lines:
            ln.setdefault("node", node)
    return lines, "gateway"
