"""Provider adapters: what Polydev knows about each AI coding CLI (see `base.ProviderAdapter`)."""

from __future__ import annotations

from polydev.providers.base import ProviderAdapter
from polydev.providers.claude_code import ClaudeCodeAdapter
from polydev.providers.codex import CodexAdapter
from polydev.providers.gemini_cli import GeminiCliAdapter

ADAPTERS: dict[str, ProviderAdapter] = {a.name: a for a in (ClaudeCodeAdapter(), CodexAdapter(), GeminiCliAdapter())}


def get_adapter(name: str) -> ProviderAdapter:
    try:
        return ADAPTERS[name]
    except KeyError:
        raise ValueError(f"unknown provider {name!r}; known providers: {', '.join(sorted(ADAPTERS))}") from None


__all__ = ["ADAPTERS", "ProviderAdapter", "get_adapter"]
