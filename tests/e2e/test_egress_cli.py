"""`polydev egress ...` as an operator and a user run it: subprocesses against a live `polydev serve` whose
operator configured an address pool. The accounting the gateway would have flushed is written to the
server's database the way the gateway's flush writes it."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime

import pytest

from polydev.client import PolydevClient
from tests.support.live_server import LiveServer, start_server

PASSWORD = "cli-Pr0xy-pass-77"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    yield from start_server(tmp_path_factory.mktemp("egress"), "polydev",
                            {"EGRESS_ADDRESS_POOL": "203.0.113.10-203.0.113.11,2001:db8:7::/64"})


def env_for(server: LiveServer, token: str) -> dict[str, str]:
    drop = ("DATABASE_URL", "REDIS_URL", "POLYDEV_URL", "POLYDEV_TOKEN")
    base = {k: v for k, v in os.environ.items() if k not in drop}
    return {**base, "POLYDEV_URL": server.url, "POLYDEV_TOKEN": token, "COLUMNS": "200"}


def egress(env: dict[str, str], *args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "polydev", "egress", *args], env=env, input=stdin,
                          capture_output=True, text=True, timeout=120, check=False)


def record_usage(server: LiveServer, rows: list[tuple[str | None, str, int, int, int, int]]) -> None:
    """(user id, host, connections, bytes up, bytes down, refusals) into the server's database."""
    from polydev.config import Settings
    from polydev.services import open_services
    from polydev.store.egress import Delta

    async def write() -> None:
        svc = await open_services(Settings(POLYDEV_DATA_DIR=server.data_dir), migrate=False)
        try:
            now = datetime.now(UTC)
            await svc.egress_admin.repo.record([
                Delta(uuid.UUID(u) if u else None, host, c, up, down, refused,
                      "not on the allow-list" if refused else None, now, now)
                for u, host, c, up, down, refused in rows])
        finally:
            await svc.close()

    # In a thread of its own: a Playwright test's thread already runs an event loop.
    with ThreadPoolExecutor(1) as pool:
        pool.submit(asyncio.run, write()).result()


@pytest.fixture(scope="module")
def people(server: LiveServer) -> dict[str, tuple[str, str]]:
    """Two users: name → (id, token)."""
    out = {}
    with PolydevClient(server.url, server.admin_token) as admin:
        for prefix in ("erin", "frank"):
            user = admin.create_user(f"{prefix}-{uuid.uuid4().hex[:6]}")
            out[prefix] = (user["name"], admin.issue_token(user["id"])["token"])
    return out


def test_admin_sets_and_shows_each_mode(server: LiveServer, people: dict[str, tuple[str, str]]) -> None:
    env = env_for(server, server.admin_token)
    name = people["erin"][0]
    done = egress(env, "set", name, "--mode", "address", "--family", "4", "--limit", "concurrent=5")
    assert done.returncode == 0, done.stderr
    assert "203.0.113.10" in done.stdout and "concurrent=5" in done.stdout
    shown = json.loads(egress(env, "show", name, "--json").stdout)
    assert (shown["mode"], shown["address"], shown["limits"]) == ("address", "203.0.113.10", {"concurrent": 5})

    url = f"http://erin:{PASSWORD}@proxy.example.test:3128"
    done = egress(env, "set", name, "--mode", "proxy", "--proxy-url", "-", stdin=url + "\n")
    assert done.returncode == 0, done.stderr
    assert "http://proxy.example.test:3128" in done.stdout and PASSWORD not in done.stdout + done.stderr
    shown = json.loads(egress(env, "show", name, "--json").stdout)
    assert shown["has_proxy"] is True and shown["proxy"] == "http://proxy.example.test:3128"
    listed = egress(env, "ls")
    assert listed.returncode == 0 and name in listed.stdout and PASSWORD not in listed.stdout

    done = egress(env, "set", name, "--mode", "direct", "--clear-limits", "--json")
    assert json.loads(done.stdout)["mode"] == "direct" and json.loads(done.stdout)["limits"] == {}
    assert PASSWORD not in server.log.read_text()


def test_bad_input_says_why_and_changes_nothing(server: LiveServer, people: dict[str, tuple[str, str]]) -> None:
    env = env_for(server, server.admin_token)
    name = people["frank"][0]
    before = egress(env, "show", name, "--json").stdout
    bad = egress(env, "set", name, "--mode", "tunnel")
    assert bad.returncode == 1 and "bad_egress_mode" in bad.stderr
    bad = egress(env, "set", name, "--mode", "proxy", "--proxy-url", f"ftp://f:{PASSWORD}@x.test")
    assert bad.returncode == 1 and "bad_proxy_url" in bad.stderr and PASSWORD not in bad.stderr
    bad = egress(env, "set", name, "--mode", "direct", "--limit", "parallel=3")
    assert bad.returncode == 2 and "--limit takes NAME=N" in bad.stderr
    bad = egress(env, "show", f"nobody-{uuid.uuid4().hex[:6]}")
    assert bad.returncode == 1 and "no user named" in bad.stderr
    assert egress(env, "show", name, "--json").stdout == before


def test_usage_is_your_own_and_everyones_for_admins(server: LiveServer, people: dict[str, tuple[str, str]]) -> None:
    admin_env = env_for(server, server.admin_token)
    ids = {p: json.loads(egress(admin_env, "show", n, "--json").stdout)["user_id"] for p, (n, _) in people.items()}
    record_usage(server, [(ids["erin"], "api.anthropic.com", 4, 2048, 3 * 1024 * 1024, 0),
                          (ids["frank"], "api.openai.com", 1, 10, 20, 2)])

    erin_env = env_for(server, people["erin"][1])
    mine = egress(erin_env, "usage")
    assert mine.returncode == 0, mine.stderr
    assert "api.anthropic.com" in mine.stdout and "3.0 MB" in mine.stdout and "api.openai.com" not in mine.stdout
    rows = json.loads(egress(erin_env, "usage", "--json").stdout)
    assert [(r["host"], r["connections"], r["bytes_down"]) for r in rows] == [("api.anthropic.com", 4, 3 * 1024 * 1024)]
    denied = egress(erin_env, "usage", "--all")
    assert denied.returncode == 1 and "forbidden" in denied.stderr
    denied = egress(erin_env, "show", people["erin"][0])
    assert denied.returncode == 1 and "forbidden" in denied.stderr

    everyone = egress(admin_env, "usage", "--all")
    assert everyone.returncode == 0, everyone.stderr
    for text in (people["erin"][0], people["frank"][0], "api.anthropic.com", "api.openai.com", "not on the allow-list"):
        assert text in everyone.stdout
