"""`polydev users`: manage users and tokens from the server's machine (no API token needed)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from polydev.services import Services

app = typer.Typer(help="Manage users and their API tokens.", no_args_is_help=True)


@app.command("create")
def create(name: str, admin: bool = typer.Option(False, "--admin", help="give the user the admin role")) -> None:
    """Create a user and print its first API token (shown once)."""
    from polydev.cli._run import with_services
    from polydev.store.users import NameTaken

    async def run(services: Services) -> str:
        user = await services.users.create(name, "admin" if admin else "user")
        return (await services.users.issue_token(user.id, "cli")).secret

    try:
        secret = with_services(run)
    except NameTaken:
        typer.secho(f"a user named {name!r} already exists", fg="red", err=True)
        raise typer.Exit(2) from None
    typer.echo(secret)


@app.command("ls")
def ls() -> None:
    """List users."""
    from polydev.cli._run import with_services

    async def run(services: Services) -> list[tuple[str, str, str]]:
        return [(str(u.id), u.name, u.role) for u in await services.users.list()]

    for row in with_services(run):
        typer.echo("\t".join(row))
