"""Storage against SQLite and a real PostgreSQL server: schema, credentials, rotation, tokens."""

from __future__ import annotations

import asyncio
import uuid

import pytest
from sqlalchemy import inspect, select, text, update

from polydev.services import Services
from polydev.store import db, rotation
from polydev.store.models import ApiToken, Credential
from polydev.store.vault import FileKeySource, VaultError

SECRET = b'{"tokens": {"access_token": "at-123", "refresh_token": "rt-456"}}'


async def test_migrations_create_every_table_and_rerun_cleanly(services: Services) -> None:
    await db.migrate(services.db_engine)  # second run: a no-op, not an error
    async with services.db_engine.connect() as conn:
        tables = set(await conn.run_sync(lambda c: inspect(c).get_table_names()))
        version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar_one()
    assert {"users", "api_tokens", "vms", "auth_sessions", "credentials", "vm_cleanup_tasks", "runs",
            "network_leases", "servers", "sandboxes"} <= tables
    assert version == "0013"  # head: bump with every new revision


async def test_seed_columns_hold_only_ciphertext(services: Services) -> None:
    user = await services.users.create("alice")
    await services.credentials.put(user.id, "codex", "oauth", SECRET)
    async with services.factory() as s:
        row = await s.scalar(select(Credential))
    assert row is not None
    for column in ("encrypted_credentials", "encryption_iv", "encryption_tag", "encryption_salt", "key_id"):
        assert getattr(row, column)
        assert b"at-123" not in getattr(row, column).encode()
    assert await services.credentials.reveal(user.id, "codex") == SECRET


async def test_put_replaces_the_credential(services: Services) -> None:
    user = await services.users.create("alice")
    await services.credentials.put(user.id, "codex", "oauth", SECRET)
    await services.credentials.put(user.id, "codex", "api_key", b"sk-new-key-123456")
    rows = await services.credentials.list(user.id)
    assert [(r.provider, r.kind) for r in rows] == [("codex", "api_key")]
    assert await services.credentials.reveal(user.id, "codex") == b"sk-new-key-123456"


async def _copy_sealed_columns(services: Services, src: Credential, dst_id: uuid.UUID) -> None:
    async with services.factory() as s:
        await s.execute(update(Credential).where(Credential.credential_id == dst_id).values(
            encrypted_credentials=src.encrypted_credentials, encryption_iv=src.encryption_iv,
            encryption_tag=src.encryption_tag, encryption_salt=src.encryption_salt, key_id=src.key_id))
        await s.commit()


async def test_ciphertext_copied_to_another_users_row_fails(services: Services) -> None:
    alice = await services.users.create("alice")
    bob = await services.users.create("bob")
    a = await services.credentials.put(alice.id, "codex", "oauth", SECRET)
    b = await services.credentials.put(bob.id, "codex", "oauth", b"bob's own")
    await _copy_sealed_columns(services, a, b.credential_id)
    with pytest.raises(VaultError):
        await services.credentials.reveal(bob.id, "codex")
    assert await services.credentials.reveal(alice.id, "codex") == SECRET


async def test_ciphertext_copied_to_another_providers_row_fails(services: Services) -> None:
    alice = await services.users.create("alice")
    a = await services.credentials.put(alice.id, "codex", "oauth", SECRET)
    g = await services.credentials.put(alice.id, "gemini_cli", "oauth", b"gemini creds")
    await _copy_sealed_columns(services, a, g.credential_id)
    with pytest.raises(VaultError):
        await services.credentials.reveal(alice.id, "gemini_cli")


async def test_rotation_reencrypts_every_row_while_reads_keep_working(services: Services) -> None:
    users = [await services.users.create(f"user{i}") for i in range(12)]
    expected = {}
    for u in users:
        for provider in ("claude_code", "codex", "gemini_cli"):
            payload = f"{u.id}/{provider}".encode()
            await services.credentials.put(u.id, provider, "oauth", payload)
            expected[(u.id, provider)] = payload
    old_key = services.vault.primary_key_id
    source = FileKeySource(services.settings.master_key_file)

    done = asyncio.Event()
    reads = 0
    failures: list[str] = []

    async def reader() -> None:
        # Reads through the server's own vault (not the rotation's): this is what a running API does.
        nonlocal reads
        while not done.is_set():
            for (uid, provider), payload in expected.items():
                try:
                    got = await services.credentials.reveal(uid, provider)
                    if got != payload:
                        failures.append(f"{uid}/{provider}: wrong plaintext")
                except VaultError as exc:
                    failures.append(f"{uid}/{provider}: {exc}")
                reads += 1
            await asyncio.sleep(0)

    # The rotation runs with a separate Vault over the same key file, as `polydev keys rotate` would.
    from polydev.services import make_vault
    from polydev.store.credentials import CredentialRepo

    rotator_vault = make_vault(services.settings)
    readers = [asyncio.create_task(reader()) for _ in range(2)]
    await asyncio.sleep(0.05)
    result = await rotation.rotate(rotator_vault, source, CredentialRepo(services.factory, rotator_vault))
    await asyncio.sleep(0.05)
    done.set()
    await asyncio.gather(*readers)

    assert failures == []
    assert reads > len(expected)
    assert result.old_key_id == old_key != result.new_key_id
    assert result.report.reencrypted == len(expected) and result.report.failed == []
    assert await services.credentials.key_ids_in_use() == {result.new_key_id}
    for (uid, provider), payload in expected.items():
        assert await services.credentials.reveal(uid, provider) == payload

    dropped = await rotation.prune(rotator_vault, source, CredentialRepo(services.factory, rotator_vault))
    assert dropped == [old_key]
    assert len(source.read_lines()) == 1
    for (uid, provider), payload in expected.items():
        assert await services.credentials.reveal(uid, provider) == payload


async def test_tokens_are_stored_hashed_and_authenticate(services: Services) -> None:
    user = await services.users.create("alice")
    issued = await services.users.issue_token(user.id, "laptop")
    async with services.factory() as s:
        stored = list(await s.scalars(select(ApiToken)))
    assert len(stored) == 1 and issued.secret not in (stored[0].token_hash, stored[0].prefix)
    assert (await services.users.authenticate(issued.secret)).id == user.id  # type: ignore[union-attr]
    assert await services.users.authenticate(issued.secret + "x") is None
    assert await services.users.revoke_token(user.id, issued.token.id) is True
    assert await services.users.authenticate(issued.secret) is None


async def test_bootstrap_admin_only_once(services: Services) -> None:
    first = await services.users.bootstrap_admin()
    assert first is not None
    assert await services.users.bootstrap_admin() is None
    admin = await services.users.authenticate(first.secret)
    assert admin is not None and admin.role == "admin"


async def test_models_and_migrations_agree(services: Services) -> None:
    """Autogenerate finds nothing to add: every model change came with its Alembic revision."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    from polydev.store.models import Base

    def diff(conn):  # type: ignore[no-untyped-def]
        return compare_metadata(MigrationContext.configure(conn), Base.metadata)

    async with services.db_engine.connect() as conn:
        changes = await conn.run_sync(diff)
    assert changes == []


async def test_upgrade_from_the_first_schema_keeps_vm_rows(database_url: str) -> None:
    """An installation on revision 0001 upgrades in place; the seed's firecracker_pid becomes backend_pid."""
    from polydev.config import normalize_database_url

    engine = db.create_engine(normalize_database_url(database_url))
    try:
        await db.migrate(engine, "0001")
        vm_id = uuid.uuid4()
        async with engine.begin() as conn:
            await conn.execute(text(
                "INSERT INTO vms (vm_id, type, status, firecracker_pid, created_at) "
                "VALUES (:id, 'cli', 'running', 4242, CURRENT_TIMESTAMP)"),
                {"id": vm_id.hex if engine.dialect.name == "sqlite" else vm_id})
        await db.migrate(engine)
        async with engine.connect() as conn:
            pid, purpose = (await conn.execute(text("SELECT backend_pid, type FROM vms"))).one()
            columns = {c["name"] for c in await conn.run_sync(lambda c: inspect(c).get_columns("vms"))}
        assert pid == 4242 and purpose == "cli"
        assert "vm_type" not in columns  # 0005: it only repeated `type`, the VM's purpose
    finally:
        await engine.dispose()


async def test_token_cache_trusts_for_its_ttl_and_revocation_here_is_immediate(services: Services) -> None:
    from polydev.store.users import UserRepo

    now = [0.0]
    cached = UserRepo(services.factory, auth_cache_seconds=5, clock=lambda: now[0])
    other = UserRepo(services.factory)  # another replica, no cache
    user = await cached.create("alice")
    issued = await cached.issue_token(user.id, "t")
    assert await cached.authenticate(issued.secret) is not None
    # Revoked by another replica: trusted here until the entry expires, then refused.
    assert await other.revoke_token(user.id, issued.token.id)
    assert await cached.authenticate(issued.secret) is not None
    now[0] += 5.1
    assert await cached.authenticate(issued.secret) is None
    # Revoked through this repo: refused at once.
    second = await cached.issue_token(user.id, "t2")
    assert await cached.authenticate(second.secret) is not None
    assert await cached.revoke_token(user.id, second.token.id)
    assert await cached.authenticate(second.secret) is None


async def test_one_live_turn_per_workspace_and_run_per_credential_each_refused_by_name(services: Services) -> None:
    """The database holds both rules (runs.live_key, runs.turn_key); a refused insert names the rule it broke,
    also when the read before it saw nothing (two turns racing)."""
    from polydev.store.models import Workspace
    from polydev.store.runs import CredentialBusy, RunRepo, WorkspaceTurnBusy
    from polydev.store.workspaces import WorkspaceRepo

    user = await services.users.create("turns")
    workspace = Workspace(user_id=user.id, name="w", source="empty", state="ready")
    await WorkspaceRepo(services.factory).add(workspace)
    runs = RunRepo(services.factory, None)
    first = await runs.create(user.id, "codex", "one", timeout_seconds=60, credential_kind="api_key",
                              workspace_id=workspace.id)
    with pytest.raises(WorkspaceTurnBusy):
        await runs.create(user.id, "claude_code", "two", timeout_seconds=60, credential_kind="api_key",
                          workspace_id=workspace.id)

    async def nothing_live(_workspace_id: uuid.UUID) -> None:  # the read that lost the race
        return None

    racing = RunRepo(services.factory, None)
    racing.live_turn = _once(nothing_live, racing.live_turn)  # type: ignore[method-assign]
    with pytest.raises(WorkspaceTurnBusy):  # the database refused it, and the read after says why
        await racing.create(user.id, "gemini_cli", "three", timeout_seconds=60, credential_kind="api_key",
                            workspace_id=workspace.id)
    with pytest.raises(CredentialBusy):
        await runs.create(user.id, "codex", "same credential", timeout_seconds=60, credential_kind="api_key")
    assert (await runs.live_turn(workspace.id)).id == first.id  # type: ignore[union-attr]


def _once(first, then):  # type: ignore[no-untyped-def]
    """A callable that answers with `first` on its first call and `then` after."""
    calls = 0

    async def call(*args):  # type: ignore[no-untyped-def]
        nonlocal calls
        calls += 1
        return await (first if calls == 1 else then)(*args)

    return call
