"""What to do when a test cannot run here: skip, saying why, on a developer's machine; fail with the same reason
under POLYDEV_REQUIRE_SERVERS=1 (scripts/test.sh sets it, so CI does), where a green run must mean every test ran.

Every missing piece goes through `unmet`: a server or tool not installed, not being root, a file system that
cannot be mounted, the POLYDEV_SKIP_* switches, a Python package not installed. The only skips left in CI are
for what its machine cannot have at all (a Firecracker binary and KVM, in tests/vm/test_firecracker_boot.py),
and those call pytest.skip themselves, next to the reason.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType
from typing import NoReturn

import pytest

REQUIRE = "POLYDEV_REQUIRE_SERVERS"


def required() -> bool:
    return os.environ.get(REQUIRE) == "1"


def unmet(reason: str) -> NoReturn:
    """Skip with the reason, or fail with it under POLYDEV_REQUIRE_SERVERS=1. Usable at module level too (a
    failure there is a collection error, which fails the run just the same)."""
    __tracebackhide__ = True  # report the caller's line, not this one
    if required():
        pytest.fail(f"{reason} ({REQUIRE}=1: this test must run here, not skip)", pytrace=False)
    pytest.skip(reason, allow_module_level=True)


def skip_switches(*names: str) -> None:
    """A developer's POLYDEV_SKIP_…=1, honoured as a skip; refused (a failure) under POLYDEV_REQUIRE_SERVERS=1."""
    __tracebackhide__ = True
    for name in names:
        if os.environ.get(name) == "1":
            unmet(f"{name}=1")


def import_module(name: str, hint: str) -> ModuleType:
    """pytest.importorskip, but failing under POLYDEV_REQUIRE_SERVERS=1: the module, imported."""
    __tracebackhide__ = True
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        unmet(f"{name} cannot be imported ({exc}): {hint}")


def root(why: str) -> None:
    __tracebackhide__ = True
    if os.geteuid() != 0:
        unmet(f"needs root: {why}")
