"""A small Python client for the Polydev API, used by the `polydev` CLI and importable by users.

    from polydev.client import PolydevClient
    with PolydevClient("http://127.0.0.1:4000", token) as pd:
        session = pd.start_login("claude_code")           # then show session["auth_url"] to the user
        pd.wait_session(session["session_id"], until=("completed",))
        run = pd.start_run("claude_code", "explain this repo")
        for event in pd.run_events(run["id"]):           # text, tool_call, tool_result, status, error, done
            print(event)
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from types import TracebackType
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:4000"
SESSION_TERMINAL = ("completed", "failed", "timeout", "cancelled")
RUN_TERMINAL = ("succeeded", "failed", "cancelled", "timeout")
CREATE_VM_TIMEOUT_S = 600.0


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

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        try:
            response = self._http.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise PolydevError(0, "unreachable", f"cannot reach Polydev at {self.url}: {exc}") from None
        if response.status_code >= 400:
            self._raise(response)
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

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
                  timeout: int | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"provider": provider, "prompt": prompt}
        if files:
            body["files"] = files
        if timeout is not None:
            body["timeout"] = timeout
        return self._call("POST", "/api/runs", json=body)

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
