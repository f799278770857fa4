from __future__ import annotations

import json

import typer


def config(as_json: bool = typer.Option(False, "--json", help="print JSON instead of a table")) -> None:
    """Print the effective configuration, secrets redacted."""
    from rich.console import Console
    from rich.table import Table

    from polydev.config import get_settings

    values = get_settings().redacted()
    if as_json:
        typer.echo(json.dumps(values, indent=2, default=str))
        return
    table = Table("setting", "value", title="Polydev configuration")
    table.columns[1].overflow = "fold"
    for key in sorted(values):
        table.add_row(key, str(values[key]))
    Console().print(table)
