"""Helpers for CLI commands that work on the store directly (same settings as the server)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import TypeVar

from polydev.config import get_settings
from polydev.logging import configure_logging
from polydev.services import Services, open_services

T = TypeVar("T")


def with_services(fn: Callable[[Services], Awaitable[T]]) -> T:
    settings = get_settings()
    configure_logging("warning")

    async def main() -> T:
        services = await open_services(settings)
        try:
            return await fn(services)
        finally:
            await services.close()

    return asyncio.run(main())
