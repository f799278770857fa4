"""envd's `filesystem.Filesystem` service (Stat, ListDir, MakeDir, Move, Remove) over the agent's POST /fs."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Any

from starlette.requests import Request
from starlette.responses import Response

from polydev.api.e2b.connect import (
    RpcError,
    field,
    read_message,
    stream_error,
    unary_answer,
    unary_error,
)
from polydev.api.e2b.envd_process import resolve
from polydev.core.sandboxes import Sandboxes
from polydev.protocol import MAX_LIST_DEPTH, FsEntry
from polydev.store.models import Sandbox
from polydev.vm.agent_client import AgentError

TYPES = {"file": "FILE_TYPE_FILE", "dir": "FILE_TYPE_DIRECTORY", "symlink": "FILE_TYPE_SYMLINK"}
STREAMS = ("WatchDir",)
_STATUS = {404: "not_found", 409: "already_exists", 403: "permission_denied", 400: "invalid_argument",
           413: "resource_exhausted"}


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


def _path(msg: dict[str, Any], name: str = "path") -> str:
    path = field(msg, name, default="")
    if not path or "\0" in path:
        raise RpcError("invalid_argument", f"{name} is required (without NUL)")
    return resolve(path)


async def handle(method: str, request: Request, sandboxes: Sandboxes, sandbox: Sandbox) -> Response:
    streaming = method in STREAMS
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
            return unary_answer({"entry": entry_info((await _fs(sandboxes, sandbox, "mkdir", _path(msg)))[0])})
        if method == "Move":
            moved = await _fs(sandboxes, sandbox, "move", _path(msg, "source"),
                              destination=_path(msg, "destination"))
            return unary_answer({"entry": entry_info(moved[0])})
        if method == "Remove":
            await _fs(sandboxes, sandbox, "remove", _path(msg))
            return unary_answer({})
        raise RpcError("unimplemented", f"filesystem.Filesystem/{method} is not implemented")
    except RpcError as exc:
        return stream_error(exc) if streaming else unary_error(exc)
