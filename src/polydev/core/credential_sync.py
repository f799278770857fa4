"""A provider's credential files, read back from a VM: sealed when a login has written them, sealed again
when a run's CLI has refreshed them. Both read them the one way (`read_back`)."""

from __future__ import annotations

import uuid

import structlog

from polydev.core.errors import LoginError
from polydev.core.guest import Guest
from polydev.providers.base import CredentialBundle, GuestEnv, ProviderAdapter
from polydev.store.credentials import CredentialRepo

log = structlog.get_logger(__name__)


async def read_back(guest: Guest, env: GuestEnv, adapter: ProviderAdapter) -> dict[str, tuple[bytes, int]]:
    """The adapter's credential files the guest holds now: path under the home → (content, permission
    bits), in the adapter's order; a file that does not exist is left out."""
    files: dict[str, tuple[bytes, int]] = {}
    for rel in adapter.credential_files:
        found = await guest.read(env.home_path(rel))
        if found is not None:
            files[rel] = (found[0], found[1] & 0o777)
    return files


async def capture(guest: Guest, env: GuestEnv, adapter: ProviderAdapter) -> CredentialBundle:
    """What a finished login wrote, as the bundle to seal; LoginError when a required file is missing."""
    files = await read_back(guest, env, adapter)
    for rel in adapter.credential_files:
        if rel in adapter.required_credential_files and rel not in files:
            raise LoginError(f"the login finished but {rel} was not written")
    return CredentialBundle("oauth", files)


async def write_back(guest: Guest, env: GuestEnv, adapter: ProviderAdapter, bundle: CredentialBundle, *,
                     credentials: CredentialRepo, user_id: uuid.UUID, run_id: uuid.UUID) -> bool:
    """After a run: seal the credential files again when the CLI changed them (a refresh); True if it did."""
    if bundle.kind != "oauth":
        return False
    fresh = CredentialBundle("oauth")
    for rel, (data, _mode) in (await read_back(guest, env, adapter)).items():
        if data.strip():  # the stored mode, not the guest's: the run's copies were all 0600
            fresh.files[rel] = (data, bundle.files.get(rel, (b"", 0o600))[1])
    if any(rel not in fresh.files for rel in adapter.required_credential_files):
        return False  # a CLI that deleted its login: keep what we had rather than store half of it
    # Only the token files decide: the CLIs rewrite their other files (Claude's ~/.claude.json counts
    # start-ups) on every run, which is no refresh and not worth a new sealed record.
    if all(fresh.files[rel][0] == bundle.files.get(rel, (b"", 0))[0] for rel in adapter.required_credential_files):
        return False
    await credentials.put(user_id, adapter.name, "oauth", fresh.to_bytes())
    log.info("credential_refreshed", run_id=str(run_id), provider=adapter.name)
    return True
