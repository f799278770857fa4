"""`polydev egress`: users' egress identities (admin) and the gateway's accounting, over the API
(POLYDEV_URL, POLYDEV_TOKEN) like the other remote commands.

A proxy URL with a password on the command line ends up in shell history and process listings: `--proxy-url -`
reads it from stdin instead (or asks for it, hidden). The server never answers it back, so nothing here
prints it either.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import typer

from polydev.cli.remote import TOKEN_OPTION, URL_OPTION, call_api, user_id_of

app = typer.Typer(help="Egress: how each user's VMs reach the outside (admin), and the gateway's accounting.",
                  no_args_is_help=True)

LIMIT_NAMES = ("concurrent", "per_minute", "bytes_per_day")
USER_ARG = typer.Argument(..., help="the user's name or id")
JSON_OPTION = typer.Option(False, "--json", help="print the API's JSON")


def _limits(items: list[str], clear: bool) -> dict[str, int] | None:
    if clear:
        return {}
    if not items:
        return None
    out: dict[str, int] = {}
    for item in items:
        name, sep, value = item.partition("=")
        if not sep or name not in LIMIT_NAMES or not value.strip().isdigit():
            typer.secho(f"error: --limit takes NAME=N with NAME one of {', '.join(LIMIT_NAMES)}", fg="red", err=True)
            raise typer.Exit(2)
        out[name] = int(value)
    return out


def _show_identity(e: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("user", "mode", "address", "proxy", "limits (overrides)", "effective limits")
    overrides = ", ".join(f"{k}={v}" for k, v in e["limits"].items()) or "-"
    effective = ", ".join(f"{k}={v}" for k, v in e["effective_limits"].items())
    table.add_row(e["user_name"], e["mode"], e["address"] or "-", e["proxy"] or "-", overrides, effective)
    Console(width=200).print(table)


def _print(e: dict[str, Any], json_out: bool) -> None:
    if json_out:
        print(json.dumps(e, indent=2))
    else:
        _show_identity(e)


@app.command("show")
def show(user: str = USER_ARG, json_out: bool = JSON_OPTION, url: str = URL_OPTION,
         token: str = TOKEN_OPTION) -> None:
    """A user's egress identity: mode, address, proxy (scheme://host:port only) and limits."""
    e = call_api(url, token, lambda pd: pd.egress(user_id_of(pd, user)))
    _print(e, json_out)


@app.command("ls")
def ls(url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """Every user's egress identity."""
    from rich.console import Console
    from rich.table import Table

    table = Table("user", "mode", "address", "proxy", "limits (overrides)")
    for e in call_api(url, token, lambda pd: pd.egress_identities()):
        table.add_row(e["user_name"], e["mode"], e["address"] or "-", e["proxy"] or "-",
                      ", ".join(f"{k}={v}" for k, v in e["limits"].items()) or "-")
    Console(width=200).print(table)


@app.command("set")
def set_(user: str = USER_ARG,
         mode: str = typer.Option(..., "--mode", help="direct, address (one from EGRESS_ADDRESS_POOL, kept) or proxy"),
         proxy_url: str = typer.Option(None, "--proxy-url", help="proxy mode: http://, socks5:// or socks5h://, "
                                       "optionally user:password@; - reads it from stdin", show_default=False),
         family: int = typer.Option(None, "--family", help="address mode: 4 or 6"),
         limit: list[str] = typer.Option([], "--limit", help="NAME=N, NAME one of concurrent, per_minute, "
                                         "bytes_per_day (repeatable)"),
         clear_limits: bool = typer.Option(False, "--clear-limits", help="drop the user's limit overrides"),
         json_out: bool = JSON_OPTION, url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """Set USER's egress identity. A change applies to the next tunnel of the user's VMs."""
    limits = _limits(limit, clear_limits)
    if proxy_url == "-":
        proxy_url = (sys.stdin.readline().strip() if not sys.stdin.isatty()
                     else typer.prompt("Proxy URL", hide_input=True))
    e = call_api(url, token, lambda pd: pd.set_egress(user_id_of(pd, user), mode, proxy_url=proxy_url, family=family,
                                                      limits=limits))
    _print(e, json_out)


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # unreachable


@app.command("usage")
def usage(all_users: bool = typer.Option(False, "--all", help="everyone's (admin)"), json_out: bool = JSON_OPTION,
          url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """Egress accounting per destination host, most recent first: yours, or everyone's with --all."""
    from rich.console import Console
    from rich.table import Table

    rows = call_api(url, token, lambda pd: pd.egress_usage(all_users=all_users))
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    columns = ["host", "connections", "up", "down", "refusals", "last refusal", "first seen", "last seen"]
    table = Table(*(["user"] if all_users else []), *columns)
    for u in rows:
        who = [u["user_name"] or "(unassigned VMs)"] if all_users else []
        table.add_row(*who, u["host"], str(u["connections"]), _size(u["bytes_up"]), _size(u["bytes_down"]),
                      str(u["refusals"]), u["last_refusal"] or "-", u["first_seen"][:19], u["last_seen"][:19])
    Console(width=220).print(table)
    if not rows:
        typer.echo("no egress recorded yet", err=True)
