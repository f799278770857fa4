"""LOGIN_POOL, the setting: how many pre-started logins to keep, per provider and login method.

`claude_code=1,codex:device=1` → {("claude_code", None): 1, ("codex", "device"): 1}; no method means the
provider's default one. The pool itself is core's (polydev.core.login_pool); which provider offers which
login method is the provider adapters', checked by the login flow when it sizes the pool.
"""

from __future__ import annotations

# (provider, login method or None for the provider's default) → how many logins to keep ready
LoginPoolSizes = dict[tuple[str, str | None], int]

# Every login method a provider adapter may offer (polydev.providers.base.LoginMethod).
LOGIN_METHODS: tuple[str, ...] = ("browser", "device")


def parse_login_pool(text: str) -> LoginPoolSizes:
    """The setting's text as sizes; ValueError when it is not `PROVIDER[:METHOD]=COUNT,...`."""
    out: LoginPoolSizes = {}
    for item in (x.strip() for x in text.split(",")):
        if not item:
            continue
        key, sep, count = item.partition("=")
        provider, _, method = key.strip().partition(":")
        if not sep or not provider or not count.strip().isdigit():
            raise ValueError(f"LOGIN_POOL entry {item!r}: use PROVIDER[:METHOD]=COUNT, e.g. claude_code=1")
        out[(provider, method or None)] = int(count)
    return out


def check_login_pool(sizes: LoginPoolSizes, providers: tuple[str, ...]) -> LoginPoolSizes:
    """`sizes` when every provider is one of `providers` and every method one of LOGIN_METHODS."""
    for provider, method in sizes:
        if provider not in providers:
            raise ValueError(f"LOGIN_POOL: unknown provider {provider!r}; use {', '.join(providers)}")
        if method is not None and method not in LOGIN_METHODS:
            raise ValueError(f"LOGIN_POOL: unknown login method {method!r}; use {', '.join(LOGIN_METHODS)}")
    return sizes


def format_login_pool(sizes: LoginPoolSizes) -> str:
    """The setting's text for `sizes`: parse_login_pool(format_login_pool(s)) == s."""
    return ",".join(f"{provider}{':' + method if method else ''}={n}" for (provider, method), n in sizes.items())
