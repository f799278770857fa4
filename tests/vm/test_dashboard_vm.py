"""The issue's "Done when", in a real browser against real VMs: sign in, Connect Claude Code, see the login page
from inside the VM drawn in the noVNC canvas, approve it by clicking in the canvas (the VM's Chromium, driven
over VNC), which sends the VM's browser to the CLI's localhost callback (or to Claude's code page, whose code
the test pastes), see the provider connected, run a prompt and see the streamed answer. The click is required:
if none reaches the VM's browser within its bound the test fails (a broken VNC input path must not pass by
pasting instead). Pasting the code with the VM's page on screen is a test of its own. Stand-ins play the
provider (tests/support/vm_login_stand.py); the full image is needed."""

from __future__ import annotations

import base64
import re
import secrets
import time
from collections.abc import Iterator
from urllib.parse import parse_qs, urlparse

import pytest

from polydev.client import PolydevClient
from tests.standins import api as standin_api
from tests.standins import oauth
from tests.standins.vm import provider_hosts
from tests.standins.signin import BANNER_RGB, BUTTON_RGB
from tests.support.dashboard_browser import (
    artifacts_dir,
    canvas_colours,
    launch,
    sign_in,
    wait_for_colour,
)
from tests.support.required import import_module, unmet
from tests.support.vm_login_stand import VmStand, full_image_missing, vm_stand

# Not pytest.importorskip: under POLYDEV_REQUIRE_SERVERS=1 a missing Playwright fails the run.
import_module("playwright", "pip install -e '.[test]'")
from playwright.sync_api import Browser, Locator, Page, expect

ART = artifacts_dir()
# Bounds on hangs under software emulation, not measurements (bench/login_visible.py measures).
WAIT_MS = 600_000
CLICK_WAIT_S = 180
expect.set_options(timeout=60_000)  # the steps between the long waits, on a loaded machine


@pytest.fixture(scope="module")
def stand(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VmStand]:
    reason = full_image_missing()
    if reason:
        unmet(reason)
    yield from vm_stand(tmp_path_factory.mktemp("dashboard-vm"))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from launch()  # type: ignore[misc]


CONNECT = re.compile(r"^(Connect|Reconnect)$")  # "Reconnect" once an earlier test stored the credential


def _open_login(stand: VmStand, page: Page, shot: str) -> Locator:
    """Sign in, Connect Claude Code, and wait for the VM's sign-in page in the noVNC canvas; the canvas."""
    server = stand.server
    sign_in(page, server.url, server.admin_token)
    page.locator('section[data-provider="claude_code"]').get_by_role("button", name=CONNECT).click()
    page.wait_for_url(re.compile(r"/app/providers/claude_code/login/[0-9a-f-]{36}$"))
    # The login page, drawn by the VM's Chromium, in the noVNC canvas: its banner colour is there, and the
    # canvas is not one flat colour.
    canvas = page.locator(".vnc canvas")
    expect(canvas).to_be_visible(timeout=WAIT_MS)
    wait_for_colour(page, BANNER_RGB, 2000, WAIT_MS)
    wait_for_colour(page, BUTTON_RGB, 10000, WAIT_MS)  # drawn down to its button
    expect(page.locator("p.status")).to_have_attribute("data-status", "awaiting_user_auth")
    assert canvas_colours(page) > 2
    # The VM's Chromium got the page through the egress gateway (its only way out) from the sign-in host.
    assert "claude.com" in stand.standins.front.log.hosts()
    # The canvas's own pixels, and the viewport as it is: a full-page or element screenshot resizes or
    # scrolls the page under noVNC, after which clicks in the canvas were seen not to reach the VM.
    png = page.evaluate("document.querySelector('.vnc canvas').toDataURL('image/png')")
    (ART / f"{shot}-canvas.png").write_bytes(base64.b64decode(png.split(",", 1)[1]))
    page.screenshot(path=str(ART / f"{shot}-login-canvas.png"))
    return canvas


def _paste_and_finish(page: Page, code: str, state: str) -> None:
    """Claude's hosted page shows `code#state`; the user pastes it, and the login completes."""
    page.get_by_label("Paste the code the sign-in page shows").fill(f"{code}#{state}")
    page.get_by_role("button", name="Send").click()
    _connected(page)


def _connected(page: Page) -> None:
    expect(page.locator("p.status")).to_have_attribute("data-status", "completed", timeout=WAIT_MS)
    expect(page.locator(".vnc")).to_be_hidden()  # the bridge closed with the session
    page.get_by_role("link", name="Providers", exact=True).click()
    expect(page.locator('section[data-provider="claude_code"] .state')).to_have_text(
        "Connected: connected via OAuth")


def test_login_by_clicking_in_the_canvas_then_a_run(stand: VmStand, browser: Browser) -> None:
    nonce = secrets.token_hex(4)
    stand.standins.api.script = standin_api.Script(text=f"Hello from the stand-in model, {nonce}.")
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.set_default_timeout(60_000)
    page = context.new_page()
    try:
        canvas = _open_login(stand, page, "vm-01")
        # Approve on the provider's page by clicking its button in the canvas: the click travels over VNC.
        box = canvas.bounding_box()
        assert box is not None
        before = stand.sign_in.last(oauth.CLAUDE)  # only an approval made by this test's click counts
        deadline = time.monotonic() + CLICK_WAIT_S
        x, y = box["x"] + box["width"] * 0.5, box["y"] + box["height"] * 0.4
        while (approval := stand.sign_in.last(oauth.CLAUDE)) is before and time.monotonic() < deadline:
            # As a person clicks: point, press, release. A press and release in the same instant can reach
            # an emulated guest's Chromium as one X event batch that it does not take for a click.
            page.mouse.move(x, y)
            page.wait_for_timeout(300)
            page.mouse.down()
            page.wait_for_timeout(150)
            page.mouse.up()
            page.wait_for_timeout(5000)
        if approval is before or approval is None:
            # The click is what this test is for: a broken VNC input path must not pass by pasting instead
            # (test_login_by_pasting_the_code covers the paste path on its own).
            page.screenshot(path=str(ART / "vm-02-no-click.png"))
            pytest.fail(f"no click in the noVNC canvas reached the VM's browser in {CLICK_WAIT_S} s")
        # The VM's browser followed the redirect: the sign-in page is gone.
        wait_for_colour(page, BANNER_RGB, 0, WAIT_MS, at_most=True)
        page.screenshot(path=str(ART / "vm-02-after-authorize.png"), full_page=True)
        if approval.redirect_uri.startswith("http://localhost"):
            _connected(page)  # the CLI's own localhost callback: the browser in the VM finished the login
        else:
            _paste_and_finish(page, approval.code, approval.state)
        page.screenshot(path=str(ART / "vm-03-connected.png"), full_page=True)

        # A run in a fresh VM with the stored credential: the stand-in model's answer streams in.
        page.get_by_role("link", name="Run", exact=True).click()
        page.get_by_label("Prompt").fill("Say hello.")
        page.get_by_role("button", name="Send").click()
        output = page.get_by_role("log", name="Output")
        expect(output).to_contain_text(nonce, timeout=WAIT_MS)
        expect(page.locator(".run-status [data-status]")).to_have_attribute("data-status", "succeeded",
                                                                            timeout=WAIT_MS)
        page.screenshot(path=str(ART / "vm-04-run.png"), full_page=True)
    finally:
        context.close()
    _only_provider_hosts(stand)


def _only_provider_hosts(stand: VmStand) -> None:
    """The login's Chromium and the run's CLI went out only to the provider's hosts: no browser sign-in,
    sync, update or metrics call (accounts.google.com and the like) reached the gateway, allowed or refused.
    The gateway writes its accounting every few seconds, so the last of it is waited for."""
    pinned = set(provider_hosts())
    deadline = time.monotonic() + 30
    with PolydevClient(stand.server.url, stand.server.admin_token) as pd:
        while True:
            rows = pd.egress_usage(all_users=True)
            if any(r["host"] == "claude.com" for r in rows) or time.monotonic() > deadline:
                break
            time.sleep(2)
    hosts = {r["host"]: r for r in rows}
    assert "claude.com" in hosts
    assert set(hosts) <= pinned, f"the VMs called hosts that are not the provider's: {set(hosts) - pinned}"
    assert not [r for r in rows if r["refusals"]], rows


def test_login_by_pasting_the_code(stand: VmStand, browser: Browser) -> None:
    """The paste path with the VM's page on screen: the user copies the code from the provider's page (here
    issued by the stand-in, as its page would show it) instead of anything travelling over VNC."""
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.set_default_timeout(60_000)
    page = context.new_page()
    try:
        _open_login(stand, page, "vm-paste-01")
        session_id = page.url.rstrip("/").rsplit("/", 1)[1]
        with PolydevClient(stand.server.url, stand.server.admin_token) as pd:
            auth_url = pd.session(session_id)["auth_url"]
        state = parse_qs(urlparse(auth_url).query)["state"][0]
        _paste_and_finish(page, stand.sign_in.oauth_state.new_code(oauth.CLAUDE), state)
        page.screenshot(path=str(ART / "vm-paste-02-connected.png"), full_page=True)
    finally:
        context.close()
