"""A real S3-compatible server for tests: moto's standalone server on 127.0.0.1.

Started like memcached: a process of its own on a free loopback port (``moto_server``), or the
one named by ``$EMNIST_TEST_S3`` (e.g. a MinIO at http://127.0.0.1:9000 with its keys in
``$AWS_ACCESS_KEY_ID``/``$AWS_SECRET_ACCESS_KEY``). A MinIO binary cannot be installed from the
package registries here; moto is what the s3fs project itself tests against.
"""

from __future__ import annotations

import os
import secrets
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.servers import free_port, wait_port

S3_ENV = "EMNIST_TEST_S3"


@contextmanager
def moto_server() -> Iterator[str]:
    """An S3 endpoint URL: ``$EMNIST_TEST_S3``, or a moto server of our own until exit."""
    if os.environ.get(S3_ENV):
        yield os.environ[S3_ENV]
        return
    port = free_port()
    exe = shutil.which("moto_server", path=str(Path(sys.executable).parent)) or \
        shutil.which("moto_server")
    assert exe, "moto_server is missing: pip install 'moto[server]' (the dev extra)"
    proc = subprocess.Popen([exe, "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_port(port, timeout=30)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(10)


def s3_env(endpoint: str) -> dict[str, str]:
    """A function environment that reaches ``endpoint`` with test keys (moto takes any)."""
    return {"s3_endpoint_url": endpoint, "s3_region": "us-east-1",
            "AWS_ACCESS_KEY_ID": os.environ.get("AWS_ACCESS_KEY_ID", "testing"),
            "AWS_SECRET_ACCESS_KEY": os.environ.get("AWS_SECRET_ACCESS_KEY", "testing")}


def new_bucket(endpoint: str) -> str:
    """A fresh bucket (tests never share objects), created through boto3."""
    import boto3

    env = s3_env(endpoint)
    name = "t" + secrets.token_hex(6)
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1",
                 aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                 aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"]).create_bucket(Bucket=name)
    return name
