"""envd's `process.Process` service over the sandbox's guest agent (core/sandbox_procs.py holds the processes).

The SDK runs `/bin/bash -l -c CMD` by Start; the first event of the stream is `start{pid}` (the guest's pid),
then `data{stdout|stderr|pty}` (base64), then `end`. A process runs as the account the call names (`user`,
by default the sandbox's: E2B's `user`), in its home unless the call gives a `cwd`.
"""

from __future__ import annotations

import asyncio
import base64
import posixpath
from collections.abc import AsyncIterator
from typing import Any

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
from polydev.core.sandbox_procs import Command, Exit, Proc, ProcessTable, StartFailed
from polydev.core.sandboxes import Sandboxes
from polydev.store.models import Sandbox
from polydev.vm.agent_client import AgentClient, AgentError

MAX_KEEPALIVE_S = 60.0
# envd's signal enum names → the agent's signal names.
SIGNALS = {"SIGNAL_SIGKILL": "KILL", "SIGNAL_SIGTERM": "TERM", "SIGNAL_SIGINT": "INT", "SIGNAL_SIGHUP": "HUP"}
STREAMS = ("Start", "Connect")


def home_of(user: str) -> str:
    """The account's home as E2B's images lay them out (and Polydev's image: vm/build_steps.sandbox_user)."""
    return "/root" if user == "root" else f"/home/{user}"


def resolve(path: str, user: str) -> str:
    """envd resolves a relative path against the user's home."""
    return posixpath.normpath(path if path.startswith("/") else posixpath.join(home_of(user), path))


def _end_event(exit: Exit) -> dict[str, Any]:
    if exit.error is not None:
        return {"event": {"end": {"exitCode": exit.code, "exited": False, "status": "error", "error": exit.error}}}
    if exit.code < 0:  # killed by signal -code (as subprocess reports it)
        return {"event": {"end": {"exitCode": -1, "exited": False, "status": f"signal: {-exit.code}"}}}
    return {"event": {"end": {"exitCode": exit.code, "exited": True, "status": f"exit status {exit.code}"}}}


async def _follow(table: ProcessTable, proc: Proc, queue: asyncio.Queue, keepalive_s: float | None
                  ) -> AsyncIterator[dict[str, Any]]:
    yield {"event": {"start": {"pid": proc.pid}}}
    events = table.events(proc, queue)
    try:
        while True:
            try:
                kind, payload = await asyncio.wait_for(anext(events), keepalive_s)
            except TimeoutError:
                yield {"event": {"keepalive": {}}}
                continue
            except StopAsyncIteration:
                return
            if kind == "end":
                yield _end_event(payload)
                return
            yield {"event": {"data": {kind: base64.b64encode(payload).decode()}}}
    finally:
        await events.aclose()


def _keepalive(request: Request) -> float | None:
    raw = request.headers.get("keepalive-ping-interval", "")
    return min(float(raw), MAX_KEEPALIVE_S) if raw.isdigit() and int(raw) > 0 else None


def _str_map(value: Any, name: str) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise RpcError("invalid_argument", f"{name} must map strings to strings")
    if any(not k or "=" in k or "\0" in k + v for k, v in value.items()):
        raise RpcError("invalid_argument", f"{name}: names must be non-empty, without '=' or NUL")
    return value


def _command(msg: dict[str, Any], envs: dict[str, str], user: str) -> Command:
    cmd = field(msg, "process", "cmd", default="")
    args = field(msg, "process", "args", kind=list, default=[])
    if not cmd or "\0" in cmd or not all(isinstance(a, str) and "\0" not in a for a in args):
        raise RpcError("invalid_argument", "process.cmd must name a program; args must be strings without NUL")
    cwd = field(msg, "process", "cwd")
    size = None
    if field(msg, "pty", kind=dict) is not None:
        rows = field(msg, "pty", "size", "rows", kind=int, default=24)
        cols = field(msg, "pty", "size", "cols", kind=int, default=80)
        if not (0 < rows < 65536 and 0 < cols < 65536):
            raise RpcError("invalid_argument", "pty.size rows and cols must be from 1 to 65535")
        size = (rows, cols)
    return Command(cmd=cmd, args=list(args), envs={**envs, **_str_map(field(msg, "process", "envs", kind=dict), "envs")},
                   cwd=resolve(cwd, user) if cwd else None, tag=field(msg, "tag"), user=user,
                   stdin=bool(field(msg, "stdin", kind=bool, default=False)), pty_size=size)


def _selected(table: ProcessTable, sandbox: Sandbox, msg: dict[str, Any]) -> Proc:
    pid = field(msg, "process", "pid", kind=int)
    tag = field(msg, "process", "tag")
    proc = table.get(sandbox.id, pid) if pid is not None else table.by_tag(sandbox.id, tag) if tag else None
    if proc is None:
        raise RpcError("not_found", f"process with {'pid ' + str(pid) if pid is not None else 'tag ' + str(tag)} "
                       "not found")
    return proc


async def _agent_call(sandboxes: Sandboxes, sandbox: Sandbox, call: str, *args: Any) -> Any:
    def run() -> Any:
        with sandboxes.agent(sandbox) as agent:
            return getattr(agent, call)(*args)
    try:
        return await asyncio.to_thread(run)
    except AgentError as exc:
        if exc.status == 404:
            raise RpcError("not_found", "the process has ended") from None
        if exc.status == 409:
            raise RpcError("failed_precondition", "the process's stdin is closed (start it with stdin=True)") \
                from None
        raise RpcError("unavailable", f"the sandbox's agent answered {exc.status}") from None


async def handle(method: str, request: Request, sandboxes: Sandboxes, table: ProcessTable, sandbox: Sandbox,
                 envs: dict[str, str], user: str) -> Response:
    streaming = method in STREAMS
    try:
        msg = await read_message(request, streaming)

        def agents() -> AgentClient:
            return sandboxes.agent(sandbox, timeout=60.0)

        if method == "Start":
            command = _command(msg, envs, user)
            try:
                proc, queue = await table.start(sandbox.id, agents, command)
            except StartFailed as exc:
                raise RpcError("invalid_argument", f"cannot start the process: {exc}") from None
            except Exception:  # the agent unreachable, its stream broken, the VM not on this server
                raise RpcError("unavailable", "the sandbox's agent could not start the process") from None
            return stream_answer(_follow(table, proc, queue, _keepalive(request)))
        # After a pause or a restart of this server, its processes are followed again (and listed) first.
        await table.sync(sandbox.id, agents)
        if method == "Connect":
            proc = _selected(table, sandbox, msg)
            return stream_answer(_follow(table, proc, proc.follow(), _keepalive(request)))
        if method == "List":
            return unary_answer({"processes": [
                {"pid": p.pid, "config": {"cmd": p.command.cmd, "args": p.command.args, "envs": p.command.envs,
                                          **({"cwd": p.command.cwd} if p.command.cwd else {})},
                 **({"tag": p.command.tag} if p.command.tag else {})} for p in table.list(sandbox.id)]})
        if method in ("SendInput", "CloseStdin", "SendSignal", "Update"):
            proc = _selected(table, sandbox, msg)
            if method == "SendInput":
                data = field(msg, "input", "stdin") or field(msg, "input", "pty") or ""
                try:
                    payload = base64.b64decode(data, validate=True)
                except ValueError:
                    raise RpcError("invalid_argument", "input must be base64") from None
                await _agent_call(sandboxes, sandbox, "write_input", proc.exec_id, payload)
            elif method == "CloseStdin":
                await _agent_call(sandboxes, sandbox, "write_input", proc.exec_id, b"", True)
            elif method == "SendSignal":
                name = SIGNALS.get(field(msg, "signal", default=""))
                if name is None:
                    raise RpcError("invalid_argument", f"signal must be one of {', '.join(SIGNALS)}")
                await _agent_call(sandboxes, sandbox, "signal", proc.exec_id, name)
            else:
                rows = field(msg, "pty", "size", "rows", kind=int)
                cols = field(msg, "pty", "size", "cols", kind=int)
                if rows is None or cols is None or not (0 < rows < 65536 and 0 < cols < 65536):
                    raise RpcError("invalid_argument", "pty.size rows and cols must be from 1 to 65535")
                await _agent_call(sandboxes, sandbox, "resize", proc.exec_id, rows, cols)
            return unary_answer({})
        raise RpcError("unimplemented", f"process.Process/{method} is not implemented")
    except RpcError as exc:
        return stream_error(exc) if streaming else unary_error(exc)
