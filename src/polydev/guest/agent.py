"""The guest agent: HTTP on TCP 8080 inside the VM. Routes, auth and start-up; the work is in execute.py.

Started by guest/init.py (or by hand: `python3 -m polydev.guest.agent --token T`). Imports only the standard
library and polydev.protocol, so it listens within a fraction of a second even on an emulated CPU.
"""

from __future__ import annotations

import hmac
import itertools
import os
import socket
import stat
import sys
import threading
import time
from typing import Callable

from polydev import protocol as p
from polydev.guest import accounts, backlog, execute, fs
from polydev.guest.http import HTTPError, Request, serve
from polydev.guest.tunnel import open_tunnel
from polydev.guest.watch import wait_for_file

MAX_UPLOAD = 4 * 1024 * 1024 * 1024
_upload_ids = itertools.count()  # tempfile would import random, shutil and more


CLOCK_TOLERANCE_S = 2.0


class Agent:
    def __init__(self, token: str | None) -> None:
        self._token = token
        self._token_lock = threading.Lock()
        self.listening_at = 0.0

    # -- plumbing -------------------------------------------------------------------------------------

    def handle(self, req: Request) -> None:
        if req.path == "/livez":
            if req.method != "GET":
                raise HTTPError(405, "use GET")
            req.send(200, b"ok\n", "text/plain")
            return
        route = ROUTES.get((req.method, req.path))
        if route is None:
            known = [m for (m, path) in ROUTES if path == req.path]
            if known:
                raise HTTPError(405, f"{req.path} takes {', '.join(sorted(known))}")
            raise HTTPError(404, f"no route {req.method} {req.path}")
        self._authorize(req)
        try:
            route(self, req)
        except p.ProtocolError as exc:
            raise HTTPError(400, str(exc)) from None

    def _authorize(self, req: Request) -> None:
        with self._token_lock:
            token = self._token
        if not token:
            raise HTTPError(503, "this VM was started without a token; nothing but /livez is served")
        scheme, _, given = req.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), token.encode()):
            raise HTTPError(401, "missing or wrong bearer token")

    # -- routes -----------------------------------------------------------------------------------------

    def health(self, req: Request) -> None:
        body = p.Health(status="ok", protocol=p.PROTOCOL_VERSION, uptime_s=round(_uptime(), 3),
                        agent_start_s=round(self.listening_at, 3), running=len(execute.RUNNING))
        req.send_json(200, body.to_json())

    def exec(self, req: Request) -> None:
        spec = p.ExecRequest.from_json(req.read_body())
        if spec.cwd is not None and not os.path.isdir(spec.cwd):
            raise HTTPError(422, f"cwd {spec.cwd!r} is not a directory")
        try:
            exec_id, ex = execute.spawn(spec)
        except execute.SpawnError as exc:
            raise HTTPError(422, f"cannot start {spec.args[0]!r}: {exc}") from None
        if spec.detach:  # runs on in its own thread; this connection only follows its output
            log = execute.detach(spec, exec_id, ex)
            req.start(200, {"Content-Type": p.NDJSON, "X-Polydev-Exec-Id": exec_id}, chunked=True)
            log.follow(-1, req.conn, req.send_chunk)
            req.end_chunks()
            return
        try:
            req.start(200, {"Content-Type": p.NDJSON, "X-Polydev-Exec-Id": exec_id}, chunked=True)
        except BaseException:
            execute.discard(exec_id, ex)
            raise
        execute.stream(spec, exec_id, ex, req.conn, req.send_chunk)
        req.end_chunks()

    def attach(self, req: Request) -> None:
        spec = p.AttachRequest.from_json(req.read_body())
        log = backlog.get(spec.exec_id)
        if log is None:
            raise HTTPError(404, f"no detach exec {spec.exec_id}")
        req.start(200, {"Content-Type": p.NDJSON}, chunked=True)
        log.follow(spec.after, req.conn, req.send_chunk)
        req.end_chunks()

    def execs(self, req: Request) -> None:
        req.send_json(200, {"execs": [d.to_json() for d in backlog.listing()]})

    def files_put(self, req: Request) -> None:
        path = _abs_path(req)
        mode = p.parse_mode(req.query.get("mode", "0644"))
        length = req.content_length(MAX_UPLOAD)
        owner = _owner(req.query.get("owner"))
        parent, made = os.path.dirname(path), accounts.missing_parents(path)
        os.makedirs(parent, exist_ok=True)
        accounts.give(made, owner)
        if os.path.isdir(path):
            raise HTTPError(409, f"{path} is a directory")
        # Write beside the target and rename, so a reader never sees half a file and a failed upload
        # leaves the old one.
        tmp = os.path.join(parent, f".polydev-upload-{os.getpid()}-{next(_upload_ids)}")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            remaining = length
            with os.fdopen(fd, "wb") as out:
                while remaining:
                    chunk = req.rfile.read(min(remaining, 1024 * 1024))
                    if not chunk:
                        raise HTTPError(400, "body shorter than Content-Length")
                    out.write(chunk)
                    remaining -= len(chunk)
            os.chmod(tmp, mode)
            accounts.give([tmp], owner)
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise
        req.send_json(200, p.FileInfo(path=path, size=length, mode=mode).to_json())

    def files_get(self, req: Request) -> None:
        path = _abs_path(req)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            raise HTTPError(404, f"{path} does not exist") from None
        except IsADirectoryError:
            raise HTTPError(409, f"{path} is a directory") from None
        except PermissionError as exc:
            raise HTTPError(403, str(exc)) from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise HTTPError(409, f"{path} is not a regular file")
        with os.fdopen(fd, "rb") as f:
            req.start(200, {"Content-Type": "application/octet-stream",
                            p.MODE_HEADER: format(st.st_mode & 0o7777, "04o")}, length=st.st_size)
            remaining = st.st_size
            while remaining > 0:
                chunk = f.read(min(remaining, 1024 * 1024))
                if not chunk:
                    break
                req.conn.sendall(chunk)
                remaining -= len(chunk)

    def signal(self, req: Request) -> None:
        spec = p.SignalRequest.from_json(req.read_body())
        number = p.signal_number(spec.signal)
        assert number is not None
        if not execute.send_signal(spec.exec_id, number):
            raise HTTPError(404, f"no running exec {spec.exec_id}")
        req.send_json(200, {"delivered": True})

    def input(self, req: Request) -> None:
        spec = p.InputRequest.from_json(req.read_body())
        try:
            written = execute.write_input(spec.exec_id, spec.payload(), spec.eof)
        except execute.NoSuchExec:
            raise HTTPError(404, f"no running exec {spec.exec_id}") from None
        except execute.InputClosed:
            raise HTTPError(409, f"stdin of exec {spec.exec_id} is closed (start it with keep_stdin_open)") from None
        req.send_json(200, {"written": written})

    def fs(self, req: Request) -> None:
        spec = p.FsRequest.from_json(req.read_body())
        try:
            entries = fs.run(spec)
        except fs.FsError as exc:
            raise HTTPError(exc.status, str(exc)) from None
        req.send_json(200, {"entries": [e.to_json() for e in entries]})

    def resize(self, req: Request) -> None:
        spec = p.ResizeRequest.from_json(req.read_body())
        if not execute.resize(spec.exec_id, spec.rows, spec.cols):
            raise HTTPError(404, f"no running PTY exec {spec.exec_id}")
        req.send_json(200, {"resized": True})

    def tcp(self, req: Request) -> None:
        open_tunnel(req)

    def watch(self, req: Request) -> None:
        spec = p.WatchRequest.from_json(req.read_body())
        found = wait_for_file(spec.paths, spec.timeout, spec.min_size, req.conn)
        if found is None:
            req.send_json(200, {"path": None})
            return
        path, st = found
        req.send_json(200, {"path": path, "size": st.st_size, "mode": format(st.st_mode & 0o7777, "04o")})

    def token(self, req: Request) -> None:
        spec = p.TokenRequest.from_json(req.read_body())
        with self._token_lock:
            self._token = spec.token
        clock_set = False
        # Only a clock that is clearly off is set: the host's reading is a few milliseconds old when it
        # arrives, and an agent that shares the host's clock (a test stand-in) must leave it alone.
        if spec.now is not None and abs(time.time() - spec.now) > CLOCK_TOLERANCE_S:
            try:
                time.clock_settime(time.CLOCK_REALTIME, spec.now)
                clock_set = True
            except (OSError, PermissionError):  # not root (the agent run on a host in tests): keep going
                pass
        req.send_json(200, {"rotated": True, "clock_set": clock_set})


ROUTES = {
    ("GET", "/health"): Agent.health,
    ("POST", "/exec"): Agent.exec,
    ("PUT", "/files"): Agent.files_put,
    ("GET", "/files"): Agent.files_get,
    ("POST", "/signal"): Agent.signal,
    ("POST", "/input"): Agent.input,
    ("POST", "/watch"): Agent.watch,
    ("POST", "/fs"): Agent.fs,
    ("POST", "/resize"): Agent.resize,
    ("POST", "/attach"): Agent.attach,
    ("GET", "/execs"): Agent.execs,
    ("GET", "/tcp"): Agent.tcp,
    ("POST", "/token"): Agent.token,
}


def _owner(name: str | None) -> accounts.Account | None:
    try:
        return None if name is None else accounts.lookup(p.user_name(name) or "")
    except (p.ProtocolError, accounts.NoSuchUser) as exc:
        raise HTTPError(422, str(exc)) from None


def _abs_path(req: Request) -> str:
    path = req.query.get("path", "")
    if not path.startswith("/") or "\0" in path:
        raise HTTPError(400, "path must be an absolute path in the query (?path=/...)")
    return os.path.normpath(path)


def _uptime() -> float:
    try:
        with open("/proc/uptime") as f:
            return float(f.read().split()[0])
    except OSError:
        return time.monotonic()


def listen(port: int, host: str = "0.0.0.0") -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(64)
    return sock


def _print(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


def run(token: str | None, port: int = p.AGENT_PORT, host: str = "0.0.0.0",
        announce: Callable[[str], None] = _print) -> None:
    agent = Agent(token)
    sock = listen(port, host)
    agent.listening_at = _uptime()
    # The host waits for this line on the serial console; it goes out only once the socket accepts.
    # (Under guest/init.py, init prints it, after the network is up too.)
    announce(f"{p.READY_MARKER} port={port} uptime={agent.listening_at:.2f}")
    serve(sock, agent.handle)


def main(argv: list[str] | None = None) -> None:
    args = list(sys.argv[1:] if argv is None else argv)
    token = os.environ.pop("POLYDEV_AGENT_TOKEN", None)
    port, host = p.AGENT_PORT, "0.0.0.0"
    while args:
        flag = args.pop(0)
        if flag == "--token":
            token = args.pop(0)
        elif flag == "--port":
            port = int(args.pop(0))
        elif flag == "--host":
            host = args.pop(0)
        else:
            sys.exit(f"usage: agent [--token T] [--port N] [--host H] (unknown {flag!r})")
    run(token, port, host)


if __name__ == "__main__":
    main()
