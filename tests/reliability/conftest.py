"""The reliability suite: real servers booting real VMs (QEMU, the `test` image) whose CLIs are the scripted stand-in
(tests/support/scripted_vm_server.py), under load and under faults. Each scenario adds a row to the table printed
at the end of the run (pytest's terminal summary, so CI's output shows it): what load it held, what fault it
injected, how many logins and runs ended with a status and a reason, the orphans found and the 5xx answers
(not counting a 503 that names the store or the disk that is out, with Retry-After: the answer designed for
that fault).

POLYDEV_RELIABILITY_LONG=1 runs the longer version (more rounds of load) instead of the one CI runs.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from polydev.vm import images
from tests.support.live_server import LiveServer, start_server
from tests.support.vm_fixtures import test_image  # noqa: F401  (the fixture; a conftest here may not use pytest_plugins)

LONG = os.environ.get("POLYDEV_RELIABILITY_LONG") == "1"
MEMORY_MB = 256  # per VM: 70 of them fit beside the rest of the machine; the scripted CLI needs little
# A login's time limit on the shared server: under the full load a login waits minutes for its VM and its CLI
# on 2 emulating cores (15 minutes on a machine shared with other test runs).
LOGIN_TIMEOUT_S = 1200


@dataclass
class Row:
    scenario: str
    load: str
    fault: str
    ended: str  # "N/M": logins and runs that ended with a status (and, if not a success, a reason)
    orphans: int
    server_errors: int


_ROWS = pytest.StashKey[list[Row]]()


@pytest.fixture(scope="session")
def report(request: pytest.FixtureRequest) -> list[Row]:
    return request.config.stash.setdefault(_ROWS, [])


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter, config: pytest.Config) -> None:
    rows = config.stash.get(_ROWS, [])
    if not rows:
        return
    terminalreporter.section("reliability" + (" (long run)" if LONG else ""))
    header = ("scenario", "load held", "fault injected", "ended with status+reason", "orphans found", "5xx")
    table = [header, *((r.scenario, r.load, r.fault, r.ended, str(r.orphans), str(r.server_errors)) for r in rows)]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for line in table:
        terminalreporter.write_line(" | ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)))


def server_env(test_image: images.Image, **extra: str) -> dict[str, str]:
    """Small VMs, and quotas and host capacity sized so the suite's load is admitted in full (every refusal
    would be a legitimate 429/503, but the load is meant to reach the VMs): per user one login and three runs
    (one per provider) at once."""
    vms = 70
    return {"POLYDEV_CACHE_DIR": str(test_image.dir.parent.parent), "VM_IMAGE_PROFILE": "test",
            "VM_CLI_MEMORY_MB": str(MEMORY_MB), "VM_CLI_VCPU": "1", "VM_BROWSER_MEMORY_MB": str(MEMORY_MB),
            "VM_BROWSER_VCPU": "1", "VM_WARM_POOL_SIZE": "0", "LOGIN_POOL": "",
            "QUOTA_VMS": "4", "QUOTA_LOGINS": "1", "QUOTA_RUNS": "3", "QUOTA_VCPUS": "4",
            "QUOTA_MEMORY_MB": str(4 * MEMORY_MB), "HOST_VCPUS": str(vms), "HOST_MEMORY_MB": str(vms * MEMORY_MB),
            **extra}


def scripted_server(root: Path, test_image: images.Image, **extra: str) -> Iterator[LiveServer]:
    """A real server with real VMs and the scripted CLI, on the data directory root/data."""
    root.mkdir(parents=True, exist_ok=True)
    return start_server(root, "tests.support.scripted_vm_server", server_env(test_image, **extra))


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory, test_image: images.Image) -> Iterator[LiveServer]:
    """One such server for the scenarios that do not stop it (its first VM makes the snapshot the rest restore),
    with the logins' time limit raised (LOGIN_TIMEOUT_S)."""
    yield from scripted_server(tmp_path_factory.mktemp("shared"), test_image,
                               LOGIN_TIMEOUT_SECONDS=str(LOGIN_TIMEOUT_S))


def ask(method: str, url: str, token: str, **kw: object) -> tuple[int, dict]:
    """One request as a client would make it: (status, JSON body); (0, {}) when no answer came within the
    client's patience (30 s)."""
    try:
        r = httpx.request(method, url, headers={"Authorization": f"Bearer {token}"}, timeout=30, **kw)  # type: ignore[arg-type]
    except httpx.HTTPError:
        return 0, {}
    try:
        return r.status_code, r.json()
    except ValueError:
        return r.status_code, {"not_json": r.text[:200]}
