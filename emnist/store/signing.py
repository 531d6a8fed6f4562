"""Seals on the store documents that steer a function, under a key only the functions hold.

memcached has no authentication (on a cluster any pod that reaches it can write), so being in
the store proves nothing about who wrote a value. The documents that say what a run is, its
run document (config, shard location, model, workers, sizes) and its parameter layout
(``SEALED_DOCS``), carry a ``seal``: HMAC-SHA256 under the store key over the document's store
key and its canonical JSON. The store key comes from the OpenFaaS secret the function's
``store_key_secret`` setting names (setup and train share it). Binding the store key means a
document sealed for run A does not verify as run B's, nor a layout as a run document.

:class:`SealedKV` wraps a function's store handle: it seals these documents as they are
written and verifies them as they are read. One that does not verify (forged, unsigned, or
copied from another key) reads as a :class:`~emnist.store.codec.Refused` value, which every
reader refuses as it refuses a damaged one (``CorruptValue`` naming the key), while a reader
that tolerates a damaged value (the run listing) goes on with the others. Without a key (no
secret configured) documents are written unsigned and read unchecked; the policy checks of
what they name and the caps on their numbers still apply (emnist.train.rundoc).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from collections.abc import Iterable, Mapping
from typing import Any

from emnist.secrets import SecretError, read_secret
from emnist.store import codec
from emnist.store.kv import KV, Updater

__all__ = ["KEY_ENV", "MIN_KEY_BYTES", "SEALED_DOCS", "SealedKV", "Sealer", "StoreKeyError",
           "is_sealed", "sealer_for"]

KEY_ENV = "store_key_secret"  # the function setting that names the key's OpenFaaS secret
MIN_KEY_BYTES = 16
SEALED_DOCS = ("run", "layout")
SEAL = "seal"
_DOMAIN = b"emnist-store-seal-v1\n"
_SEALED_KEY = re.compile(r"^emnist:[A-Za-z0-9_-]{1,64}:(?:run|layout)$")


class StoreKeyError(RuntimeError):
    """The function's store key is configured but unusable (the operator's to fix: a 5xx)."""


def is_sealed(key: str) -> bool:
    """True for the store keys whose documents carry a seal (``emnist:{run}:run|layout``)."""
    return key.endswith((":run", ":layout")) and bool(_SEALED_KEY.match(key))


def _canonical(doc: Mapping[str, Any]) -> bytes:
    return json.dumps({k: v for k, v in doc.items() if k != SEAL}, sort_keys=True,
                      separators=(",", ":")).encode()


class Sealer:
    """Seals and opens documents under one key; without a key it only strips seals."""

    def __init__(self, key: bytes | None) -> None:
        if key is not None and len(key) < MIN_KEY_BYTES:
            raise StoreKeyError(f"the store key is shorter than {MIN_KEY_BYTES} bytes")
        self._key = key

    @property
    def enabled(self) -> bool:
        return self._key is not None

    def _mac(self, store_key: str, doc: Mapping[str, Any]) -> str:
        assert self._key is not None
        msg = _DOMAIN + store_key.encode() + b"\n" + _canonical(doc)
        return "v1:" + hmac.new(self._key, msg, hashlib.sha256).hexdigest()

    def seal(self, store_key: str, doc: Mapping[str, Any]) -> dict[str, Any]:
        """``doc`` with its seal for ``store_key`` (unchanged, unsealed, without a key)."""
        if not isinstance(doc, Mapping):
            raise TypeError(f"only JSON objects are sealed ({store_key})")
        plain = json.loads(json.dumps({k: v for k, v in doc.items() if k != SEAL}))
        return {**plain, SEAL: self._mac(store_key, plain)} if self.enabled else plain

    def open(self, store_key: str, doc: Any) -> Any:
        """``doc`` without its seal, if the seal verifies for ``store_key`` (any doc without a
        key); else :class:`~emnist.store.codec.CorruptValue` saying why."""
        if not self.enabled:
            return {k: v for k, v in doc.items() if k != SEAL} if isinstance(doc, dict) else doc
        if not isinstance(doc, dict):
            raise codec.CorruptValue(store_key, "not a sealed document (not a JSON object)")
        seal = doc.get(SEAL)
        if not isinstance(seal, str):
            raise codec.CorruptValue(store_key, "not sealed (written without this function's "
                                     "store key)")
        if not hmac.compare_digest(seal.encode(), self._mac(store_key, doc).encode()):
            raise codec.CorruptValue(store_key, "the seal does not verify (forged, or written "
                                     "for another key or with another store key)")
        return {k: v for k, v in doc.items() if k != SEAL}


def sealer_for(env: Mapping[str, str]) -> Sealer:
    """The function's sealer: keyed by the secret its ``store_key_secret`` names, else none."""
    name = (env.get(KEY_ENV) or "").strip()
    if not name:
        return Sealer(None)
    try:
        return Sealer(read_secret(name, env).encode())
    except SecretError as e:
        raise StoreKeyError(f"{KEY_ENV}: {e}") from None


class SealedKV:
    """A store handle that seals ``SEALED_DOCS`` on write and verifies them on read; every
    other key, and every other method, is the wrapped handle's."""

    def __init__(self, kv: KV, sealer: Sealer) -> None:
        self.inner, self.sealer = kv, sealer

    def __getattr__(self, name: str) -> Any:
        value = getattr(self.inner, name)  # AttributeError when the backend lacks it
        if name != "update_batched":
            return value

        def update_batched(batches: list[list[str]], *args: Any, **kw: Any) -> int:
            """Redis's batched transaction, for keys that are not sealed (chunks, notes)."""
            if any(is_sealed(k) for batch in (*batches, *kw.get("read", ())) for k in batch):
                raise ValueError("sealed documents are written with set_many or update_many")
            return value(batches, *args, **kw)
        return update_batched

    def _write(self, key: str, value: bytes) -> bytes:
        return codec.encode_doc(self.sealer.seal(key, codec.decode_doc(key, value)))

    def _read(self, key: str, value: bytes | None) -> bytes | None:
        if value is None:
            return None
        try:
            doc = codec.decode_doc(key, value)
        except codec.CorruptValue:
            return value  # the reader refuses it as it is
        try:
            return codec.encode_doc(self.sealer.open(key, doc))
        except codec.CorruptValue as e:
            return codec.Refused(e.reason)

    def get_many(self, keys: list[str]) -> dict[str, bytes]:
        got = self.inner.get_many(keys)
        return {k: (self._read(k, v) if is_sealed(k) else v) for k, v in got.items()}

    def set_many(self, values: Mapping[str, bytes]) -> None:
        self.inner.set_many({k: (self._write(k, v) if is_sealed(k) else v)
                             for k, v in values.items()})

    def add(self, key: str, value: bytes) -> bool:
        return self.inner.add(key, self._write(key, value) if is_sealed(key) else value)

    def update_many(self, keys: Iterable[str], fn: Updater,
                    read: Iterable[str] = ()) -> tuple[int, dict[str, bytes]]:
        keys, read = list(keys), list(read)
        if not any(is_sealed(k) for k in (*keys, *read)):
            return self.inner.update_many(keys, fn, read=read)

        def sealed(key: str, old: bytes | None) -> bytes:
            if not is_sealed(key):
                return fn(key, old)
            return self._write(key, fn(key, self._read(key, old)))

        retries, got = self.inner.update_many(keys, sealed, read=read)
        return retries, {k: (self._read(k, v) if is_sealed(k) else v) for k, v in got.items()}
