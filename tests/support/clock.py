"""A clock the test moves by hand: pass it where the code takes a `clock` callable, then set `now`."""

from __future__ import annotations


class ManualClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now
