"""The provider flows end to end: the real Claude Code, Codex and Gemini CLIs in real QEMU VMs (the `test`
image), driven through the API, against the stand-ins (tests/standins) served on the host's loopback.

The guests reach the stand-ins only through the egress gateway, as on any server (QEMU user networking with
restrict=on, the CLIs' proxy the gateway's guest address, no proxy or forward of the tests' making): every
provider host is pinned (EGRESS_HOSTS) to a TLS front on the host's loopback that presents the test CA's
certificate for the name asked and hands the model calls to the API stand-in, the rest to the OAuth stand-in
(tests/standins/vm.py). Each user's tunnels are in the gateway's accounting; nothing may be refused.

For each provider: a login played as the user (the URL the CLI asked to open — caught by the `$BROWSER` hook,
or for Claude the paste-code variant it prints — → a code the OAuth stand-in accepts and the URL's `state`,
pasted or sent as the CLI's localhost callback address; Codex also by device code), a run
with a tool-call round trip streamed over SSE, and a run in which the stand-in forces a token refresh that
is written back. One logged-in user per provider is shared by its tests (a Gemini start costs about a minute
under TCG), so the tests of a provider depend on its login test having passed.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlencode, urlparse

import httpx
import pytest
import pytest_asyncio

from polydev.api.app import create_app
from polydev.providers import ADAPTERS
from polydev.providers.base import CredentialBundle
from polydev.services import Services
from polydev.vm import images
from polydev.vm.engine import find_marked_processes
from tests.standins import api as standin_api
from tests.standins import clis, oauth
from tests.standins.front import TlsFront
from tests.standins.vm import PROVIDERS, VmStandins
from tests.support.app import Api, make_settings
from tests.support.flow_api import no_vms_left, sse
from tests.support.required import unmet

pytest_plugins = ["tests.support.vm_fixtures"]
pytestmark = pytest.mark.asyncio(loop_scope="module")

OAUTH_NAME = {"claude_code": oauth.CLAUDE, "codex": oauth.CODEX, "gemini_cli": oauth.GOOGLE}
SHELL_TOOL = {"claude_code": clis.claude_shell_tool, "codex": clis.codex_shell_tool,
              "gemini_cli": clis.gemini_shell_tool}
# The hosts the CLIs may contact: their token, profile and account endpoints and the model APIs. Anything
# else (telemetry, update checks, plugin sync) means a background-traffic switch is not working; the gateway
# refuses it (it is on no allow-list, and resolves nothing unpinned), which the accounting shows.
EXPECTED_HOSTS = {"platform.claude.com", "api.anthropic.com", "auth.openai.com", "chatgpt.com", "api.openai.com",
                  "oauth2.googleapis.com", "www.googleapis.com", "cloudcode-pa.googleapis.com"}
TOKEN_HOST = {"claude_code": "platform.claude.com", "codex": "auth.openai.com", "gemini_cli": "oauth2.googleapis.com"}
MODEL_HOST = {"claude_code": "api.anthropic.com", "codex": "api.openai.com", "gemini_cli": "cloudcode-pa.googleapis.com"}
# Under TCG a Gemini start takes about a minute: these bound a hang, they do not measure anything.
WAIT = 1500.0


def _vm_host_missing() -> str | None:
    for tool in ("qemu-system-x86_64", "qemu-img", "socat"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (VM tests need QEMU, and socat for the egress gateway's forward)"
    if os.geteuid() != 0:
        return "the stand-ins' TLS front listens on port 443 of a loopback address, which needs root"
    return None


@dataclass
class Stand:
    api: Api
    app: Any
    standin: standin_api.StandinState
    oauth: oauth.OAuthState
    front: TlsFront
    users: dict[str, tuple[str, dict[str, str]]] = field(default_factory=dict)  # provider -> (uid, headers)

    @property
    def services(self) -> Services:
        return self.api.services

    def user(self, provider: str) -> tuple[str, dict[str, str]]:
        if provider not in self.users:
            pytest.fail(f"no {provider} account connected: test_login[{provider}] must pass first")
        return self.users[provider]


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def stand(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Stand]:
    missing = _vm_host_missing()
    if missing:
        unmet(missing)
    test_image: images.Image = request.getfixturevalue("test_image")  # builds it when not cached
    tmp = tmp_path_factory.mktemp("provider-flows")
    with VmStandins(tmp / "standins") as si:  # on the host's loopback: guests reach it through the gateway
        settings = make_settings(
            tmp, POLYDEV_CACHE_DIR=test_image.dir.parent.parent, vm_image_profile="test",
            vm_cli_memory_mb=2048, vm_cli_vcpu=1, vm_warm_pool_size=0, login_timeout_seconds=1800,
            login_browser="off", **si.settings())
        app = create_app(settings)
        async with app.router.lifespan_context(app):
            services: Services = app.state.services
            if services.engine is None:
                pytest.fail(f"the VM engine did not start: {services.engine_unavailable}")
            assert services.egress is not None and settings.guest_https_proxy is None
            tag = services.engine.tag
            token = (settings.data_dir / "admin.token").read_text().strip()
            async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://polydev.test",
                                         timeout=WAIT) as client:
                yield Stand(Api(services, client, token), app, si.api, si.oauth, si.front)
        assert find_marked_processes(tag) == {}


# -- helpers -------------------------------------------------------------------------------------------------

async def until(what: str, probe: Any, timeout: float = WAIT) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        await asyncio.sleep(0.5)


async def session_in(st: Stand, h: dict[str, str], sid: str, *statuses: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        body = (await st.api.client.get(f"/api/auth/sessions/{sid}", headers=h)).json()
        if body["status"] in statuses:
            return body
        if body["status"] in ("completed", "failed", "timeout", "cancelled"):
            pytest.fail(f"login session ended {body['status']}: {body.get('error_message')}")
        return None

    return await until(f"login session {sid} to be {'/'.join(statuses)}", probe)


async def run_ended(st: Stand, h: dict[str, str], rid: str) -> dict[str, Any]:
    async def probe() -> dict[str, Any] | None:
        body = (await st.api.client.get(f"/api/runs/{rid}", headers=h)).json()
        return body if body["status"] not in ("queued", "running") else None

    return await until(f"run {rid} to end", probe)


async def stored(st: Stand, uid: str, provider: str) -> CredentialBundle:
    found = await st.services.credentials.reveal_with_kind(uuid.UUID(uid), provider)
    assert found is not None, f"no {provider} credential stored"
    return CredentialBundle.from_bytes(found[1], found[0])


def creds_doc(bundle: CredentialBundle, provider: str) -> dict[str, Any]:
    return json.loads(bundle.files[ADAPTERS[provider].required_credential_files[0]][0])


def access_token(provider: str, doc: dict[str, Any]) -> str:
    """The stand-in's name of the stored access token (Codex's is a JWT wrapping it)."""
    if provider == "claude_code":
        return doc["claudeAiOauth"]["accessToken"]
    if provider == "codex":
        return str(standin_api.token_label(doc["tokens"]["access_token"]))
    return doc["access_token"]


def refresh_token(provider: str, doc: dict[str, Any]) -> str:
    if provider == "claude_code":
        return doc["claudeAiOauth"]["refreshToken"]
    if provider == "codex":
        return doc["tokens"]["refresh_token"]
    return doc["refresh_token"]


async def login(st: Stand, provider: str, h: dict[str, str], method: str | None = None,
                pre_started: bool = False) -> dict[str, Any]:
    """Start a login through the API and play the user; returns the awaiting_user_auth session."""
    body: dict[str, Any] = {"provider": provider, **({"method": method} if method else {})}
    r = await st.api.client.post("/api/auth/start", json=body, headers=h)
    assert r.status_code == 202, r.text
    # A pre-started login (LOGIN_POOL) answers with its sign-in URL already there.
    assert r.json()["status"] == ("awaiting_user_auth" if pre_started else "initializing")
    sid = r.json()["session_id"]
    waiting = await session_in(st, h, sid, "awaiting_user_auth")
    if method == "device":
        # The user types the code on the provider's page; the stand-in approves it, Codex's next poll wins.
        assert waiting["device_code"] in {d["user_code"] for d in st.oauth.device.values()}
        assert st.oauth.approve_device_codes() >= 1
        return waiting
    query = parse_qs(urlparse(waiting["auth_url"]).query)
    state = query["state"][0]
    code = st.oauth.new_code(OAUTH_NAME[provider])
    if provider == "claude_code":
        # The hosted code page shows `code#state`, which the user pastes at the CLI's prompt.
        answer = f"{code}#{state}"
    else:
        # The browser ends up on the CLI's localhost callback; the user pastes that address.
        answer = f"{query['redirect_uri'][0]}?{urlencode({'code': code, 'state': state})}"
    r = await st.api.client.post(f"/api/auth/sessions/{sid}/code", json={"code": answer}, headers=h)
    assert r.status_code == 202, r.text
    return waiting


async def only_expected_hosts(st: Stand) -> None:
    """Everything the CLIs sent out so far went through the gateway to the expected hosts (no telemetry):
    the front saw no other name, and the gateway refused nothing, for any user."""
    hosts = set(st.front.log.hosts())
    assert hosts <= EXPECTED_HOSTS, sorted(hosts - EXPECTED_HOSTS)
    egress = st.services.egress
    assert egress is not None
    await egress.flush()
    refused = {(u.host, u.last_refusal) for u in await egress.repo.usage(all_users=True) if u.refusals}
    assert not refused, refused


async def tunnelled(st: Stand, uid: str) -> set[str]:
    """The hosts the gateway tunnelled for this user (its accounting)."""
    egress = st.services.egress
    assert egress is not None
    await egress.flush()
    return {u.host for u in await egress.repo.usage(uuid.UUID(uid)) if u.connections}


# -- a: login ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
async def test_login(stand: Stand, provider: str) -> None:
    uid, token = await stand.api.new_user()
    h = stand.api.auth(token)
    logins_before = len(stand.oauth.of_kind("login"))
    waiting = await login(stand, provider, h)
    url = urlparse(waiting["auth_url"])
    expected_host = {"claude_code": "claude.com", "codex": "auth.openai.com",
                     "gemini_cli": "accounts.google.com"}[provider]
    assert url.scheme == "https" and url.hostname == expected_host, waiting["auth_url"]
    assert waiting["accepts_code"] is (provider == "claude_code")
    done = await session_in(stand, h, waiting["session_id"], "completed")
    assert done["error_message"] is None
    # The CLI itself exchanged the code at the (stand-in) token endpoint, through the gateway.
    assert len(stand.oauth.of_kind("login")) == logins_before + 1
    rows = await stand.services.credentials.list(uuid.UUID(uid))
    assert [(r.provider, r.kind) for r in rows] == [(provider, "oauth")]
    bundle = await stored(stand, uid, provider)
    assert bundle.kind == "oauth"
    doc = creds_doc(bundle, provider)
    assert access_token(provider, doc) == f"{OAUTH_NAME[provider]}-access-{stand.oauth.generation(OAUTH_NAME[provider])}"
    assert access_token(provider, doc).encode() not in rows[0].encrypted_credentials.encode()  # sealed
    for rel in ADAPTERS[provider].required_credential_files:
        assert bundle.files[rel][1] == 0o600
    # The token request left through the gateway, accounted to this user.
    assert TOKEN_HOST[provider] in await tunnelled(stand, uid)
    await only_expected_hosts(stand)
    await no_vms_left(stand.api)
    stand.users[provider] = (uid, h)


async def test_codex_device_login(stand: Stand) -> None:
    uid, token = await stand.api.new_user()
    h = stand.api.auth(token)
    waiting = await login(stand, "codex", h, method="device")
    assert waiting["auth_url"] == "https://auth.openai.com/codex/device"
    await session_in(stand, h, waiting["session_id"], "completed")
    doc = creds_doc(await stored(stand, uid, "codex"), "codex")
    assert doc["auth_mode"] == "chatgpt" and doc["tokens"]["refresh_token"].startswith("codex-refresh-")
    assert any(r.body.get("redirect_uri") == "https://auth.openai.com/deviceauth/callback"
               for r in stand.oauth.of_kind("login"))
    await no_vms_left(stand.api)


async def test_a_pre_started_login_is_taken_and_completed(stand: Stand) -> None:
    """LOGIN_POOL: the real Claude Code login driven up to its URL in a VM before anyone asks, then given to
    a user, who finishes it as usual; its credential is theirs."""
    flow = stand.services.login_flow
    flow.set_pool({("claude_code", None): 1})
    flow.start_pool()
    try:
        async def ready() -> bool:
            return flow.pool.counts()["claude_code:browser"]["ready"] == 1
        await until("a pre-started Claude login with its URL", ready)
        uid, token = await stand.api.new_user()
        h = stand.api.auth(token)
        waiting = await login(stand, "claude_code", h, pre_started=True)
        assert urlparse(waiting["auth_url"]).hostname == "claude.com"
        await session_in(stand, h, waiting["session_id"], "completed")
        doc = creds_doc(await stored(stand, uid, "claude_code"), "claude_code")
        assert access_token("claude_code", doc) == \
            f"{OAUTH_NAME['claude_code']}-access-{stand.oauth.generation(OAUTH_NAME['claude_code'])}"
    finally:
        await flow.stop_pool()  # the replacement it started
    await only_expected_hosts(stand)
    await no_vms_left(stand.api)


# -- b: a run with a tool call, streamed ---------------------------------------------------------------------

async def start_run(st: Stand, provider: str, h: dict[str, str], prompt: str, **extra: Any) -> str:
    r = await st.api.client.post("/api/runs", json={"provider": provider, "prompt": prompt, **extra}, headers=h)
    assert r.status_code == 202, r.text
    return r.json()["id"]


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_run_streams_a_tool_round_trip(stand: Stand, provider: str) -> None:
    _, h = stand.user(provider)
    nonce = "note-" + secrets.token_hex(6)
    stand.standin.script = standin_api.Script(tool=SHELL_TOOL[provider]("cat note.txt"),
                                              final_text="The note says {tool_output}")
    rid = await start_run(stand, provider, h, "What does note.txt say?", files={"note.txt": nonce + "\n"})
    r = await stand.api.client.get(f"/api/runs/{rid}/events", headers=h)  # the whole stream, to its end
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
    events = sse(r.text)
    ids = [i for i, _, _ in events]
    assert ids == list(range(len(events)))
    kinds = [data["type"] for _, _, data in events]
    assert [name for _, name, _ in events] == kinds
    assert kinds.count("done") == 1 and kinds[-1] == "done" and "error" not in kinds, kinds
    call = kinds.index("tool_call")
    result = kinds.index("tool_result", call)
    final = max(i for i, k in enumerate(kinds) if k == "text")
    assert call < result < final < len(kinds) - 1
    assert events[result][2]["id"] == events[call][2]["id"]
    assert nonce in events[result][2]["output"] and nonce in events[final][2]["text"]
    body = await run_ended(stand, h, rid)
    assert body["status"] == "succeeded" and body["exit_code"] == 0, body
    assert nonce in body["result"]
    assert body["credential_refreshed"] is False  # the tokens were still good: nothing to write back
    assert any(nonce in out for out in stand.standin.tool_outputs)  # the file reached the CLI's tool
    assert MODEL_HOST[provider] in await tunnelled(stand, stand.user(provider)[0])
    await only_expected_hosts(stand)
    await no_vms_left(stand.api)


# -- b2: a conversation on a workspace: two turns, the second continuing the CLI's session -------------------

async def workspace_ready(st: Stand, h: dict[str, str], name: str) -> str:
    r = await st.api.client.post("/api/workspaces", json={"name": name}, headers=h)
    assert r.status_code == 202, r.text
    wid = r.json()["id"]

    async def ready() -> bool:
        body = (await st.api.client.get(f"/api/workspaces/{wid}", headers=h)).json()
        assert body["state"] != "failed", body
        return body["state"] == "ready"

    await until(f"workspace {wid} to be ready", ready)
    return str(wid)


@pytest.mark.parametrize("provider", PROVIDERS)
async def test_a_conversation_continues_the_cli_session_on_a_workspace(stand: Stand, provider: str) -> None:
    uid, h = stand.user(provider)
    client = stand.api.client
    wid = await workspace_ready(stand, h, f"conversation-{provider}")
    nonce = "remember-" + secrets.token_hex(6)
    stand.standin.script = standin_api.Script(tool=SHELL_TOOL[provider](f"echo {nonce} > notes.txt"),
                                              final_text="Noted: {tool_output}")
    r = await client.post("/api/runs", json={"provider": provider, "workspace_id": wid,
                                             "prompt": f"Remember the word {nonce} and write it to notes.txt."},
                          headers=h)
    assert r.status_code == 202, r.text
    first = await run_ended(stand, h, r.json()["id"])
    assert first["status"] == "succeeded", first
    conversation = first["conversation_id"]
    assert first["workspace_id"] == wid and conversation
    assert first["changes"] == [{"path": "notes.txt", "status": "added", "binary": False}]
    patch = (await client.get(f"/api/runs/{first['id']}/diff", headers=h)).text
    assert "+++ b/notes.txt" in patch and f"+{nonce}" in patch
    # The credential is not left in the workspace's VM between turns.
    vm_id = uuid.UUID((await client.get(f"/api/workspaces/{wid}", headers=h)).json()["vm_id"])
    creds = stand.services.guest_env(provider).home_path(ADAPTERS[provider].required_credential_files[0])
    assert stand.services.engine is not None
    with stand.services.engine.agent(vm_id) as agent:
        assert agent.exec(["test", "-e", creds]).exit_code == 1

    asked = len(stand.standin.model_turns())
    stand.standin.script = standin_api.Script(text="You asked me to remember a word.")
    r = await client.post("/api/runs", json={"provider": provider, "conversation_id": conversation,
                                             "prompt": "Which word did I ask you to remember?"}, headers=h)
    assert r.status_code == 202, r.text
    second = await run_ended(stand, h, r.json()["id"])
    assert second["status"] == "succeeded" and second["conversation_id"] == conversation, second
    follow_up = stand.standin.model_turns()[asked:]
    assert follow_up and nonce in json.dumps(follow_up[-1].body)  # the model saw the first turn
    assert second["changes"] == []
    listed = (await client.get(f"/api/workspaces/{wid}/conversations", headers=h)).json()
    assert [(c["id"], c["provider"], c["turns"], c["runs"]) for c in listed] == [
        (conversation, provider, 2, [first["id"], second["id"]])]

    # Another user sees none of it; a conversation keeps its provider.
    other = stand.api.auth((await stand.api.new_user(f"nosy-{provider}"))[1])
    assert (await client.get(f"/api/workspaces/{wid}/conversations", headers=other)).status_code == 404
    r = await client.post("/api/runs", json={"provider": provider, "conversation_id": conversation,
                                             "prompt": "hi"}, headers=other)
    assert r.status_code in (404, 409), r.text  # (409: that user has no credential; never the conversation)
    assert (await client.get(f"/api/runs/{first['id']}/diff", headers=other)).status_code == 404
    wrong = next(p for p in PROVIDERS if p != provider)
    r = await client.post("/api/runs", json={"provider": wrong, "conversation_id": conversation, "prompt": "hi"},
                          headers=h)
    assert r.status_code == 422 and r.json()["error"]["code"] == "bad_turn"
    assert (await client.delete(f"/api/workspaces/{wid}", headers=h)).status_code == 204
    await only_expected_hosts(stand)
    await no_vms_left(stand.api)


# -- c: the stand-in forces a refresh; the new tokens are written back ----------------------------------------

@pytest.mark.parametrize("provider", PROVIDERS)
async def test_refresh_is_written_back(stand: Stand, provider: str) -> None:
    uid, h = stand.user(provider)
    before = creds_doc(await stored(stand, uid, provider), provider)
    old_access, old_refresh = access_token(provider, before), refresh_token(provider, before)
    refreshes = len(stand.oauth.of_kind("refresh"))
    stand.standin.script = standin_api.Script(text="fresh tokens work")
    if provider == "gemini_cli":
        # Gemini refreshes only when `expiry_date` has passed (a 401 does not make it refresh): the stored
        # credential is made to have expired, as it would be hours after the login. Relative to the login's
        # own expiry, which the guest computed with its own clock.
        bundle = await stored(stand, uid, provider)
        rel = ADAPTERS[provider].required_credential_files[0]
        doc = {**before, "expiry_date": int(before["expiry_date"]) - 3 * 3_600_000}
        bundle.files[rel] = (json.dumps(doc).encode(), bundle.files[rel][1])
        await stand.services.credentials.put(uuid.UUID(uid), provider, "oauth", bundle.to_bytes())
    else:
        # Claude and Codex refresh when the API answers 401 for the access token.
        stand.standin.script.reject_tokens = {old_access}
    rid = await start_run(stand, provider, h, "Say something.")
    body = await run_ended(stand, h, rid)
    assert body["status"] == "succeeded", body
    assert body["credential_refreshed"] is True
    assert len(stand.oauth.of_kind("refresh")) == refreshes + 1
    after = creds_doc(await stored(stand, uid, provider), provider)
    new_access = access_token(provider, after)
    assert new_access != old_access
    assert new_access == f"{OAUTH_NAME[provider]}-access-{stand.oauth.generation(OAUTH_NAME[provider])}"
    if provider == "gemini_cli":  # Google keeps the refresh token
        assert refresh_token(provider, after) == old_refresh
    else:  # rotated, and the old one is spent (single use)
        assert refresh_token(provider, after) not in (old_refresh, "")
    # The model saw the new token on its successful turn.
    assert stand.standin.model_turns()[-1].credential == new_access
    await only_expected_hosts(stand)
    await no_vms_left(stand.api)


# -- a fault in a real VM ------------------------------------------------------------------------------------

async def test_a_vm_killed_mid_run_fails_the_run_and_leaves_nothing(stand: Stand) -> None:
    _, h = stand.user("claude_code")
    stand.standin.script = standin_api.Script(tool=SHELL_TOOL["claude_code"]("sleep 600"))
    turns = len(stand.standin.model_turns())
    rid = await start_run(stand, "claude_code", h, "Wait a long time.")
    engine = stand.services.engine
    assert engine is not None

    async def tool_running() -> bool:  # the model asked for the tool: the CLI is mid-run in the VM
        return any(t.answered == "tool_call" for t in stand.standin.model_turns()[turns:])

    await until("the CLI to call the tool", tool_running)
    row = await stand.services.runs.get(uuid.UUID(rid))
    assert row is not None and row.vm_id is not None
    pid = find_marked_processes(engine.tag)[row.vm_id]
    os.kill(pid, signal.SIGKILL)
    body = await run_ended(stand, h, rid)
    assert body["status"] == "failed", body
    assert "VM" in body["error_message"] or "agent" in body["error_message"], body["error_message"]
    events = sse((await stand.api.client.get(f"/api/runs/{rid}/events", headers=h)).text)
    assert [e[2]["type"] for e in events][-1] == "error" and "done" not in [e[2]["type"] for e in events]
    await no_vms_left(stand.api)


async def test_no_background_traffic_left_the_guests(stand: Stand) -> None:
    """Over the whole module: the logins and runs went through the gateway, and nothing but them."""
    assert stand.front.log.hosts(), "the logins and runs went through the gateway"
    await only_expected_hosts(stand)
