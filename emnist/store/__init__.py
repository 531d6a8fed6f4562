"""Parameter stores: a byte-level KV contract (memcached, Redis) under a chunked vector store."""

from emnist.store.codec import CorruptValue
from emnist.store.kv import KV, StoreError, open_kv, redact
from emnist.store.params import MissingState, ParameterStore

__all__ = ["KV", "CorruptValue", "MissingState", "ParameterStore", "StoreError", "open_kv",
           "redact"]
