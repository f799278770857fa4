"""envd's `filesystem.Filesystem` service (Stat, ListDir, MakeDir, Move, Remove) over the agent's POST /fs, and its
directory watchers (CreateWatcher, GetWatcherEvents, RemoveWatcher, WatchDir: core/sandbox_watch.py)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, TypeVar

from starlette.requests import Request
from starlette.responses import Response

from polydev.api.e2b.connect import (
    RpcError,
    field,
    read_message,
    stream_answer,
    stream_error,
    unary_answer,
    unary_error,
)
from polydev.api.e2b.envd_process import resolve
from polydev.core.sandbox_watch import Watchers
from polydev.core.sandboxes import Sandboxes
from polydev.protocol import MAX_LIST_DEPTH, FsEntry
from polydev.store.models import Sandbox
from polydev.vm.agent_client import AgentError

TYPES = {"file": "FILE_TYPE_FILE", "dir": "FILE_TYPE_DIRECTORY", "symlink": "FILE_TYPE_SYMLINK"}
STREAMS = ("WatchDir",)
R = TypeVar("R")
_STATUS = {404: "not_found", 409: "already_exists", 403: "permission_denied", 400: "invalid_argument",
           422: "invalid_argument", 413: "resource_exhausted"}


def entry_info(e: FsEntry) -> dict[str, Any]:
    info: dict[str, Any] = {
        "name": e.name, "type": TYPES.get(e.type, "FILE_TYPE_UNSPECIFIED"), "path": e.path, "size": e.size,
        "mode": e.mode, "permissions": e.permissions, "owner": e.owner, "group": e.group,
        "modifiedTime": datetime.fromtimestamp(e.mtime, UTC).isoformat().replace("+00:00", "Z")}
    if e.symlink_target is not None:
        info["symlinkTarget"] = e.symlink_target
    return info


async def _fs(sandboxes: Sandboxes, sandbox: Sandbox, op: str, path: str, **kw: Any) -> list[FsEntry]:
    def run() -> list[FsEntry]:
        with sandboxes.agent(sandbox) as agent:
            return agent.fs(op, path, **kw)
    try:
        return await asyncio.to_thread(run)
    except AgentError as exc:
        code = _STATUS.get(exc.status)
        if code is None:
            raise RpcError("unavailable", f"the sandbox's agent answered {exc.status}") from None
        raise RpcError(code, exc.reason) from None


def _lister(sandboxes: Sandboxes, sandbox: Sandbox, root: str, recursive: bool) -> Callable[[], list[FsEntry]]:
    """The watched directory's listing, one agent call each time (blocking)."""
    def lister() -> list[FsEntry]:
        with sandboxes.agent(sandbox) as agent:
            return agent.fs("list", root, depth=MAX_LIST_DEPTH if recursive else 1)
    return lister


async def _listing(first: Awaitable[R]) -> R:
    """A watch's first listing, its failure in envd's words (a missing directory: not_found)."""
    try:
        return await first
    except AgentError as exc:
        raise RpcError(_STATUS.get(exc.status, "unavailable"), exc.reason) from None


async def _watch_stream(lister: Callable[[], list[FsEntry]], root: str) -> AsyncIterator[dict[str, Any]]:
    changes = Watchers.stream(lister, root)
    await _listing(anext(changes))  # its first listing: a missing directory ends the stream before its start
    yield {"start": {}}
    async for events in changes:
        for name, kind in events:
            yield {"filesystem": {"name": name, "type": kind}}


async def handle(method: str, request: Request, sandboxes: Sandboxes, sandbox: Sandbox, user: str) -> Response:
    """One call, as the guest account `user`: relative paths are in its home and directories made are its."""
    streaming = method in STREAMS

    def _path(msg: dict[str, Any], name: str = "path") -> str:
        path = field(msg, name, default="")
        if not path or "\0" in path:
            raise RpcError("invalid_argument", f"{name} is required (without NUL)")
        return resolve(path, user)

    try:
        msg = await read_message(request, streaming)
        if method == "Stat":
            return unary_answer({"entry": entry_info((await _fs(sandboxes, sandbox, "stat", _path(msg)))[0])})
        if method == "ListDir":
            depth = field(msg, "depth", kind=int, default=0) or 1
            if not 1 <= depth <= MAX_LIST_DEPTH:
                raise RpcError("invalid_argument", f"depth must be from 1 to {MAX_LIST_DEPTH}")
            entries = await _fs(sandboxes, sandbox, "list", _path(msg), depth=depth)
            return unary_answer({"entries": [entry_info(e) for e in entries]})
        if method == "MakeDir":
            made = await _fs(sandboxes, sandbox, "mkdir", _path(msg), user=user)
            return unary_answer({"entry": entry_info(made[0])})
        if method == "Move":
            moved = await _fs(sandboxes, sandbox, "move", _path(msg, "source"),
                              destination=_path(msg, "destination"))
            return unary_answer({"entry": entry_info(moved[0])})
        if method == "Remove":
            await _fs(sandboxes, sandbox, "remove", _path(msg))
            return unary_answer({})
        if method in ("CreateWatcher", "WatchDir"):
            root = _path(msg)
            lister = _lister(sandboxes, sandbox, root, field(msg, "recursive", kind=bool, default=False))
            if method == "WatchDir":
                return stream_answer(_watch_stream(lister, root))
            watcher_id = await _listing(sandboxes.watchers.create(sandbox.id, lister, root))
            return unary_answer({"watcherId": watcher_id})
        if method == "GetWatcherEvents":
            events = sandboxes.watchers.events(sandbox.id, field(msg, "watcherId", default=""))
            if events is None:
                raise RpcError("not_found", "no such watcher")
            return unary_answer({"events": [{"name": name, "type": kind} for name, kind in events]})
        if method == "RemoveWatcher":
            if not await sandboxes.watchers.remove(sandbox.id, field(msg, "watcherId", default="")):
                raise RpcError("not_found", "no such watcher")
            return unary_answer({})
        raise RpcError("unimplemented", f"filesystem.Filesystem/{method} is not implemented")
    except RpcError as exc:
        return stream_error(exc) if streaming else unary_error(exc)
