"""Host ⇄ guest wire protocol: the one module the guest agent shares with the host side.

Why plain dataclasses and not pydantic (as DESIGN.md §2 first said): the agent imports this module inside the
VM, where it must start in well under a second on an emulated (TCG) CPU with only Debian's python3; pydantic
costs seconds to import under TCG and would drag a compiled wheel (pydantic-core) into the image. So the types
here are stdlib dataclasses with explicit validation (`from_json` raises `ProtocolError` with a reason the agent
answers as HTTP 400). The host may wrap them in pydantic models at its API edge; the wire format is only here.

Wire summary (all JSON bodies are UTF-8 objects; process output is base64 because it is arbitrary bytes):
- `GET /livez`                       no token; answers `ok`. A bare liveness probe.
- `GET /health`                      → `Health`
- `POST /exec` body `ExecRequest`    → `application/x-ndjson` stream of `ExecEvent`, one per line, `seq` from 0:
                                        `start`, then `stdout`/`stderr` chunks, then exactly one `exit`.
- `PUT /files?path=ABS&mode=0644[&owner=USER]` raw body → `FileInfo` (it and the directories made: USER's).
- `GET /files?path=ABS`              → raw body + `X-Polydev-Mode`.
- `POST /signal` body `SignalRequest` → `{"delivered": true}`
- `POST /input` body `InputRequest`  → `{"written": n}`: more input for a running exec: a PTY exec's terminal, or
                                        a pipe exec started with `keep_stdin_open`. `eof` closes a pipe; on a PTY
                                        it types the EOF character (Ctrl-D). 404 unknown or finished exec, 409
                                        stdin closed. `n < len(data)` when the process read nothing for
                                        INPUT_WAIT_S (then `eof` was not applied).
- `POST /watch` body `WatchRequest`  → `{"path": P, "size": n, "mode": "0600"}` as soon as one of the paths is a
                                        regular file of at least `min_size` bytes that has stopped changing
                                        (so a half-written file is not reported); `{"path": null}` at timeout.
- `POST /fs` body `FsRequest`        → `{"entries": [FsEntry…]}`: stat, list (to `depth`), mkdir (with parents), move,
                                        remove (recursive). 404 no such path, 409 mkdir of an existing path.
- `POST /resize` body `ResizeRequest` sets a PTY exec's window size → `{"resized": true}`.
- `POST /attach` body `AttachRequest` → the NDJSON events of a `detach` exec whose `seq` is above `after`, from
                                        its backlog and then as they come, up to its `exit`. 404 unknown exec.
- `GET /execs`                       → `{"execs": [DetachedExec…]}`: the detach execs the agent holds, running or
                                        finished (the last MAX_FINISHED_DETACHED of those).
- `GET /tcp?port=N`                  → `200`, then the connection is a raw byte pipe to the guest's 127.0.0.1:N
                                        (503 when nothing listens there).
- `POST /token` body `TokenRequest`  replaces the token (after a snapshot restore the host hands each clone its own)
                                        and, with `now`, sets the guest's clock to the host's.
Every call but `/livez` needs `Authorization: Bearer <token>`; errors answer `{"error": reason}` with a 4xx/5xx.
"""

from __future__ import annotations

import base64
import json
import re
from dataclasses import asdict, dataclass, field
from typing import Any

AGENT_PORT = 8080
PROTOCOL_VERSION = 1
# Printed on the serial console by the agent the moment its socket listens; the host watches for it.
READY_MARKER = "POLYDEV-AGENT-READY"
# The token is never baked into an image. The host hands it over at boot as a QEMU fw_cfg file (readable
# in the guest under FW_CFG_SYSFS, kept out of the host's process list and of /proc/cmdline), or on the
# kernel command line as CMDLINE_TOKEN for backends without fw_cfg.
FW_CFG_TOKEN = "opt/polydev/token"
FW_CFG_SYSFS = "/sys/firmware/qemu_fw_cfg/by_name"
CMDLINE_TOKEN = "polydev.token"
CMDLINE_ADDR = "polydev.addr"  # e.g. 10.0.2.15/24
CMDLINE_GATEWAY = "polydev.gw"
CMDLINE_PORT = "polydev.port"
# A `detach` exec outlives its client: the agent keeps its last DETACHED_BACKLOG_BYTES of output for the
# next /attach, and remembers the last MAX_FINISHED_DETACHED that ended (with their exit) for a late one.
DETACHED_BACKLOG_BYTES = 1024 * 1024
MAX_FINISHED_DETACHED = 32
MAX_META_BYTES = 16 * 1024
INPUT_WAIT_S = 10.0  # how long one POST /input waits for a process that does not read its input
MAX_WATCH_PATHS = 16
MAX_WATCH_S = 300.0
MODE_HEADER = "X-Polydev-Mode"
NDJSON = "application/x-ndjson"

EVENT_TYPES = ("start", "stdout", "stderr", "exit")
SIGNALS = {"HUP": 1, "INT": 2, "QUIT": 3, "KILL": 9, "USR1": 10, "USR2": 12, "TERM": 15, "CONT": 18,
           "STOP": 19, "TSTP": 20, "WINCH": 28}


class ProtocolError(ValueError):
    """A message that does not follow this protocol; the text is the reason given to the peer."""


def _obj(raw: bytes | str | dict[str, Any]) -> dict[str, Any]:
    if isinstance(raw, dict):
        return raw
    try:
        value = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"body is not JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ProtocolError("body must be a JSON object")
    return value


def _check_keys(data: dict[str, Any], allowed: set[str], what: str) -> None:
    unknown = sorted(set(data) - allowed)
    if unknown:
        raise ProtocolError(f"{what}: unknown field(s) {', '.join(unknown)}")


def _str_list(value: Any, name: str) -> list[str]:
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise ProtocolError(f"{name} must be a list of strings")
    return value


def user_name(value: Any) -> str | None:
    """An account name as `useradd` takes it (the guest looks it up; None: the agent's own, root)."""
    if value is not None and (not isinstance(value, str) or not re.fullmatch(r"[a-z_][a-z0-9_-]{0,31}", value)):
        raise ProtocolError(f"user must be an account name, not {value!r:.40}")
    return value


def _b64(value: Any, name: str) -> str:
    if not isinstance(value, str):
        raise ProtocolError(f"{name} must be a base64 string")
    try:
        base64.b64decode(value, validate=True)
    except ValueError:  # binascii.Error
        raise ProtocolError(f"{name} is not valid base64") from None
    return value


def _opt(value: Any, kind: type | tuple[type, ...], name: str) -> Any:
    # bool is an int in Python; a JSON true where a number is expected is still a client bug.
    if value is None:
        return None
    if isinstance(value, bool) and kind is not bool:
        raise ProtocolError(f"{name} has the wrong type")
    if not isinstance(value, kind):
        raise ProtocolError(f"{name} has the wrong type")
    return value


class _Fields:
    """A message whose JSON is its fields as they are: a mixin for the dataclasses below (only those)."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)  # type: ignore[call-overload]


@dataclass
class ExecRequest(_Fields):
    args: list[str]
    env: dict[str, str] = field(default_factory=dict)  # merged over the agent's default environment
    cwd: str | None = None
    stdin: str | None = None  # base64; closed after writing unless keep_stdin_open (a PTY stays open)
    pty: bool = False  # stdout carries the terminal's output; stderr is merged into it
    timeout_s: float | None = None  # the process group is killed when it runs longer
    keep_stdin_open: bool = False  # a pipe exec's stdin stays open for POST /input (a PTY's always does)
    pty_size: list[int] | None = None  # [rows, cols] of a PTY's window
    # The process is not killed when its client leaves: its output waits in a backlog for POST /attach.
    detach: bool = False
    meta: str | None = None  # a detach exec's note from the host, given back by GET /execs (MAX_META_BYTES)
    user: str | None = None  # an account of the guest to run as (its groups, HOME; cwd its home); None: root

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> ExecRequest:
        data = _obj(raw)
        _check_keys(data, {"args", "env", "cwd", "stdin", "pty", "timeout_s", "keep_stdin_open", "pty_size",
                           "detach", "meta", "user"}, "exec")
        if "args" not in data:
            raise ProtocolError("exec: args is required")
        args = _str_list(data["args"], "args")
        if not args or not args[0]:
            raise ProtocolError("args must name a program")
        env = data.get("env") or {}
        if not isinstance(env, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in env.items()):
            raise ProtocolError("env must map strings to strings")
        if any(not k or "=" in k or "\0" in k + v for k, v in env.items()):
            raise ProtocolError("env names must be non-empty, without '=' or NUL")
        if any("\0" in a for a in args):
            raise ProtocolError("args must not contain NUL")
        timeout = _opt(data.get("timeout_s"), (int, float), "timeout_s")
        if timeout is not None and timeout <= 0:
            raise ProtocolError("timeout_s must be positive")
        stdin = data.get("stdin")
        size = data.get("pty_size")
        if size is not None and (not isinstance(size, list) or len(size) != 2
                                 or not all(type(n) is int and 0 < n < 65536 for n in size)):
            raise ProtocolError("pty_size must be [rows, cols], each from 1 to 65535")
        meta = _opt(data.get("meta"), str, "meta")
        if meta is not None and len(meta.encode()) > MAX_META_BYTES:
            raise ProtocolError(f"meta must be at most {MAX_META_BYTES} bytes")
        detach = bool(_opt(data.get("detach"), bool, "detach"))
        if meta is not None and not detach:
            raise ProtocolError("meta is kept only for a detach exec")
        return cls(args=args, pty_size=size, env=env, cwd=_opt(data.get("cwd"), str, "cwd"), detach=detach, meta=meta,
                   stdin=None if stdin is None else _b64(stdin, "stdin"), user=user_name(data.get("user")),
                   pty=bool(_opt(data.get("pty"), bool, "pty")),
                   timeout_s=None if timeout is None else float(timeout),
                   keep_stdin_open=bool(_opt(data.get("keep_stdin_open"), bool, "keep_stdin_open")))


@dataclass
class ExecEvent:
    seq: int
    type: str  # one of EVENT_TYPES
    exec_id: str | None = None  # start: the id POST /signal takes
    pid: int | None = None  # start
    data: str | None = None  # stdout/stderr: base64 of the bytes read
    code: int | None = None  # exit: the exit status, or -N when killed by signal N (as subprocess does)
    timed_out: bool = False  # exit: killed because timeout_s passed
    duration_s: float | None = None  # exit

    def to_line(self) -> bytes:
        body = {k: v for k, v in asdict(self).items() if v is not None and (k != "timed_out" or v)}
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> ExecEvent:
        data = _obj(raw)
        if data.get("type") not in EVENT_TYPES or not isinstance(data.get("seq"), int):
            raise ProtocolError(f"not an exec event: {data!r:.200}")
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)

    def bytes(self) -> bytes:
        return base64.b64decode(self.data or "")


@dataclass
class Health(_Fields):
    status: str
    protocol: int
    uptime_s: float
    agent_start_s: float  # guest uptime when the agent started listening
    running: int  # processes started by /exec still running

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> Health:
        data = _obj(raw)
        try:
            return cls(**{k: data[k] for k in cls.__dataclass_fields__})
        except KeyError as exc:
            raise ProtocolError(f"health: missing {exc}") from None


@dataclass
class FileInfo(_Fields):
    path: str
    size: int
    mode: int


@dataclass
class SignalRequest:
    exec_id: str
    signal: str = "TERM"  # a name from SIGNALS, with or without the SIG prefix

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> SignalRequest:
        data = _obj(raw)
        _check_keys(data, {"exec_id", "signal"}, "signal")
        exec_id = _opt(data.get("exec_id"), str, "exec_id")
        if not exec_id:
            raise ProtocolError("signal: exec_id is required")
        name = _opt(data.get("signal", "TERM"), str, "signal") or "TERM"
        if signal_number(name) is None:
            raise ProtocolError(f"unknown signal {name!r}")
        return cls(exec_id=exec_id, signal=name)


@dataclass
class InputRequest(_Fields):
    exec_id: str
    data: str = ""  # base64 of the bytes to write
    eof: bool = False  # after the data: close a pipe's stdin, or type Ctrl-D on a PTY

    def payload(self) -> bytes:
        return base64.b64decode(self.data)

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> InputRequest:
        data = _obj(raw)
        _check_keys(data, {"exec_id", "data", "eof"}, "input")
        exec_id = _opt(data.get("exec_id"), str, "exec_id")
        if not exec_id:
            raise ProtocolError("input: exec_id is required")
        return cls(exec_id=exec_id, data=_b64(data.get("data", ""), "data"),
                   eof=bool(_opt(data.get("eof"), bool, "eof")))


@dataclass
class WatchRequest(_Fields):
    paths: list[str]  # absolute; the answer names the first that is ready, as spelled here
    timeout: float  # seconds; 0 checks once
    min_size: int = 1  # an empty file just created by open() is not yet the file being waited for

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> WatchRequest:
        data = _obj(raw)
        _check_keys(data, {"paths", "timeout", "min_size"}, "watch")
        paths = _str_list(data.get("paths"), "paths")
        if not 1 <= len(paths) <= MAX_WATCH_PATHS:
            raise ProtocolError(f"paths must name 1 to {MAX_WATCH_PATHS} files")
        if any(not path.startswith("/") or "\0" in path for path in paths):
            raise ProtocolError("paths must be absolute, without NUL")
        timeout = _opt(data.get("timeout"), (int, float), "timeout")
        if timeout is None or not 0 <= timeout <= MAX_WATCH_S:  # also refuses NaN, which json accepts
            raise ProtocolError(f"timeout must be seconds from 0 to {MAX_WATCH_S:g}")
        min_size = _opt(data.get("min_size", 1), int, "min_size")
        if min_size is None or min_size < 0:
            raise ProtocolError("min_size must be a non-negative integer")
        return cls(paths=paths, timeout=float(timeout), min_size=min_size)


@dataclass
class TokenRequest:
    token: str
    # The host's clock (Unix seconds). A guest restored from a snapshot resumes with the clock it had when the
    # snapshot was taken, hours or days ago: TLS validity and token-expiry checks would go wrong. The
    # handover after a restore carries the time, and the agent sets the guest's clock from it.
    now: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> TokenRequest:
        data = _obj(raw)
        _check_keys(data, {"token", "now"}, "token")
        token = _opt(data.get("token"), str, "token")
        if not token or len(token) < 16 or any(c.isspace() for c in token):
            raise ProtocolError("token must be at least 16 characters without spaces")
        now = _opt(data.get("now"), (int, float), "now")
        if now is not None and not 1e9 < now < 1e11:  # 2001..5138: a clock, not a mistake
            raise ProtocolError("now must be the host's time in Unix seconds")
        return cls(token=token, now=None if now is None else float(now))


FS_OPS = ("stat", "list", "mkdir", "move", "remove")
MAX_LIST_DEPTH = 16
MAX_LIST_ENTRIES = 100_000


@dataclass
class FsRequest(_Fields):
    op: str  # one of FS_OPS
    path: str  # absolute
    depth: int = 1  # list: 1 lists the directory's own entries, 2 their children too, ...
    destination: str | None = None  # move: absolute
    user: str | None = None  # mkdir: the directories made are owned by this account of the guest

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> FsRequest:
        data = _obj(raw)
        _check_keys(data, {"op", "path", "depth", "destination", "user"}, "fs")
        op = _opt(data.get("op"), str, "op")
        if op not in FS_OPS:
            raise ProtocolError(f"op must be one of {', '.join(FS_OPS)}")
        paths = [_opt(data.get("path"), str, "path")]
        destination = _opt(data.get("destination"), str, "destination")
        if op == "move":
            paths.append(destination)
        if any(not path or not path.startswith("/") or "\0" in path for path in paths):
            raise ProtocolError("paths must be absolute, without NUL")
        depth = _opt(data.get("depth", 1), int, "depth")
        if depth is None or not 1 <= depth <= MAX_LIST_DEPTH:
            raise ProtocolError(f"depth must be from 1 to {MAX_LIST_DEPTH}")
        return cls(op=op, path=paths[0], depth=depth, destination=destination, user=user_name(data.get("user")))


@dataclass
class FsEntry(_Fields):
    name: str
    path: str
    type: str  # file, dir, symlink or other (a symlink is described as itself, not its target)
    size: int
    mode: int  # permission bits
    permissions: str  # as ls shows them: -rw-r--r--
    owner: str
    group: str
    mtime: float  # Unix seconds
    symlink_target: str | None = None


@dataclass
class ResizeRequest(_Fields):
    exec_id: str
    rows: int
    cols: int

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> ResizeRequest:
        data = _obj(raw)
        _check_keys(data, {"exec_id", "rows", "cols"}, "resize")
        exec_id = _opt(data.get("exec_id"), str, "exec_id")
        rows, cols = _opt(data.get("rows"), int, "rows"), _opt(data.get("cols"), int, "cols")
        if not exec_id or rows is None or cols is None or not (0 < rows < 65536 and 0 < cols < 65536):
            raise ProtocolError("resize: exec_id, and rows and cols from 1 to 65535, are required")
        return cls(exec_id=exec_id, rows=rows, cols=cols)


@dataclass
class AttachRequest(_Fields):
    exec_id: str
    after: int = -1  # the last seq the caller has; -1 for everything the backlog still holds

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> AttachRequest:
        data = _obj(raw)
        _check_keys(data, {"exec_id", "after"}, "attach")
        exec_id = _opt(data.get("exec_id"), str, "exec_id")
        after = _opt(data.get("after", -1), int, "after")
        if not exec_id or after is None or after < -1:
            raise ProtocolError("attach: exec_id is required and after must be -1 or a seq")
        return cls(exec_id=exec_id, after=after)


@dataclass
class DetachedExec(_Fields):
    exec_id: str
    pid: int
    running: bool
    last_seq: int  # the seq of its newest event so far
    first_seq: int  # the oldest event its backlog still holds (older output was dropped)
    meta: str | None = None

    @classmethod
    def from_json(cls, raw: bytes | str | dict[str, Any]) -> DetachedExec:
        data = _obj(raw)
        try:
            return cls(exec_id=str(data["exec_id"]), pid=int(data["pid"]), running=bool(data["running"]),
                       last_seq=int(data["last_seq"]), first_seq=int(data["first_seq"]), meta=data.get("meta"))
        except (KeyError, TypeError, ValueError):
            raise ProtocolError(f"not a detached exec: {data!r:.200}") from None


def signal_number(name: str) -> int | None:
    name = name.upper()
    return SIGNALS.get(name[3:] if name.startswith("SIG") else name)


def parse_mode(text: str) -> int:
    """An octal permission string such as "0600" or "755"; only permission and sticky/set-id bits."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise ProtocolError(f"mode must be octal, got {text!r}") from None
    if not 0 <= mode <= 0o7777:
        raise ProtocolError(f"mode out of range: {text!r}")
    return mode


def parse_cmdline(text: str) -> dict[str, str]:
    """The `polydev.*` keys of a kernel command line (values never contain spaces)."""
    out: dict[str, str] = {}
    for word in text.split():
        key, sep, value = word.partition("=")
        if sep and key.startswith("polydev."):
            out[key] = value
    return out
