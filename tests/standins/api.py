"""Provider API stand-in: enough of three streaming APIs for the real CLIs to finish a one-shot prompt.

- Anthropic Messages (``POST /v1/messages``, SSE) — Claude Code with ``ANTHROPIC_BASE_URL``.
- OpenAI Responses (``POST /v1/responses``, SSE) — Codex with a custom ``model_provider``.
- Gemini ``models/M:streamGenerateContent?alt=sse`` / ``generateContent`` / ``countTokens`` — Gemini CLI with
  ``GOOGLE_GEMINI_BASE_URL`` (API-key mode), and the Code Assist ``/v1internal:*`` methods (OAuth mode, with
  ``CODE_ASSIST_ENDPOINT``), whose answers are the same wrapped in ``{"response": ...}``.

Each test scripts the answers with a :class:`Script` (the text, an optional tool call the model asks for on the
first turn, tokens to refuse with a 401) and reads what the CLI sent from :attr:`StandinState.requests`.

Usage::

    state = StandinState(Script(text="hi", tool=ToolCall("Bash", {"command": "cat x"})))
    app = create_app(state)           # any ASGI server; see tests.standins.server.StandinServer
"""

from __future__ import annotations

import base64
import json
import threading
import uuid
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

ANTHROPIC = "anthropic"
OPENAI = "openai"
GEMINI = "gemini"
CODE_ASSIST = "code_assist"


@dataclass
class ToolCall:
    """A tool the model asks the CLI to run on the first turn.

    ``name`` may list several names: the first one the request offers is used (tool names differ between CLI
    versions and model families, e.g. Codex's ``shell_command`` / ``shell`` / ``exec_command``). ``arguments``
    is a dict, or a function of the chosen name that returns one.
    """

    name: str | tuple[str, ...]
    arguments: dict[str, Any] | Callable[[str], dict[str, Any]]

    def names(self) -> tuple[str, ...]:
        return (self.name,) if isinstance(self.name, str) else tuple(self.name)

    def args_for(self, name: str) -> dict[str, Any]:
        return self.arguments(name) if callable(self.arguments) else dict(self.arguments)


@dataclass
class Script:
    """What the stand-in model answers.

    - ``text``: the answer when no tool is asked for, and (unless ``final_text`` is set) after the tool result.
    - ``tool``: asked for on a turn whose request offers that tool and carries no tool result yet.
    - ``final_text``: the answer once a tool result came back; ``{tool_output}`` is replaced by that result.
    - ``reject_tokens``: a request whose credential (API key or bearer token) is one of these gets a 401,
      which makes an OAuth-mode CLI refresh its token and retry.
    - ``reject_all``: every model request gets a 401 (to test a CLI's failure path).
    """

    text: str = "Hello from the Polydev stand-in."
    tool: ToolCall | None = None
    final_text: str | None = None
    reject_tokens: set[str] = field(default_factory=set)
    reject_all: bool = False


@dataclass
class RecordedRequest:
    dialect: str
    method: str
    path: str
    query: str
    headers: dict[str, str]
    body: Any
    credential: str | None
    status: int = 200
    #: what this answer was: "text", "tool_call", "final", "error", "aux"
    answered: str = ""

    @property
    def is_model_turn(self) -> bool:
        return self.answered in ("text", "tool_call", "final")


class StandinState:
    """The script plus everything received; safe to read from the test thread while the server runs."""

    def __init__(self, script: Script | None = None) -> None:
        self.script = script or Script()
        self._lock = threading.Lock()
        self._requests: list[RecordedRequest] = []
        self.tool_outputs: list[str] = []

    def record(self, rec: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(rec)

    @property
    def requests(self) -> list[RecordedRequest]:
        with self._lock:
            return list(self._requests)

    def model_turns(self, dialect: str | None = None) -> list[RecordedRequest]:
        return [r for r in self.requests if r.is_model_turn and (dialect is None or r.dialect == dialect)]

    def credentials_seen(self) -> list[str | None]:
        return [r.credential for r in self.requests if r.answered in ("text", "tool_call", "final", "error")]


# ---------------------------------------------------------------- helpers


def token_label(cred: str | None) -> str | None:
    """A JWT minted by the OAuth stand-in (Codex access tokens) stands for its ``standin_token`` claim."""
    if cred and cred.count(".") == 2:
        payload = cred.split(".")[1]
        try:
            claims = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        except ValueError:
            return cred
        if isinstance(claims, dict) and isinstance(claims.get("standin_token"), str):
            return claims["standin_token"]
    return cred


def credential_of(request: Request) -> str | None:
    """The request's API key or bearer token (a stand-in JWT as its token name, e.g. ``codex-access-2``)."""
    return token_label(_raw_credential(request))


def _raw_credential(request: Request) -> str | None:
    h = request.headers
    if h.get("x-api-key"):
        return h["x-api-key"]
    if h.get("x-goog-api-key"):
        return h["x-goog-api-key"]
    auth = h.get("authorization", "")
    if auth.lower().startswith("bearer "):
        return auth[7:].strip()
    return request.query_params.get("key")


def _sse(event: str | None, data: dict[str, Any]) -> bytes:
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _stream(chunks: Iterable[bytes]) -> AsyncIterator[bytes]:
    for c in chunks:
        yield c


def _sse_response(chunks: list[bytes]) -> StreamingResponse:
    return StreamingResponse(_stream(chunks), media_type="text/event-stream",
                             headers={"cache-control": "no-cache"})


def _text_of(value: Any) -> str:
    """Flatten a tool result (string, list of content blocks, dict) into text."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        return "\n".join(_text_of(v) for v in value)
    if isinstance(value, dict):
        for key in ("text", "output", "content", "result", "stdout", "llmContent"):
            if key in value:
                return _text_of(value[key])
        return json.dumps(value)
    return str(value)


def _final(script: Script, tool_output: str) -> str:
    if script.final_text is None:
        return script.text
    return script.final_text.replace("{tool_output}", tool_output.strip())


def _pick_tool(script: Script, offered: list[str]) -> str | None:
    if script.tool is None:
        return None
    for name in script.tool.names():
        if name in offered:
            return name
    return None


async def _body(request: Request) -> Any:
    raw = await request.body()
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


# ---------------------------------------------------------------- Anthropic Messages


def _anthropic_error(status: int, kind: str, message: str) -> JSONResponse:
    return JSONResponse({"type": "error", "error": {"type": kind, "message": message}}, status_code=status)


def _anthropic_stream(model: str, blocks: list[dict[str, Any]], stop_reason: str) -> list[bytes]:
    msg_id = "msg_standin_" + uuid.uuid4().hex[:12]
    usage = {"input_tokens": 12, "output_tokens": 0, "cache_creation_input_tokens": 0, "cache_read_input_tokens": 0}
    out = [_sse("message_start", {"type": "message_start", "message": {
        "id": msg_id, "type": "message", "role": "assistant", "model": model, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": usage}})]
    for i, block in enumerate(blocks):
        if block["type"] == "text":
            out.append(_sse("content_block_start", {"type": "content_block_start", "index": i,
                                                    "content_block": {"type": "text", "text": ""}}))
            out.append(_sse("content_block_delta", {"type": "content_block_delta", "index": i,
                                                    "delta": {"type": "text_delta", "text": block["text"]}}))
        else:
            out.append(_sse("content_block_start", {"type": "content_block_start", "index": i, "content_block": {
                "type": "tool_use", "id": block["id"], "name": block["name"], "input": {}}}))
            out.append(_sse("content_block_delta", {"type": "content_block_delta", "index": i, "delta": {
                "type": "input_json_delta", "partial_json": json.dumps(block["input"])}}))
        out.append(_sse("content_block_stop", {"type": "content_block_stop", "index": i}))
    out.append(_sse("message_delta", {"type": "message_delta",
                                      "delta": {"stop_reason": stop_reason, "stop_sequence": None},
                                      "usage": {"output_tokens": 7}}))
    out.append(_sse("message_stop", {"type": "message_stop"}))
    return out


def _anthropic_tool_results(messages: list[Any]) -> list[str] | None:
    """Tool results in the last user message, or None when it carries none."""
    if not messages:
        return None
    last = messages[-1]
    content = last.get("content") if isinstance(last, dict) else None
    if not isinstance(content, list):
        return None
    results = [_text_of(b.get("content")) for b in content if isinstance(b, dict) and b.get("type") == "tool_result"]
    return results or None


async def anthropic_messages(request: Request) -> Response:
    state: StandinState = request.app.state.standin
    script = state.script
    body = await _body(request) or {}
    cred = credential_of(request)
    rec = RecordedRequest(ANTHROPIC, request.method, request.url.path, request.url.query,
                          dict(request.headers), body, cred)
    if _refused(script, cred):
        return _reject(state, rec, _anthropic_error(401, "authentication_error", "OAuth token has expired."))
    model = body.get("model", "claude-standin")
    results = _anthropic_tool_results(body.get("messages") or [])
    offered = [t.get("name") for t in body.get("tools") or [] if isinstance(t, dict)]
    tool = _pick_tool(script, offered) if results is None else None
    if results is not None:
        state.tool_outputs.extend(results)
        blocks, stop, rec.answered = [{"type": "text", "text": _final(script, "\n".join(results))}], "end_turn", "final"
    elif tool is not None:
        assert script.tool is not None
        blocks = [{"type": "tool_use", "id": "toolu_standin_" + uuid.uuid4().hex[:12], "name": tool,
                   "input": script.tool.args_for(tool)}]
        stop, rec.answered = "tool_use", "tool_call"
    else:
        blocks, stop, rec.answered = [{"type": "text", "text": script.text}], "end_turn", "text"
    state.record(rec)
    if body.get("stream") is False:
        content = [{"type": "text", "text": b["text"]} if b["type"] == "text" else
                   {"type": "tool_use", "id": b["id"], "name": b["name"], "input": b["input"]} for b in blocks]
        return JSONResponse({"id": "msg_standin", "type": "message", "role": "assistant", "model": model,
                             "content": content, "stop_reason": stop, "stop_sequence": None,
                             "usage": {"input_tokens": 12, "output_tokens": 7}})
    return _sse_response(_anthropic_stream(model, blocks, stop))


async def anthropic_count_tokens(request: Request) -> Response:
    state: StandinState = request.app.state.standin
    state.record(RecordedRequest(ANTHROPIC, request.method, request.url.path, request.url.query,
                                 dict(request.headers), await _body(request), credential_of(request),
                                 answered="aux"))
    return JSONResponse({"input_tokens": 12})


# ---------------------------------------------------------------- OpenAI Responses


def _openai_tool_names(tools: list[Any]) -> list[str]:
    names = []
    for t in tools:
        if isinstance(t, dict):
            names.append(t.get("name") or (t.get("function") or {}).get("name") or t.get("type"))
    return [n for n in names if n]


def _openai_tool_results(items: list[Any]) -> list[str] | None:
    """Function-call outputs after the last user message, or None."""
    results: list[str] = []
    for item in reversed(items):
        if not isinstance(item, dict):
            continue
        if item.get("type") in ("function_call_output", "custom_tool_call_output", "local_shell_call_output"):
            results.append(_text_of(item.get("output")))
        elif item.get("type") == "message" and item.get("role") == "user":
            break
    return list(reversed(results)) or None


async def openai_responses(request: Request) -> Response:
    state: StandinState = request.app.state.standin
    script = state.script
    body = await _body(request) or {}
    cred = credential_of(request)
    rec = RecordedRequest(OPENAI, request.method, request.url.path, request.url.query,
                          dict(request.headers), body, cred)
    if _refused(script, cred):
        return _reject(state, rec, JSONResponse({"error": {"message": "Your authentication token has expired.",
                                                           "type": "invalid_request_error",
                                                           "code": "token_expired"}}, status_code=401))
    items = body.get("input") if isinstance(body.get("input"), list) else []
    results = _openai_tool_results(items)
    tool = _pick_tool(script, _openai_tool_names(body.get("tools") or [])) if results is None else None
    resp_id = "resp_standin_" + uuid.uuid4().hex[:12]
    out = [_sse("response.created", {"type": "response.created", "response": {"id": resp_id}})]
    if tool is not None:
        assert script.tool is not None
        rec.answered = "tool_call"
        item = {"type": "function_call", "id": "fc_" + uuid.uuid4().hex[:12], "name": tool,
                "arguments": json.dumps(script.tool.args_for(tool)), "call_id": "call_" + uuid.uuid4().hex[:12]}
        out.append(_sse("response.output_item.done", {"type": "response.output_item.done", "output_index": 0,
                                                      "item": item}))
    else:
        if results is not None:
            state.tool_outputs.extend(results)
            text, rec.answered = _final(script, "\n".join(results)), "final"
        else:
            text, rec.answered = script.text, "text"
        msg_id = "msg_" + uuid.uuid4().hex[:12]
        added = {"type": "message", "role": "assistant", "id": msg_id, "content": []}
        out.append(_sse("response.output_item.added", {"type": "response.output_item.added", "output_index": 0,
                                                       "item": added}))
        out.append(_sse("response.output_text.delta", {"type": "response.output_text.delta", "item_id": msg_id,
                                                       "output_index": 0, "content_index": 0, "delta": text}))
        item = {"type": "message", "role": "assistant", "id": msg_id,
                "content": [{"type": "output_text", "text": text, "annotations": []}]}
        out.append(_sse("response.output_item.done", {"type": "response.output_item.done", "output_index": 0,
                                                      "item": item}))
    out.append(_sse("response.completed", {"type": "response.completed", "response": {
        "id": resp_id, "usage": {"input_tokens": 12, "input_tokens_details": {"cached_tokens": 0},
                                 "output_tokens": 7, "output_tokens_details": {"reasoning_tokens": 0},
                                 "total_tokens": 19}}}))
    state.record(rec)
    return _sse_response(out)


async def openai_models(request: Request) -> Response:
    state: StandinState = request.app.state.standin
    state.record(RecordedRequest(OPENAI, request.method, request.url.path, request.url.query,
                                 dict(request.headers), None, credential_of(request), answered="aux"))
    return JSONResponse({"object": "list", "data": [], "models": []})


# ---------------------------------------------------------------- Gemini (API key) and Code Assist (OAuth)


def _gemini_tool_names(tools: list[Any]) -> list[str]:
    names = []
    for t in tools:
        if isinstance(t, dict):
            for decl in t.get("functionDeclarations") or t.get("function_declarations") or []:
                if isinstance(decl, dict) and decl.get("name"):
                    names.append(decl["name"])
    return names


def _gemini_tool_results(contents: list[Any]) -> list[str] | None:
    if not contents:
        return None
    last = contents[-1]
    parts = last.get("parts") if isinstance(last, dict) else None
    if not isinstance(parts, list):
        return None
    results = [_text_of((p.get("functionResponse") or {}).get("response")) for p in parts
               if isinstance(p, dict) and "functionResponse" in p]
    return results or None


_USAGE = {"promptTokenCount": 12, "candidatesTokenCount": 7, "totalTokenCount": 19}


def _gemini_chunk(parts: list[dict[str, Any]], model: str) -> dict[str, Any]:
    return {"candidates": [{"content": {"role": "model", "parts": parts}, "finishReason": "STOP", "index": 0}],
            "usageMetadata": _USAGE, "modelVersion": model}


def _gemini_answer(state: StandinState, rec: RecordedRequest, body: dict[str, Any], model: str) -> dict[str, Any]:
    script = state.script
    results = _gemini_tool_results(body.get("contents") or [])
    tool = _pick_tool(script, _gemini_tool_names(body.get("tools") or [])) if results is None else None
    if results is not None:
        state.tool_outputs.extend(results)
        rec.answered = "final"
        return _gemini_chunk([{"text": _final(script, "\n".join(results))}], model)
    if tool is not None:
        assert script.tool is not None
        rec.answered = "tool_call"
        return _gemini_chunk([{"functionCall": {"name": tool, "args": script.tool.args_for(tool)}}], model)
    rec.answered = "text"
    return _gemini_chunk([{"text": script.text}], model)


# The JSON-mode side calls (model router, next-speaker check, ...) get one object that satisfies them all.
_SIDE_JSON = {"reasoning": "Polydev stand-in.", "next_speaker": "user", "model_choice": "flash",
              "complexity_reasoning": "simple", "complexity_score": 1}


def _is_json_mode(body: dict[str, Any]) -> bool:
    cfg = body.get("generationConfig") or body.get("generation_config") or {}
    return cfg.get("responseMimeType") == "application/json" or "responseJsonSchema" in cfg \
        or "responseSchema" in cfg


def _aux(state: StandinState, rec: RecordedRequest, payload: Any) -> JSONResponse:
    """Record a side call (not a model turn) and answer it with ``payload``."""
    rec.answered = "aux"
    state.record(rec)
    return JSONResponse(payload)


def _reject(state: StandinState, rec: RecordedRequest, response: JSONResponse) -> JSONResponse:
    rec.status, rec.answered = response.status_code, "error"
    state.record(rec)
    return response


def _refused(script: Script, cred: str | None) -> bool:
    return script.reject_all or (cred is not None and cred in script.reject_tokens)


def _gemini_unauthorized() -> JSONResponse:
    return JSONResponse({"error": {"code": 401, "message": "Request had invalid authentication credentials.",
                                   "status": "UNAUTHENTICATED"}}, status_code=401)


async def gemini_model_call(request: Request) -> Response:
    """``/v1beta/models/{model}:{method}`` (API-key mode)."""
    state: StandinState = request.app.state.standin
    target = request.path_params["target"]
    model, _, method = target.partition(":")
    body = await _body(request) or {}
    cred = credential_of(request)
    rec = RecordedRequest(GEMINI, request.method, request.url.path, request.url.query,
                          dict(request.headers), body, cred)
    script = state.script
    if method in ("streamGenerateContent", "generateContent") and _refused(script, cred):
        return _reject(state, rec, _gemini_unauthorized())
    if method == "countTokens":
        return _aux(state, rec, {"totalTokens": 12})
    if method == "embedContent":
        return _aux(state, rec, {"embedding": {"values": [0.0] * 8}})
    if method == "generateContent" and _is_json_mode(body):
        return _aux(state, rec, _gemini_chunk([{"text": json.dumps(_SIDE_JSON)}], model))
    answer = _gemini_answer(state, rec, body, model)
    state.record(rec)
    if method == "streamGenerateContent":
        return _sse_response([_sse(None, answer)])
    return JSONResponse(answer)


async def code_assist_call(request: Request) -> Response:
    """``/v1internal:{method}`` (Gemini CLI OAuth mode, ``CODE_ASSIST_ENDPOINT``)."""
    state: StandinState = request.app.state.standin
    method = request.path_params["method"]
    body = await _body(request) or {}
    cred = credential_of(request)
    rec = RecordedRequest(CODE_ASSIST, request.method, request.url.path, request.url.query,
                          dict(request.headers), body, cred)
    script = state.script
    if _refused(script, cred):
        return _reject(state, rec, _gemini_unauthorized())
    inner = body.get("request") if isinstance(body, dict) and isinstance(body.get("request"), dict) else {}
    model = body.get("model", "gemini-standin") if isinstance(body, dict) else "gemini-standin"
    if method == "loadCodeAssist":
        return _aux(state, rec, {"currentTier": {"id": "standard-tier", "name": "Stand-in",
                                                 "userDefinedCloudaicompanionProject": False},
                             "allowedTiers": [{"id": "standard-tier", "name": "Stand-in", "isDefault": True}],
                             "cloudaicompanionProject": "polydev-standin"})
    if method == "onboardUser":
        return _aux(state, rec, {"name": "operations/standin", "done": True,
                             "response": {"cloudaicompanionProject": {"id": "polydev-standin",
                                                                      "name": "polydev-standin"}}})
    if method == "countTokens":
        return _aux(state, rec, {"totalTokens": 12})
    if method == "generateContent" and _is_json_mode(inner):
        return _aux(state, rec, {"response": _gemini_chunk([{"text": json.dumps(_SIDE_JSON)}], model)})
    if method in ("streamGenerateContent", "generateContent"):
        answer = _gemini_answer(state, rec, inner, model)
        state.record(rec)
        wrapped = {"response": answer, "traceId": "standin"}
        if method == "streamGenerateContent":
            return _sse_response([_sse(None, wrapped)])
        return JSONResponse(wrapped)
    if method == "retrieveUserQuota":
        return _aux(state, rec, {"buckets": []})
    return _aux(state, rec, {})


async def fallback(request: Request) -> Response:
    state: StandinState = request.app.state.standin
    state.record(RecordedRequest("other", request.method, request.url.path, request.url.query,
                                 dict(request.headers), await _body(request), credential_of(request),
                                 status=404, answered="aux"))
    return JSONResponse({"error": {"message": f"stand-in has no {request.method} {request.url.path}"}},
                        status_code=404)


def routes() -> list[Route]:
    return [
        Route("/v1/messages", anthropic_messages, methods=["POST"]),
        Route("/v1/messages/count_tokens", anthropic_count_tokens, methods=["POST"]),
        Route("/v1/responses", openai_responses, methods=["POST"]),
        Route("/v1/models", openai_models, methods=["GET"]),
        Route("/v1beta/models/{target:path}", gemini_model_call, methods=["POST"]),
        Route("/v1/models/{target:path}", gemini_model_call, methods=["POST"]),
        Route("/v1internal:{method}", code_assist_call, methods=["POST", "GET"]),
        Route("/{rest:path}", fallback, methods=["GET", "POST", "PUT", "PATCH", "DELETE"]),
    ]


def create_app(state: StandinState | Script | None = None) -> Starlette:
    """The API stand-in as an ASGI app; ``app.state.standin`` is the :class:`StandinState`."""
    if not isinstance(state, StandinState):
        state = StandinState(state)
    app = Starlette(routes=routes())
    app.state.standin = state
    return app
