"""Master-key rotation.

Embedded (key file) mode: a new key is prepended to the key file, so it seals from now on while the old
ones still open; then every record is re-sealed under it. Running servers notice the file change on
their next vault access, so reads keep working throughout. Old keys stay in the file until `prune`,
which first re-seals anything a server may have written under an old key meanwhile.

Environment mode: the operator deploys the new key as CREDENTIAL_ENCRYPTION_KEY with the old one in
CREDENTIAL_ENCRYPTION_PREVIOUS_KEYS, then runs the rotation, then drops the previous keys.
"""

from __future__ import annotations

from dataclasses import dataclass

from polydev.store.credentials import CredentialRepo, RotationReport
from polydev.store.vault import FileKeySource, Vault, generate_master_key, key_id_of, decode_master_key


class RotationError(Exception):
    pass


@dataclass(frozen=True)
class RotationResult:
    old_key_id: str
    new_key_id: str
    report: RotationReport


async def rotate(vault: Vault, source: FileKeySource | None, repo: CredentialRepo) -> RotationResult:
    old = vault.primary_key_id
    if source is not None:
        source.write([generate_master_key(), *source.read_lines()])
    new = vault.primary_key_id  # the vault re-reads a changed key file
    if source is None and new == old and not await _stale_records(vault, repo):
        raise RotationError(
            "CREDENTIAL_ENCRYPTION_KEY is set in the environment, so the new key comes from there: set it to a "
            "new key (e.g. `polydev keys generate`), move the old one to CREDENTIAL_ENCRYPTION_PREVIOUS_KEYS, "
            "then run `polydev keys rotate` again"
        )
    return RotationResult(old, new, await repo.reencrypt_all())


async def _stale_records(vault: Vault, repo: CredentialRepo) -> bool:
    return bool(await repo.key_ids_in_use() - {vault.primary_key_id})


async def prune(vault: Vault, source: FileKeySource, repo: CredentialRepo) -> list[str]:
    """Re-seal stragglers, then drop every non-primary key no record uses. Returns the dropped key ids."""
    report = await repo.reencrypt_all()
    if report.failed:
        raise RotationError(f"{len(report.failed)} record(s) no configured key opens; nothing pruned")
    in_use = await repo.key_ids_in_use()
    lines = source.read_lines()
    keep = [lines[0]] + [k for k in lines[1:] if key_id_of(decode_master_key(k)) in in_use]
    dropped = [key_id_of(decode_master_key(k)) for k in lines[1:] if k not in keep]
    if dropped:
        source.write(keep)
    return dropped
