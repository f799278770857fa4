"""A turn on a workspace, in its VM: where it starts in git, and what it changed when it ends.

Every workspace is a git repository (core/workspaces.py). A turn notes the commit it starts from; at its end
everything the CLI left (its own commits and whatever it did not commit, new files included) is committed
as the turn, and the changes are read as `git diff` between the two: the files with their status (binary
ones marked: they are named, not included in the patch) and the whole patch.
"""

from __future__ import annotations

import shlex
from typing import Any

from polydev.core.workspace_vm import GIT_IDENTITY, ROOT
from polydev.vm.agent_client import AgentClient

MAX_PATCH_BYTES = 2 * 1024 * 1024  # larger patches are cut there (the archive has everything)
TRUNCATED = "\n[polydev: the patch is longer than {limit} bytes and was cut here; download the workspace]\n"
GIT_TIMEOUT_S = 120
STATUS = {"A": "added", "M": "modified", "D": "deleted", "R": "renamed", "C": "copied", "T": "type_changed"}


def start(agent: AgentClient) -> str:
    """The commit the turn starts from."""
    result = agent.exec(["git", "-C", ROOT, "rev-parse", "HEAD"], timeout_s=GIT_TIMEOUT_S)
    if result.exit_code != 0:
        raise RuntimeError(f"the workspace is not a git repository: {result.stderr.decode(errors='replace')[-300:]}")
    return result.stdout.decode().strip()


def finish(agent: AgentClient, base: str, message: str) -> tuple[list[dict[str, Any]], str]:
    """Commit what the turn left and return (files changed since `base`, the patch). The disk is synced."""
    identity = " ".join(shlex.quote(a) for a in GIT_IDENTITY)
    commit = (f"cd {shlex.quote(ROOT)} && git add -A && "
              f"(git diff --cached --quiet || git {identity} commit -q --no-verify -m {shlex.quote(message)}) && sync")
    result = agent.exec(["sh", "-c", commit], timeout_s=GIT_TIMEOUT_S)
    if result.exit_code != 0:
        raise RuntimeError(f"committing the turn failed: {result.stderr.decode(errors='replace')[-300:]}")
    git = ["git", "-C", ROOT, "-c", "core.quotepath=off", "diff", "-M", base, "HEAD"]
    names = agent.exec([*git, "--name-status", "-z"], timeout_s=GIT_TIMEOUT_S).stdout
    numbers = agent.exec([*git, "--numstat", "-z"], timeout_s=GIT_TIMEOUT_S).stdout
    patch = agent.exec(git, timeout_s=GIT_TIMEOUT_S).stdout
    binary = _binary_paths(numbers)
    changes = [{**change, "binary": change["path"] in binary} for change in _name_status(names)]
    if len(patch) > MAX_PATCH_BYTES:
        patch = patch[:MAX_PATCH_BYTES] + TRUNCATED.format(limit=MAX_PATCH_BYTES).encode()
    return changes, patch.decode("utf-8", "replace")


def _name_status(raw: bytes) -> list[dict[str, Any]]:
    """`git diff --name-status -z`: STATUS\\0PATH\\0, or for renames and copies STATUS\\0OLD\\0NEW\\0."""
    parts = raw.decode("utf-8", "replace").split("\0")
    out: list[dict[str, Any]] = []
    i = 0
    while i < len(parts) and parts[i]:
        code = parts[i]
        if code[0] in "RC":
            out.append({"path": parts[i + 2], "from": parts[i + 1], "status": STATUS[code[0]]})
            i += 3
        else:
            out.append({"path": parts[i + 1], "status": STATUS.get(code[0], code)})
            i += 2
    return out


def _binary_paths(raw: bytes) -> set[str]:
    """`git diff --numstat -z`: ADDED\\tDELETED\\tPATH\\0, with an empty PATH and then OLD\\0NEW\\0 for a rename;
    `-` `-` for a binary file."""
    parts = raw.decode("utf-8", "replace").split("\0")
    binary: set[str] = set()
    i = 0
    while i < len(parts) and parts[i]:
        added, deleted, path = parts[i].split("\t", 2)
        if path:
            i += 1
        else:
            path = parts[i + 2]
            i += 3
        if added == "-" and deleted == "-":
            binary.add(path)
    return binary
