"""``s3://bucket/prefix`` data locations on any S3-compatible service (AWS S3, MinIO, Ceph RGW),
through boto3 (the ``s3`` extra).

Where and as whom: the endpoint, region and credentials come from the environment mapping the
location is opened with (the function's environment, i.e. the operator's deployment) and from
OpenFaaS secrets named there, never from the URL or a request:

- ``s3_endpoint_url``: e.g. ``http://minio.openfaas-fn:9000`` (host aliases applied, like every
  store URL); unset: ``AWS_ENDPOINT_URL_S3`` / ``AWS_ENDPOINT_URL``, else AWS itself.
- ``s3_region``: default ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, else ``us-east-1``.
- ``s3_access_key_secret`` / ``s3_secret_key_secret``: NAMES of the OpenFaaS secrets holding the
  keys (default ``emnist-s3-access-key`` / ``emnist-s3-secret-key``, used when mounted); else
  ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` from the mapping (the CLI on a laptop),
  else boto3's own chain (profile, instance role).
- ``s3_range_mb`` (64) and ``s3_readers`` (4): a download's byte ranges and how many are read
  at once. Parallel ranges beat one connection's throughput cap on AWS S3 and MinIO; a server
  that reads the whole object to answer each range (moto) wants ``s3_range_mb=0``: one
  streaming GET per object, resumed with a range where it broke.

Objects are written whole or not at all (one PUT, or a multipart upload completed only after
its last part; a failed one is aborted). A single PUT carries its CRC-32C as metadata
(``x-amz-meta-crc32c``); a multipart object's is known only after its last part, so callers
record it elsewhere (a prepared set's upload markers and manifest). Downloads stream in
bounded pieces; large objects are read as parallel byte ranges written at their offsets, a
broken range resumes where it stopped, and the result is checked against the caller's size and
CRC-32C.
"""

from __future__ import annotations

import os
import re
import threading
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crc32c import crc32c

from emnist.policy import DATA_ENV
from emnist.secrets import SecretError, read_secret, secrets_dir

from .idx import DataError
from .location import MAX_LIST, Location, ObjectInfo, check_name

__all__ = ["DEFAULT_ACCESS_SECRET", "DEFAULT_SECRET_SECRET", "S3Location", "S3Settings",
           "S3_ENV", "parse_s3_url", "s3_settings"]

S3_ENV: tuple[str, ...] = tuple(n for n in DATA_ENV if n.startswith("s3_"))
DEFAULT_ACCESS_SECRET = "emnist-s3-access-key"
DEFAULT_SECRET_SECRET = "emnist-s3-secret-key"
SINGLE_PUT = 32 << 20  # objects up to this size go in one PUT; larger ones in parts
PART_BYTES = 16 << 20  # multipart upload part size (S3's minimum is 5 MiB)
UPLOADS_IN_FLIGHT = 3  # parts being sent at once: memory <= (this + 1) * PART_BYTES
RANGE_BYTES = 64 << 20  # a download's byte-range size
READERS = 4  # byte ranges fetched at once
PIECE = 1 << 20  # bytes read from a response body at a time
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
_CLIENTS: dict[tuple, Any] = {}
_CLIENTS_LOCK = threading.Lock()
MAX_CLIENTS = 8


def parse_s3_url(url: str) -> tuple[str, str]:
    """(bucket, key prefix without slashes at its ends) of ``s3://bucket[/prefix]``."""
    if not url.startswith("s3://"):
        raise DataError(f"{url}: not an s3:// URL")
    rest = url[len("s3://"):]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.match(bucket) or ".." in bucket:
        raise DataError(f"{url}: not a bucket name (3-63 lowercase letters, digits, '.', '-')",
                        field="data_location", public="not an s3://bucket/prefix URL")
    prefix = prefix.strip("/")
    if any(c in url for c in "?#\\\x00") or (prefix and any(
            p in ("", ".", "..") for p in prefix.split("/"))):
        raise DataError(f"{url}: an s3:// URL is s3://bucket/prefix (no query, '..' or '//')",
                        field="data_location", public="not an s3://bucket/prefix URL")
    return bucket, prefix


@dataclass(frozen=True)
class S3Settings:
    endpoint_url: str | None
    region: str
    access_key: str | None
    secret_key: str | None
    range_bytes: int | None = None  # None: RANGE_BYTES; a huge value: one GET per object
    readers: int | None = None  # None: READERS

    def __repr__(self) -> str:  # never the keys
        return f"S3Settings(endpoint_url={self.endpoint_url!r}, region={self.region!r})"


def _secret_pair(env: Mapping[str, str]) -> tuple[str, str] | None:
    names = env.get("s3_access_key_secret"), env.get("s3_secret_key_secret")
    try:
        if any(names):
            if not all(names):
                raise DataError("set both s3_access_key_secret and s3_secret_key_secret (or "
                                "neither)", field="data_location",
                                public="S3 credentials are configured by halves")
            return read_secret(names[0], env), read_secret(names[1], env)
        d = secrets_dir(env)
        if (d / DEFAULT_ACCESS_SECRET).is_file() and (d / DEFAULT_SECRET_SECRET).is_file():
            return read_secret(DEFAULT_ACCESS_SECRET, env), read_secret(DEFAULT_SECRET_SECRET,
                                                                        env)
    except SecretError as e:
        raise DataError(f"S3 credentials: {e}", field="data_location",
                        public="the S3 credentials' secrets are not mounted") from None
    return None


def s3_settings(env: Mapping[str, str]) -> S3Settings:
    """The S3 endpoint, region and keys for ``env`` (see the module docstring)."""
    from emnist.policy import PolicyError, env_number, resolve

    endpoint = (env.get("s3_endpoint_url") or env.get("AWS_ENDPOINT_URL_S3")
                or env.get("AWS_ENDPOINT_URL") or None)
    if endpoint:
        if not endpoint.startswith(("http://", "https://")):
            raise DataError("s3_endpoint_url must be an http(s):// URL", field="data_location",
                            public="the function's s3_endpoint_url is not an http(s) URL")
        endpoint = resolve(env, endpoint)
    region = (env.get("s3_region") or env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION")
              or "us-east-1")
    keys = _secret_pair(env) or (env.get("AWS_ACCESS_KEY_ID"), env.get("AWS_SECRET_ACCESS_KEY"))
    try:
        range_mb = env_number(env, "s3_range_mb", -1, 0, 4096)
        readers = env_number(env, "s3_readers", -1, 1, 10)  # boto3 pools 10
    except PolicyError as e:
        raise DataError(str(e), field="data_location",
                        public="the function's S3 download settings are invalid") from None
    return S3Settings(endpoint, region, keys[0] or None, keys[1] or None,
                      None if range_mb < 0 else (range_mb << 20 or 1 << 62),
                      None if readers < 0 else readers)


def _client(settings: S3Settings) -> Any:
    """One boto3 client per process and settings (clients are thread-safe), bounded."""
    key = (settings.endpoint_url, settings.region, settings.access_key, settings.secret_key)
    with _CLIENTS_LOCK:
        if key in _CLIENTS:
            return _CLIENTS[key]
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise DataError("s3:// data locations need boto3: pip install 'emnist[s3]'",
                        field="data_location",
                        public="this function has no S3 support installed (the s3 extra)") \
            from None
    config = Config(
        connect_timeout=10, read_timeout=60, retries={"max_attempts": 5, "mode": "standard"},
        max_pool_connections=2 * READERS + UPLOADS_IN_FLIGHT,
        s3={"addressing_style": "path" if settings.endpoint_url else "auto"},
        # our own CRC-32C covers every object; S3-compatible servers differ in trailers
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required")
    session = boto3.session.Session(aws_access_key_id=settings.access_key,
                                    aws_secret_access_key=settings.secret_key,
                                    region_name=settings.region)
    client = session.client("s3", endpoint_url=settings.endpoint_url, config=config)
    with _CLIENTS_LOCK:
        while len(_CLIENTS) >= MAX_CLIENTS:
            _CLIENTS.pop(next(iter(_CLIENTS)))
        return _CLIENTS.setdefault(key, client)


def _errors() -> tuple[type[BaseException], ...]:
    from botocore.exceptions import BotoCoreError, ClientError

    return (BotoCoreError, ClientError)


def _code(e: BaseException) -> str:
    return str(getattr(e, "response", {}).get("Error", {}).get("Code", ""))


class S3Location(Location):
    """A bucket and key prefix; file names are the keys below the prefix."""

    remote = True

    def __init__(self, url: str, env: Mapping[str, str] | None = None,
                 settings: S3Settings | None = None) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"
        self.settings = settings or s3_settings(os.environ if env is None else env)
        self.s3 = _client(self.settings)

    def child(self, sub: str) -> S3Location:
        return S3Location(f"{self.url}/{check_name(sub)}", settings=self.settings)

    def _key(self, name: str) -> str:
        name = check_name(name)
        return f"{self.prefix}/{name}" if self.prefix else name

    def _fail(self, what: str, e: BaseException, name: str = "") -> DataError:
        code = _code(e)
        where = self.where(name) if name else self.url
        missing = code in ("NoSuchKey", "NoSuchBucket", "404", "NotFound")
        return DataError(f"{where}: cannot {what} ({code or type(e).__name__}: {e})",
                         missing=missing)

    def stat(self, name: str) -> ObjectInfo | None:
        try:
            head = self.s3.head_object(Bucket=self.bucket, Key=self._key(name))
        except _errors() as e:
            if _code(e) in ("404", "NoSuchKey", "NotFound"):
                return None
            raise self._fail("stat", e, name) from None
        return self._info(name, head["ContentLength"], head.get("Metadata", {}),
                          head.get("LastModified"))

    @staticmethod
    def _info(name: str, size: int, meta: Mapping[str, str], modified: Any) -> ObjectInfo:
        crc: int | None
        try:
            crc = int(meta["crc32c"], 16)
        except (KeyError, ValueError, TypeError):
            crc = None
        return ObjectInfo(name, int(size), crc, modified.timestamp() if modified else 0.0)

    def _body(self, name: str, **kw: Any) -> Any:
        try:
            return self.s3.get_object(Bucket=self.bucket, Key=self._key(name), **kw)["Body"]
        except _errors() as e:
            raise self._fail("read", e, name) from None

    def read(self, name: str, max_bytes: int = 64 << 20) -> bytes:
        info = self.stat(name)
        if info is None:
            raise DataError(f"{self.where(name)}: missing", missing=True)
        if info.size > max_bytes:
            raise DataError(f"{self.where(name)}: larger than {max_bytes} bytes")
        body = self._body(name)
        try:
            data = body.read(max_bytes + 1)
        except _errors() as e:
            raise self._fail("read", e, name) from None
        finally:
            body.close()
        if len(data) > max_bytes:
            raise DataError(f"{self.where(name)}: larger than {max_bytes} bytes")
        return data

    def _list(self, prefix: str, delimiter: str = "") -> tuple[list[dict], list[str]]:
        base = f"{self.prefix}/" if self.prefix else ""
        kw: dict[str, Any] = {"Bucket": self.bucket, "Prefix": base + prefix}
        if delimiter:
            kw["Delimiter"] = delimiter
        objects, dirs = [], []
        try:
            for page in self.s3.get_paginator("list_objects_v2").paginate(**kw):
                objects += page.get("Contents", [])
                dirs += [p["Prefix"][len(base):].rstrip("/")
                         for p in page.get("CommonPrefixes", [])]
                if len(objects) + len(dirs) >= MAX_LIST:
                    break
        except _errors() as e:
            raise self._fail("list", e) from None
        for o in objects:
            o["Key"] = o["Key"][len(base):]
        return objects, dirs

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        objects, _ = self._list(prefix)
        # a listing carries no metadata: the recorded CRC is in stat()
        return [self._info(o["Key"], o["Size"], {}, o.get("LastModified")) for o in objects]

    def dirs(self) -> list[str]:
        return sorted(self._list("", "/")[1])

    def _range(self, name: str, dest: int, start: int, end: int) -> None:
        """Bytes [start, end) of ``name`` written at the same offsets of the open file
        ``dest``; a broken stream resumes at the byte it reached (5 tries in all)."""
        pos, failures = start, 0
        while pos < end:
            try:
                body = self._body(name, Range=f"bytes={pos}-{end - 1}")
                try:
                    while pos < end and (piece := body.read(min(PIECE, end - pos))):
                        os.pwrite(dest, piece, pos)
                        pos += len(piece)
                finally:
                    body.close()
                if pos < end:
                    raise DataError(f"{self.where(name)}: the stream ended at byte {pos} of "
                                    f"{end}")
            except (*_errors(), DataError, ConnectionError, TimeoutError) as e:
                failures += 1
                if failures >= 5:
                    raise (e if isinstance(e, DataError) else self._fail("read", e, name)) \
                        from None

    def download(self, name: str, dest: Path, size: int, crc: int) -> None:
        info = self.stat(name)
        if info is None:
            raise DataError(f"{self.where(name)}: missing", missing=True)
        if info.size != size:
            raise DataError(f"{self.where(name)}: {info.size} bytes where {size} were expected "
                            "(truncated or replaced)")
        fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, size)
            step = self.settings.range_bytes or RANGE_BYTES
            spans = [(s, min(s + step, size)) for s in range(0, size, step)]
            if len(spans) <= 1:
                self._range(name, fd, 0, size) if size else None
            else:
                with ThreadPoolExecutor(min(self.settings.readers or READERS,
                                            len(spans))) as pool:
                    for f in [pool.submit(self._range, name, fd, s, e) for s, e in spans]:
                        f.result()
        finally:
            os.close(fd)
        self._verify(dest, self.where(name), size, crc)

    def put(self, name: str, pieces: Iterable[memoryview | bytes], size: int) -> int:
        key = self._key(name)
        if size <= SINGLE_PUT:
            data = b"".join(bytes(p) for p in pieces)
            if len(data) != size:
                raise DataError(f"{self.where(name)}: {len(data)} bytes where {size} were "
                                "planned")
            crc = crc32c(data)
            try:
                self.s3.put_object(Bucket=self.bucket, Key=key, Body=data,
                                   Metadata={"crc32c": f"{crc:08x}"})
            except _errors() as e:
                raise self._fail("write", e, name) from None
            return crc
        return self._multipart(name, key, pieces, size)

    def _multipart(self, name: str, key: str, pieces: Iterable[memoryview | bytes],
                   size: int) -> int:
        """Parts of PART_BYTES sent a few at a time; the object exists only once the upload
        completes, so a failure (or a kill) leaves nothing a reader could open."""
        crc, n = 0, 0
        try:
            upload = self.s3.create_multipart_upload(Bucket=self.bucket, Key=key)["UploadId"]
        except _errors() as e:
            raise self._fail("write", e, name) from None
        parts: list[dict[str, Any]] = []
        try:
            with ThreadPoolExecutor(UPLOADS_IN_FLIGHT) as pool:
                futures: list[Any] = []

                def send(buf: bytes) -> None:
                    number = len(futures) + 1
                    while sum(not f.done() for f in futures) >= UPLOADS_IN_FLIGHT:
                        next(f for f in futures if not f.done()).result()
                    futures.append(pool.submit(self._part, key, upload, number, buf))

                buf = bytearray()
                for piece in pieces:
                    crc, n = crc32c(piece, crc), n + len(piece)
                    buf += piece
                    while len(buf) >= PART_BYTES:
                        send(bytes(buf[:PART_BYTES]))
                        del buf[:PART_BYTES]
                if buf or not futures:
                    send(bytes(buf))
                parts = [f.result() for f in futures]
            if n != size:
                raise DataError(f"{self.where(name)}: {n} bytes written where {size} were "
                                "planned")
            self.s3.complete_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload,
                                              MultipartUpload={"Parts": parts})
        except BaseException as e:
            try:
                self.s3.abort_multipart_upload(Bucket=self.bucket, Key=key, UploadId=upload)
            except Exception:  # noqa: BLE001 - the first failure is the one to report
                pass
            if isinstance(e, _errors()):
                raise self._fail("write", e, name) from None
            raise
        return crc

    def _part(self, key: str, upload: str, number: int, data: bytes) -> dict[str, Any]:
        resp = self.s3.upload_part(Bucket=self.bucket, Key=key, UploadId=upload,
                                   PartNumber=number, Body=data)
        return {"PartNumber": number, "ETag": resp["ETag"]}

    def delete(self, prefix: str = "") -> int:
        objects, _ = self._list(prefix)
        base = f"{self.prefix}/" if self.prefix else ""
        try:
            for i in range(0, len(objects), 1000):
                batch = [{"Key": base + o["Key"]} for o in objects[i:i + 1000]]
                self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": batch,
                                                                   "Quiet": True})
            uploads = self.s3.list_multipart_uploads(Bucket=self.bucket,
                                                     Prefix=base + prefix).get("Uploads", [])
            for u in uploads:  # interrupted uploads hold storage until aborted
                self.s3.abort_multipart_upload(Bucket=self.bucket, Key=u["Key"],
                                               UploadId=u["UploadId"])
        except _errors() as e:
            raise self._fail("delete", e) from None
        return len(objects)
