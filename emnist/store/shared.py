"""One thread-safe store handle per process and URL, shared by everything that uses the store.

Lease saves, checkpoints, the (overlapped) exchange, averaging, the tier's syncer and the
replica's request threads all use the handle of their URL; every backend is thread-safe, so
sharing it is safe, and a process keeps one set of connections per store. The registry is an
LRU of at most ``MAX_HANDLES`` URLs (requests cannot grow it without bound); an evicted handle
is closed, which only drops its idle connections, so a thread still using it is unaffected.
"""

from __future__ import annotations

import threading
from collections import OrderedDict

from emnist.store.kv import KV, open_kv

MAX_HANDLES = 32

_handles: OrderedDict[str, KV] = OrderedDict()
_lock = threading.Lock()


def shared_kv(url: str) -> KV:
    with _lock:
        kv = _handles.get(url)
        if kv is not None:
            _handles.move_to_end(url)
            return kv
        kv = _handles[url] = open_kv(url)  # connects lazily: cheap under the lock
        evicted = _handles.popitem(last=False)[1] if len(_handles) > MAX_HANDLES else None
    if evicted is not None:
        evicted.close()
    return kv
