"""Waiting, with a generous bound, for something to happen (never asserting how fast it did)."""

from __future__ import annotations

import time
from collections.abc import Callable


def eventually(check: Callable[[], bool], timeout: float = 120.0, every: float = 0.05) -> bool:
    """Whether `check()` came true within `timeout` seconds (looked at every `every` seconds)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(every)
    return True
