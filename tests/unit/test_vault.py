from __future__ import annotations

import base64
import dataclasses
import os
import stat
import uuid
from pathlib import Path

import pytest

from polydev.store.vault import (
    FileKeySource,
    KeyConfigError,
    StaticKeySource,
    Vault,
    VaultError,
    generate_master_key,
    key_id_of,
)

SECRET = b'{"claudeAiOauth": {"accessToken": "sk-ant-oat01-xyz", "refreshToken": "sk-ant-ort01-abc"}}'


@pytest.fixture
def vault() -> Vault:
    return Vault(StaticKeySource(generate_master_key()))


def test_round_trip(vault: Vault) -> None:
    user = uuid.uuid4()
    record = vault.seal(user, "claude_code", SECRET)
    assert vault.open(user, "claude_code", record) == SECRET
    assert SECRET not in base64.b64decode(record.ciphertext)


def test_every_record_gets_fresh_salt_and_iv(vault: Vault) -> None:
    user = uuid.uuid4()
    a, b = vault.seal(user, "codex", SECRET), vault.seal(user, "codex", SECRET)
    assert a.salt != b.salt and a.iv != b.iv and a.ciphertext != b.ciphertext
    assert len(base64.b64decode(a.salt)) == 16 and len(base64.b64decode(a.iv)) == 12
    assert len(base64.b64decode(a.tag)) == 16


def test_ciphertext_moved_to_another_user_fails(vault: Vault) -> None:
    alice, bob = uuid.uuid4(), uuid.uuid4()
    record = vault.seal(alice, "codex", SECRET)
    with pytest.raises(VaultError):
        vault.open(bob, "codex", record)


def test_ciphertext_moved_to_another_provider_fails(vault: Vault) -> None:
    user = uuid.uuid4()
    record = vault.seal(user, "codex", SECRET)
    with pytest.raises(VaultError):
        vault.open(user, "gemini_cli", record)


@pytest.mark.parametrize("field", ["ciphertext", "iv", "tag", "salt"])
def test_tampering_with_any_column_fails(vault: Vault, field: str) -> None:
    user = uuid.uuid4()
    record = vault.seal(user, "codex", SECRET)
    raw = bytearray(base64.b64decode(getattr(record, field)))
    raw[0] ^= 0x01
    tampered = dataclasses.replace(record, **{field: base64.b64encode(bytes(raw)).decode()})
    with pytest.raises(VaultError):
        vault.open(user, "codex", tampered)


def test_garbage_columns_give_vault_error_not_crash(vault: Vault) -> None:
    user = uuid.uuid4()
    record = vault.seal(user, "codex", SECRET)
    with pytest.raises(VaultError):
        vault.open(user, "codex", dataclasses.replace(record, iv="not base64!!"))
    with pytest.raises(VaultError):
        vault.open(user, "codex", dataclasses.replace(record, iv=base64.b64encode(b"short").decode()))


def test_other_master_key_cannot_open_and_says_which_key_is_missing(vault: Vault) -> None:
    user = uuid.uuid4()
    record = vault.seal(user, "codex", SECRET)
    other = Vault(StaticKeySource(generate_master_key()))
    with pytest.raises(VaultError, match=record.key_id):
        other.open(user, "codex", record)


def test_previous_keys_open_old_records_and_new_records_use_primary() -> None:
    old, new = generate_master_key(), generate_master_key()
    user = uuid.uuid4()
    record = Vault(StaticKeySource(old)).seal(user, "codex", SECRET)
    rotated = Vault(StaticKeySource(new, [old]))
    assert rotated.open(user, "codex", record) == SECRET
    assert rotated.seal(user, "codex", SECRET).key_id == key_id_of(base64.b64decode(new)) != record.key_id


def test_key_id_does_not_reveal_the_key() -> None:
    key = generate_master_key()
    assert base64.b64decode(key).hex()[:16] != key_id_of(base64.b64decode(key))


@pytest.mark.parametrize("bad", ["", "not base64 at all", base64.b64encode(b"too short").decode()])
def test_bad_master_key_is_a_clear_config_error(bad: str) -> None:
    with pytest.raises(KeyConfigError):
        StaticKeySource(bad)


def test_key_file_is_generated_once_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "data" / "master.keys"
    source = FileKeySource(path)
    ring = source.load()
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert FileKeySource(path).load().primary == ring.primary


def test_vault_picks_up_a_rotated_key_file(tmp_path: Path) -> None:
    path = tmp_path / "master.keys"
    source = FileKeySource(path)
    vault = Vault(source)
    user = uuid.uuid4()
    old_record = vault.seal(user, "codex", SECRET)
    # Another process rotates: new primary first, old kept for reading.
    writer = FileKeySource(path)
    writer.write([generate_master_key(), *writer.read_lines()])
    os.utime(path, ns=(0, os.stat(path).st_mtime_ns + 1_000_000))  # coarse-mtime filesystems
    new_record = vault.seal(user, "codex", SECRET)
    assert new_record.key_id != old_record.key_id
    assert vault.open(user, "codex", old_record) == SECRET
    assert Vault(FileKeySource(path)).open(user, "codex", new_record) == SECRET


def test_a_derived_secret_is_the_same_for_one_key_and_label_and_differs_otherwise() -> None:
    key = generate_master_key()
    one, two = Vault(StaticKeySource(key)), Vault(StaticKeySource(key))  # two servers, one configured key
    assert one.derive("peer hop") == two.derive("peer hop") and len(one.derive("peer hop")) == 32
    assert one.derive("peer hop") != one.derive("something else")
    assert Vault(StaticKeySource(generate_master_key())).derive("peer hop") != one.derive("peer hop")
    assert base64.b64decode(key) not in one.derive("peer hop")
