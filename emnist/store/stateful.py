"""``@stateful``: load named state before a call, persist what the call returns after it.

    @stateful("weights", "steps", kv=lambda: shared_kv(url), run_id=lambda event, ctx: ...)
    def handle(event, context, *, weights, steps):
        ...
        return response, {"steps": (steps or 0) + 1}

Absent state arrives as None. Arrays are stored with the codec, anything else as a JSON
document. Each persisted value's clock must still be the one that was loaded (checked inside
the backend's CAS / transaction); if another call got there first, the whole call runs again
on the fresh state, so no update is lost. On Redis all names are written in one transaction;
on memcached each name is its own CAS, so keep names that must change together in one value.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import numpy as np

from emnist.store import codec
from emnist.store.keys import key_for
from emnist.store.kv import KV, StoreError


class _Conflict(Exception):
    pass


def _load(key: str, value: bytes | None) -> tuple[Any, int]:
    if value is None:
        return None, -1
    d = codec.decode(key, value)
    if d.array is None:
        return codec.decode_doc(key, value), d.clock
    return np.array(d.array), d.clock  # a writable copy for the function


def _persister(clocks: dict[str, int], values: dict[str, Any]) -> Callable:
    """The CAS updater: write only over the very value (clock) that was loaded."""
    def persist(key: str, old: bytes | None) -> bytes:
        clock = -1 if old is None else codec.decode(key, old).clock
        if clock != clocks[key]:
            raise _Conflict(key)
        value = values[key]
        if isinstance(value, np.ndarray):
            return codec.encode(value, clock + 1)
        return codec.encode_doc(value, clock + 1)
    return persist


def stateful(*names: str, kv: KV | Callable[[], KV], run_id: str | Callable[..., str],
             retries: int = 1000) -> Callable:
    if not names:
        raise ValueError("@stateful needs at least one state name")

    def decorate(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            store = kv() if callable(kv) else kv
            rid = run_id(*args, **kwargs) if callable(run_id) else run_id
            keys = {n: key_for(rid, "state", n) for n in names}
            for _ in range(retries):
                got = store.get_many(list(keys.values()))
                loaded = {n: _load(k, got.get(k)) for n, k in keys.items()}
                result, updates = fn(*args, **kwargs, **{n: v for n, (v, _) in loaded.items()})
                unknown = set(updates) - set(names)
                if unknown:
                    raise ValueError(f"@stateful got updates for undeclared state {unknown}")
                if not updates:
                    return result
                by_key = {keys[n]: n for n in updates}
                clocks = {k: loaded[n][1] for k, n in by_key.items()}
                values = {k: updates[n] for k, n in by_key.items()}
                try:
                    store.update_many(list(by_key), _persister(clocks, values))
                except _Conflict:
                    continue  # someone else persisted first: run again on fresh state
                return result
            raise StoreError(f"@stateful {fn.__name__}: {retries} conflicting attempts")
        return call
    return decorate
