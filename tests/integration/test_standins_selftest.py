"""The stand-ins themselves, without any CLI: the API dialects, the script, the token endpoints and the proxy."""

from __future__ import annotations

import json
import ssl
import subprocess
from pathlib import Path

import httpx
import pytest

from tests.standins import api
from tests.standins.harness import Standins

# The plugin gives the fixtures and marks every test here `standins`.
pytest_plugins = ["tests.standins.fixtures"]


def _client(state: api.StandinState) -> httpx.AsyncClient:
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=api.create_app(state)), base_url="http://standin")


def _sse_data(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]


async def test_anthropic_tool_call_then_final_text_with_the_tool_output() -> None:
    state = api.StandinState(api.Script(tool=api.ToolCall("Bash", {"command": "ls"}), final_text="saw {tool_output}"))
    tools = [{"name": "Bash", "input_schema": {}}]
    async with _client(state) as c:
        first = await c.post("/v1/messages?beta=true", headers={"x-api-key": "k1"}, json={
            "model": "m", "stream": True, "tools": tools, "messages": [{"role": "user", "content": "hi"}]})
        events = _sse_data(first.text)
        assert events[0]["type"] == "message_start" and events[-1]["type"] == "message_stop"
        block = events[1]["content_block"]
        assert block["type"] == "tool_use" and block["name"] == "Bash"
        assert json.loads(events[2]["delta"]["partial_json"]) == {"command": "ls"}
        assert events[-2]["delta"]["stop_reason"] == "tool_use"
        second = await c.post("/v1/messages", headers={"x-api-key": "k1"}, json={
            "model": "m", "stream": True, "tools": tools, "messages": [
                {"role": "user", "content": "hi"},
                {"role": "assistant", "content": [{"type": "tool_use", "id": block["id"], "name": "Bash", "input": {}}]},
                {"role": "user", "content": [{"type": "tool_result", "tool_use_id": block["id"], "content": "a.txt"}]}]})
        texts = [e["delta"]["text"] for e in _sse_data(second.text) if e["type"] == "content_block_delta"]
        assert texts == ["saw a.txt"]
    assert [r.answered for r in state.requests] == ["tool_call", "final"]
    assert state.tool_outputs == ["a.txt"] and state.credentials_seen() == ["k1", "k1"]


async def test_tool_is_only_asked_for_when_the_request_offers_it() -> None:
    state = api.StandinState(api.Script(text="plain", tool=api.ToolCall("Bash", {"command": "ls"})))
    async with _client(state) as c:
        r = await c.post("/v1/messages", json={"model": "m", "stream": True, "messages": [
            {"role": "user", "content": "title this"}]})
    assert [e["delta"]["text"] for e in _sse_data(r.text) if e["type"] == "content_block_delta"] == ["plain"]


async def test_rejected_tokens_get_401_in_each_dialect() -> None:
    state = api.StandinState(api.Script(reject_tokens={"old"}))
    async with _client(state) as c:
        a = await c.post("/v1/messages", headers={"authorization": "Bearer old"}, json={"messages": []})
        o = await c.post("/v1/responses", headers={"authorization": "Bearer old"}, json={"input": []})
        g = await c.post("/v1beta/models/g:streamGenerateContent?alt=sse", headers={"x-goog-api-key": "old"},
                         json={"contents": []})
        ca = await c.post("/v1internal:streamGenerateContent?alt=sse", headers={"authorization": "Bearer old"},
                          json={"request": {"contents": []}})
        ok = await c.post("/v1/messages", headers={"authorization": "Bearer new"}, json={"messages": []})
    assert [a.status_code, o.status_code, g.status_code, ca.status_code, ok.status_code] == [401, 401, 401, 401, 200]
    assert a.json()["error"]["type"] == "authentication_error"


async def test_openai_function_call_and_output() -> None:
    state = api.StandinState(api.Script(tool=api.ToolCall(("exec_command", "shell"), {"cmd": "ls"}),
                                        final_text="got {tool_output}"))
    tools = [{"type": "function", "name": "exec_command"}]
    async with _client(state) as c:
        first = await c.post("/v1/responses", json={"tools": tools, "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}]})
        done = [e for e in _sse_data(first.text) if e["type"] == "response.output_item.done"]
        call = done[0]["item"]
        assert call["type"] == "function_call" and call["name"] == "exec_command"
        assert json.loads(call["arguments"]) == {"cmd": "ls"}
        second = await c.post("/v1/responses", json={"tools": tools, "input": [
            {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "hi"}]}, call,
            {"type": "function_call_output", "call_id": call["call_id"], "output": "x.txt"}]})
    events = _sse_data(second.text)
    assert events[-1]["type"] == "response.completed"
    message = next(e["item"] for e in events if e["type"] == "response.output_item.done")
    assert message["content"][0]["text"] == "got x.txt"


async def test_gemini_function_call_and_code_assist_wrapping() -> None:
    state = api.StandinState(api.Script(tool=api.ToolCall("run_shell_command", {"command": "ls"})))
    tools = [{"functionDeclarations": [{"name": "run_shell_command"}]}]
    async with _client(state) as c:
        g = await c.post("/v1beta/models/gm:streamGenerateContent?alt=sse", json={
            "tools": tools, "contents": [{"role": "user", "parts": [{"text": "hi"}]}]})
        part = _sse_data(g.text)[0]["candidates"][0]["content"]["parts"][0]
        assert part == {"functionCall": {"name": "run_shell_command", "args": {"command": "ls"}}}
        ca = await c.post("/v1internal:streamGenerateContent?alt=sse", json={"model": "gm", "request": {
            "tools": tools, "contents": [{"role": "user", "parts": [{"text": "hi"}]},
                                         {"role": "user", "parts": [{"functionResponse": {
                                             "name": "run_shell_command", "response": {"output": "y.txt"}}}]}]}})
        wrapped = _sse_data(ca.text)[0]
        assert wrapped["response"]["candidates"][0]["content"]["parts"][0]["text"] == state.script.text
        load = await c.post("/v1internal:loadCodeAssist", json={})
        assert load.json()["cloudaicompanionProject"]
    assert state.tool_outputs == ["y.txt"]


def test_namespace_has_only_loopback_and_no_route(standins: Standins) -> None:
    links = subprocess.run(["ip", "-n", standins.netns.name, "-o", "link"], capture_output=True, text=True,
                           check=True).stdout
    assert [line.split(":")[1].strip() for line in links.splitlines()] == ["lo"]
    routes = subprocess.run(["ip", "-n", standins.netns.name, "route", "show", "default"], capture_output=True,
                            text=True, check=True).stdout
    assert routes.strip() == ""


def _https_post(si: Standins, url: str, verify: ssl.SSLContext | bool, **kwargs: object) -> httpx.Response:
    async def _go() -> httpx.Response:
        async with httpx.AsyncClient(proxy=si.proxy_url, verify=verify, trust_env=False, timeout=20) as c:
            return await c.post(url, **kwargs)  # type: ignore[arg-type]

    return si.loop.run(_go(), timeout=30)


def test_token_endpoints_over_https_through_the_proxy_with_the_test_ca(standins: Standins) -> None:
    ca = ssl.create_default_context(cafile=str(standins.ca.cert_path))
    code = standins.oauth.new_code("claude")
    r = _https_post(standins, "https://platform.claude.com/v1/oauth/token", ca,
                    json={"grant_type": "authorization_code", "code": code, "code_verifier": "v"})
    assert r.status_code == 200 and r.json()["access_token"] == "claude-access-1"
    again = _https_post(standins, "https://platform.claude.com/v1/oauth/token", ca,
                        json={"grant_type": "authorization_code", "code": code, "code_verifier": "v"})
    assert again.status_code == 401  # codes are single-use
    g = _https_post(standins, "https://oauth2.googleapis.com/token", ca,
                    data={"grant_type": "refresh_token", "refresh_token": "unknown"})
    assert g.status_code == 400 and g.json()["error"] == "invalid_grant"
    assert standins.proxy.log.hosts() == ["platform.claude.com", "platform.claude.com", "oauth2.googleapis.com"]
    with pytest.raises(httpx.ConnectError):  # not trusted without the test CA
        _https_post(standins, "https://auth.openai.com/oauth/token", ssl.create_default_context(),
                    data={"grant_type": "refresh_token"})


def test_refresh_tokens_rotate_and_are_single_use(standins: Standins) -> None:
    oauth = standins.oauth
    _, refresh = oauth.seed_tokens("codex")
    assert oauth.refresh("codex", refresh) == ("codex-access-2", "codex-refresh-2")
    assert oauth.refresh("codex", refresh) == "refresh_token_reused"
    assert oauth.refresh("codex", "codex-refresh-99") == "invalid_grant"
    assert oauth.generation("codex") == 2


def test_leaf_certificate_names_the_host(tmp_path: Path) -> None:
    from cryptography import x509

    from tests.standins.tls import TestCA

    ca = TestCA(tmp_path)
    cert_path, _ = ca.leaf("auth.openai.com")
    leaf = x509.load_pem_x509_certificates(cert_path.read_bytes())[0]
    names = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value.get_values_for_type(
        x509.DNSName)
    assert names == ["auth.openai.com"] and leaf.issuer == ca.cert.subject
