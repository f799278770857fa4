"""envd for every sandbox at one address: an ASGI app that checks the sandbox's access token (X-Access-Token)
on every call and serves the process and filesystem services, `/files` and `/health` against that sandbox's
VM. routing.py decides which requests come here (the E2b-Sandbox-Id header, or a `49983-{id}.` host name).

A missing sandbox, one that has ended and a wrong token get the same 502 "… was not found" as E2B's proxy
answers for a sandbox that is gone, which the SDK turns into SandboxNotRunningException: a sandbox id alone
tells a caller nothing.
"""

from __future__ import annotations

import base64
from collections.abc import Callable

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from polydev.api.e2b import envd_files, envd_fs, envd_process
from polydev.api.e2b.connect import RpcError, stream_error, unary_error
from polydev.core.sandboxes import SandboxNotFound
from polydev.protocol import ProtocolError, user_name
from polydev.services import Services
from polydev.store.models import Sandbox

SANDBOX_HEADER = "e2b-sandbox-id"
TOKEN_HEADER = "x-access-token"


def requested_user(request: Request) -> str | None:
    """The user the SDK asks to act as (`user=`): Basic auth `user:` on RPCs, `?username=` on /files."""
    scheme, _, value = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "basic":
        try:
            return base64.b64decode(value, validate=True).decode().partition(":")[0]
        except ValueError:
            return ""
    return request.query_params.get("username")


def acting_user(request: Request, default: str) -> str:
    """The guest account the call runs as: the one it names, else the sandbox's default (E2B's `user`).
    ValueError for a name no account can have; one the guest lacks fails there, in envd's words."""
    user = requested_user(request) or default
    try:
        return user_name(user) or default
    except ProtocolError:
        raise ValueError(f"user {user!r:.40} is not an account name") from None


def build(services: Callable[[], Services], sandbox_id: Callable[[Request], str | None]) -> Starlette:
    """The envd app; `sandbox_id` says which sandbox a request is for (set by the router)."""

    async def authorized(request: Request) -> tuple[Sandbox, dict[str, str]]:
        svc = services()
        sid = sandbox_id(request) or ""
        return await svc.sandboxes.authorize(sid, request.headers.get(TOKEN_HEADER))

    async def rpc(request: Request) -> Response:
        service, method = request.path_params["service"], request.path_params["method"]
        streaming = method in envd_process.STREAMS or method in envd_fs.STREAMS
        try:
            sandbox, envs = await authorized(request)
        except SandboxNotFound as exc:
            error = RpcError("unavailable", str(exc))
            return stream_error(error) if streaming else Response(
                unary_error(error).body, status_code=502, media_type="application/json")
        svc = services()
        try:
            user = acting_user(request, svc.sandboxes.default_user)
        except ValueError as exc:
            error = RpcError("invalid_argument", str(exc))
            return stream_error(error) if streaming else unary_error(error)
        if service == "process.Process":
            return await envd_process.handle(method, request, svc.sandboxes, svc.sandbox_procs, sandbox, envs, user)
        if service == "filesystem.Filesystem":
            return await envd_fs.handle(method, request, svc.sandboxes, sandbox, user)
        error = RpcError("unimplemented", f"no service {service}")
        return stream_error(error) if streaming else unary_error(error)

    async def files(request: Request) -> Response:
        try:
            sandbox, _ = await authorized(request)
        except SandboxNotFound as exc:
            return envd_files.error(502, str(exc))
        try:
            user = acting_user(request, services().sandboxes.default_user)
        except ValueError as exc:
            return envd_files.error(400, str(exc))
        if request.method == "GET":
            return await envd_files.download(request, services().sandboxes, sandbox, user)
        return await envd_files.upload(request, services().sandboxes, sandbox, user)

    async def health(request: Request) -> Response:
        try:
            await authorized(request)
        except SandboxNotFound as exc:
            return envd_files.error(502, str(exc))
        return Response(status_code=204)

    async def unknown(request: Request) -> Response:
        return envd_files.error(404, f"no envd route {request.method} {request.url.path}")

    return Starlette(routes=[
        Route("/{service}/{method}", rpc, methods=["POST"]),
        Route("/files", files, methods=["GET", "POST"]),
        Route("/health", health, methods=["GET"]),
        Route("/{rest:path}", unknown, methods=["GET", "POST", "PUT", "DELETE", "PATCH"]),
    ])
