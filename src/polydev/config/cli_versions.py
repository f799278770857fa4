"""POLYDEV_CLI_VERSIONS, the setting (and `polydev image build --cli`): which version of each CLI goes into the
image, where it differs from the release's tested one.

`claude_code=2.1.210,codex=latest` → {"claude_code": "2.1.210", "codex": "latest"}. `latest` is resolved
against the npm registry when the image is built (vm/images.py), and the version it resolved to is what the
image's recipe hash and manifest hold.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

CliVersions = dict[str, str]  # provider → version or "latest"

# An exact npm version (with an optional pre-release or build part), or "latest".
VERSION = re.compile(r"^(latest|\d+\.\d+\.\d+([-+][0-9A-Za-z.-]+)?)$")


def parse_cli_versions(text: str | Iterable[str]) -> CliVersions:
    """`PROVIDER=VERSION` items (comma-separated text, or a list of items); ValueError naming a bad one."""
    items = text.split(",") if isinstance(text, str) else list(text)
    out: CliVersions = {}
    for item in (x.strip() for x in items):
        if not item:
            continue
        provider, sep, version = (p.strip() for p in item.partition("="))
        if not sep or not provider or not VERSION.match(version):
            raise ValueError(f"CLI version {item!r}: use PROVIDER=VERSION (an exact version like 2.1.210, or "
                             "latest), e.g. codex=latest")
        out[provider] = version
    return out


def check_cli_versions(versions: CliVersions, providers: tuple[str, ...]) -> CliVersions:
    unknown = sorted(set(versions) - set(providers))
    if unknown:
        raise ValueError(f"CLI versions: unknown provider(s) {', '.join(unknown)}; use {', '.join(providers)}")
    return versions


def version_key(version: str) -> tuple[int, ...]:
    """For ordering npm versions: 1.2.10 → (1, 2, 10); a leading v, a pre-release or build part are ignored
    (2.0.0-beta.1 → (2, 0, 0)); text without numbers → ()."""
    core = version.strip().lstrip("v").split("-", 1)[0].split("+", 1)[0]
    return tuple(int(part) for part in core.split(".") if part.isdigit())


def format_cli_versions(versions: CliVersions) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(versions.items()))
