"""`polydev web vendor`: install the dashboard's noVNC (pinned version, integrity-checked) before serving."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="The web dashboard.", no_args_is_help=True)


@app.command("vendor")
def vendor(tarball: Annotated[Path | None, typer.Option(
        exists=True, dir_okay=False, help="use this @novnc/novnc .tgz instead of asking npm (offline installs)")] = None,
           ) -> None:
    """Install noVNC from its npm package into the vendor directory the server serves."""
    from polydev.config import get_settings
    from polydev.web.vendor import NOVNC_VERSION, VendorError, install_novnc

    try:
        path = install_novnc(get_settings(), tarball=tarball)
    except VendorError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    typer.echo(f"noVNC {NOVNC_VERSION} in {path}")
