"""Host-side client for the guest agent (see polydev.protocol for the wire format)."""

from __future__ import annotations

import base64
import contextlib
import functools
import json
import socket
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field

import httpx

from polydev import protocol as p


class AgentError(Exception):
    """A call to the agent failed. Raised as such: the agent answered an error, and `status` and `reason`
    are what it said; raised as AgentUnreachable: no answer came."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"agent answered {status}: {reason}")
        self.status = status
        self.reason = reason


class AgentUnreachable(AgentError):
    """No usable answer from the agent: the connection was refused, broke off or timed out (httpx's
    TransportError), or what came back could not be read as HTTP (httpx's other HTTPErrors). `cause` is
    httpx's error; `status` is 0 (nothing was answered) and the text is the cause's name and text, e.g.
    "ConnectError: [Errno 111] Connection refused"."""

    def __init__(self, cause: httpx.HTTPError) -> None:
        super().__init__(0, f"{type(cause).__name__}: {cause}")
        self.args = (self.reason,)
        self.cause = cause
        # The connection itself failed (refused, reset, timed out), as opposed to an unreadable answer.
        self.transport = isinstance(cause, httpx.TransportError)


@contextlib.contextmanager
def _answer() -> Iterator[None]:
    """Around every request: httpx's failures leave this client as AgentUnreachable."""
    try:
        yield
    except httpx.HTTPError as exc:
        raise AgentUnreachable(exc) from exc


@dataclass
class ExecResult:
    exit_code: int
    stdout: bytes
    stderr: bytes
    timed_out: bool
    duration_s: float
    events: list[p.ExecEvent] = field(default_factory=list)


@functools.cache
def _tls_context() -> ssl.SSLContext:
    """httpx's default TLS context, made once: each client would otherwise load the CA bundle again (35-60 ms
    measured, on the run's path to its first event), though agents speak plain HTTP."""
    return httpx.create_ssl_context()


class AgentClient:
    def __init__(self, base_url: str, token: str, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self._http = httpx.Client(base_url=self.base_url, timeout=timeout, verify=_tls_context(),
                                  headers={"Authorization": f"Bearer {token}"})

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> AgentClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def set_token(self, token: str) -> None:
        self._http.headers["Authorization"] = f"Bearer {token}"

    @staticmethod
    def _check(response: httpx.Response) -> httpx.Response:
        if response.status_code >= 400:
            response.read()
            try:
                reason = response.json().get("error", response.text)
            except (ValueError, AttributeError):
                reason = response.text
            raise AgentError(response.status_code, reason)
        return response

    def livez(self) -> bool:
        with _answer():
            return self._http.get("/livez").status_code == 200

    def health(self) -> p.Health:
        with _answer():
            return p.Health.from_json(self._check(self._http.get("/health")).content)

    def exec_stream(self, args: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                    stdin: bytes | None = None, pty: bool = False, timeout_s: float | None = None,
                    keep_stdin_open: bool = False, pty_size: tuple[int, int] | None = None, detach: bool = False,
                    meta: str | None = None, user: str | None = None) -> Iterator[p.ExecEvent]:
        """Yield events as the agent sends them. Leaving the loop early closes the connection, which kills
        the process in the guest, unless `detach`: then it runs on, and `attach` follows it again (`execs`
        lists such processes, each with its `meta`). With keep_stdin_open (or pty), `write_input` feeds it
        more input later."""
        req = p.ExecRequest(args=args, env=env or {}, cwd=cwd, pty=pty, timeout_s=timeout_s,
                            stdin=None if stdin is None else base64.b64encode(stdin).decode(),
                            keep_stdin_open=keep_stdin_open, pty_size=list(pty_size) if pty_size else None,
                            detach=detach, meta=meta, user=user)
        # The read timeout must outlast the command; the agent enforces timeout_s itself.
        read_timeout = None if timeout_s is None else timeout_s + 30
        yield from self._events("/exec", req.to_json(), read_timeout)

    def attach(self, exec_id: str, after: int = -1) -> Iterator[p.ExecEvent]:
        """A detach exec's events above seq `after`, those the agent still holds and then as they come."""
        yield from self._events("/attach", p.AttachRequest(exec_id=exec_id, after=after).to_json(), None)

    def execs(self) -> list[p.DetachedExec]:
        with _answer():
            body = self._check(self._http.get("/execs")).json()
        return [p.DetachedExec.from_json(item) for item in body.get("execs", [])]

    def _events(self, path: str, body: dict[str, object], read_timeout: float | None) -> Iterator[p.ExecEvent]:
        with _answer(), self._http.stream("POST", path, json=body,
                                          timeout=httpx.Timeout(30.0, read=read_timeout)) as response:
            self._check(response)
            for line in response.iter_lines():
                if line:
                    yield p.ExecEvent.from_json(line)

    def exec(self, args: list[str], **kw: object) -> ExecResult:
        events = list(self.exec_stream(args, **kw))  # type: ignore[arg-type]
        if not events or events[-1].type != "exit":
            raise AgentError(502, "exec stream ended without an exit event")
        last = events[-1]
        out = b"".join(e.bytes() for e in events if e.type == "stdout")
        err = b"".join(e.bytes() for e in events if e.type == "stderr")
        return ExecResult(exit_code=last.code if last.code is not None else -1, stdout=out, stderr=err,
                          timed_out=last.timed_out, duration_s=last.duration_s or 0.0, events=events)

    def put_file(self, path: str, data: bytes, mode: int = 0o644, owner: str | None = None) -> dict[str, object]:
        """Write a file in the guest; `owner` (an account there) gets it and the directories made for it."""
        params = {"path": path, "mode": format(mode, "04o"), **({"owner": owner} if owner else {})}
        with _answer():
            response = self._http.put("/files", params=params, content=data)
            return json.loads(self._check(response).content)

    def get_file(self, path: str) -> tuple[bytes, int]:
        with _answer():
            response = self._check(self._http.get("/files", params={"path": path}))
            return response.content, int(response.headers[p.MODE_HEADER], 8)

    def signal(self, exec_id: str, signal: str = "TERM") -> None:
        with _answer():
            self._check(self._http.post("/signal", json={"exec_id": exec_id, "signal": signal}))

    def write_input(self, exec_id: str, data: bytes, eof: bool = False) -> int:
        """Write to a running exec's terminal (pty) or kept-open stdin; eof closes the pipe / types Ctrl-D.
        Returns the bytes written: fewer than given when the process read nothing for p.INPUT_WAIT_S."""
        req = p.InputRequest(exec_id=exec_id, data=base64.b64encode(data).decode(), eof=eof)
        with _answer():
            response = self._http.post("/input", json=req.to_json(),
                                       timeout=httpx.Timeout(30.0, read=p.INPUT_WAIT_S + 30))
            return int(json.loads(self._check(response).content)["written"])

    def watch(self, paths: list[str], timeout: float, min_size: int = 1) -> str | None:
        """Block until one of `paths` (absolute, in the guest) is a completely written file of at least
        min_size bytes, and return it; None when `timeout` seconds pass first."""
        req = p.WatchRequest(paths=list(paths), timeout=timeout, min_size=min_size)
        # The read timeout must outlast the watch; the agent enforces `timeout` itself.
        with _answer():
            response = self._http.post("/watch", json=req.to_json(), timeout=httpx.Timeout(30.0, read=timeout + 30))
            path = json.loads(self._check(response).content)["path"]
        return None if path is None else str(path)

    def fs(self, op: str, path: str, *, depth: int = 1, destination: str | None = None,
           user: str | None = None) -> list[p.FsEntry]:
        """A file-system operation in the guest (protocol.FsRequest); AgentError 404/409 as the agent says."""
        req = p.FsRequest(op=op, path=path, depth=depth, destination=destination, user=user)
        with _answer():
            body = json.loads(self._check(self._http.post("/fs", json=req.to_json())).content)
        return [p.FsEntry(**e) for e in body["entries"]]

    def resize(self, exec_id: str, rows: int, cols: int) -> None:
        with _answer():
            self._check(self._http.post("/resize", json={"exec_id": exec_id, "rows": rows, "cols": cols}))

    def tunnel(self, port: int, timeout: float = 10.0) -> socket.socket:
        """A connection to the guest's 127.0.0.1:`port` through the agent (GET /tcp): raw bytes both ways.
        AgentError(503) when nothing listens there."""
        url = httpx.URL(self.base_url)
        sock = socket.create_connection((url.host, url.port or 80), timeout=timeout)
        try:
            auth = self._http.headers["Authorization"]
            sock.sendall(f"GET /tcp?port={port} HTTP/1.1\r\nHost: agent\r\nAuthorization: {auth}\r\n\r\n".encode())
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = sock.recv(1)  # byte by byte: nothing past the head may be consumed here
                if not chunk:
                    raise AgentError(502, "the agent closed the tunnel before answering")
                head += chunk
                if len(head) > 65536:
                    raise AgentError(502, "the agent's answer has no end of head")
            status = int(head.split(b" ", 2)[1])
            if status != 200:
                raise AgentError(status, head.decode("latin-1").split("\r\n", 1)[0])
        except BaseException:
            sock.close()
            raise
        sock.settimeout(None)
        return sock

    def rotate_token(self, new_token: str) -> None:
        with _answer():
            self._check(self._http.post("/token", json={"token": new_token}))
        self.set_token(new_token)
