"""The Connect protocol with JSON encoding, as the e2b SDK speaks it to envd (connectrpc 0.12).

Unary calls: POST `/{service}/{Method}` with a JSON body, answered 200 with JSON, or an error status with
`{"code": "not_found", "message": …}`. Server streams: the request and the answer are
`application/connect+json` envelopes (a flag byte, a big-endian 32-bit length, the JSON); the last envelope
has flag 0x02 and carries `{}` or `{"error": {…}}`. Errors in a stream always go in that last envelope with
HTTP 200, as the protocol wants.
"""

from __future__ import annotations

import json
import struct
from collections.abc import AsyncIterator
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse

STREAM_TYPE = "application/connect+json"
END_STREAM = 0x02
COMPRESSED = 0x01
MAX_MESSAGE = 16 * 1024 * 1024

# Connect code → HTTP status for unary errors (the Connect protocol's table).
HTTP_STATUS = {"canceled": 499, "unknown": 500, "invalid_argument": 400, "deadline_exceeded": 504,
               "not_found": 404, "already_exists": 409, "permission_denied": 403, "resource_exhausted": 429,
               "failed_precondition": 400, "aborted": 409, "out_of_range": 400, "unimplemented": 501,
               "internal": 500, "unavailable": 503, "data_loss": 500, "unauthenticated": 401}


class RpcError(Exception):
    """An error answered in Connect's shape; `code` is one of HTTP_STATUS's keys."""

    def __init__(self, code: str, message: str) -> None:
        assert code in HTTP_STATUS
        super().__init__(message)
        self.code = code
        self.message = message

    def body(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def frame(message: dict[str, Any], flags: int = 0) -> bytes:
    data = json.dumps(message, separators=(",", ":")).encode()
    return struct.pack(">BI", flags, len(data)) + data


def end_frame(error: RpcError | None = None) -> bytes:
    return frame({"error": error.body()} if error is not None else {}, END_STREAM)


def parse_envelope(body: bytes) -> dict[str, Any]:
    """The one request message of a server-streaming call."""
    if len(body) < 5:
        raise RpcError("invalid_argument", "the request is not a Connect envelope")
    flags, length = struct.unpack(">BI", body[:5])
    if flags & COMPRESSED:
        raise RpcError("unimplemented", "compressed messages are not supported")
    if length != len(body) - 5:
        raise RpcError("invalid_argument", "the envelope's length does not match the body")
    return _json_object(body[5:])


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = json.loads(raw or b"{}")
    except (ValueError, UnicodeDecodeError):
        raise RpcError("invalid_argument", "the message is not JSON") from None
    if not isinstance(value, dict):
        raise RpcError("invalid_argument", "the message must be a JSON object")
    return value


async def read_message(request: Request, streaming: bool) -> dict[str, Any]:
    if request.headers.get("content-encoding", "identity") not in ("identity", ""):
        raise RpcError("unimplemented", "compressed requests are not supported")
    body = await request.body()
    if len(body) > MAX_MESSAGE:
        raise RpcError("resource_exhausted", "the message is too large")
    return parse_envelope(body) if streaming else _json_object(body)


def unary_error(error: RpcError) -> Response:
    return JSONResponse(error.body(), status_code=HTTP_STATUS[error.code])


def unary_answer(message: dict[str, Any]) -> Response:
    return JSONResponse(message)


def stream_answer(messages: AsyncIterator[dict[str, Any]]) -> Response:
    """Each message as an envelope as it comes, then the end envelope (with the error that stopped it)."""

    async def body() -> AsyncIterator[bytes]:
        try:
            async for message in messages:
                yield frame(message)
        except RpcError as exc:
            yield end_frame(exc)
            return
        yield end_frame()

    return StreamingResponse(body(), media_type=STREAM_TYPE, headers={"Cache-Control": "no-store"})


def stream_error(error: RpcError) -> Response:
    return Response(end_frame(error), media_type=STREAM_TYPE)


def field(message: dict[str, Any], *path: str, kind: type | tuple[type, ...] = str, default: Any = None) -> Any:
    """message[path…], type-checked: protobuf JSON lets a field be absent (its default) but not mistyped."""
    value: Any = message
    for i, name in enumerate(path):
        if not isinstance(value, dict):
            raise RpcError("invalid_argument", f"{'.'.join(path[:i])} must be an object")
        value = value.get(name)
        if value is None:
            return default
    if isinstance(value, bool) and kind is not bool or not isinstance(value, kind):
        raise RpcError("invalid_argument", f"{'.'.join(path)} has the wrong type")
    return value
