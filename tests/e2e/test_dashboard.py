"""The dashboard in a real browser (Debian's Chromium under Playwright, headless) against a live server whose
claude_code is the scripted CLI of tests/support/flow_fakes.py and whose "VMs" are the guest agent on the host: sign
in, connect a provider by pasting its code, run a prompt and watch it stream, history, admin, egress, and what another
user cannot see. Each page's screenshot goes to $POLYDEV_ARTIFACTS/dashboard (default tests/artifacts/).

The workspace views (list, create, a conversation's thread with its diff, the terminal) are driven against the
API's answers played in the browser (tests/support/workspace_stub.py): this server's "VMs" cannot hold a workspace.

The same flows with real VMs: the login page drawn in the noVNC canvas is test_dashboard_vm.py; workspaces,
conversations and the terminal are test_dashboard_workspaces.py."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from polydev.client import PolydevClient
from polydev.config import Settings
from polydev.web.vendor import installed, vendor_root
from tests.e2e.test_egress_cli import record_usage
from tests.support.dashboard_browser import artifacts_dir, launch, sign_in
from tests.support.live_server import LiveServer, start_server
from tests.support.required import import_module, unmet
from tests.support.workspace_stub import Turn, WorkspaceApi

# Not pytest.importorskip: under POLYDEV_REQUIRE_SERVERS=1 a missing Playwright fails the run.
import_module("playwright", "pip install -e '.[test]'")
from playwright.sync_api import Browser, Page, expect

ART = artifacts_dir()
# Waits, not time limits: long enough for a loaded 2-core machine (VM tests alongside) to get there.
WAIT_MS = 60_000
expect.set_options(timeout=WAIT_MS)


def vendor_installed(key: str = "novnc") -> bool:
    return installed(Settings(), key)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LiveServer]:
    root = tmp_path_factory.mktemp("dashboard")
    # The noVNC and xterm.js this machine vendored (the fake flow has no VNC, but the page may load it).
    env = {"POLYDEV_TEST_FAKE_CLI": str(root / "guest"), "POLYDEV_WEB_VENDOR_DIR": str(vendor_root(Settings()))}
    yield from start_server(root, "tests.support.fake_vm_server", env)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from launch()  # type: ignore[misc]


@pytest.fixture(scope="module")
def admin(server: LiveServer) -> Iterator[PolydevClient]:
    with PolydevClient(server.url, server.admin_token) as client:
        yield client


@pytest.fixture(scope="module")
def other_token(admin: PolydevClient) -> str:
    user = admin.create_user(f"other-{uuid.uuid4().hex[:6]}")
    return admin.issue_token(user["id"])["token"]


@pytest.fixture
def page(browser: Browser, server: LiveServer) -> Iterator[Page]:
    context = browser.new_context(viewport={"width": 1200, "height": 860})
    context.set_default_timeout(WAIT_MS)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # the confirm() before Disconnect / Destroy
    yield page
    context.close()


def until(page: Page, probe: Callable[[], object], what: str, timeout_s: float = WAIT_MS / 1000) -> None:
    """Wait for `probe()` while Playwright keeps handling the page's routed calls (time.sleep would not)."""
    deadline = time.monotonic() + timeout_s
    while not probe():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        page.wait_for_timeout(100)


def shot(page: Page, name: str) -> None:
    path = ART / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 1000


def provider_card(page: Page, provider: str):
    return page.locator(f'section[data-provider="{provider}"]')


def test_connect_run_and_history(page: Page, server: LiveServer) -> None:
    requested: list[str] = []
    page.on("request", lambda request: requested.append(request.url))

    page.goto(f"{server.url}/")
    expect(page).to_have_url(f"{server.url}/app/signin")
    expect(page.get_by_role("heading", name="Sign in")).to_be_visible()
    shot(page, "01-signin")
    page.get_by_label("API token").fill("pd_not-a-token")
    page.get_by_role("button", name="Sign in").click()
    expect(page.get_by_role("alert")).to_have_text("That token is not valid.")
    sign_in(page, server.url, server.admin_token)

    # Providers: three, none connected yet.
    expect(page.locator("section[data-provider]")).to_have_count(3)
    expect(provider_card(page, "claude_code").locator(".state")).to_have_text("Not connected")
    expect(page.get_by_role("link", name="Admin")).to_be_visible()
    shot(page, "02-providers")

    # Connect: the live login view reaches "awaiting user" with the provider's address and a code box.
    provider_card(page, "claude_code").get_by_role("button", name="Connect", exact=True).click()
    page.wait_for_url(re.compile(r"/app/providers/claude_code/login/[0-9a-f-]{36}$"))
    status = page.locator("p.status")
    expect(status).to_have_attribute("data-status", "awaiting_user_auth")
    expect(status).to_have_text("Waiting for you to sign in")
    expect(page.get_by_role("link", name=re.compile(r"^https:\/\/auth\.fake\.test\/authorize"))).to_be_visible()
    expect(page.get_by_role("button", name="Cancel")).to_be_visible()
    shot(page, "03-login-awaiting")

    page.get_by_label("Paste the code the sign-in page shows").fill("not-the-code")
    page.get_by_role("button", name="Send").click()
    expect(status).to_have_attribute("data-status", "failed")  # the fake CLI exits on a wrong code
    expect(page.get_by_role("button", name="Start a new session")).to_be_visible()
    page.get_by_role("button", name="Start a new session").click()
    expect(status).to_have_attribute("data-status", "awaiting_user_auth")
    page.get_by_label("Paste the code the sign-in page shows").fill("good-code")
    page.get_by_role("button", name="Send").click()
    expect(status).to_have_attribute("data-status", "completed")
    expect(page.get_by_text("Claude Code is connected.")).to_be_visible()
    shot(page, "04-login-completed")

    page.get_by_role("link", name="Providers", exact=True).click()
    expect(provider_card(page, "claude_code").locator(".state")).to_have_text("Connected: connected via OAuth")

    # Run: the answer streams in while the run is still going ("sleep 3" makes the fake CLI pause mid-way).
    page.get_by_role("link", name="Run", exact=True).click()
    expect(page.get_by_label("Provider")).to_have_value("claude_code")
    page.get_by_label("Prompt").fill("sleep 3")
    page.get_by_role("button", name="Send").click()
    page.wait_for_url(re.compile(r"/app/runs/[0-9a-f-]{36}$"))
    run_url = page.url
    output = page.get_by_role("log", name="Output")
    expect(output).to_contain_text("working")
    expect(page.locator(".run-status [data-status]")).to_have_attribute("data-status", "running")
    expect(output).to_contain_text("answer to: sleep 3")
    expect(page.locator(".run-status [data-status]")).to_have_attribute("data-status", "succeeded")
    expect(output).to_contain_text("Done · 7 output tokens")
    shot(page, "05-run")

    # History lists it; opening it replays the stored events.
    page.get_by_role("link", name="History").click()
    row = page.locator(f'tr[data-run="{run_url.rsplit("/", 1)[1]}"]')
    expect(row).to_contain_text("succeeded")
    shot(page, "06-history")
    row.get_by_role("link", name="sleep 3").click()
    expect(page).to_have_url(run_url)
    expect(page.get_by_role("log", name="Output")).to_contain_text("answer to: sleep 3")

    # A run can be cancelled from its page.
    page.get_by_role("link", name="Run another").click()
    page.get_by_label("Prompt").fill("sleep 60")
    page.get_by_role("button", name="Send").click()
    expect(page.get_by_role("log", name="Output")).to_contain_text("working")
    page.get_by_role("button", name="Cancel").click()
    expect(page.locator(".run-status [data-status]")).to_have_attribute("data-status", "cancelled")

    # The token went out in headers only: no address the page asked for carries it.
    assert requested and not [u for u in requested if server.admin_token in u]
    page.get_by_role("button", name="Sign out").click()
    expect(page).to_have_url(f"{server.url}/app/signin")
    assert page.evaluate("sessionStorage.getItem('polydev.token')") is None


def test_expired_session_offers_a_new_one(page: Page, server: LiveServer) -> None:
    sign_in(page, server.url, server.admin_token)
    # The API's answer for a session whose state is gone (410 session_expired), on its event stream.
    expired = {"error": {"code": "session_expired", "message": "this login session has expired; start a new "
                         "session", "action": "start_new_session"}}
    page.route("**/api/auth/sessions/*/events", lambda route: route.fulfill(status=410, json=expired))
    page.goto(f"{server.url}/app/providers/claude_code/login/{uuid.uuid4()}")
    expect(page.locator("p.status")).to_have_text("This login session has expired")
    shot(page, "07-login-expired")
    page.unroute("**/api/auth/sessions/*/events")

    page.get_by_role("button", name="Start a new session").click()
    status = page.locator("p.status")
    expect(status).to_have_attribute("data-status", "awaiting_user_auth")
    page.get_by_role("button", name="Cancel").click()
    expect(status).to_have_attribute("data-status", "cancelled")
    expect(page.get_by_role("button", name="Start a new session")).to_be_visible()


def test_api_key_and_disconnect(page: Page, server: LiveServer) -> None:
    sign_in(page, server.url, server.admin_token)
    card = provider_card(page, "codex")
    expect(card.locator(".state")).to_have_text("Not connected")
    card.get_by_text("Use an API key instead").click()
    card.get_by_label("Codex API key").fill("sk-test-0123456789")
    card.get_by_role("button", name="Save key").click()
    expect(card.locator(".state")).to_have_text("Connected: connected with an API key")
    card.get_by_role("button", name="Disconnect").click()
    expect(card.locator(".state")).to_have_text("Not connected")


def test_admin_lists_and_destroys_vms(page: Page, server: LiveServer, admin: PolydevClient) -> None:
    vm = admin.create_vm("cli")
    sign_in(page, server.url, server.admin_token)
    page.get_by_role("link", name="Admin").click()
    row = page.locator(f'tr[data-vm="{vm["id"]}"]')
    expect(row.locator("[data-status]")).to_have_attribute("data-status", "running")
    expect(row).to_contain_text(vm["backend"])
    expect(row).to_contain_text("admin")
    expect(row.locator("td[data-created]")).to_have_text(re.compile(r"^\d+ (s|min)"))
    # The quotas: the admin's live VM counts against their limits, and against the host's capacity.
    me = admin.me()["id"]
    expect(page.locator(f'tr[data-user="{me}"] td[data-limit="vms"]')).to_have_text(
        f"1 / {admin.quotas(me)['limits']['vms']}")
    cap = admin.host_capacity()["capacity"]["vcpus"]
    assert cap["used"] >= 1
    expect(page.locator("[data-host-capacity]")).to_contain_text(f"{cap['used']} of {cap['capacity']} vCPUs in use")
    shot(page, "08-admin")
    row.get_by_role("button", name=re.compile("^Destroy")).click()
    expect(row).to_have_count(0)
    assert admin.vm(vm["id"])["status"] == "destroyed"


IN_USE = {"hash": "a1" * 32, "profile": "default", "built_at": "2025-10-01T09:30:00Z",
          "clis": {"@anthropic-ai/claude-code": "2.0.14", "@openai/codex": "0.46.0", "@google/gemini-cli": "0.8.2"}}
ACTIVE = {**IN_USE, "hash": "b2" * 32, "built_at": "2025-10-02T10:00:00Z",
          "clis": {**IN_USE["clis"], "@openai/codex": "0.47.0"}}
UPDATES = [{"provider": "claude_code", "package": "@anthropic-ai/claude-code", "current": "2.0.14",
            "latest": "2.0.14", "newer": False},
           {"provider": "codex", "package": "@openai/codex", "current": "0.46.0", "latest": "0.47.0", "newer": True},
           {"provider": "gemini_cli", "package": "@google/gemini-cli", "current": "0.8.2", "latest": "0.8.2",
            "newer": False}]
REGISTRY_DOWN = "@openai/codex@latest: the npm registry did not answer in 60 s"


class ImagesApi:
    """GET /api/images[?check=true] (api/routes/images.py) answered in the browser: this server has no image, so
    its answer has none in use. `checks` are the answers to ?check=true in turn (an int: that HTTP error)."""

    def __init__(self, checks: list[dict[str, Any] | int]) -> None:
        self.base = {"profile": "default", "in_use": IN_USE, "active": ACTIVE, "building": [".build-feedface-42"],
                     "cached": [IN_USE, ACTIVE], "updates": None, "updates_error": None, "checked_at": None}
        self.checks = checks
        self.calls: list[tuple[dict[str, list[str]], str | None]] = []  # (query, Authorization)

    def install(self, page: Page) -> None:
        page.route(lambda url: urlparse(url).path == "/api/images", self._answer)

    def _answer(self, route: Any) -> None:
        query = parse_qs(urlparse(route.request.url).query)
        self.calls.append((query, route.request.headers.get("authorization")))
        if query.get("check") != ["true"]:
            route.fulfill(json=self.base)
            return
        answer = self.checks.pop(0)
        if isinstance(answer, int):
            route.fulfill(status=answer, json={"error": {"code": "bad_gateway", "message": "the images went away"}})
            return
        route.fulfill(json={**self.base, **answer, "checked_at": time.time()})


def test_admin_image_in_use_active_and_updates(page: Page, server: LiveServer, other_token: str) -> None:
    stub = ImagesApi([{"updates": UPDATES}, {"updates_error": REGISTRY_DOWN}, 502])
    stub.install(page)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    sign_in(page, server.url, server.admin_token)
    page.get_by_role("link", name="Admin").click()
    section = page.get_by_role("region", name="Image")

    # The image in use: its hash, when it was built, each CLI's version.
    in_use = section.locator('dl[data-image="in-use"]')
    expect(in_use.locator("[data-hash]")).to_have_text(IN_USE["hash"])
    expect(in_use.locator('dd[title="2025-10-01T09:30:00Z"]')).to_be_visible()
    for package, version in IN_USE["clis"].items():
        expect(in_use.locator(f'li[data-package="{package}"] [data-version]')).to_have_text(version)
    # The active one is another: said, with how servers follow it.
    expect(section.locator("[data-active-note]")).to_contain_text("servers switch to it within 15 s")
    active = section.locator('dl[data-image="active"]')
    expect(active.locator("[data-hash]")).to_have_text(ACTIVE["hash"])
    expect(active.locator('li[data-package="@openai/codex"] [data-version]')).to_have_text("0.47.0")
    expect(section.locator("[data-building]")).to_have_text("Builds in progress: .build-feedface-42")
    expect(section).to_contain_text("Not checked yet.")
    expect(section).to_contain_text("polydev image update` on the host builds")
    assert stub.calls == [({}, f"Bearer {server.admin_token}")]

    # Check for updates: the registry asked (check=true, with the token); the newer version marked.
    section.get_by_role("button", name="Check for updates").click()
    table = section.locator('table[data-table="image-updates"]')
    codex = table.locator('tr[data-package="@openai/codex"]')
    expect(codex).to_have_attribute("data-newer", "true")
    expect(codex.locator("[data-current]")).to_have_text("0.46.0")
    expect(codex.locator("[data-latest]")).to_have_text("0.47.0 newer")
    claude = table.locator('tr[data-package="@anthropic-ai/claude-code"]')
    expect(claude).to_have_attribute("data-newer", "false")
    expect(claude.locator("[data-latest]")).to_have_text("2.0.14")
    expect(table.locator("tr.newer")).to_have_count(1)
    expect(section.locator("[data-checked]")).to_contain_text("1 newer version available (checked ")
    background = "(sel) => getComputedStyle(document.querySelector(sel)).backgroundColor"
    assert page.evaluate(background, 'tr[data-package="@openai/codex"] td') \
        != page.evaluate(background, 'tr[data-package="@anthropic-ai/claude-code"] td')
    assert stub.calls[-1] == ({"check": ["true"]}, f"Bearer {server.admin_token}")
    shot(page, "08-admin-image")

    # The registry could not tell: its reason, no table.
    section.get_by_role("button", name="Check for updates").click()
    expect(section.locator("[data-updates-error]")).to_have_text(f"The npm registry could not tell: {REGISTRY_DOWN}")
    expect(table).to_have_count(0)
    # The API fails: said as the admin page says its errors; what was shown stays.
    section.get_by_role("button", name="Check for updates").click()
    expect(section.locator("p.notice.error:not([data-updates-error])")).to_have_text("the images went away")
    expect(section.get_by_role("button", name="Check for updates")).to_be_enabled()
    expect(in_use.locator("[data-hash]")).to_have_text(IN_USE["hash"])
    assert [q for q, _ in stub.calls] == [{}, {"check": ["true"]}, {"check": ["true"]}, {"check": ["true"]}]
    assert {auth for _, auth in stub.calls} == {f"Bearer {server.admin_token}"}
    assert errors == []

    # Another user: the admin page refuses them before anything is asked, so no Image section.
    calls = len(stub.calls)
    page.get_by_role("button", name="Sign out").click()
    sign_in(page, server.url, other_token)
    expect(page.get_by_role("link", name="Admin")).to_have_count(0)
    page.goto(f"{server.url}/app/admin")
    expect(page.get_by_role("alert")).to_have_text("This page is for admins.")
    expect(page.get_by_role("region", name="Image")).to_have_count(0)
    expect(page.locator(".image")).to_have_count(0)
    assert len(stub.calls) == calls and errors == []


def test_admin_image_without_one(page: Page, server: LiveServer) -> None:
    """The real API: this server has no image, so none in use and none active."""
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    sign_in(page, server.url, server.admin_token)
    page.get_by_role("link", name="Admin").click()
    section = page.get_by_role("region", name="Image")
    expect(section.locator('[data-image="none"]')).to_have_text(re.compile(r"^No image: this server's VMs have no "
                                                                            r"\S+ image to start from\."))
    expect(section.locator("[data-building]")).to_have_text("No build in progress.")
    expect(section.get_by_role("button", name="Check for updates")).to_be_enabled()
    expect(section.locator("[data-active-note], dl[data-image], p.notice.error")).to_have_count(0)
    assert errors == []


def test_sandboxes_page_lists_mine_and_kills_one(page: Page, server: LiveServer, admin: PolydevClient,
                                               other_token: str) -> None:
    from e2b import Sandbox

    mine = Sandbox.create(timeout=300, api_url=server.url, sandbox_url=server.url, api_key=server.admin_token)
    theirs = Sandbox.create(timeout=300, api_url=server.url, sandbox_url=server.url, api_key=other_token)
    try:
        sign_in(page, server.url, server.admin_token)
        page.get_by_role("link", name="Sandboxes").click()
        row = page.locator(f'tr[data-sandbox="{mine.sandbox_id}"]')
        expect(row.locator("[data-state]")).to_have_attribute("data-state", "running")
        expect(row).to_contain_text("you")
        expect(page.locator(f'tr[data-sandbox="{theirs.sandbox_id}"]')).to_have_count(0)  # the admin's own only
        page.get_by_label("Everyone's").check()
        other_row = page.locator(f'tr[data-sandbox="{theirs.sandbox_id}"]')
        expect(other_row).to_have_count(1)
        expect(other_row.get_by_role("button")).to_have_count(0)  # only its owner may kill it
        shot(page, "09-sandboxes")
        row.get_by_role("button", name=re.compile("^Kill")).click()
        expect(row).to_have_count(0)
        assert [s.sandbox_id for s in Sandbox.list(api_url=server.url, api_key=server.admin_token).next_items()] == []
    finally:
        theirs.kill()


def test_egress_usage_and_an_admin_switches_a_users_mode(page: Page, server: LiveServer, admin: PolydevClient,
                                                         other_token: str) -> None:
    user = admin.create_user(f"egress-{uuid.uuid4().hex[:6]}")
    with PolydevClient(server.url, other_token) as other:
        other_id = other.me()["id"]
    record_usage(server, [(user["id"], "api.anthropic.com", 3, 1024, 2 * 1024 * 1024, 0),
                          (other_id, "api.openai.com", 1, 10, 20, 1)])
    password = "dash-Pr0xy-secret"
    sign_in(page, server.url, server.admin_token)
    page.get_by_role("link", name="Egress").click()
    usage = page.locator('table[data-table="egress-usage"]')
    row = usage.locator('tr[data-host="api.anthropic.com"]')
    expect(row).to_contain_text(user["name"])
    expect(row).to_contain_text("2.0 MB")
    expect(usage.locator('tr[data-host="api.openai.com"]')).to_contain_text("1")

    ident = page.locator(f'table[data-table="egress-identities"] tr[data-user="{user["id"]}"]')
    expect(ident.locator("[data-mode]")).to_have_text("direct")
    ident.get_by_role("button", name=f"Edit {user['name']}").click()
    page.get_by_label("Mode", exact=True).select_option("proxy")
    page.get_by_label("Proxy URL").fill(f"http://carol:{password}@proxy.example.test:3128")
    page.get_by_label("Concurrent connections").fill("4")
    page.get_by_role("button", name="Save egress").click()
    expect(ident.locator("[data-mode]")).to_have_text("proxy")
    expect(ident).to_contain_text("http://proxy.example.test:3128")
    expect(ident).to_contain_text("concurrent=4")
    expect(page.get_by_role("status")).to_contain_text(f"{user['name']}: proxy http://proxy.example.test:3128")
    assert password not in page.content()
    shot(page, "10-egress")
    stored = admin.egress(user["id"])
    assert (stored["mode"], stored["limits"]) == ("proxy", {"concurrent": 4})

    ident.get_by_role("button", name=f"Edit {user['name']}").click()
    page.get_by_label("Mode", exact=True).select_option("direct")
    page.get_by_role("button", name="Save egress").click()
    expect(ident.locator("[data-mode]")).to_have_text("direct")
    assert admin.egress(user["id"])["mode"] == "direct"

    # Another user: their own usage only, and no identities.
    page.get_by_role("button", name="Sign out").click()
    sign_in(page, server.url, other_token)
    page.get_by_role("link", name="Egress").click()
    expect(page.get_by_role("heading", name="Your usage")).to_be_visible()
    expect(page.locator('table[data-table="egress-usage"] tr[data-host="api.openai.com"]')).to_be_visible()
    expect(page.locator('tr[data-host="api.anthropic.com"]')).to_have_count(0)
    expect(page.locator('table[data-table="egress-identities"]')).to_have_count(0)

def test_other_user_sees_neither_session_nor_vnc(page: Page, server: LiveServer, admin: PolydevClient,
                                                  other_token: str) -> None:
    session = admin.start_login("claude_code")
    sid = session["session_id"]
    try:
        assert admin.wait_session(sid, timeout=60)["status"] == "awaiting_user_auth"
        sign_in(page, server.url, other_token)
        expect(page.get_by_role("link", name="Admin")).to_have_count(0)  # not an admin
        page.goto(f"{server.url}/app/providers/claude_code/login/{sid}")
        expect(page.locator("p.status")).to_have_attribute("data-status", "not_found")
        expect(page.get_by_role("link", name=re.compile("auth.fake.test"))).to_have_count(0)
        # From this user's page: no ticket for the VNC WebSocket, and the socket itself will not open.
        answer = page.evaluate("""async (sid) => {
            const token = sessionStorage.getItem("polydev.token");
            const r = await fetch(`/api/auth/sessions/${sid}/vnc-ticket`, {method: "POST",
                headers: {Authorization: `Bearer ${token}`}});
            return r.status;
        }""", sid)
        assert answer == 404
        for query in ("", "?ticket=forged-ticket"):
            opened = page.evaluate("""(path) => new Promise((resolve) => {
                const ws = new WebSocket(`ws://${location.host}${path}`);
                ws.onopen = () => { ws.close(); resolve(true); };
                ws.onclose = () => resolve(false);
            })""", f"/api/auth/sessions/{sid}/vnc{query}")
            assert opened is False
        assert httpx.get(f"{server.url}/api/auth/sessions/{sid}",
                         headers={"Authorization": f"Bearer {other_token}"}).status_code == 404
        shot(page, "09-other-user")
    finally:
        admin.cancel_session(sid)


def test_pages_load_only_local_files(server: LiveServer) -> None:
    page = httpx.get(f"{server.url}/app/runs")
    assert page.status_code == 200
    csp = page.headers["content-security-policy"]
    assert "script-src 'self'" in csp and "frame-ancestors 'none'" in csp
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", page.text)  # no CDN, nothing remote
    for path in Path(__file__).resolve().parents[2].glob("src/polydev/web/static/**/*.js"):
        assert not re.search(r"""(import|from)\s*\(?\s*["'](https?:)?//""", path.read_text()), path


def test_novnc_loads_as_es_modules_under_the_page_policy(page: Page, server: LiveServer) -> None:
    if not vendor_installed():
        reason = "noVNC is not vendored on this machine: run `polydev web vendor` (scripts/test.sh does)"
        unmet(reason)
    sign_in(page, server.url, server.admin_token)
    # The view imports it the same way: core/rfb.js and its relative imports, no bundler, under the CSP.
    kind = page.evaluate("""async () => {
        const mod = await import("/app/vendor/novnc/core/rfb.js");
        return typeof mod.default;
    }""")
    assert kind == "function"


PATCH = """diff --git a/notes.txt b/notes.txt
new file mode 100644
index 0000000..3b18e51
--- /dev/null
+++ b/notes.txt
@@ -0,0 +1,2 @@
+hello world
+<img src=x onerror="document.title='pwned'">
diff --git a/old.txt b/old.txt
deleted file mode 100644
index 1f2a4c1..0000000
--- a/old.txt
+++ /dev/null
@@ -1 +0,0 @@
--- bye
"""


def test_workspaces_list_create_and_a_conversation_with_its_diff(page: Page, server: LiveServer) -> None:
    stub = WorkspaceApi(server.admin_token)
    demo = stub.add_workspace("demo", size=2048)
    stub.add_workspace("broken", state="failed", source="archive", error="unpacking the archive failed: not a tar")
    first = stub.add_turn(demo["id"], "Write hello to notes.txt and delete old.txt.", Turn(
        events=[{"type": "text", "text": "Writing the notes."},
                {"type": "tool_call", "id": "t1", "name": "Bash", "input": {"command": "echo hello world > notes.txt"}},
                {"type": "tool_result", "id": "t1", "output": ""},
                {"type": "text", "text": "Noted, and old.txt is gone."}, {"type": "done", "usage": {"output_tokens": 9}}],
        changes=[{"path": "notes.txt", "status": "added", "binary": False},
                 {"path": "old.txt", "status": "deleted", "binary": False},
                 {"path": "logo.png", "status": "added", "binary": True}],
        patch=PATCH))
    stub.install(page)
    sign_in(page, server.url, server.admin_token)

    # The list: each workspace's name, source, state and size; a failed one says why.
    page.get_by_role("link", name="Workspaces").click()
    expect(page.get_by_role("heading", name="Workspaces")).to_be_visible()
    row = page.locator(f'tr[data-workspace="{demo["id"]}"]')
    expect(row.locator("[data-state]")).to_have_attribute("data-state", "ready")
    expect(row).to_contain_text("2.0 KB")
    expect(page.locator("tr[data-workspace]", has_text="broken")).to_contain_text("unpacking the archive failed")

    # Made empty, from an uploaded archive (the name taken from the file's), and from a git repository.
    page.get_by_label("Name", exact=True).fill("scratch")
    page.get_by_role("button", name="Create workspace").click()
    expect(page.get_by_text("scratch is being made.")).to_be_visible()
    scratch = page.locator("tr[data-workspace]", has_text="scratch")
    expect(scratch.locator("[data-state]")).to_have_attribute("data-state", "ready")  # the next look
    page.get_by_label("An archive (.tar, .tar.gz, .zip)").check()
    page.get_by_label("Archive", exact=True).set_input_files(
        {"name": "project.tar.gz", "mimeType": "application/gzip", "buffer": b"\x1f\x8b tarball"})
    expect(page.get_by_label("Name", exact=True)).to_have_value("project")
    page.get_by_role("button", name="Create workspace").click()
    expect(page.get_by_text("project is being made.")).to_be_visible()
    page.get_by_label("A git repository").check()
    page.get_by_label("Repository URL").fill("https://github.com/octo/hello.git")
    page.get_by_label("Branch (optional)").fill("main")
    page.get_by_label("Access token (optional)").fill("ghp_not-a-real-token")
    page.get_by_role("button", name="Create workspace").click()
    expect(page.get_by_text("hello is being made.")).to_be_visible()
    expect(page.locator("tr[data-workspace]", has_text="octo/hello.git")).to_contain_text("(main)")
    expect(page.get_by_label("Access token (optional)")).to_have_value("")
    assert stub.created == [{"name": "scratch"}, {"name": "hello", "source": "git", "branch": "main",
                                                  "repo_url": "https://github.com/octo/hello.git",
                                                  "git_token": "ghp_not-a-real-token"}]
    assert stub.uploads == [("project", "application/gzip", b"\x1f\x8b tarball")]
    assert "ghp_not-a-real-token" not in page.content()
    shot(page, "11-workspaces")

    # Download (fetched with the token, saved under the server's name), pause, delete.
    with page.expect_download() as download:
        row.get_by_role("button", name="Download demo").click()
    assert download.value.suggested_filename == "demo.tar.gz"
    assert Path(download.value.path()).read_bytes() == stub.archive
    row.get_by_role("button", name="Pause demo").click()
    expect(row.locator("[data-state]")).to_have_attribute("data-state", "paused")
    scratch.get_by_role("button", name="Delete scratch").click()
    expect(scratch).to_have_count(0)

    # The workspace's page: its conversation as a thread, the turn's events, changed files and diff.
    row.get_by_role("link", name="demo").click()
    expect(page).to_have_url(f"{server.url}/app/workspaces/{demo['id']}")
    expect(page.get_by_role("heading", name="demo", exact=True)).to_be_visible()
    turn = page.locator(f'li.turn[data-run="{first["id"]}"]')
    expect(turn.locator(".prompt")).to_have_text("Write hello to notes.txt and delete old.txt.")
    expect(turn.get_by_role("log")).to_contain_text("Noted, and old.txt is gone.")
    expect(turn.get_by_role("log")).to_contain_text("echo hello world > notes.txt")
    expect(turn.locator('li[data-path="notes.txt"]')).to_contain_text("added")
    expect(turn.locator('li[data-path="old.txt"]')).to_contain_text("deleted")
    expect(turn.locator('li[data-path="logo.png"]')).to_contain_text("(binary)")
    diff = turn.locator("pre.diff")
    expect(diff.locator("[data-line=add]")).to_have_text(["+hello world", """+<img src=x onerror="document.title='pwned'">"""])
    expect(diff.locator("[data-line=del]")).to_have_text(["--- bye"])  # a removed line, not a file header
    expect(diff.locator("[data-line=file]")).to_have_count(2)
    expect(diff.locator("[data-line=hunk]")).to_have_count(2)
    assert diff.locator("img").count() == 0 and "pwned" not in page.title()  # text, never markup
    assert page.evaluate("""() => getComputedStyle(document.querySelector("pre.diff [data-line=add]")).backgroundColor""") \
        != page.evaluate("""() => getComputedStyle(document.querySelector("pre.diff [data-line=del]")).backgroundColor""")
    shot(page, "12-workspace-thread")

    # A follow-up on that conversation: its provider is the conversation's; the new turn streams in.
    stub.next_turn = Turn(events=[{"type": "text", "text": "You asked me to write hello."},
                                  {"type": "done", "usage": {"output_tokens": 4}}])
    page.get_by_role("button", name="Follow up on conversation 1").click()
    expect(page.get_by_label("Provider")).to_be_disabled()
    page.get_by_label("Prompt").fill("What did I ask you to write?")
    page.get_by_role("button", name="Send").click()
    second = page.locator("li.turn").nth(1)
    expect(second.get_by_role("log")).to_contain_text("You asked me to write hello.")
    expect(second.locator(".run-status [data-status]")).to_have_attribute("data-status", "succeeded")
    expect(second.locator("[data-changes=none]")).to_have_text("No files changed.")
    conversation = stub.conversations[demo["id"]][0]["id"]
    assert stub.asked[-1] == {"provider": "claude_code", "prompt": "What did I ask you to write?",
                              "conversation_id": conversation}
    expect(page.locator("article.conversation")).to_have_count(1)

    # A new conversation on the same workspace.
    stub.next_turn = Turn(events=[{"type": "text", "text": "Started over."}, {"type": "done"}],
                          changes=[{"path": "notes.txt", "status": "modified", "binary": False}],
                          patch="diff --git a/notes.txt b/notes.txt\n@@ -1 +1 @@\n-hello world\n+hi\n")
    page.get_by_label("Conversation", exact=True).select_option("")
    page.get_by_label("Prompt").fill("Say hi instead.")
    page.get_by_role("button", name="Send").click()
    expect(page.locator("article.conversation")).to_have_count(2)
    latest = page.locator("article.conversation").nth(1)
    expect(latest.locator("pre.diff [data-line=add]")).to_have_text(["+hi"])
    assert stub.asked[-1] == {"provider": "claude_code", "prompt": "Say hi instead.", "workspace_id": demo["id"]}
    expect(page.get_by_label("Conversation", exact=True)).to_have_value(stub.conversations[demo["id"]][1]["id"])
    assert stub.unauthenticated == []
    shot(page, "13-workspace-follow-up")


def test_workspace_terminal_types_resizes_reconnects_and_closes(page: Page, server: LiveServer) -> None:
    if not vendor_installed("xterm") or not vendor_installed("xterm-addon-fit"):
        unmet("xterm.js is not vendored on this machine: run `polydev web vendor` (scripts/test.sh does)")
    stub = WorkspaceApi(server.admin_token)
    demo = stub.add_workspace("demo")
    stub.install(page)
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    sign_in(page, server.url, server.admin_token)
    page.goto(f"{server.url}/app/workspaces/{demo['id']}")
    page.get_by_role("button", name="Open terminal").click()
    status = page.locator("[data-terminal]")
    expect(status).to_have_attribute("data-terminal", "open")
    screen = page.locator(".term-screen .xterm-rows")
    expect(screen).to_contain_text("workspace:/workspace$")
    url = stub.shell.urls[-1]
    assert url.startswith(f"ws://127.0.0.1:{server.url.rsplit(':', 1)[1]}/api/workspaces/{demo['id']}/terminal?ticket=ticket-1&")
    assert re.search(r"&rows=\d+&cols=\d+$", url) and server.admin_token not in url
    # xterm's own styles apply under the page's policy (its theme: white text on black).
    assert page.evaluate("getComputedStyle(document.querySelector('.xterm-rows')).color") == "rgb(255, 255, 255)"

    page.locator(".term-screen").click()
    page.keyboard.type("echo hello-terminal")
    page.keyboard.press("Enter")
    expect(screen).to_contain_text("hello-terminal$")  # the answer line, then the prompt
    expect(screen.locator("div", has_text=re.compile(r"^hello-terminal\s*$"))).to_have_count(1)
    assert bytes(stub.shell.keys) == b"echo hello-terminal\r"
    shot(page, "14-workspace-terminal")

    # A resize is a JSON text frame with the new size.
    before = [c for c in stub.shell.controls if c["type"] == "resize"]
    page.set_viewport_size({"width": 800, "height": 860})
    resizes = lambda: [c for c in stub.shell.controls if c["type"] == "resize"]  # noqa: E731
    until(page, lambda: len(resizes()) > len(before), "a resize message")
    assert resizes()[-1]["cols"] < before[-1]["cols"] and resizes()[-1]["rows"] == before[-1]["rows"], resizes()

    # The shell exits: said, with Reconnect; a refusal is said with the server's reason; then it connects again.
    page.keyboard.type("exit")
    page.keyboard.press("Enter")
    expect(status).to_have_attribute("data-terminal", "ended")
    expect(status).to_have_text("The shell exited.")
    stub.shell.refuse = (4409, "a turn is running on the workspace")
    page.get_by_role("button", name="Reconnect").click()
    expect(status).to_have_text("The workspace is busy or unavailable. a turn is running on the workspace")
    stub.shell.refuse = None
    page.get_by_role("button", name="Reconnect").click()
    expect(status).to_have_attribute("data-terminal", "open")
    assert stub.tickets == 3  # a fresh single-use ticket each time

    # Closing the panel closes the socket; the workspace stays.
    page.get_by_role("button", name="Close terminal").click()
    expect(page.get_by_role("button", name="Open terminal")).to_be_visible()
    expect(page.locator(".term-screen")).to_be_hidden()
    # (the first: the shell's exit; the second: the page's close)
    until(page, lambda: stub.shell.closes == [1000, 1000], "the page to close the socket")
    assert demo["id"] in stub.workspaces
    assert page.evaluate("document.adoptedStyleSheets.length") == 0
    assert errors == []
