"""The S3 side of a Kubernetes deploy: where prepared sets live, and as whom the functions read.

Two ways: MinIO in the cluster (``deploy/k8s/minio.yaml``, endpoint
``http://minio.<namespace>:9000``), or an external S3-compatible service (``--s3-endpoint``).
Either way the functions get the endpoint and the data URL as stack variables
(``S3_ENDPOINT_URL``, ``DATA_LOCATION``, ``DATA_ROOTS`` in ``emnist.yml``) and their keys from
the OpenFaaS secret :data:`KEYS_SECRET` (``S3_SECRET``), whose two keys faas-netes mounts as
the files ``/var/openfaas/secrets/emnist-s3-access-key`` and ``.../emnist-s3-secret-key``:
the names :mod:`emnist.data.s3` looks for. The keys are never in the stack file.
"""

from __future__ import annotations

import copy
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from emnist.data.s3 import DEFAULT_ACCESS_SECRET, DEFAULT_SECRET_SECRET, parse_s3_url

__all__ = ["DEFAULT_DATA_URL", "KEYS_SECRET", "MINIO_PORT", "ROOT_SECRET", "S3Plan",
           "SETUP_JOB", "configure", "generate_keys", "generate_root", "is_minio",
           "keys_secret", "minio_endpoint", "root_secret", "stack_env"]

DEFAULT_DATA_URL = "s3://emnist/sets"
KEYS_SECRET = "emnist-s3"  # keys: DEFAULT_ACCESS_SECRET, DEFAULT_SECRET_SECRET
ROOT_SECRET = "emnist-minio-root"  # keys: root-user, root-password (MinIO and its Job only)
SETUP_JOB = "emnist-minio-setup"
MINIO_PORT = 9000
_LABELS = {"app.kubernetes.io/part-of": "emnist"}


@dataclass(frozen=True)
class S3Plan:
    """Where the functions' data lives: ``data_url`` (s3://bucket/prefix) at ``endpoint``;
    ``minio``: the endpoint is the in-cluster MinIO this deploy applies."""

    data_url: str
    endpoint: str
    minio: bool

    @property
    def bucket(self) -> str:
        return parse_s3_url(self.data_url)[0]


def minio_endpoint(namespace: str) -> str:
    """The MinIO Service as function pods reach it (cluster DNS ``<svc>.<namespace>``)."""
    return f"http://minio.{namespace}:{MINIO_PORT}"


def stack_env(plan: S3Plan, env: Mapping[str, str]) -> dict[str, str]:
    """The variables ``emnist.yml`` is read with so that every function gets the endpoint,
    the secret's name and the data URL (the data URL also becomes a data root)."""
    roots = [r for r in (env.get("DATA_ROOTS") or "").split(",") if r.strip()]
    if plan.data_url not in roots:
        roots.append(plan.data_url)
    return {"S3_ENDPOINT_URL": plan.endpoint, "S3_SECRET": KEYS_SECRET,
            "DATA_LOCATION": plan.data_url, "DATA_ROOTS": ",".join(roots)}


def generate_root() -> tuple[str, str]:
    """A MinIO administrator: user (3+ characters) and password (8-40 characters)."""
    return "root-" + secrets.token_hex(6), secrets.token_urlsafe(30)


def generate_keys() -> tuple[str, str]:
    """The functions' MinIO user: access key (at most 20 characters) and secret key (40)."""
    return "emnist-" + secrets.token_hex(6), secrets.token_urlsafe(30)


def _secret(name: str, namespace: str, data: dict[str, str]) -> dict[str, Any]:
    if not all(data.values()):
        raise ValueError(f"Secret {name}: a value is empty")
    return {"apiVersion": "v1", "kind": "Secret",
            "metadata": {"name": name, "namespace": namespace, "labels": dict(_LABELS)},
            "type": "Opaque", "stringData": data}


def root_secret(user: str, password: str, namespace: str) -> dict[str, Any]:
    return _secret(ROOT_SECRET, namespace, {"root-user": user, "root-password": password})


def keys_secret(access_key: str, secret_key: str, namespace: str) -> dict[str, Any]:
    """The functions' keys; in the functions' namespace it is the OpenFaaS secret."""
    return _secret(KEYS_SECRET, namespace, {DEFAULT_ACCESS_SECRET: access_key,
                                            DEFAULT_SECRET_SECRET: secret_key})


def is_minio(m: Mapping[str, Any]) -> bool:
    """An object of ``minio.yaml`` (what --no-s3 / --s3-endpoint leave out)."""
    return m.get("metadata", {}).get("labels", {}).get("app.kubernetes.io/name") == "minio"


def configure(objs: list[dict[str, Any]], plan: S3Plan) -> list[dict[str, Any]]:
    """Copies with the setup Job's bucket set to ``plan``'s."""
    out = []
    for m in objs:
        if m["kind"] == "Job" and m["metadata"]["name"] == SETUP_JOB:
            m = copy.deepcopy(m)
            for c in m["spec"]["template"]["spec"]["containers"]:
                for e in c.get("env", []):
                    if e["name"] == "EMNIST_BUCKET":
                        e["value"] = plan.bucket
        out.append(m)
    return out
