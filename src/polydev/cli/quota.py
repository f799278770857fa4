"""`polydev quota`: each user's limits and use (admins set overrides), and the host's capacity, over the API
(POLYDEV_URL, POLYDEV_TOKEN) like the other remote commands."""

from __future__ import annotations

import json
from typing import Any

import typer

from polydev.cli.remote import TOKEN_OPTION, URL_OPTION, call_api, user_id_of

app = typer.Typer(help="Quotas: live VMs, logins, runs, vCPUs and memory per user; the host's capacity.",
                  no_args_is_help=True)

LIMITS = ("vms", "logins", "runs", "vcpus", "memory_mb")
JSON_OPTION = typer.Option(False, "--json", help="print the API's JSON")


def _table(rows: list[dict[str, Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("user", *LIMITS)
    for q in rows:
        cells = [f"{q['usage'][k]} / {q['limits'][k]}{' *' if k in q['overrides'] else ''}" for k in LIMITS]
        table.add_row(q.get("user_name") or q["user_id"], *cells)
    Console(width=200).print(table)
    typer.echo("in use / limit; * the user's own limit", err=True)


@app.command("show")
def show(user: str = typer.Argument(None, help="a user's name or id (admin); none: yours"),
         json_out: bool = JSON_OPTION, url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """A user's limits and what they hold against each."""
    q = call_api(url, token, lambda pd: pd.quotas(user_id_of(pd, user) if user else None))
    print(json.dumps(q, indent=2)) if json_out else _table([q])


@app.command("ls")
def ls(json_out: bool = JSON_OPTION, url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """Every user's limits and use, and the host's capacity (admin)."""
    rows, host = call_api(url, token, lambda pd: (pd.all_quotas(), pd.host_capacity()))
    if json_out:
        print(json.dumps({"users": rows, "host": host}, indent=2))
        return
    _table(rows)
    for resource, v in host["capacity"].items():
        typer.echo(f"host {resource}: {v['used']} of {v['capacity']} in use")


@app.command("set")
def set_(user: str = typer.Argument(..., help="the user's name or id"),
         limit: list[str] = typer.Option([], "--limit", help=f"NAME=N, NAME one of {', '.join(LIMITS)} (repeatable)"),
         clear: bool = typer.Option(False, "--clear", help="drop the user's own limits"),
         json_out: bool = JSON_OPTION, url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """Set USER's own limits (the others keep the defaults); applies to their next login, run or VM."""
    limits: dict[str, int] = {}
    for item in [] if clear else limit:
        name, sep, value = item.partition("=")
        if not sep or name not in LIMITS or not value.strip().isdigit():
            typer.secho(f"error: --limit takes NAME=N with NAME one of {', '.join(LIMITS)}", fg="red", err=True)
            raise typer.Exit(2)
        limits[name] = int(value)
    if not limits and not clear:
        typer.secho("error: give --limit NAME=N (repeatable) or --clear", fg="red", err=True)
        raise typer.Exit(2)
    q = call_api(url, token, lambda pd: pd.set_quotas(user_id_of(pd, user), limits))
    print(json.dumps(q, indent=2)) if json_out else _table([q])
