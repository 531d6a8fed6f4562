"""Data URLs: one interface for a local directory, ``s3://bucket/prefix``, ``store:[/prefix]``
(files kept in the function's own parameter store: ``emnist.data.kvlocation``) and (read-only)
an http(s) URL prefix, used by shards, test sets and p2p partitions alike.

A :class:`Location` names files relative to its URL (``worker-0-x.npy``, ``peer-1/train-x``);
a name is never absolute and never has a ``..`` part, so a location reads only below itself.
Every read is bounded (``max_bytes``) and every download is checked against the size and
CRC-32C its caller expects before the caller may use it. Which S3 endpoint and credentials a
location uses come from the environment mapping it is opened with (``emnist.data.s3``), never
from the URL: ``s3://bucket/prefix`` carries a bucket and a key prefix only. Likewise which
store a ``store:`` location uses is the mapping's ``store_url``: the URL names no host.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from crc32c import crc32c

from .idx import DataError
from .npyio import READ_CHUNK, file_crc

__all__ = ["DEFAULT_MAX_READ", "HttpLocation", "LocalLocation", "Location", "ObjectInfo",
           "check_name", "is_remote", "open_location"]

DEFAULT_MAX_READ = 64 << 20  # bytes a whole-file read() returns at most (manifests, batches)
MAX_LIST = 100_000  # entries a listing returns at most
_SCHEME = re.compile(r"^([a-z][a-z0-9+.-]*)://")


def check_name(name: str) -> str:
    """``name`` if it is a relative name below a location; DataError otherwise."""
    if (not isinstance(name, str) or not name or name.startswith("/") or "\\" in name
            or "\x00" in name or any(p in ("", ".", "..") for p in name.split("/"))):
        raise DataError(f"{name!r}: not a file name below a data location")
    return name


def is_remote(url: str) -> bool:
    """True for a URL that needs a network (s3://, http(s)://, store:), False for a
    directory."""
    m = _SCHEME.match(url)
    return (bool(m) and m.group(1) != "file") or url.startswith("store:")


@dataclass(frozen=True)
class ObjectInfo:
    """One file: its name below the location, size, recorded CRC-32C (S3 object metadata
    written by us; None where nothing records one) and modification time."""

    name: str
    size: int
    crc32c: int | None = None
    modified: float = 0.0


class Location:
    """Files below one URL. Subclasses implement the primitives; the checks live here."""

    url: str
    remote = False
    writable = True

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    def child(self, sub: str) -> Location:
        """The location of the directory (prefix) ``sub`` below this one."""
        raise NotImplementedError

    def where(self, name: str) -> str:
        """The full URL or path of ``name`` (for logs and messages)."""
        return f"{self.url.rstrip('/')}/{check_name(name)}"

    def stat(self, name: str) -> ObjectInfo | None:
        """The file's info, or None when it is not there."""
        raise NotImplementedError

    def read(self, name: str, max_bytes: int = DEFAULT_MAX_READ) -> bytes:
        """A whole small file (DataError with ``missing`` when absent, or larger than
        ``max_bytes``)."""
        raise NotImplementedError

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        """Every file whose name starts with ``prefix`` (recursive, at most MAX_LIST)."""
        raise NotImplementedError

    def dirs(self) -> list[str]:
        """The names of the immediate subdirectories (prefixes) of this location."""
        raise NotImplementedError

    def download(self, name: str, dest: Path, size: int, crc: int) -> None:
        """Copy ``name`` to the local file ``dest`` (created or replaced), then check its size
        and CRC-32C; DataError (``dest`` removed) when either differs."""
        raise NotImplementedError

    def put(self, name: str, pieces: Iterable[memoryview | bytes], size: int) -> int:
        """Write ``name`` from ``pieces`` (``size`` bytes in all); its CRC-32C. The file
        appears whole or not at all."""
        raise NotImplementedError

    def delete(self, prefix: str = "") -> int:
        """Remove every file whose name starts with ``prefix``; how many were removed."""
        raise NotImplementedError

    @staticmethod
    def _verify(dest: Path, where: str, size: int, crc: int) -> None:
        got = dest.stat().st_size
        if got != size:
            dest.unlink(missing_ok=True)
            raise DataError(f"{where}: {got} bytes where {size} were expected (truncated or "
                            "replaced)")
        if file_crc(dest) != crc:
            dest.unlink(missing_ok=True)
            raise DataError(f"{where}: fails its CRC-32C (damaged or replaced)")


class LocalLocation(Location):
    """A directory (``/path`` or ``file:///path``)."""

    def __init__(self, url: str) -> None:
        path = url[len("file://"):] if url.startswith("file://") else url
        self.root = Path(path).expanduser()
        self.url = str(self.root)

    def child(self, sub: str) -> LocalLocation:
        return LocalLocation(str(self.root / check_name(sub)))

    def _path(self, name: str) -> Path:
        return self.root / check_name(name)

    def where(self, name: str) -> str:
        return str(self._path(name))

    def stat(self, name: str) -> ObjectInfo | None:
        try:
            st = self._path(name).stat()
        except (FileNotFoundError, NotADirectoryError):
            return None
        except OSError as e:
            raise DataError(f"{self.where(name)}: cannot stat ({e})") from None
        return ObjectInfo(name, st.st_size, None, st.st_mtime)

    def read(self, name: str, max_bytes: int = DEFAULT_MAX_READ) -> bytes:
        path = self._path(name)
        try:
            with open(path, "rb") as f:
                data = f.read(max_bytes + 1)
        except (FileNotFoundError, NotADirectoryError):
            raise DataError(f"{path}: missing", missing=True) from None
        except OSError as e:
            raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
        if len(data) > max_bytes:
            raise DataError(f"{path}: larger than {max_bytes} bytes")
        return data

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        if not self.root.is_dir():
            return out
        for dirpath, _, files in os.walk(self.root):
            for f in files:
                rel = os.path.relpath(os.path.join(dirpath, f), self.root).replace(os.sep, "/")
                if rel.startswith(prefix):
                    info = self.stat(rel)
                    if info is not None:
                        out.append(info)
                    if len(out) >= MAX_LIST:
                        return sorted(out, key=lambda i: i.name)
        return sorted(out, key=lambda i: i.name)

    def dirs(self) -> list[str]:
        try:
            return sorted(p.name for p in self.root.iterdir() if p.is_dir())
        except (FileNotFoundError, NotADirectoryError):
            return []

    def download(self, name: str, dest: Path, size: int, crc: int) -> None:
        src = self._path(name)
        try:
            with open(src, "rb") as f, open(dest, "wb") as out:
                while piece := f.read(READ_CHUNK):
                    out.write(piece)
        except (FileNotFoundError, NotADirectoryError):
            raise DataError(f"{src}: missing", missing=True) from None
        self._verify(dest, str(src), size, crc)

    def put(self, name: str, pieces: Iterable[memoryview | bytes], size: int) -> int:
        path = self._path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.{time.monotonic_ns()}.part")
        crc, n = 0, 0
        try:
            with open(tmp, "wb") as f:
                for piece in pieces:
                    f.write(piece)
                    crc, n = crc32c(piece, crc), n + len(piece)
            if n != size:
                raise DataError(f"{path}: {n} bytes written where {size} were planned")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return crc

    def delete(self, prefix: str = "") -> int:
        count = 0
        for info in self.list(prefix):
            self._path(info.name).unlink(missing_ok=True)
            count += 1
        return count


class HttpLocation(Location):
    """An http(s) URL prefix serving a tree of files (read-only: write locally, serve it)."""

    remote = True
    writable = False

    def __init__(self, url: str, timeout: float = 30.0) -> None:
        import requests

        self.url = url.rstrip("/")
        self.timeout = timeout
        self._session = requests.Session()
        self._session.trust_env = False  # no proxies or netrc from the environment

    def child(self, sub: str) -> HttpLocation:
        return HttpLocation(f"{self.url}/{check_name(sub)}", self.timeout)

    def _get(self, name: str, headers: dict[str, str] | None = None):  # noqa: ANN202
        import requests

        url = self.where(name)
        try:
            resp = self._session.get(url, timeout=self.timeout, stream=True, headers=headers)
        except requests.RequestException as e:
            raise DataError(f"{url}: cannot read ({type(e).__name__}: {e})") from None
        if resp.status_code not in (200, 206):
            resp.close()
            raise DataError(f"{url}: HTTP {resp.status_code}",
                            missing=resp.status_code in (404, 410))
        return resp

    def stat(self, name: str) -> ObjectInfo | None:
        import requests

        try:
            resp = self._session.head(self.where(name), timeout=self.timeout)
        except requests.RequestException as e:
            raise DataError(f"{self.where(name)}: cannot read ({type(e).__name__}: {e})") \
                from None
        if resp.status_code in (404, 410):
            return None
        if resp.status_code != 200 or "Content-Length" not in resp.headers:
            raise DataError(f"{self.where(name)}: HTTP {resp.status_code} without a size")
        return ObjectInfo(name, int(resp.headers["Content-Length"]))

    def read(self, name: str, max_bytes: int = DEFAULT_MAX_READ) -> bytes:
        import requests

        data = bytearray()
        with self._get(name) as resp:
            try:
                for piece in resp.iter_content(1 << 16):
                    data += piece
                    if len(data) > max_bytes:
                        raise DataError(f"{self.where(name)}: larger than {max_bytes} bytes")
            except requests.RequestException as e:
                raise DataError(f"{self.where(name)}: cannot read ({type(e).__name__}: {e})") \
                    from None
        return bytes(data)

    def list(self, prefix: str = "") -> list[ObjectInfo]:
        raise DataError(f"{self.url}: an http(s) location cannot be listed (use s3:// or a "
                        "directory)")

    def dirs(self) -> list[str]:
        return [info.name for info in self.list()]

    def download(self, name: str, dest: Path, size: int, crc: int) -> None:
        import requests

        done = 0
        with open(dest, "wb") as out:
            for _ in range(5):  # a dropped connection resumes where it stopped
                headers = {"Range": f"bytes={done}-"} if done else None
                with self._get(name, headers) as resp:
                    if done and resp.status_code != 206:
                        out.seek(0)
                        out.truncate()
                        done = 0  # the server ignored the range: start over
                    try:
                        for piece in resp.iter_content(READ_CHUNK):
                            out.write(piece)
                            done += len(piece)
                            if done > size:
                                break
                        break
                    except requests.RequestException:
                        continue
        self._verify(dest, self.where(name), size, crc)

    def _read_only(self) -> DataError:
        return DataError(f"{self.url}: an http(s) location is read-only (write to a directory "
                         "or s3:// and serve it)")

    def put(self, name: str, pieces: Iterable[memoryview | bytes], size: int) -> int:
        raise self._read_only()

    def delete(self, prefix: str = "") -> int:
        raise self._read_only()


def open_location(url: str, env: Mapping[str, str] | None = None) -> Location:
    """The location of ``url``: a directory, ``file:///dir``, ``s3://bucket/prefix`` (the
    ``s3`` extra; endpoint and credentials from ``env``, see :mod:`emnist.data.s3`),
    ``store:[/prefix]`` (in the store ``env``'s ``store_url`` names, see
    :mod:`emnist.data.kvlocation`) or an http(s) prefix (read-only)."""
    if not isinstance(url, str) or not url:
        raise DataError("a data location must be a directory or URL", field="data_location")
    env = os.environ if env is None else env
    if url.startswith("store:"):
        from .kvlocation import KVLocation

        return KVLocation(url, env)
    m = _SCHEME.match(url)
    scheme = m.group(1) if m else ""
    if scheme in ("", "file"):
        return LocalLocation(url)
    if scheme == "s3":
        from .s3 import S3Location

        return S3Location(url, env)
    if scheme in ("http", "https"):
        return HttpLocation(url)
    raise DataError(f"{url}: unknown data location scheme {scheme}:// (use a directory, "
                    "s3://, store:/ or http(s)://)", field="data_location",
                    public=f"unknown scheme {scheme}:// (use a directory, s3://, store:/ or "
                    "http(s)://)" if len(scheme) < 20 else "unknown scheme")
