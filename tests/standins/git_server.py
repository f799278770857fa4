"""A git host for the workspace tests: git's smart HTTP protocol, served by `git http-backend` (git's own CGI
program, what GitHub-like hosts speak), over TLS with the test CA on a loopback address of its own.

    with GitHost(workdir, ca) as host:        # https://git.stand.test/<owner>/<name>.git
        host.make_repo("alice/public.git", {"README.md": b"hello"})
        host.make_repo("alice/private.git", {...}, token="s3cret")   # needs the token, as Basic auth
        settings: host.settings()             # pin the name for the gateway, allow it for workspaces

Guests reach it only through the egress gateway (the name is pinned to GIT_ADDRESS, which the gateway
trusts as given). Reading a private repository, and every push, needs the repository's token as the Basic
password (any user name), as a hosted forge asks for a personal access token; `requests` records what was
asked, with whether it carried the token.
"""

from __future__ import annotations

import asyncio
import base64
import os
import subprocess
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Self

from tests.standins.front import TlsFront
from tests.standins.server import StandinLoop
from tests.standins.tls import TestCA

GIT_HOST = "git.stand.test"
GIT_ADDRESS = "127.0.0.59"  # the gateway dials port 443 there
GIT_IDENTITY = ["-c", "user.name=Test", "-c", "user.email=test@stand.test"]


@dataclass(frozen=True)
class Request:
    method: str
    path: str
    service: str  # upload-pack (fetch) or receive-pack (push)
    authorized: bool


class GitHost:
    def __init__(self, workdir: Path, ca: TestCA) -> None:
        self.root = Path(workdir) / "repos"
        self.root.mkdir(parents=True, exist_ok=True)
        self.tokens: dict[str, str] = {}  # repository path → its token (private repositories)
        self.requests: list[Request] = []
        self._lock = threading.Lock()
        self.loop = StandinLoop(None)
        try:
            async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:  # (a function: uvicorn
                await self.serve(scope, receive, send)  # takes a bound method for an ASGI2 app)

            port = self.loop.serve_asgi(app, "127.0.0.1", 0)
            self.front = TlsFront(ca, "127.0.0.1", port)
            self.loop.run(self.front.start(GIT_ADDRESS))
            self.loop.add_closer(self.front.close)
        except BaseException:
            self.loop.close()
            raise

    def url(self, repo: str) -> str:
        return f"https://{GIT_HOST}/{repo}"

    def settings(self) -> dict[str, Any]:
        """What to merge into the server's settings (egress_hosts is merged with the other stand-ins')."""
        return {"egress_hosts": {GIT_HOST: [GIT_ADDRESS]}, "workspace_git_hosts": (GIT_HOST,)}

    def make_repo(self, repo: str, files: dict[str, bytes], token: str | None = None) -> Path:
        """A bare repository with one commit of `files` on main."""
        bare = self.root / repo
        work = self.root / ".work" / repo
        work.mkdir(parents=True)
        for name, data in files.items():
            (work / name).parent.mkdir(parents=True, exist_ok=True)
            (work / name).write_bytes(data)
        _git(["init", "-q", "-b", "main"], work)
        _git(["add", "-A"], work)
        _git([*GIT_IDENTITY, "commit", "-q", "-m", "first"], work)
        _git(["clone", "-q", "--bare", str(work), str(bare)], self.root)
        if token is not None:
            self.tokens[repo] = token
        return bare

    def log(self, repo: str, ref: str) -> list[str]:
        """The subjects of `ref`'s commits in the bare repository, newest first."""
        out = _git(["log", "--format=%s", ref], self.root / repo)
        return out.splitlines()

    def show(self, repo: str, ref: str, path: str) -> bytes:
        return subprocess.run(["git", "show", f"{ref}:{path}"], cwd=self.root / repo, capture_output=True,
                              check=True, timeout=30).stdout

    # -- the HTTP side: git http-backend as CGI ----------------------------------------------------------
    async def serve(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        path: str = scope["path"]
        query = scope.get("query_string", b"").decode()
        headers = {k.decode().lower(): v.decode() for k, v in scope["headers"]}
        repo = next((r for r in [*self.tokens, *_repos(self.root)] if path.startswith(f"/{r}/")), None)
        service = "receive-pack" if "receive-pack" in path or "receive-pack" in query else "upload-pack"
        token = self.tokens.get(repo or "")
        authorized = token is not None and _password(headers.get("authorization", "")) == token
        with self._lock:
            self.requests.append(Request(scope["method"], path, service, authorized))
        if repo is None:
            await _answer(send, 404, b"no such repository\n")
            return
        if (token is not None or service == "receive-pack") and not authorized:
            await _answer(send, 401, b"authentication required\n",
                          [(b"www-authenticate", b'Basic realm="git.stand.test"')])
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "GIT_PROJECT_ROOT": str(self.root),
               "GIT_HTTP_EXPORT_ALL": "1", "PATH_INFO": path, "QUERY_STRING": query,
               "REQUEST_METHOD": scope["method"], "CONTENT_TYPE": headers.get("content-type", ""),
               "CONTENT_LENGTH": str(len(body)), "REMOTE_ADDR": "127.0.0.1",
               "REMOTE_USER": "tester" if authorized else "",
               "HTTP_CONTENT_ENCODING": headers.get("content-encoding", ""),
               "GIT_PROTOCOL": headers.get("git-protocol", "")}
        proc = await asyncio.create_subprocess_exec("git", "http-backend", env=env, stdin=subprocess.PIPE,
                                                    stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, _err = await proc.communicate(body)
        head, _, content = out.partition(b"\r\n\r\n")
        if not _:
            head, _, content = out.partition(b"\n\n")
        status, extra = 200, []
        for line in head.splitlines():
            name, _, value = line.decode().partition(":")
            if name.lower() == "status":
                status = int(value.strip().split()[0])
            elif name:
                extra.append((name.strip().lower().encode(), value.strip().encode()))
        await _answer(send, status, content, extra)

    def close(self) -> None:
        self.loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _repos(root: Path) -> list[str]:
    return [str(p.relative_to(root)) for p in root.glob("*/*.git")]


def _password(header: str) -> str | None:
    if not header.lower().startswith("basic "):
        return None
    try:
        return base64.b64decode(header[6:]).decode().partition(":")[2]
    except (ValueError, UnicodeDecodeError):
        return None


async def _answer(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]] | None = None) -> None:
    headers = [h for h in headers or [] if h[0] != b"content-length"]
    await send({"type": "http.response.start", "status": status,
                "headers": [*headers, (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def _git(args: list[str], cwd: Path) -> str:
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=60).stdout
