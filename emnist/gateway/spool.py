"""Where queued async bodies wait: memory for small ones within a budget, disk for the rest.

A body held as ``bytes`` until a queue worker runs it costs its size in the gateway's memory,
and the allocator rarely gives large freed blocks back, so batches of big async bodies grew the
gateway for good. Bodies are copied from the request in chunks; one stays in memory only while
all bodies in memory fit ``memory_budget``, else it goes to an anonymous temporary file (gone
when closed, or when the process dies) and is later sent to the replica with ``sendfile``.
"""

from __future__ import annotations

import os
import tempfile
import threading
from pathlib import Path
from typing import BinaryIO

__all__ = ["Body", "Spool"]

CHUNK = 64 * 1024
SMALL = 64 * 1024


class Body:
    """One queued body: ``data`` (in memory) or ``file`` (on disk), ``size`` bytes either way."""

    __slots__ = ("_spool", "data", "file", "size")

    def __init__(self, spool: Spool | None, size: int, data: bytes | None = None,
                 file: BinaryIO | None = None) -> None:
        self._spool, self.size, self.data, self.file = spool, size, data, file

    def payload(self) -> bytes | BinaryIO:
        """What :func:`.proxy.forward` sends: the bytes, or the file rewound."""
        if self.file is not None:
            self.file.seek(0)
            return self.file
        return self.data or b""

    def close(self) -> None:
        """Give the memory back to the budget or delete the file. Safe to call twice."""
        if self.file is not None:
            self.file.close()
            self.file = None
        elif self.data is not None and self._spool is not None:
            self._spool.release(self.size)
        self.data = None


class Spool:
    """Stores queued bodies, at most ``memory_budget`` bytes of them in memory at once."""

    def __init__(self, directory: str | os.PathLike[str] | None,
                 memory_budget: int = 4 << 20) -> None:
        self.directory = Path(directory) if directory else None
        self.memory_budget = memory_budget
        self.in_memory = 0
        self._lock = threading.Lock()

    def store(self, stream: BinaryIO, size: int) -> Body:
        """Copy ``size`` bytes of ``stream`` (fewer if it ends first) into a :class:`Body`."""
        if size <= SMALL and self._reserve(size):
            data = stream.read(size) if size else b""
            if len(data) < size:
                self.release(size - len(data))
            return Body(self, len(data), data=data)
        file = self._tempfile()
        try:
            remaining = size
            while remaining > 0:
                chunk = stream.read(min(CHUNK, remaining))
                if not chunk:
                    break
                file.write(chunk)
                remaining -= len(chunk)
            file.flush()
        except BaseException:
            file.close()
            raise
        return Body(None, size - remaining, file=file)

    def _reserve(self, size: int) -> bool:
        with self._lock:
            if self.in_memory + size > self.memory_budget:
                return False
            self.in_memory += size
            return True

    def release(self, size: int) -> None:
        with self._lock:
            self.in_memory -= size

    def _tempfile(self) -> BinaryIO:
        if self.directory is not None:
            self.directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        return tempfile.TemporaryFile(dir=self.directory)

