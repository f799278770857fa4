"""envd's plain HTTP file endpoints: `GET /files?path=` (the raw bytes) and `POST /files` (multipart/form-data
with field `file` and the path as its filename, or application/octet-stream, optionally gzip), answered
`[{"name", "type": "file", "path"}]`. Errors are `{"code": status, "message": …}`, which the SDK reads."""

from __future__ import annotations

import asyncio
import email.parser
import email.policy
import gzip
import posixpath
import zlib

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from polydev.api.e2b.envd_process import resolve
from polydev.core.sandboxes import Sandboxes
from polydev.store.models import Sandbox
from polydev.vm.agent_client import AgentError

# Uploads are held in memory on their way to the agent; larger ones answer 413.
MAX_UPLOAD = 256 * 1024 * 1024


def error(status: int, message: str) -> Response:
    return JSONResponse({"code": status, "message": message}, status_code=status)


def _agent_error(exc: AgentError) -> Response:
    if exc.status in (400, 403, 404, 409, 413, 422):
        return error(exc.status if exc.status not in (409, 422) else 400, exc.reason)
    return error(502, f"the sandbox's agent answered {exc.status}")


def _query_path(request: Request, user: str) -> str | None:
    path = request.query_params.get("path")
    if path is None:
        return None
    if not path or "\0" in path:
        raise ValueError("path must be non-empty, without NUL")
    return resolve(path, user)


async def download(request: Request, sandboxes: Sandboxes, sandbox: Sandbox, user: str) -> Response:
    """The file's bytes, a relative path being in `user`'s home."""
    try:
        path = _query_path(request, user)
    except ValueError as exc:
        return error(400, str(exc))
    if path is None:
        return error(400, "the path query parameter is required")

    def run() -> bytes:
        with sandboxes.agent(sandbox) as agent:
            return agent.get_file(path)[0]
    try:
        data = await asyncio.to_thread(run)
    except AgentError as exc:
        return _agent_error(exc)
    return Response(data, media_type="application/octet-stream")


async def _body(request: Request) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > MAX_UPLOAD:
        raise OverflowError
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_UPLOAD:
            raise OverflowError
    return bytes(body)


def _multipart(content_type: str, body: bytes) -> list[tuple[str, bytes]]:
    """(filename, bytes) of each `file` part. The stdlib's MIME parser: no multipart dependency for a form
    the SDK fills one way."""
    head = f"Content-Type: {content_type}\r\nMIME-Version: 1.0\r\n\r\n".encode("latin-1")
    message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(head + body)
    if not message.is_multipart():
        raise ValueError("the multipart body could not be parsed")
    files = []
    for part in message.iter_parts():  # type: ignore[attr-defined]
        if part.get_param("name", header="content-disposition") != "file":
            continue
        files.append((part.get_filename() or "", part.get_payload(decode=True) or b""))
    return files


async def upload(request: Request, sandboxes: Sandboxes, sandbox: Sandbox, user: str) -> Response:
    """Write the files as the agent (root) and give them, with the directories made for them, to `user`."""
    try:
        path = _query_path(request, user)
        body = await _body(request)
        content_type = request.headers.get("content-type", "")
        if content_type.startswith("multipart/form-data"):
            files = _multipart(content_type, body)
            if not files:
                return error(400, "the form has no `file` field")
            if path is not None and len(files) == 1:
                files = [(path, files[0][1])]
            targets = [(resolve(name, user), data) for name, data in files]
        else:
            if path is None:
                return error(400, "the path query parameter is required")
            if request.headers.get("content-encoding", "").lower() == "gzip":
                body = gzip.decompress(body)
            targets = [(path, body)]
    except OverflowError:
        return error(413, f"uploads are limited to {MAX_UPLOAD} bytes")
    except (ValueError, OSError, EOFError, zlib.error) as exc:
        return error(400, f"bad upload: {exc}")
    if any(not name.startswith("/") or "\0" in name for name, _ in targets):
        return error(400, "each file needs a path")

    def run() -> None:
        with sandboxes.agent(sandbox) as agent:
            for name, data in targets:
                agent.put_file(name, data, owner=user)
    try:
        await asyncio.to_thread(run)
    except AgentError as exc:
        return _agent_error(exc)
    return JSONResponse([{"name": posixpath.basename(name), "type": "file", "path": name} for name, _ in targets])
