"""Workspaces in the dashboard, in a real browser (Debian's Chromium under Playwright) against a `polydev serve`
booting real VMs (the `test` image, with the real Claude Code CLI) wired to the stand-ins through the egress
gateway (tests/support/vm_login_stand.py): create a workspace from the Workspaces view, ask Claude to write a
file and see the turn stream in with its changed file and diff, ask a follow-up in the same conversation (the
CLI resumes its session: the stand-in model is sent the first turn), then open the terminal on the workspace's
VM and run commands in it, see the shell's exit and reconnect, and delete the workspace.

The account is connected over the API first (the dashboard's login is test_dashboard_vm.py's). The same flow
over the API alone, for all three CLIs, is test_provider_flows_vm.py's
test_a_conversation_continues_the_cli_session_on_a_workspace; the views against a stand-in API are
tests/e2e/test_dashboard.py's."""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
from collections.abc import Iterator
from urllib.parse import parse_qs, urlparse

import pytest

from polydev.client import PolydevClient
from polydev.config import Settings
from polydev.vm import images
from polydev.web.vendor import installed
from tests.standins import api as standin_api
from tests.standins import clis, oauth
from tests.support.dashboard_browser import artifacts_dir, launch, sign_in
from tests.support.required import import_module, unmet
from tests.support.vm_login_stand import VmStand, vm_stand

# Not pytest.importorskip: under POLYDEV_REQUIRE_SERVERS=1 a missing Playwright fails the run.
import_module("playwright", "pip install -e '.[test]'")
from playwright.sync_api import Browser, Page, expect

pytest_plugins = ["tests.support.vm_fixtures"]

ART = artifacts_dir()
# Bounds on hangs under software emulation (a VM boot, a CLI's start under TCG), not measurements.
WAIT_MS = 600_000
expect.set_options(timeout=60_000)  # the steps between the long waits, on a loaded machine


def _host_missing() -> str | None:
    for tool in ("qemu-system-x86_64", "qemu-img", "socat"):
        if shutil.which(tool) is None:
            return f"{tool} is not installed (VM tests need QEMU, and socat for the egress gateway's forward)"
    if os.geteuid() != 0:
        return "the stand-ins' TLS front listens on port 443 of a loopback address, which needs root"
    if not installed(Settings(), "xterm") or not installed(Settings(), "xterm-addon-fit"):
        return "xterm.js is not vendored on this machine: run `polydev web vendor` (scripts/test.sh does)"
    return None


@pytest.fixture(scope="module")
def stand(tmp_path_factory: pytest.TempPathFactory, test_image: images.Image) -> Iterator[VmStand]:
    reason = _host_missing()
    if reason:
        unmet(reason)
    # The test image (the CLIs, no login browser): the login is played over the API, by pasting the code.
    yield from vm_stand(tmp_path_factory.mktemp("dashboard-workspaces"), VM_IMAGE_PROFILE="test",
                        LOGIN_BROWSER="off", VM_CLI_MEMORY_MB="2048", VM_CLI_VCPU="1",
                        POLYDEV_CACHE_DIR=str(test_image.dir.parent.parent))


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    yield from launch()  # type: ignore[misc]


def _connect_claude(stand: VmStand) -> None:
    """The admin's Claude Code account, connected as a user would by pasting the code Claude's page shows."""
    with PolydevClient(stand.server.url, stand.server.admin_token, timeout=120) as pd:
        session = pd.start_login("claude_code")
        waiting = pd.wait_session(session["session_id"], timeout=WAIT_MS / 1000)
        assert waiting["status"] == "awaiting_user_auth", waiting
        state = parse_qs(urlparse(waiting["auth_url"]).query)["state"][0]
        pd.submit_code(session["session_id"], f"{stand.standins.oauth.new_code(oauth.CLAUDE)}#{state}")
        done = pd.wait_session(session["session_id"], until=("completed",), timeout=WAIT_MS / 1000)
        assert done["status"] == "completed", done
        assert "claude_code" in {c["provider"] for c in pd.credentials()}


def _run_in_terminal(page: Page, command: str) -> None:
    page.locator(".term-screen").click()
    page.keyboard.type(command)
    page.keyboard.press("Enter")


def test_workspace_conversation_diff_follow_up_and_terminal(stand: VmStand, browser: Browser) -> None:
    _connect_claude(stand)
    nonce = "remember-" + secrets.token_hex(6)
    name = f"demo-{secrets.token_hex(3)}"
    context = browser.new_context(viewport={"width": 1280, "height": 1000})
    context.set_default_timeout(60_000)
    page = context.new_page()
    page.on("dialog", lambda dialog: dialog.accept())  # the confirm() before Delete
    errors: list[str] = []
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    try:
        # Create: the workspace's VM starts and its /workspace becomes a git repository.
        sign_in(page, stand.server.url, stand.server.admin_token)
        page.get_by_role("link", name="Workspaces").click()
        page.get_by_label("Name", exact=True).fill(name)
        page.get_by_role("button", name="Create workspace").click()
        row = page.locator("tr[data-workspace]", has_text=name)
        expect(row.locator("[data-state]")).to_have_attribute("data-state", "ready", timeout=WAIT_MS)
        page.screenshot(path=str(ART / "vm-ws-01-list.png"), full_page=True)
        row.get_by_role("link", name=name).click()
        expect(page.get_by_role("heading", name=name)).to_be_visible()

        # Ask: Claude runs a shell command that writes the file; the turn streams, then its change and diff.
        stand.standins.api.script = standin_api.Script(tool=clis.claude_shell_tool(f"echo {nonce} > notes.txt"),
                                                       final_text="Noted: {tool_output}")
        page.get_by_label("Provider").select_option("claude_code")
        page.get_by_label("Prompt").fill(f"Remember the word {nonce} and write it to notes.txt.")
        page.get_by_role("button", name="Send").click()
        first = page.locator("li.turn").first
        expect(first.locator(".run-status [data-status]")).to_have_attribute("data-status", "succeeded",
                                                                             timeout=WAIT_MS)
        expect(first.get_by_role("log")).to_contain_text(f"echo {nonce} > notes.txt")  # the tool call
        expect(first.get_by_role("log")).to_contain_text("Noted:")
        expect(first.locator('li[data-path="notes.txt"]')).to_contain_text("added")
        diff = first.locator("pre.diff")
        expect(diff.locator("[data-line=file]")).to_have_text(["diff --git a/notes.txt b/notes.txt"])
        expect(diff.locator("[data-line=add]")).to_have_text([f"+{nonce}"])
        page.screenshot(path=str(ART / "vm-ws-02-turn.png"), full_page=True)

        # A follow-up in the same conversation: the CLI resumes its session, so the model sees the first turn.
        asked = len(stand.standins.api.model_turns())
        stand.standins.api.script = standin_api.Script(text="You asked me to remember a word.")
        page.get_by_role("button", name="Follow up on conversation 1").click()
        expect(page.get_by_label("Provider")).to_be_disabled()
        page.get_by_label("Prompt").fill("Which word did I ask you to remember?")
        page.get_by_role("button", name="Send").click()
        second = page.locator("li.turn").nth(1)
        expect(second.locator(".run-status [data-status]")).to_have_attribute("data-status", "succeeded",
                                                                              timeout=WAIT_MS)
        expect(second.get_by_role("log")).to_contain_text("You asked me to remember a word.")
        expect(second.locator("[data-changes=none]")).to_have_text("No files changed.")
        expect(page.locator("article.conversation")).to_have_count(1)
        follow_up = stand.standins.api.model_turns()[asked:]
        assert follow_up and nonce in json.dumps(follow_up[-1].body)
        page.screenshot(path=str(ART / "vm-ws-03-follow-up.png"), full_page=True)

        # The terminal: a shell in the workspace's VM, in /workspace, where the turn's file is.
        page.get_by_role("button", name="Open terminal").click()
        status = page.locator("[data-terminal]")
        expect(status).to_have_attribute("data-terminal", "open", timeout=WAIT_MS)
        screen = page.locator(".term-screen .xterm-rows")
        _run_in_terminal(page, "cd /workspace && cat notes.txt && echo sum=$((6*7))")
        expect(screen).to_contain_text("sum=42", timeout=WAIT_MS)
        expect(screen.locator("div", has_text=re.compile(rf"^{nonce}\s*$"))).to_have_count(1)  # cat's output
        page.screenshot(path=str(ART / "vm-ws-04-terminal.png"), full_page=True)
        _run_in_terminal(page, "exit")
        expect(status).to_have_text("The shell exited.")  # the server's 1000, not a dropped socket
        expect(status).to_have_attribute("data-terminal", "ended")
        page.get_by_role("button", name="Reconnect").click()
        expect(status).to_have_attribute("data-terminal", "open", timeout=WAIT_MS)
        _run_in_terminal(page, "echo again-$((1+1))")
        expect(screen).to_contain_text("again-2", timeout=WAIT_MS)
        page.get_by_role("button", name="Close terminal").click()
        expect(page.get_by_role("button", name="Open terminal")).to_be_visible()

        # Deleting it from its page goes back to the list, without it.
        page.get_by_role("button", name="Delete", exact=True).click()
        expect(page).to_have_url(f"{stand.server.url}/app/workspaces")
        expect(page.locator("tr[data-workspace]", has_text=name)).to_have_count(0)
        assert errors == []
    finally:
        page.screenshot(path=str(ART / "vm-ws-05-end.png"), full_page=True)
        context.close()
    with PolydevClient(stand.server.url, stand.server.admin_token) as pd:
        assert pd.workspaces() == []
