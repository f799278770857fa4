"""`polydev keys`: master-key generation and rotation for the credential vault."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:  # the store is imported inside the commands: `polydev --help` stays fast
    from polydev.services import Services
    from polydev.store.vault import FileKeySource

app = typer.Typer(help="Manage the credential vault's master keys.", no_args_is_help=True)


def _file_source(services: Services) -> FileKeySource | None:
    from polydev.store.vault import FileKeySource

    return None if services.settings.credential_encryption_key else FileKeySource(services.settings.master_key_file)


@app.command()
def generate() -> None:
    """Print a new random master key (base64 of 32 bytes) for CREDENTIAL_ENCRYPTION_KEY."""
    from polydev.store.vault import generate_master_key

    typer.echo(generate_master_key())


@app.command()
def rotate() -> None:
    """Re-encrypt every stored credential under a new master key; reads keep working meanwhile."""
    from polydev.cli._run import with_services
    from polydev.store import rotation

    async def run(services: Services) -> rotation.RotationResult:
        return await rotation.rotate(services.vault, _file_source(services), services.credentials)

    try:
        result = with_services(run)
    except rotation.RotationError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None
    r = result.report
    typer.echo(f"primary key {result.old_key_id} -> {result.new_key_id}: re-encrypted {r.reencrypted}, "
               f"already current {r.already_current}, failed {len(r.failed)}")
    if r.failed:
        typer.secho(f"records no configured key opens: {', '.join(r.failed)}", fg="red", err=True)
        raise typer.Exit(1)


@app.command()
def prune() -> None:
    """Drop old master keys from the key file once no record needs them (embedded key-file mode)."""
    from polydev.cli._run import with_services
    from polydev.store import rotation

    async def run(services: Services) -> list[str]:
        source = _file_source(services)
        if source is None:
            raise rotation.RotationError("keys come from the environment: remove CREDENTIAL_ENCRYPTION_PREVIOUS_KEYS")
        return await rotation.prune(services.vault, source, services.credentials)

    try:
        dropped = with_services(run)
    except rotation.RotationError as exc:
        typer.secho(str(exc), fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(f"dropped {len(dropped)} key(s): {', '.join(dropped) or '-'}")
