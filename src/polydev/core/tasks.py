"""Helpers for the flows' background tasks."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable


async def cancel_and_wait(tasks: Iterable[asyncio.Task[None] | None]) -> None:
    """Cancel every task still running, then wait for each to finish its own cleanup (VM destroyed, status
    written). A task's failure is its own business here: it has recorded it."""
    pending = [t for t in tasks if t is not None]
    for task in pending:
        if not task.done():
            task.cancel()
    for task in pending:
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
