"""Stored provider credentials, always sealed by the vault; plaintext never touches the database."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from sqlalchemy import delete, func, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from polydev.store.db import session_scope
from polydev.store.models import Credential, utcnow
from polydev.store.vault import SealedRecord, Vault, VaultError

# A user's upstream egress proxy URL (polydev.store.egress) is sealed here like a provider credential, under
# this pseudo-provider, so key rotation covers it; it is never listed with the provider credentials.
EGRESS_PROXY = "egress_proxy"


def _sealed(row: Credential) -> SealedRecord:
    return SealedRecord(row.encrypted_credentials, row.encryption_iv, row.encryption_tag,
                        row.encryption_salt, row.key_id)


@dataclass(frozen=True)
class RotationReport:
    reencrypted: int
    already_current: int
    failed: list[str]  # credential ids that no configured key opens


class CredentialRepo:
    def __init__(self, factory: async_sessionmaker[AsyncSession], vault: Vault) -> None:
        self._factory = factory
        self._vault = vault

    async def list(self, user_id: uuid.UUID) -> list[Credential]:
        async with self._factory() as s:
            q = (select(Credential).where(Credential.user_id == user_id, Credential.provider != EGRESS_PROXY)
                 .order_by(Credential.provider))
            return list(await s.scalars(q))

    async def put(self, user_id: uuid.UUID, provider: str, kind: str, secret: bytes) -> Credential:
        """Store (or replace) the user's credential for `provider`."""
        record = self._vault.seal(user_id, provider, secret)
        values = dict(kind=kind, encrypted_credentials=record.ciphertext, encryption_iv=record.iv,
                      encryption_tag=record.tag, encryption_salt=record.salt, key_id=record.key_id,
                      is_valid=True, updated_at=utcnow())
        for _ in range(2):  # a concurrent first insert for the same pair turns into an update on retry
            try:
                async with session_scope(self._factory) as s:
                    row = await s.scalar(select(Credential).where(
                        Credential.user_id == user_id, Credential.provider == provider))
                    if row is None:
                        row = Credential(user_id=user_id, provider=provider, **values)
                        s.add(row)
                    else:
                        for k, v in values.items():
                            setattr(row, k, v)
                    await s.flush()
                    return row
            except IntegrityError:
                continue
        raise RuntimeError("could not store credential after a concurrent write")

    async def reveal(self, user_id: uuid.UUID, provider: str) -> bytes | None:
        """The decrypted credential, for writing into a VM. Raises VaultError if it cannot be opened."""
        found = await self.reveal_with_kind(user_id, provider)
        return None if found is None else found[1]

    async def reveal_with_kind(self, user_id: uuid.UUID, provider: str) -> tuple[str, bytes] | None:
        """(kind, decrypted credential), or None when the user has none for `provider`."""
        async with self._factory() as s:
            row = await s.scalar(select(Credential).where(
                Credential.user_id == user_id, Credential.provider == provider))
        if row is None:
            return None
        return row.kind, self._vault.open(row.user_id, row.provider, _sealed(row))

    async def delete(self, user_id: uuid.UUID, provider: str) -> bool:
        async with session_scope(self._factory) as s:
            result = await s.execute(delete(Credential).where(
                Credential.user_id == user_id, Credential.provider == provider))
            return result.rowcount == 1

    async def reencrypt_all(self, batch: int = 100) -> RotationReport:
        """Re-seal every record not under the primary key, one row per transaction.

        Each update is conditional on the row still holding the ciphertext we opened, so a credential
        written concurrently (already under the new key) is never overwritten with stale content.
        """
        primary = self._vault.primary_key_id
        done = 0
        failed: list[str] = []
        async with self._factory() as s:
            ids = list(await s.scalars(select(Credential.credential_id).where(Credential.key_id != primary)))
            total = int(await s.scalar(select(func.count()).select_from(Credential)) or 0)
        for i in range(0, len(ids), batch):
            async with self._factory() as s:
                rows = list(await s.scalars(select(Credential).where(
                    Credential.credential_id.in_(ids[i:i + batch]))))
            for row in rows:
                try:
                    plain = self._vault.open(row.user_id, row.provider, _sealed(row))
                except VaultError:
                    failed.append(str(row.credential_id))
                    continue
                new = self._vault.seal(row.user_id, row.provider, plain)
                async with session_scope(self._factory) as s:
                    result = await s.execute(
                        update(Credential)
                        .where(Credential.credential_id == row.credential_id,
                               Credential.encrypted_credentials == row.encrypted_credentials)
                        .values(encrypted_credentials=new.ciphertext, encryption_iv=new.iv,
                                encryption_tag=new.tag, encryption_salt=new.salt, key_id=new.key_id)
                    )
                    done += result.rowcount
        return RotationReport(reencrypted=done, already_current=total - len(ids), failed=failed)

    async def key_ids_in_use(self) -> set[str]:
        async with self._factory() as s:
            return set(await s.scalars(select(Credential.key_id).distinct()))
