"""`polydev login` and `polydev run`: the two provider flows from the terminal, over the API."""

from __future__ import annotations

import select
import sys
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import typer

from polydev.cli.remote import TOKEN_OPTION, URL_OPTION, call_api

if TYPE_CHECKING:
    from polydev.client import PolydevClient

PROVIDER_HELP = "claude_code, codex or gemini_cli"
T = TypeVar("T")


def _say(text: str, **style: Any) -> None:
    typer.secho(text, err=True, **style)


def login(provider: str = typer.Argument(..., help=PROVIDER_HELP),
          device: bool = typer.Option(False, "--device", help="use a device code (Codex) instead of a browser"),
          url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """Connect your PROVIDER account: prints the login URL (or device code), then waits. Paste the code the
    provider shows, or the http://localhost… address your browser ends on, and press Enter."""
    from polydev.client import SESSION_TERMINAL

    session = call_api(url, token, lambda pd: pd.start_login(provider, "device" if device else None))
    sid = session["session_id"]
    pre_started = session["status"] == "awaiting_user_auth"  # the server had one ready (LOGIN_POOL)
    _say(f"login session {sid}: " + ("ready" if pre_started else f"starting a VM for {provider}…"))
    state = _follow(url, token, lambda pd: _follow_login(pd, sid), lambda pd: pd.cancel_session(sid))
    if state["status"] == "completed":
        _say(f"connected: your {provider} credential is stored (encrypted)", fg="green")
        return
    assert state["status"] in SESSION_TERMINAL
    _say(f"login {state['status']}: {state.get('error_message') or ''}", fg="red")
    raise typer.Exit(1)


def _follow(url: str | None, token: str | None, follow: Callable[[PolydevClient], T],
            cancel: Callable[[PolydevClient], object]) -> T:
    """Follow a login or a run to its end; an API error ends the command with its message, and Ctrl-C
    cancels it on the server (its VM goes) before exiting 130."""
    try:
        return call_api(url, token, follow)
    except KeyboardInterrupt:
        call_api(url, token, cancel)
        _say("\ncancelled", fg="yellow")
        raise typer.Exit(130) from None


def _follow_login(pd: PolydevClient, sid: str) -> dict[str, Any]:
    from polydev.client import SESSION_TERMINAL

    shown = False
    reads_input = not sys.stdin.closed
    while True:
        state = pd.session(sid)
        if state["status"] in SESSION_TERMINAL:
            return state
        if state["status"] == "awaiting_user_auth" and not shown:
            shown = True
            if state.get("device_code"):
                _say(f"\nOpen {state['auth_url']}\nand enter the code:  {state['device_code']}\n", bold=True)
            else:
                _say(f"\nOpen this address in your browser and sign in:\n\n  {state['auth_url']}\n", bold=True)
                hint = "the code the page shows, or " if state.get("accepts_code") else ""
                _say(f"Then paste {hint}the http://localhost… address your browser ends on, and press Enter.")
        if not (shown and reads_input):
            time.sleep(0.5)
            continue
        # Wait a second for a pasted line, without blocking the status checks.
        if select.select([sys.stdin], [], [], 1.0)[0]:
            line = sys.stdin.readline()
            if not line:  # end of input: keep waiting for the login to complete elsewhere
                reads_input = False
            elif line.strip():
                pd.submit_code(sid, line.strip())
                _say("code sent; waiting for the login to finish…")


def run(provider: str = typer.Argument(..., help=PROVIDER_HELP),
        prompt: str = typer.Argument(..., help="the prompt; - reads it from stdin"),
        file: list[str] = typer.Option([], "--file", "-f", help="a local text file to put in the run's "
                                       "working directory (repeatable)"),
        timeout: int = typer.Option(None, "--timeout", help="stop the run after this many seconds"),
        workspace: str = typer.Option(None, "--workspace", metavar="ID", help="run as a turn on this workspace "
                                      "(a new conversation) instead of in a fresh VM"),
        conversation: str = typer.Option(None, "--conversation", metavar="ID", help="a follow-up: continue this "
                                         "conversation, on its workspace, where the CLI left it"),
        json_out: bool = typer.Option(False, "--json", help="print each event as a JSON line"),
        url: str = URL_OPTION, token: str = TOKEN_OPTION) -> None:
    """Run PROMPT with PROVIDER's CLI in a fresh VM (or on a workspace) and stream what it does. Exits 0 when
    the run succeeds. A workspace turn ends with the files it changed (`polydev diff RUN_ID` for the patch)."""
    import json
    from pathlib import Path

    if prompt == "-":
        prompt = sys.stdin.read()
    files = {}
    for name in file:
        path = Path(name)
        try:
            files[path.name] = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            _say(f"error: cannot read {name}: {exc}", fg="red")
            raise typer.Exit(2) from None
    started = call_api(url, token, lambda pd: pd.start_run(provider, prompt, files=files or None, timeout=timeout,
                                                           workspace_id=workspace, conversation_id=conversation))
    rid = started["id"]
    _say(f"run {rid}" + (f" on workspace {started['workspace_id']}" if started.get("workspace_id") else ""),
         dim=True)
    def stream(pd: PolydevClient) -> dict[str, Any]:
        for ev in pd.run_events(rid):
            if json_out:
                print(json.dumps(ev), flush=True)
            else:
                _show(ev)
        return pd.run(rid)

    final = _follow(url, token, stream, lambda pd: pd.cancel_run(rid))
    if final.get("workspace_id"):
        _show_changes(final)
    if final["status"] != "succeeded":
        _say(f"run {final['status']}: {final.get('error_message') or ''}", fg="red")
        raise typer.Exit(1)


STATUS_LETTERS = {"added": "A", "modified": "M", "deleted": "D", "renamed": "R", "copied": "C",
                  "type_changed": "T"}


def changes_summary(run: dict[str, Any]) -> list[str]:
    """A workspace turn's changed files as `git status --short` would list them, then how to go on. On
    stderr with the rest of the run's commentary: stdout keeps only the CLI's answer."""
    changes = run.get("changes")
    lines = []
    if changes is None:  # the turn ended before its changes were read (it failed early, or was cancelled)
        lines.append("changes: unknown")
    elif not changes:
        lines.append("no files changed")
    else:
        lines.append(f"{len(changes)} file{'s' if len(changes) != 1 else ''} changed "
                     f"(the patch: polydev diff {run['id']}):")
        for c in changes:
            letter = STATUS_LETTERS.get(c.get("status", ""), "?")
            path = f"{c['from']} -> {c['path']}" if c.get("from") else c["path"]
            lines.append(f"  {letter} {path}{' (binary)' if c.get('binary') else ''}")
    if run.get("conversation_id"):
        lines.append(f"follow up: polydev run {run['provider']} PROMPT --conversation {run['conversation_id']}")
    return lines


def _show_changes(run: dict[str, Any]) -> None:
    for line in changes_summary(run):
        _say(line, bold=line[:1] != " " and not line.startswith("follow up"))


def _show(ev: dict[str, Any]) -> None:
    kind = ev.get("type")
    if kind == "text":
        sys.stdout.write(ev.get("text", "") + "\n")
        sys.stdout.flush()
    elif kind == "tool_call":
        _say(f"→ {ev.get('name')} {json_dumps(ev.get('input'))}", fg="cyan")
    elif kind == "tool_result":
        out = str(ev.get("output", ""))
        _say("  " + (out[:500] + ("…" if len(out) > 500 else "")).replace("\n", "\n  "), dim=True)
    elif kind == "status":
        _say(f"· {ev.get('message', '')}", dim=True)
    elif kind == "error":
        _say(f"error: {ev.get('message', '')}", fg="red")
    elif kind == "done":
        usage = ev.get("usage") or {}
        _say(f"done ({', '.join(f'{k} {v}' for k, v in usage.items() if isinstance(v, int | float))})", dim=True)


def json_dumps(value: Any) -> str:
    import json

    text = json.dumps(value)
    return text if len(text) <= 200 else text[:200] + "…"
