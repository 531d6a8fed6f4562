"""What to do when a conditional write's reply is lost (a broken connection, a timeout).

The server may or may not have executed it, so it is never simply sent again: a repeated cas
fails against the token it changed itself and the update loop would apply the push a second
time; a repeated add fails against the value it wrote itself and the claim would be lost.
Instead the key is read again and compared with the exact bytes that were written (values
carry a clock and a checksum, claims an owner token, so another writer's identical bytes are
practically impossible):

- the key holds what this call wrote: it was applied, once; nothing is repeated;
- the key is unchanged since it was read (same memcached cas token, same Redis bytes, still
  absent): it was not applied; the write is attempted again, still conditional on that
  unchanged state, so the lost write, should it still arrive, and the new one cannot both
  succeed;
- anything else (another writer changed the key meanwhile): ``OutcomeUnknown``, a
  ``StoreError``; nothing is repeated.

Idempotent commands (reads, plain sets, deletes) are retried once on a fresh connection.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from emnist.store import codec
from emnist.store.kv import KV, StoreError, Updater

LOST_ATTEMPTS = 3  # writes whose reply was lost, per call, before giving up
MAX_CONFLICTS = 10_000
Gets = Callable[[list[str], list[str]], "tuple[dict[str, tuple[bytes, Any]], dict[str, bytes]]"]
Write = Callable[[str, bytes, Any], bool]


class OutcomeUnknown(StoreError):
    """A write's reply was lost and the key changed since: it is not known whether it was
    applied, and it was not repeated."""


class Lost(Exception):
    """Internal: the connection broke after a non-idempotent command may have been sent."""


@dataclass
class Pending:
    """One key whose conditional write may or may not have been applied."""

    old: bytes | None  # what the write was conditional on
    token: Any = None  # memcached cas token of ``old`` (None: compare bytes)
    written: list[bytes] = field(default_factory=list)

    def settle(self, value: bytes | None, token: Any = None) -> str | None:
        """"ours": the key holds what we wrote (it was applied); "again": unchanged since it
        was read, so it was not applied and may be written again; None: unknown."""
        if value is not None and value in self.written:
            return "ours"
        if self.old is None:
            unchanged = value is None
        elif self.token is not None:
            unchanged = token == self.token
        else:
            unchanged = value == self.old
        return "again" if unchanged else None


def unknown(keys: list[str], url: str, why: str = "another writer changed it since") -> str:
    which = keys[0] if len(keys) == 1 else f"{len(keys)} keys (first: {keys[0]})"
    return (f"outcome unknown: the reply to a write of {which} at {url} was lost and {why}; "
            "not repeated")


def cas_loop(keys: Iterable[str], fn: Updater, read: Iterable[str], url: str, gets: Gets,
             write: Write) -> tuple[int, dict[str, bytes]]:
    """memcached's read-modify-write: gets, then cas per key (add where absent), again for the
    keys another writer changed meanwhile; a lost write is settled as described above.

    ``gets(keys, extra)`` (idempotent) returns {key: (value, token)} and the ``extra`` values;
    ``write(key, value, token)`` is a cas (an add when token is None) and raises ``Lost``.
    """
    pending, extra, retries = list(keys), list(read), 0
    first: dict[str, bytes] = {}
    unsure: dict[str, Pending] = {}
    lost: dict[str, str] = {}  # keys whose outcome cannot be known (why): the others complete
    while pending:
        try:
            got, others = gets(pending, extra)
        except StoreError as e:
            if unsure:
                raise OutcomeUnknown(unknown(list(unsure), url, f"cannot be read back: {e}")
                                     ) from None
            raise
        if extra:
            first, extra = others, []
        again = []
        for key in pending:
            value, token = got.get(key, (None, None))
            p = unsure.get(key)
            if p is not None:
                state = p.settle(value, token)
                if state != "again":
                    del unsure[key]  # "ours": it did land, once; None: unknowable
                    if state is None:
                        lost[key] = "another writer changed it since"
                    continue
            new = fn(key, value)
            try:
                ok = write(key, new, token)
            except Lost:
                p = unsure.setdefault(key, Pending(value, token))
                p.written.append(new)
                if len(p.written) >= LOST_ATTEMPTS:
                    del unsure[key]
                    lost[key] = f"so were {LOST_ATTEMPTS - 1} more in a row"
                    continue
                again.append(key)
                continue
            if ok:
                unsure.pop(key, None)  # ours now; a lost one, conditional on before, cannot land
            else:
                again.append(key)
        retries += len(again)
        if retries > MAX_CONFLICTS:
            raise StoreError(f"gave up after {retries} cas conflicts on {again[:3]}")
        pending = again
    if lost:
        raise OutcomeUnknown(unknown(list(lost), url, next(iter(lost.values()))))
    return retries, first


def add_once(key: str, value: bytes, url: str, attempt: Callable[[], bool],
             read: Callable[[], bytes | None]) -> bool:
    """``add`` that survives a lost reply: True only if this value is the one stored.

    ``attempt`` raises ``Lost``; ``read`` is idempotent. Sound when values are unique per
    caller and the key is only ever written by ``add`` (claims: ``claim``).
    """
    lost = 0
    while True:
        try:
            if attempt():
                return True
            if not lost:
                return False
        except Lost:
            lost += 1
        try:
            current = read()  # ours (perhaps a late one), another caller's, or still nobody's
        except StoreError as e:
            raise OutcomeUnknown(f"outcome unknown: the reply to an add of {key} was lost and "
                                 f"{url} cannot be read back: {e}") from None
        if current is not None:
            return current == value
        if lost >= LOST_ATTEMPTS:
            raise OutcomeUnknown(unknown([key], url, f"so were {lost - 1} more in a row"))


def claim(kv: KV, key: str) -> bool:
    """Take ``key`` if nobody has (one initialiser, one checkpoint writer per pass). The value
    names this caller, so a lost reply is settled by reading it back."""
    token = secrets.token_hex(8)
    return kv.add(key, codec.encode_doc({"owner": token, "at": time.time()}))
