"""`polydev web vendor`: install the dashboard's noVNC and xterm.js (pinned versions, integrity-checked) before
serving."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

app = typer.Typer(help="The web dashboard.", no_args_is_help=True)


@app.command("vendor")
def vendor(tarball: Annotated[list[Path] | None, typer.Option(
        exists=True, dir_okay=False, help="use this package .tgz (@novnc/novnc, @xterm/xterm or @xterm/addon-fit, "
        "told apart by their pinned integrity) instead of asking npm (offline installs); repeatable")] = None,
           ) -> None:
    """Install noVNC and xterm.js from their npm packages into the vendor directory the server serves."""
    from polydev.config import get_settings
    from polydev.web.vendor import VendorError, install_all

    try:
        done = install_all(get_settings(), tarballs=tarball or ())
    except VendorError as exc:
        typer.echo(f"error: {exc}", err=True)
        raise typer.Exit(1) from None
    for pkg, path in done:
        typer.echo(f"{pkg.title} {pkg.version} in {path}")
