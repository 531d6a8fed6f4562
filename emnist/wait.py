"""The one wait-until helper: poll a condition until it holds or a deadline passes.

Every "start something, then wait for it" in the project goes through here, so a timeout is
always an error with a message that says what did not happen (never a silent give-up).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

__all__ = ["wait_until"]

T = TypeVar("T")


def wait_until(predicate: Callable[[], T], timeout: float, message: str,
               interval: float = 0.05, *,
               error: Callable[[str], BaseException] = TimeoutError) -> T:
    """Call ``predicate`` until it returns something truthy, and return that.

    Checks once more at the deadline, then raises ``error(message)``. An exception raised by
    ``predicate`` (e.g. "the process exited") propagates at once.
    """
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        left = deadline - time.monotonic()
        if left <= 0:
            raise error(message)
        time.sleep(min(interval, left))
