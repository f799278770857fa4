"""The `polydev` command as an operator uses it, in subprocesses with their own environment."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from polydev.store.vault import generate_master_key
from tests.support.servers import free_port

ROOT = Path(__file__).resolve().parents[2]


def polydev(*args: str, env: dict[str, str], check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "polydev", *args], env=env, capture_output=True, text=True,
                          check=check, timeout=120)


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if k not in ("DATABASE_URL", "REDIS_URL", "CREDENTIAL_ENCRYPTION_KEY", "CREDENTIAL_ENCRYPTION_PREVIOUS_KEYS")}
    return {**base, "POLYDEV_DATA_DIR": str(tmp_path / "data")}


def test_config_redacts_every_secret(env: dict[str, str]) -> None:
    key = generate_master_key()
    env |= {"CREDENTIAL_ENCRYPTION_KEY": key, "DATABASE_URL": "postgresql://polydev:hunter2secret@db.internal/polydev",
            "REDIS_URL": "redis://:redispass99@cache.internal:6379/0", "PORT": "4321"}
    out = polydev("config", "--json", env=env).stdout
    values = json.loads(out)
    assert values["PORT"] == 4321 and values["SESSION_STORE"] == "redis"
    assert values["DATABASE_URL"].startswith("postgresql+asyncpg://polydev:***@db.internal")
    for secret in (key, "hunter2secret", "redispass99"):
        assert secret not in out
    table = polydev("config", env=env).stdout
    assert "PORT" in table and key not in table and "hunter2secret" not in table


def test_invalid_setting_is_a_clear_error(env: dict[str, str]) -> None:
    result = polydev("config", env=env | {"PORT": "not-a-port"}, check=False)
    assert result.returncode != 0
    assert "port" in (result.stderr + result.stdout).lower()


def test_users_create_prints_a_working_token(env: dict[str, str]) -> None:
    token = polydev("users", "create", "dave", env=env).stdout.strip()
    assert token.startswith("pd_")
    again = polydev("users", "create", "dave", env=env, check=False)
    assert again.returncode == 2 and "already exists" in again.stderr
    assert "dave\tuser" in polydev("users", "ls", env=env).stdout


def test_keys_rotate_and_prune_keep_credentials_readable(env: dict[str, str]) -> None:
    import asyncio

    from polydev.config import Settings
    from polydev.services import open_services

    data = Path(env["POLYDEV_DATA_DIR"])

    async def seed() -> list[tuple[object, str]]:
        svc = await open_services(Settings(POLYDEV_DATA_DIR=data))
        try:
            u = await svc.users.create("erin")
            for p in ("claude_code", "codex"):
                await svc.credentials.put(u.id, p, "oauth", f"secret-{p}".encode())
            return [(u.id, p) for p in ("claude_code", "codex")]
        finally:
            await svc.close()

    async def read_all() -> tuple[list[bytes | None], set[str]]:
        svc = await open_services(Settings(POLYDEV_DATA_DIR=data))
        try:
            return ([await svc.credentials.reveal(uid, p) for uid, p in rows],  # type: ignore[arg-type]
                    await svc.credentials.key_ids_in_use())
        finally:
            await svc.close()

    rows = asyncio.run(seed())
    _, before_ids = asyncio.run(read_all())
    out = polydev("keys", "rotate", env=env).stdout
    assert "re-encrypted 2" in out and "failed 0" in out
    values, after_ids = asyncio.run(read_all())
    assert values == [b"secret-claude_code", b"secret-codex"]
    assert after_ids.isdisjoint(before_ids) and len(after_ids) == 1
    assert len((data / "master.keys").read_text().split()) == 2
    assert "dropped 1 key" in polydev("keys", "prune", env=env).stdout
    assert len((data / "master.keys").read_text().split()) == 1
    assert asyncio.run(read_all())[0] == [b"secret-claude_code", b"secret-codex"]


def test_keys_rotate_with_environment_key_explains_the_procedure(env: dict[str, str]) -> None:
    result = polydev("keys", "rotate", env=env | {"CREDENTIAL_ENCRYPTION_KEY": generate_master_key()}, check=False)
    assert result.returncode == 2 and "CREDENTIAL_ENCRYPTION_PREVIOUS_KEYS" in result.stderr


def test_readme_run_command_serves_health(env: dict[str, str], tmp_path: Path) -> None:
    """scripts/run.sh — the README's first command — brings the API up on the embedded default."""
    port = free_port()
    log = open(tmp_path / "run.log", "wb")
    proc = subprocess.Popen([str(ROOT / "scripts" / "run.sh")], env=env | {"PORT": str(port)}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300  # may install into .venv on a first run
        body = None
        while time.monotonic() < deadline and proc.poll() is None:
            try:
                r = httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
                body = r.json()
                break
            except httpx.TransportError:
                time.sleep(0.2)
        assert body is not None, (tmp_path / "run.log").read_text()[-3000:]
        assert body["status"] == "ok" and body["database"]["kind"] == "sqlite"
        assert body["session_store"]["kind"] == "memory"
        assert "Its API token (shown once)" in (tmp_path / "run.log").read_text()
    finally:
        os.killpg(proc.pid, 15)
        proc.wait(30)
        log.close()


def test_credentials_commands_against_a_live_server(live_server, env: dict[str, str]) -> None:  # type: ignore[no-untyped-def]
    key = "sk-cli-0123456789abcdef"
    env = env | {"POLYDEV_URL": live_server.url, "POLYDEV_TOKEN": live_server.admin_token}
    stored = subprocess.run([sys.executable, "-m", "polydev", "credentials", "set-key", "gemini_cli"], env=env,
                            input=key + "\n", capture_output=True, text=True, timeout=60)
    assert stored.returncode == 0, stored.stderr
    listed = polydev("credentials", "ls", env=env).stdout
    assert "gemini_cli" in listed and "api_key" in listed and key not in listed
    bad = polydev("credentials", "rm", "nope", env=env, check=False)
    assert bad.returncode == 1 and "unknown_provider" in bad.stderr
    assert "removed" in polydev("credentials", "rm", "gemini_cli", env=env).stdout
    assert "gemini_cli" not in polydev("credentials", "ls", env=env).stdout
    unreachable = polydev("credentials", "ls", env=env | {"POLYDEV_URL": f"http://127.0.0.1:{free_port()}"},
                          check=False)
    assert unreachable.returncode == 1 and "cannot reach" in unreachable.stderr
