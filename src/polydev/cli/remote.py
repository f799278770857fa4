"""Commands that talk to a running Polydev over its API (POLYDEV_URL, POLYDEV_TOKEN)."""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, TypeVar

import typer

if TYPE_CHECKING:  # httpx is imported inside the commands: the CLI's start-up stays fast
    from polydev.client import PolydevClient, PolydevError

T = TypeVar("T")

credentials = typer.Typer(help="Your stored provider credentials (on the server named by POLYDEV_URL).",
                          no_args_is_help=True)

# Shared by every command that talks to the API (these and flows.py's): its options and `call_api`.
URL_OPTION = typer.Option(None, "--url", envvar="POLYDEV_URL", help="Polydev API, default http://127.0.0.1:4000")
TOKEN_OPTION = typer.Option(None, "--token", envvar="POLYDEV_TOKEN", help="your API token", show_default=False)


def _fail(exc: PolydevError) -> None:
    typer.secho(f"error: {exc}", fg="red", err=True)
    raise typer.Exit(1)


def call_api(url: str | None, token: str | None, fn: Callable[[PolydevClient], T]) -> T:
    """One API call with the client; an error answer ends the command with its message and status 1."""
    from polydev.client import PolydevClient, PolydevError

    try:
        with PolydevClient(url, token) as pd:
            return fn(pd)
    except PolydevError as exc:
        _fail(exc)
        raise  # unreachable: _fail exits


@credentials.command("ls")
def ls(url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """List your stored credentials (never their contents)."""
    from rich.console import Console
    from rich.table import Table

    rows = call_api(url, token, lambda pd: pd.credentials())
    table = Table("provider", "kind", "valid", "created", "last validated")
    for c in rows:
        table.add_row(c["provider"], c["kind"], "yes" if c["is_valid"] else "no", c["created_at"][:19],
                      (c["last_validated"] or "-")[:19])
    Console().print(table)


@credentials.command("set-key")
def set_key(provider: str, url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """Store your own API key for PROVIDER. The key is read from stdin (or asked for, hidden), never
    taken as an argument, so it stays out of shell history and process listings."""
    key = sys.stdin.readline().strip() if not sys.stdin.isatty() else typer.prompt("API key", hide_input=True)
    call_api(url, token, lambda pd: pd.set_api_key(provider, key))
    typer.echo(f"stored an API key for {provider}")


@credentials.command("rm")
def rm(provider: str, url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """Forget your credential for PROVIDER."""
    call_api(url, token, lambda pd: pd.delete_credential(provider))
    typer.echo(f"removed the {provider} credential")


vm = typer.Typer(help="VMs on the server named by POLYDEV_URL (admin token).", no_args_is_help=True)


@vm.command("create")
def vm_create(purpose: str = typer.Option("cli", "--purpose", help="cli, or browser (the login VM's size)"),
              ttl: int = typer.Option(None, "--ttl", help="seconds before the reaper destroys it (server default)"),
              url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """Create a VM and wait until its agent answers. Prints the VM's id (and nothing else) on stdout."""
    created = call_api(url, token, lambda pd: pd.create_vm(purpose, ttl))
    typer.echo(created["id"])
    typer.echo(f"{created['purpose']} VM running on {created['backend']}, expires {created['expires_at'][:19]}",
               err=True)


@vm.command("ls")
def vm_ls(include_ended: bool = typer.Option(False, "--all", help="include destroyed and failed VMs"),
          url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """List VMs (live ones, or all with --all)."""
    from rich.console import Console
    from rich.table import Table

    rows = call_api(url, token, lambda pd: pd.vms(include_ended=include_ended))
    table = Table("id", "purpose", "status", "backend", "created", "expires", "error")
    for v in rows:
        table.add_row(v["id"], v["purpose"], v["status"], v["backend"], v["created_at"][:19],
                      (v["expires_at"] or "-")[:19], v["error"] or "")
    Console(width=200).print(table)


@vm.command("exec")
def vm_exec(vm_id: str = typer.Argument(..., help="the VM's id"),
            command: list[str] = typer.Argument(..., help="the program and its arguments, after --"),
            env: list[str] = typer.Option([], "--env", "-e", help="NAME=VALUE for the command (repeatable)"),
            cwd: str = typer.Option(None, "--cwd", help="working directory in the VM"),
            timeout: float = typer.Option(None, "--timeout", help="kill the command after this many seconds"),
            stdin: bool = typer.Option(False, "--stdin", help="send this terminal's standard input to the command"),
            url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """Run COMMAND in a VM: `polydev vm exec VM_ID -- CMD ARGS...`. Its output is printed as it ends, and
    this command exits with its status (128+N when killed by signal N, 124 when it timed out)."""
    pairs = dict(item.split("=", 1) for item in env if "=" in item)
    if len(pairs) != len(env):
        typer.secho("error: --env takes NAME=VALUE", fg="red", err=True)
        raise typer.Exit(2)
    data = sys.stdin.read() if stdin else None
    result = call_api(url, token, lambda pd: pd.exec_vm(vm_id, command, env=pairs, cwd=cwd, timeout_s=timeout,
                                                        stdin=data))
    sys.stdout.write(result["stdout"])
    sys.stdout.flush()
    sys.stderr.write(result["stderr"])
    for stream in ("stdout", "stderr"):
        if result.get(f"{stream}_truncated"):
            typer.secho(f"polydev: the command's {stream} was cut at the server's limit", fg="yellow", err=True)
    if result["timed_out"]:
        typer.secho("polydev: the command timed out and was killed", fg="yellow", err=True)
        raise typer.Exit(124)
    code = int(result["exit_code"])
    raise typer.Exit(128 - code if code < 0 else code)


@vm.command("rm")
def vm_rm(vm_id: str = typer.Argument(..., help="the VM's id"), url: str = URL_OPTION,
          token: str = TOKEN_OPTION) -> None:
    """Destroy a VM: its process, disk, network slot and address."""
    call_api(url, token, lambda pd: pd.delete_vm(vm_id))
    typer.echo(f"destroyed {vm_id}")


def user_id_of(pd: PolydevClient, user: str) -> str:
    """The id of USER (a name or an id); a name nobody has ends the command."""
    import uuid

    try:
        return str(uuid.UUID(user))
    except ValueError:
        pass
    for u in pd.users():
        if u["name"] == user:
            return str(u["id"])
    typer.secho(f"error: no user named {user!r}", fg="red", err=True)
    raise typer.Exit(1)
