"""A small Python client for the Polydev API, used by the `polydev` CLI and importable by users.

    from polydev.client import PolydevClient
    with PolydevClient("http://127.0.0.1:4000", token) as pd:
        session = pd.start_login("claude_code")           # then show session["auth_url"] to the user
        pd.wait_session(session["session_id"], until=("completed",))
        run = pd.start_run("claude_code", "explain this repo")
        for event in pd.run_events(run["id"]):           # text, tool_call, tool_result, status, error, done
            print(event)
        ws = pd.upload_workspace("demo", open("demo.tar.gz", "rb"), "application/gzip")
        pd.wait_workspace(ws["id"])                      # ready, or failed with its error
        turn = pd.start_run("claude_code", "add tests", workspace_id=ws["id"])
        ...                                              # follow it as above; then
        print(pd.run_diff(turn["id"]))                   # the turn's patch
        pd.download_workspace(ws["id"], "demo-after.tar.gz")
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Any

import httpx

from polydev.client_archives import CHUNK, Download, counted, filename_from

DEFAULT_URL = "http://127.0.0.1:4000"
SESSION_TERMINAL = ("completed", "failed", "timeout", "cancelled")
RUN_TERMINAL = ("succeeded", "failed", "cancelled", "timeout")
CREATE_VM_TIMEOUT_S = 600.0
WORKSPACE_MADE = ("ready", "paused", "failed")  # a workspace is no longer being made (paused: made, then idle)



class PolydevError(Exception):
    """An error answer from the API, with its code (`not_found`, `session_expired`, ...) and status."""

    def __init__(self, status: int, code: str, message: str, body: dict[str, Any] | None = None) -> None:
        super().__init__(f"{message} ({code}, HTTP {status})")
        self.status = status
        self.code = code
        self.message = message
        self.body = body or {}


class PolydevClient:
    def __init__(self, url: str | None = None, token: str | None = None, *, timeout: float = 30.0,
                 transport: httpx.BaseTransport | None = None) -> None:
        self.url = (url or os.environ.get("POLYDEV_URL") or DEFAULT_URL).rstrip("/")
        token = token or os.environ.get("POLYDEV_TOKEN")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._http = httpx.Client(base_url=self.url, headers=headers, timeout=timeout, transport=transport)

    def __enter__(self) -> PolydevClient:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _call(self, method: str, path: str, *, wrap_transport_errors: bool = True, **kwargs: Any) -> Any:
        response = self._request(method, path, wrap_transport_errors, **kwargs)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

    def _text(self, method: str, path: str, **kwargs: Any) -> str:
        """A call whose answer is text (a patch), not JSON."""
        return self._request(method, path, True, **kwargs).text

    def _request(self, method: str, path: str, wrap_transport_errors: bool, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            if not wrap_transport_errors:
                raise
            raise PolydevError(0, "unreachable", f"cannot reach Polydev at {self.url}: {exc}") from None
        if response.status_code >= 400:
            self._raise(response)
        return response

    @staticmethod
    def _raise(response: httpx.Response) -> None:
        try:
            body = response.json()
        except ValueError:
            raise PolydevError(response.status_code, "error", response.text[:200]) from None
        err = body.get("error", {}) if isinstance(body, dict) else {}
        raise PolydevError(response.status_code, err.get("code", "error"), err.get("message", response.text), body)

    # -- account ----------------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        return self._call("GET", "/health")

    def me(self) -> dict[str, Any]:
        return self._call("GET", "/api/me")

    def create_user(self, name: str, role: str = "user") -> dict[str, Any]:
        return self._call("POST", "/api/users", json={"name": name, "role": role})

    def issue_token(self, user_id: str, name: str = "default") -> dict[str, Any]:
        return self._call("POST", f"/api/users/{user_id}/tokens", json={"name": name})

    # -- credentials ------------------------------------------------------------------------------------
    def credentials(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/credentials")

    def set_api_key(self, provider: str, api_key: str) -> dict[str, Any]:
        return self._call("PUT", f"/api/credentials/{provider}/api-key", json={"api_key": api_key})

    def delete_credential(self, provider: str) -> None:
        self._call("DELETE", f"/api/credentials/{provider}")

    # -- login sessions ---------------------------------------------------------------------------------
    def start_login(self, provider: str, method: str | None = None) -> dict[str, Any]:
        """Start connecting a provider account; answers at once (status `initializing`)."""
        body: dict[str, Any] = {"provider": provider}
        if method:
            body["method"] = method
        return self._call("POST", "/api/auth/start", json=body)

    def session(self, session_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/auth/sessions/{session_id}")

    def wait_session(self, session_id: str, until: tuple[str, ...] = ("awaiting_user_auth", *SESSION_TERMINAL),
                     timeout: float = 600.0, interval: float = 0.5) -> dict[str, Any]:
        """Poll until the session reaches one of `until` (or any end); returns its state."""
        deadline = time.monotonic() + timeout
        while True:
            state = self.session(session_id)
            if state["status"] in until or state["status"] in SESSION_TERMINAL:
                return state
            if time.monotonic() > deadline:
                raise PolydevError(0, "timeout", f"session still {state['status']} after {timeout:.0f} s")
            time.sleep(interval)

    def submit_code(self, session_id: str, code: str) -> None:
        """Hand the login the code the provider showed, or the localhost URL the browser ended on."""
        self._call("POST", f"/api/auth/sessions/{session_id}/code", json={"code": code}, timeout=90)

    def cancel_session(self, session_id: str) -> dict[str, Any]:
        return self._call("POST", f"/api/auth/sessions/{session_id}/cancel", timeout=60)

    # -- runs -------------------------------------------------------------------------------------------
    def start_run(self, provider: str, prompt: str, *, files: dict[str, str] | None = None,
                  timeout: int | None = None, workspace_id: str | None = None,
                  conversation_id: str | None = None) -> dict[str, Any]:
        """Start a run: in a fresh VM, or as a turn on a workspace (`workspace_id`: a new conversation;
        `conversation_id`: a follow-up in that conversation, on its workspace)."""
        body: dict[str, Any] = {"provider": provider, "prompt": prompt}
        if files:
            body["files"] = files
        for name, value in (("timeout", timeout), ("workspace_id", workspace_id),
                            ("conversation_id", conversation_id)):
            if value is not None:
                body[name] = value
        return self._call("POST", "/api/runs", json=body)

    def run_diff(self, run_id: str) -> str:
        """A workspace turn's changes as a patch (404 `not_found` for a run that is not a turn, or not ended)."""
        return self._text("GET", f"/api/runs/{run_id}/diff")

    def run(self, run_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/runs/{run_id}")

    def runs(self, limit: int = 50) -> list[dict[str, Any]]:
        return self._call("GET", "/api/runs", params={"limit": limit})

    def cancel_run(self, run_id: str) -> dict[str, Any]:
        return self._call("POST", f"/api/runs/{run_id}/cancel", timeout=60)

    def run_events(self, run_id: str, after: int = -1, reconnects: int = 5) -> Iterator[dict[str, Any]]:
        """The run's events from the start (or after event `after`), live until it ends. A dropped
        connection is resumed where it stopped (Last-Event-ID), so no event is missed or repeated."""
        last, failures = after, 0
        while True:
            headers = {"Accept": "text/event-stream"}
            if last >= 0:  # (an event id is never negative: from the start, the header is left out)
                headers["Last-Event-ID"] = str(last)
            try:
                with self._http.stream("GET", f"/api/runs/{run_id}/events", headers=headers,
                                       timeout=httpx.Timeout(30.0, read=None)) as response:
                    if response.status_code >= 400:
                        response.read()
                        self._raise(response)
                    for seq, data in _sse(response.iter_lines()):
                        last, failures = seq, 0
                        yield data
                return
            except httpx.TransportError as exc:
                failures += 1
                if failures > reconnects:
                    raise PolydevError(0, "unreachable", f"lost the event stream of run {run_id}: {exc}") from None
                time.sleep(min(2.0, 0.2 * failures))

    # -- workspaces ---------------------------------------------------------------------------------------
    def workspaces(self, *, all_users: bool = False) -> list[dict[str, Any]]:
        """Your workspaces, or everyone's (`all_users`, admin)."""
        return self._call("GET", "/api/workspaces", params={"all": "true"} if all_users else None)

    def workspace(self, workspace_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/workspaces/{workspace_id}")

    def create_workspace(self, name: str, *, git_url: str | None = None, branch: str | None = None,
                         git_token: str | None = None) -> dict[str, Any]:
        """A new workspace, empty or (`git_url`) cloned from a repository; answers at once (`creating`).
        `git_token` is for a private repository: sent to the server once, in the body, never in the URL."""
        body: dict[str, Any] = {"name": name, "source": "empty"}
        if git_url is not None:
            body |= {"source": "git", "repo_url": git_url}
            if branch is not None:
                body["branch"] = branch
            if git_token is not None:
                body["git_token"] = git_token
        # The server starts the workspace's VM before it answers: a cold boot under emulation takes minutes.
        return self._call("POST", "/api/workspaces", json=body, timeout=CREATE_VM_TIMEOUT_S)

    def upload_workspace(self, name: str, archive: bytes | IO[bytes], content_type: str, *,
                         size: int | None = None, progress: Callable[[int], None] | None = None
                         ) -> dict[str, Any]:
        """A new workspace made from an archive (tar, tar.gz or zip: `content_type` as `archive_type` gives
        it). A file is sent in chunks as it is read, not loaded whole; `size` (found from the file when not
        given) is sent as Content-Length, so a server whose limit it passes refuses it before it is sent.
        `progress` is called with each chunk's length."""
        if isinstance(archive, bytes | bytearray):
            size = len(archive) if size is None else size
            content: bytes | Iterable[bytes] = counted([bytes(archive)], progress) if progress else bytes(archive)
        else:
            if size is None:
                with contextlib.suppress(OSError):  # not seekable (a pipe): sent chunked, size unannounced
                    here = archive.tell()
                    size = archive.seek(0, os.SEEK_END) - here
                    archive.seek(here)
            content = counted(iter(lambda: archive.read(CHUNK), b""), progress)
        headers = {"Content-Type": content_type}
        if size is not None:
            headers["Content-Length"] = str(size)
        try:
            return self._call("POST", "/api/workspaces/upload", params={"name": name}, content=content,
                              headers=headers, timeout=httpx.Timeout(60.0, read=CREATE_VM_TIMEOUT_S),
                              wrap_transport_errors=False)
        except httpx.WriteError as exc:
            # The server answers before reading a body it will not take (one over its size limit), and closes
            # the connection: what the client sees is the write failing, not the answer.
            raise PolydevError(0, "upload_failed", f"the server stopped taking the archive ({exc}): is it over "
                               "the server's size limit (WORKSPACE_UPLOAD_MAX_BYTES)?") from None
        except httpx.TransportError as exc:
            raise PolydevError(0, "unreachable", f"cannot reach Polydev at {self.url}: {exc}") from None

    def wait_workspace(self, workspace_id: str, *, timeout: float = 900.0, interval: float = 1.0,
                       on_state: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Poll until the workspace is made (`ready`; or `failed`, with its `error`); returns it.
        `on_state` sees each state polled."""
        deadline = time.monotonic() + timeout
        while True:
            ws = self.workspace(workspace_id)
            if on_state is not None:
                on_state(ws)
            if ws["state"] in WORKSPACE_MADE:
                return ws
            if time.monotonic() > deadline:
                raise PolydevError(0, "timeout", f"workspace still {ws['state']} after {timeout:.0f} s")
            time.sleep(interval)

    def delete_workspace(self, workspace_id: str) -> None:
        self._call("DELETE", f"/api/workspaces/{workspace_id}", timeout=120)

    def pause_workspace(self, workspace_id: str, *, memory: bool = True) -> dict[str, Any]:
        """Hibernate the workspace's VM now (without `memory`: keep its disk only, it boots cold); the next
        use wakes it."""
        return self._call("POST", f"/api/workspaces/{workspace_id}/pause", params={"memory": str(memory).lower()},
                          timeout=CREATE_VM_TIMEOUT_S)

    def push_workspace(self, workspace_id: str, branch: str) -> dict[str, Any]:
        """Push the workspace's commits to `branch` of the repository it was cloned from:
        {branch, commit, remote}."""
        return self._call("POST", f"/api/workspaces/{workspace_id}/push", json={"branch": branch},
                          timeout=CREATE_VM_TIMEOUT_S)

    def conversations(self, workspace_id: str) -> list[dict[str, Any]]:
        """The workspace's conversations: id, provider, turns, runs (their ids, oldest first), times."""
        return self._call("GET", f"/api/workspaces/{workspace_id}/conversations")

    @contextlib.contextmanager
    def workspace_archive(self, workspace_id: str) -> Iterator[Download]:
        """The workspace's files as a tar.gz, streamed: read `chunks` inside the `with`. A paused workspace
        is woken for it, which can take a while before the first byte."""
        try:
            with self._http.stream("GET", f"/api/workspaces/{workspace_id}/archive",
                                   timeout=httpx.Timeout(30.0, read=CREATE_VM_TIMEOUT_S)) as response:
                if response.status_code >= 400:
                    response.read()
                    self._raise(response)
                length = response.headers.get("content-length")
                yield Download(filename_from(response.headers.get("content-disposition"), workspace_id),
                               int(length) if length and length.isdigit() else None,
                               self._chunks(response))
        except httpx.TransportError as exc:
            raise PolydevError(0, "unreachable", f"cannot reach Polydev at {self.url}: {exc}") from None

    def _chunks(self, response: httpx.Response) -> Iterator[bytes]:
        try:
            yield from response.iter_bytes(CHUNK)
        except httpx.TransportError as exc:  # cut mid-way: the archive is incomplete
            raise PolydevError(0, "download_failed", f"the download was cut off: {exc}") from None

    def download_workspace(self, workspace_id: str, dest: str | Path, *,
                           progress: Callable[[int], None] | None = None) -> Path:
        """Save the workspace's tar.gz at `dest` (a file, or a directory for the server's file name), streamed
        to disk. It is written to a temporary file beside it and renamed only once whole, so `dest` is never
        left half-written (nor an older copy lost) when the download fails. The file is left mode 0600, as
        the temporary file is made: a workspace may hold the user's secrets. Returns the path written."""
        dest = Path(dest)
        with self.workspace_archive(workspace_id) as download:
            target = dest / download.filename if dest.is_dir() else dest
            fd, part = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as out:
                    for chunk in download.chunks:
                        out.write(chunk)
                        if progress is not None:
                            progress(len(chunk))
                    out.flush()
                    os.fsync(out.fileno())
                os.replace(part, target)
            except BaseException:
                with contextlib.suppress(OSError):
                    os.unlink(part)
                raise
        return target

    # -- VMs (admin) ------------------------------------------------------------------------------------
    def vms(self, *, include_ended: bool = False) -> list[dict[str, Any]]:
        return self._call("GET", "/api/vms", params={"all": "true"} if include_ended else None)

    def create_vm(self, purpose: str = "cli", ttl_seconds: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"purpose": purpose}
        if ttl_seconds is not None:
            body["ttl_seconds"] = ttl_seconds
        # A first VM may boot cold (and be snapshotted) before it answers: minutes under software emulation.
        return self._call("POST", "/api/vms", json=body, timeout=CREATE_VM_TIMEOUT_S)

    def vm(self, vm_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/vms/{vm_id}")

    def delete_vm(self, vm_id: str) -> None:
        self._call("DELETE", f"/api/vms/{vm_id}")

    def exec_vm(self, vm_id: str, args: list[str], *, env: dict[str, str] | None = None, cwd: str | None = None,
                timeout_s: float | None = None, stdin: str | None = None) -> dict[str, Any]:
        """Run a command in a VM and wait for it: {exit_code, stdout, stderr, timed_out, ...}."""
        body: dict[str, Any] = {"args": args, "env": env or {}}
        for name, value in (("cwd", cwd), ("timeout_s", timeout_s), ("stdin", stdin)):
            if value is not None:
                body[name] = value
        # The answer comes when the command ends: wait for its own timeout (server default 60 s) and then some.
        wait = (timeout_s or 60.0) + 30.0
        return self._call("POST", f"/api/vms/{vm_id}/exec", json=body, timeout=wait)

    # -- egress ----------------------------------------------------------------------------------------
    def users(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/users")

    def egress(self, user_id: str) -> dict[str, Any]:
        """A user's egress identity (admin); the proxy only as scheme://host:port."""
        return self._call("GET", f"/api/users/{user_id}/egress")

    def egress_identities(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/egress/identities")

    def set_egress(self, user_id: str, mode: str, *, proxy_url: str | None = None, family: int | None = None,
                   limits: dict[str, int] | None = None) -> dict[str, Any]:
        """Set a user's egress identity (admin): direct, address or proxy (with `proxy_url`)."""
        body: dict[str, Any] = {"mode": mode}
        for name, value in (("proxy_url", proxy_url), ("family", family), ("limits", limits)):
            if value is not None:
                body[name] = value
        return self._call("PUT", f"/api/users/{user_id}/egress", json=body)

    def egress_usage(self, *, all_users: bool = False) -> list[dict[str, Any]]:
        """Your egress accounting per destination host, or everyone's (admin)."""
        return self._call("GET", "/api/egress/usage", params={"all": "true"} if all_users else None)

    # -- quotas ----------------------------------------------------------------------------------------
    def quotas(self, user_id: str | None = None) -> dict[str, Any]:
        """A user's limits and use (admin), or (None) your own."""
        return self._call("GET", f"/api/users/{user_id}/quotas" if user_id else "/api/me/quotas")

    def all_quotas(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/quotas")

    def set_quotas(self, user_id: str, limits: dict[str, int]) -> dict[str, Any]:
        """Set a user's own limits (admin); {} drops them."""
        return self._call("PUT", f"/api/users/{user_id}/quotas", json={"limits": limits})

    def host_capacity(self) -> dict[str, Any]:
        return self._call("GET", "/api/quotas/host")


def _sse(lines: Iterator[str]) -> Iterator[tuple[int, dict[str, Any]]]:
    """(id, data) of each server-sent event; comments (keep-alives) are skipped."""
    seq, data = -1, []
    for line in lines:
        if not line:
            if data:
                yield seq, json.loads("\n".join(data))
            data = []
        elif line.startswith("id:"):
            seq = int(line[3:].strip())
        elif line.startswith("data:"):
            data.append(line[5:].strip())
