"""Parameter stores: a byte-level KV contract (memcached, Redis) under a chunked vector store."""

from emnist.store.codec import CorruptValue
from emnist.store.kv import DEFAULT_STORE_URL, KV, StoreError, open_kv, redact
from emnist.store.outcome import OutcomeUnknown, claim
from emnist.store.params import MissingState, ParameterStore
from emnist.store.shared import shared_kv

__all__ = ["DEFAULT_STORE_URL", "KV", "CorruptValue", "MissingState", "OutcomeUnknown",
           "ParameterStore", "StoreError", "claim", "open_kv", "redact", "shared_kv"]
