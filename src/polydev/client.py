"""A small Python client for the Polydev API, used by the `polydev` CLI and importable by users.

    from polydev.client import PolydevClient
    with PolydevClient("http://127.0.0.1:4000", token) as pd:
        pd.set_api_key("codex", "sk-...")
        print(pd.credentials())
"""

from __future__ import annotations

import os
from types import TracebackType
from typing import Any

import httpx

DEFAULT_URL = "http://127.0.0.1:4000"
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
            try:
                body = response.json()
                err = body.get("error", {})
                raise PolydevError(response.status_code, err.get("code", "error"), err.get("message", response.text),
                                   body)
            except ValueError:
                raise PolydevError(response.status_code, "error", response.text[:200]) from None
        if response.status_code == 204 or not response.content:
            return None
        return response.json()

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
    def session(self, session_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/auth/sessions/{session_id}")

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
