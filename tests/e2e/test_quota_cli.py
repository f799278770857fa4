"""`polydev quota ...` as an operator and a user run it: subprocesses against a live `polydev serve`."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest

from polydev.client import PolydevClient
from tests.e2e.test_egress_cli import env_for
from tests.support.live_server import LiveServer, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    yield from start_server(tmp_path_factory.mktemp("quota"), "polydev", {"QUOTA_RUNS": "3", "HOST_VCPUS": "6"})


def quota(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "polydev", "quota", *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False)


def test_an_admin_sets_a_users_quota_and_the_user_reads_it(server: LiveServer) -> None:
    admin = env_for(server, server.admin_token)
    name = f"q-{uuid.uuid4().hex[:6]}"
    with PolydevClient(server.url, server.admin_token) as pd:
        user = pd.create_user(name)
        token = pd.issue_token(user["id"])["token"]
    done = quota(admin, "set", name, "--limit", "runs=1", "--limit", "memory_mb=4096", "--json")
    assert done.returncode == 0, done.stderr
    body = json.loads(done.stdout)
    assert body["overrides"] == {"memory_mb": 4096, "runs": 1} and body["limits"]["runs"] == 1
    assert body["limits"]["logins"] == 2  # the default, kept
    mine = json.loads(quota(env_for(server, token), "show", "--json").stdout)
    assert mine["limits"]["runs"] == 1 and mine["usage"]["runs"] == 0
    table = quota(admin, "ls")
    assert table.returncode == 0 and name in table.stdout and "0 / 1 *" in table.stdout, table.stdout
    assert "host vcpus: 0 of 6 in use" in table.stdout
    # A user cannot set quotas; bad limits are refused before the server is asked; --clear drops them.
    assert quota(env_for(server, token), "set", name, "--limit", "runs=9").returncode == 1
    bad = quota(admin, "set", name, "--limit", "gpus=1")
    assert bad.returncode == 2 and "NAME one of vms, logins, runs, vcpus, memory_mb" in bad.stderr
    cleared = json.loads(quota(admin, "set", name, "--clear", "--json").stdout)
    assert cleared["overrides"] == {} and cleared["limits"]["runs"] == 3
