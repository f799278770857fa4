"""Commands that talk to a running Polydev over its API (POLYDEV_URL, POLYDEV_TOKEN)."""

from __future__ import annotations

import sys

from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:  # httpx is imported inside the commands: the CLI's start-up stays fast
    from polydev.client import PolydevError

credentials = typer.Typer(help="Your stored provider credentials (on the server named by POLYDEV_URL).",
                          no_args_is_help=True)

_URL = typer.Option(None, "--url", envvar="POLYDEV_URL", help="Polydev API, default http://127.0.0.1:4000")
_TOKEN = typer.Option(None, "--token", envvar="POLYDEV_TOKEN", help="your API token", show_default=False)


def _fail(exc: PolydevError) -> None:
    typer.secho(f"error: {exc}", fg="red", err=True)
    raise typer.Exit(1)


@credentials.command("ls")
def ls(url: str = _URL, token: str = _TOKEN) -> None:
    """List your stored credentials (never their contents)."""
    from rich.console import Console
    from rich.table import Table

    from polydev.client import PolydevClient, PolydevError

    try:
        with PolydevClient(url, token) as pd:
            rows = pd.credentials()
    except PolydevError as exc:
        _fail(exc)
    table = Table("provider", "kind", "valid", "created", "last validated")
    for c in rows:
        table.add_row(c["provider"], c["kind"], "yes" if c["is_valid"] else "no", c["created_at"][:19],
                      (c["last_validated"] or "-")[:19])
    Console().print(table)


@credentials.command("set-key")
def set_key(provider: str, url: str = _URL, token: str = _TOKEN) -> None:
    """Store your own API key for PROVIDER. The key is read from stdin (or asked for, hidden), never
    taken as an argument, so it stays out of shell history and process listings."""
    from polydev.client import PolydevClient, PolydevError

    key = sys.stdin.readline().strip() if not sys.stdin.isatty() else typer.prompt("API key", hide_input=True)
    try:
        with PolydevClient(url, token) as pd:
            pd.set_api_key(provider, key)
    except PolydevError as exc:
        _fail(exc)
    typer.echo(f"stored an API key for {provider}")


@credentials.command("rm")
def rm(provider: str, url: str = _URL, token: str = _TOKEN) -> None:
    """Forget your credential for PROVIDER."""
    from polydev.client import PolydevClient, PolydevError

    try:
        with PolydevClient(url, token) as pd:
            pd.delete_credential(provider)
    except PolydevError as exc:
        _fail(exc)
    typer.echo(f"removed the {provider} credential")
