"""`polydev workspace …` (projects the CLIs work on across turns), `polydev diff` (a turn's patch) and
`polydev pull` (a workspace's files), over the API (POLYDEV_URL, POLYDEV_TOKEN) like the other remote commands.

A git token for a private repository is never taken as an argument (shell history, process listings): it
comes from POLYDEV_GIT_TOKEN, stdin, or a hidden prompt, and nothing here prints it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

import typer

from polydev.cli.remote import TOKEN_OPTION, URL_OPTION, call_api

if TYPE_CHECKING:
    from rich.console import Console

    from polydev.client import PolydevClient

app = typer.Typer(help="Workspaces: projects the coding CLIs work on across turns, each on a VM of its own.",
                  no_args_is_help=True)

JSON_OPTION = typer.Option(False, "--json", help="print the API's JSON")
ID_ARG = typer.Argument(..., help="the workspace's id")
GIT_TOKEN_ENV = "POLYDEV_GIT_TOKEN"
WAIT_POLL_S = 1.0


def _fail(message: str, code: int = 1) -> NoReturn:
    typer.secho(f"error: {message}", fg="red", err=True)
    raise typer.Exit(code)


def _say(text: str, **style: Any) -> None:
    typer.secho(text, err=True, **style)


def _stderr() -> Console:
    from rich.console import Console

    return Console(stderr=True)


def human_size(n: int | None) -> str:
    """Bytes for people: 0 B, 999 B, 1.5 KB, 12.0 MB (powers of 1024)."""
    size = float(n or 0)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{int(size)} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError("unreachable")


@contextlib.contextmanager
def _transfer(description: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """A progress bar on stderr (bytes, speed) while bytes move; a callback to count them. Shown only on a
    terminal: piped, stderr gets the summary line the command prints, not redraws."""
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        SpinnerColumn,
        TextColumn,
        TransferSpeedColumn,
    )

    console = _stderr()
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), console=console, transient=True, disable=not console.is_terminal) as bar:
        task = bar.add_task(description, total=total)
        yield lambda n: bar.advance(task, n)


# -- listing and details ----------------------------------------------------------------------------------
@app.command("ls")
def ls(all_users: bool = typer.Option(False, "--all", help="everyone's workspaces (admin)"),
       json_out: bool = JSON_OPTION, url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """List your workspaces (everyone's with --all)."""
    from rich.console import Console
    from rich.table import Table

    rows = call_api(url, token, lambda pd: pd.workspaces(all_users=all_users))
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    table = Table("id", *(["user"] if all_users else []), "name", "state", "source", "size", "used", "error")
    for w in rows:
        table.add_row(w["id"], *([w["user_id"]] if all_users else []), w["name"], w["state"], w["source"],
                      human_size(w["size_bytes"]), w["used_at"][:19], w["error"] or "")
    Console(width=200).print(table)


FIELDS = ("id", "name", "state", "source", "repo_url", "size_bytes", "vm_id", "created_at", "used_at", "error")


def _show(w: dict[str, Any]) -> None:
    for name in FIELDS:
        value = w.get(name)
        if name == "size_bytes":
            value = f"{human_size(value)} ({value or 0} bytes)"
        typer.echo(f"{name + ':':<12}{'-' if value is None else value}")


@app.command("show")
def show(workspace_id: str = ID_ARG, json_out: bool = JSON_OPTION, url: str = URL_OPTION,
         token: str = TOKEN_OPTION) -> None:
    """A workspace's details: state, source, size, its VM, and why it failed if it did."""
    w = call_api(url, token, lambda pd: pd.workspace(workspace_id))
    print(json.dumps(w, indent=2)) if json_out else _show(w)


@app.command("conversations")
def conversations(workspace_id: str = ID_ARG, json_out: bool = JSON_OPTION, url: str = URL_OPTION,
                  token: str = TOKEN_OPTION) -> None:
    """The workspace's conversations: follow one up with `polydev run PROVIDER PROMPT --conversation ID`."""
    from rich.console import Console
    from rich.table import Table

    rows = call_api(url, token, lambda pd: pd.conversations(workspace_id))
    if json_out:
        print(json.dumps(rows, indent=2))
        return
    table = Table("id", "provider", "turns", "last run", "updated")
    for c in rows:
        table.add_row(c["id"], c["provider"], str(c["turns"]), c["runs"][-1] if c["runs"] else "-",
                      c["updated_at"][:19])
    Console(width=200).print(table)


# -- making one ---------------------------------------------------------------------------------------------
def _git_token() -> str:
    """From POLYDEV_GIT_TOKEN, else a line of stdin when it is not a terminal, else a hidden prompt."""
    value = os.environ.get(GIT_TOKEN_ENV, "").strip()
    if not value:
        value = (sys.stdin.readline().strip() if not sys.stdin.isatty()
                 else typer.prompt("git token", hide_input=True).strip())
    if not value:
        _fail(f"--git-token: no token (set {GIT_TOKEN_ENV}, or type it when asked)", 2)
    return value


def _upload(url: str | None, token: str | None, name: str, path: Path) -> dict[str, Any]:
    """A workspace from a local directory (packed as a tar.gz in a temporary file, never whole in memory)
    or an archive file, sent as it is read."""
    from polydev.cli.archives import pack_directory
    from polydev.client_archives import ARCHIVE_TYPES, archive_type

    with contextlib.ExitStack() as stack:
        archive: IO[bytes]
        if path.is_dir():
            archive = stack.enter_context(tempfile.TemporaryFile(prefix="polydev-upload-"))
            try:
                count = pack_directory(path, archive)
            except OSError as exc:
                _fail(f"cannot pack {path}: {exc}", 2)
            kind = "application/gzip"
            _say(f"packed {count} entr{'y' if count == 1 else 'ies'} from {path}")
        elif path.is_file():
            found = archive_type(path)
            if found is None:
                _fail(f"--from takes a directory or an archive ({', '.join(ARCHIVE_TYPES)}): {path}", 2)
            kind = found
            archive = stack.enter_context(path.open("rb"))
        else:
            _fail(f"--from: no such file or directory: {path}", 2)
        size = archive.seek(0, os.SEEK_END)
        archive.seek(0)
        with _transfer("uploading", size) as count_bytes:
            made = call_api(url, token, lambda pd: pd.upload_workspace(name, archive, kind, size=size,
                                                                       progress=count_bytes))
        _say(f"uploaded {human_size(size)}")
        return made


def _wait(url: str | None, token: str | None, workspace_id: str) -> dict[str, Any]:
    """Poll until the workspace is made, with a spinner naming its state; a failed one ends the command
    with the workspace's error."""
    console = _stderr()
    with console.status(f"workspace {workspace_id}: creating…") as status:
        def shown(w: dict[str, Any]) -> None:
            status.update(f"workspace {workspace_id}: {w['state']}…")

        w = call_api(url, token, lambda pd: pd.wait_workspace(workspace_id, interval=WAIT_POLL_S, on_state=shown))
    if w["state"] == "failed":
        _fail(f"workspace {workspace_id} failed: {w['error'] or 'no reason given'}")
    return w


@app.command("create")
def create(name: str = typer.Argument(..., help="a name for it (not unique: workspaces are known by id)"),
           git: str = typer.Option(None, "--git", metavar="URL", help="clone this git repository into it"),
           branch: str = typer.Option(None, "--branch", help="with --git: the branch to check out"),
           git_token: bool = typer.Option(False, "--git-token", help=f"with --git: send a token for a private "
                                          f"repository, read from {GIT_TOKEN_ENV}, or stdin, or asked for"),
           source: Path = typer.Option(None, "--from", metavar="PATH", help="upload a local directory, or a "
                                       ".tar, .tar.gz, .tgz or .zip file"),
           wait: bool = typer.Option(False, "--wait", help="wait until it is ready; fail with its error if it fails"),
           json_out: bool = JSON_OPTION, url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """Create a workspace: empty, cloned (--git), or from local files (--from). Prints its id (and nothing
    else) on stdout, or its JSON with --json. It is `creating` until its files are in place: --wait waits."""
    if git is not None and source is not None:
        _fail("--git and --from are two different sources: give one", 2)
    if git is None and (branch is not None or git_token):
        _fail("--branch and --git-token go with --git", 2)
    if source is not None:
        made = _upload(url, token, name, source)
    else:
        secret = _git_token() if git_token else None
        made = call_api(url, token, lambda pd: pd.create_workspace(name, git_url=git, branch=branch,
                                                                   git_token=secret))
    if wait:
        made = _wait(url, token, made["id"])
    if json_out:
        print(json.dumps(made, indent=2))
    else:
        typer.echo(made["id"])
        _say(f"workspace {made['name']!r}: {made['state']}"
             + ("" if made["state"] != "creating" else " (`polydev workspace show ID`, or --wait)"))


# -- changing one -------------------------------------------------------------------------------------------
@app.command("rm")
def rm(workspace_id: str = ID_ARG, url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """Delete a workspace: its VM, disk and everything on it (pull it first to keep the files)."""
    call_api(url, token, lambda pd: pd.delete_workspace(workspace_id))
    typer.echo(f"deleted {workspace_id}")


@app.command("pause")
def pause(workspace_id: str = ID_ARG,
          disk_only: bool = typer.Option(False, "--disk-only", help="keep its disk only, not its memory (past "
                                         "your limit of paused workspaces); it boots cold when next used"),
          url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """Pause a workspace's VM now (it pauses by itself once idle); the next use wakes it."""
    w = call_api(url, token, lambda pd: pd.pause_workspace(workspace_id, memory=not disk_only))
    typer.echo(f"{workspace_id}: {w['state']}")


@app.command("push")
def push(workspace_id: str = ID_ARG,
         branch: str = typer.Option(..., "--branch", help="the branch to push to, on the repository it was "
                                    "cloned from"),
         json_out: bool = JSON_OPTION, url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """Push a cloned workspace's commits (each turn is one) to BRANCH of its repository."""
    pushed = call_api(url, token, lambda pd: pd.push_workspace(workspace_id, branch))
    if json_out:
        print(json.dumps(pushed, indent=2))
    else:
        typer.echo(f"pushed {pushed['commit']} to {pushed['branch']} of {pushed['remote']}")


# -- polydev diff ---------------------------------------------------------------------------------------------
def colored_patch(patch: str) -> str:
    """The patch with ANSI colors, as `git diff` colors it: headers bold, hunks cyan, - red, + green."""
    out = []
    for line in patch.splitlines(keepends=True):
        body, end = (line[:-1], "\n") if line.endswith("\n") else (line, "")
        if line.startswith(("diff --git", "index ", "--- ", "+++ ", "new file", "deleted file", "rename ",
                            "similarity ", "Binary files")):
            body = typer.style(body, bold=True)
        elif line.startswith("@@"):
            body = typer.style(body, fg="cyan")
        elif line.startswith("+"):
            body = typer.style(body, fg="green")
        elif line.startswith("-"):
            body = typer.style(body, fg="red")
        out.append(body + end)
    return "".join(out)


def diff(run_id: str = typer.Argument(..., help="a workspace turn's run id"),
         color: str = typer.Option("auto", "--color", help="auto (when stdout is a terminal and NO_COLOR is "
                                   "unset), always or never"),
         url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """Print the patch of a workspace turn: what it changed, as `git diff` shows it. Piped, the patch is
    printed exactly as the server gave it (for `git apply`)."""
    if color not in ("auto", "always", "never"):
        _fail("--color takes auto, always or never", 2)
    patch = call_api(url, token, lambda pd: pd.run_diff(run_id))
    if not patch:
        _say("no changes")
        return
    paint = color == "always" or (color == "auto" and sys.stdout.isatty() and not os.environ.get("NO_COLOR"))
    sys.stdout.write(colored_patch(patch) if paint else patch)
    sys.stdout.flush()


# -- polydev pull ---------------------------------------------------------------------------------------------
def pull(workspace_id: str = ID_ARG,
         output: str = typer.Option(None, "--output", "-o", metavar="FILE", help="where to save the tar.gz "
                                    "(- for stdout); default: NAME.tar.gz here"),
         extract: Path = typer.Option(None, "--extract", metavar="DIR", help="unpack into DIR (new or empty) "
                                      "instead of saving the archive"),
         url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """Download a workspace's files (its git history included) as a tar.gz, or unpack them with --extract.
    The download streams to disk; a failed one leaves nothing behind."""
    if output is not None and extract is not None:
        _fail("-o and --extract are two different destinations: give one", 2)
    try:
        if extract is not None:
            _pull_extract(url, token, workspace_id, extract)
        elif output == "-":
            def to_stdout(pd: PolydevClient) -> None:
                with pd.workspace_archive(workspace_id) as download:
                    for chunk in download.chunks:
                        sys.stdout.buffer.write(chunk)
                sys.stdout.buffer.flush()

            call_api(url, token, to_stdout)
        else:
            with _transfer("downloading", None) as count_bytes:
                saved = call_api(url, token, lambda pd: pd.download_workspace(
                    workspace_id, Path(output) if output else Path.cwd(), progress=count_bytes))
            _say(f"saved {saved} ({human_size(saved.stat().st_size)})")
    except OSError as exc:  # the local side: a directory that does not exist, a full disk, permissions
        _fail(str(exc))
    except KeyboardInterrupt:
        _say("\ncancelled", fg="yellow")
        raise typer.Exit(130) from None


def _pull_extract(url: str | None, token: str | None, workspace_id: str, dest: Path) -> None:
    from polydev.cli.archives import ArchiveError, safe_extract

    # Only into a new or empty directory: unpacking over existing files would silently overwrite them.
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        _fail(f"--extract: {dest} exists and is not an empty directory", 2)
    with tempfile.TemporaryFile(prefix="polydev-pull-") as spool:
        def fetch(pd: PolydevClient) -> None:
            with pd.workspace_archive(workspace_id) as download, _transfer("downloading", download.size) as n:
                for chunk in download.chunks:
                    spool.write(chunk)
                    n(len(chunk))

        call_api(url, token, fetch)
        size = spool.tell()
        spool.seek(0)
        created = not dest.exists()
        try:
            count = safe_extract(spool, dest)
        except ArchiveError as exc:
            if created:  # refused before anything was written: leave no empty directory behind
                with contextlib.suppress(OSError):
                    dest.rmdir()
            _fail(str(exc))
    _say(f"unpacked {count} entr{'y' if count == 1 else 'ies'} ({human_size(size)}) into {dest}")
