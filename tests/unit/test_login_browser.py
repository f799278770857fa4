"""The login browser's guest side as data: the hook (still records every URL exactly as before; shows http(s)
URLs only when asked), the commands (the VNC server wants the login's password, from a file; proxy passed on), and
when the setting turns it on."""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from polydev.config import Settings
from polydev.core import rfb
from polydev.core.login_browser import VNC_PORT, LoginBrowser
from polydev.providers.base import GuestEnv, hook_files
from polydev.services import Services
from polydev.vm import network
from polydev.vm.types import EngineInfo
from tests.support.rfb_server import password_from_file

# The hook as it was before the login browser: every login without one must keep getting exactly this.
RECORDER = (b"#!/bin/sh\n# Polydev login helper: record the URL the CLI wants opened.\n"
            b"for u in \"$@\"; do printf '%s\\n' \"$u\" >> '/run/polydev/login/urls'; done\nexit 0\n")


def test_without_a_browser_the_hook_is_the_recorder_unchanged() -> None:
    browser, xdg = hook_files(GuestEnv())
    assert browser.data == RECORDER and xdg.data == RECORDER
    assert browser.mode == 0o755 and xdg.path == "/run/polydev/login/bin/xdg-open"


def test_with_a_browser_the_hook_records_then_opens_http_urls_only(tmp_path: Path) -> None:
    env = GuestEnv(login_dir=str(tmp_path / "login"))
    Path(env.login_dir).mkdir()
    opened = tmp_path / "opened"
    record = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')"
    opener = LoginBrowser(opener_argv=(sys.executable, "-c", record, str(opened), "{url}")).hook_opener(env)
    script = hook_files(env, opener)[0]
    assert script.data.startswith(RECORDER.replace(b"/run/polydev/login", env.login_dir.encode())[:-len(b"exit 0\n")])
    hook = tmp_path / "browser-open"
    hook.write_bytes(script.data)
    hook.chmod(0o755)
    url = "https://auth.example.test/authorize?a=1&b=$(touch /tmp/pwned)"
    subprocess.run([str(hook), url, "file:///etc/passwd"], check=True, timeout=30)
    assert Path(env.urls_file).read_text() == f"{url}\nfile:///etc/passwd\n"
    deadline = time.monotonic() + 30  # the opener runs detached: wait for its line
    while not opened.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert opened.read_text() == url + "\n"  # the URL verbatim, and the file: URL never opened


def test_vnc_server_wants_the_logins_password_from_a_file_the_flow_puts() -> None:
    browser, env, password = LoginBrowser(), GuestEnv(), rfb.new_password()
    argv = browser.vnc_server(env).argv
    assert argv[:2] == ["Xtigervnc", ":1"]
    assert argv[argv.index("-rfbport") + 1] == "5901" and VNC_PORT == network.VNC_PORT
    # VncAuth alone (the port is reachable by any local user), with the password in a file, never in argv.
    assert argv[argv.index("-SecurityTypes") + 1] == "VncAuth" and "-nolisten" in argv
    path = argv[argv.index("-PasswordFile") + 1]
    assert path == "/run/polydev/login/vnc-password"
    (file,) = [f for f in browser.files(env, password) if f.path == path]
    assert password_from_file(file.data) == password and file.mode == 0o600
    assert not any(password.decode() in a or file.data.hex() in a for a in argv)


def test_chromium_is_a_kiosk_with_its_profile_in_tmp_and_the_platform_proxy() -> None:
    env = GuestEnv(https_proxy="http://10.0.2.100:3128", no_proxy="127.0.0.1,localhost")
    cmd = LoginBrowser().idle_browser(env)
    assert cmd.argv[0] == "chromium" and "--kiosk" in cmd.argv and "--no-sandbox" in cmd.argv
    assert "--user-data-dir=/tmp/polydev-chromium" in cmd.argv and cmd.env["DISPLAY"] == ":1"
    assert "--proxy-server=http://10.0.2.100:3128" in cmd.argv
    assert "--proxy-bypass-list=127.0.0.1;localhost" in cmd.argv
    assert not any(a.startswith("--proxy") for a in LoginBrowser().chromium_argv(GuestEnv()))


def test_chromium_policy_trusts_the_platform_ca_and_saves_no_passwords(tmp_path: Path) -> None:
    from tests.standins.tls import TestCA

    ca = TestCA(tmp_path / "ca")
    opener, policy, _ = LoginBrowser().files(GuestEnv(), b"pw", ca.cert_path.read_bytes())
    assert opener.path == "/run/polydev/login/open-url.py" and policy.path.startswith("/etc/chromium/policies/managed/")
    doc = json.loads(policy.data)
    assert doc["PasswordManagerEnabled"] is False
    # Chromium's own calls home are off: no sign-in, sync, metrics, suggestions or Safe Browsing lookups.
    assert doc["BrowserSignin"] == 0 and doc["SyncDisabled"] is True and doc["MetricsReportingEnabled"] is False
    assert doc["SearchSuggestEnabled"] is False and doc["SafeBrowsingProtectionLevel"] == 0
    der = x509.load_pem_x509_certificate(ca.cert_path.read_bytes()).public_bytes(serialization.Encoding.DER)
    assert doc["CACertificates"] == [base64.b64encode(der).decode()]
    assert "CACertificates" not in json.loads(LoginBrowser().files(GuestEnv(), b"pw")[1].data)


def _services(mode: str, packages: dict[str, object] | None) -> Services:
    # The engine as the services see it: its description, with the image's packages (none: no manifest).
    info = EngineInfo(backend="fake", accel=None, network_mode="user", image_packages=frozenset(packages or ()))
    svc = Services.__new__(Services)
    svc.settings = Settings(login_browser=mode)  # type: ignore[call-arg]
    svc.engine = SimpleNamespace(describe=lambda: info)  # type: ignore[assignment]
    return svc


@pytest.mark.parametrize(("mode", "packages", "on"), [
    ("auto", {"chromium": {}, "python3": {}}, True),  # the full image
    ("auto", {"python3": {}}, False),  # the test image
    ("auto", None, False),  # a backend without an image manifest
    ("on", {"python3": {}}, True),
    ("off", {"chromium": {}}, False),
])
def test_login_browser_setting(mode: str, packages: dict[str, object] | None, on: bool) -> None:
    assert (_services(mode, packages).login_browser() is not None) is on
