"""The login browser: Xtigervnc on display :1 and Chromium in kiosk mode inside a login VM.

Only login sessions run it (a `browser` VM, full image). The flow starts both through the agent's exec right
after the VM is up, in parallel with the CLI: Chromium takes many seconds to start on an emulated CPU, so it
starts at once on a placeholder page, and the `$BROWSER` hook later points it at the login URL through
Chromium's DevTools HTTP endpoint (guest loopback only). The control plane reaches the VNC server through
the VM's forwarded VNC port (see `VMEngine.vnc_endpoint`) and bridges it to the user's WebSocket; the server
asks for the login's own password (core/rfb.py), which only the control plane has.

No desktop environment and no window manager: Chromium's kiosk window fills the X screen by itself.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import re
from dataclasses import dataclass

from polydev.core.rfb import password_file
from polydev.providers.base import LOGIN_DISPLAY, Command, GuestEnv, GuestFile

VNC_PORT = 5901  # inside the guest: 5900 + display number
GEOMETRY = (1280, 800)
DEVTOOLS_PORT = 9222  # Chromium's DevTools, bound to the guest's 127.0.0.1 only (Chromium's default)
# Chromium's managed policies: how it learns the platform's extra CA (Chromium reads its own trust settings,
# not the CA file the CLIs use) and what it must not do in a disposable login VM.
POLICY_PATH = "/etc/chromium/policies/managed/polydev.json"
PROFILE_DIR = "/tmp/polydev-chromium"  # /tmp is a tmpfs in the guest: nothing of the profile reaches disk
_NOWHERE = "http://127.0.0.1:9"  # the discard port on the guest's loopback: nothing listens there
RFB_BANNER_PREFIX = b"RFB 003."
PLACEHOLDER = ("data:text/html,<title>Polydev</title><body style='font:28px sans-serif;margin:3em'>"
               "Opening the sign-in page%E2%80%A6</body>")

# The opener the hook runs (detached) for each URL: wait for the idle Chromium's DevTools, open the URL as a
# new page, bring it to the front and close the others, so the kiosk window shows just the login page.
# Python's standard library only: the guest has no curl. If no Chromium answers in time it starts one.
OPENER = r'''import json, subprocess, sys, time, urllib.parse, urllib.request
url, devtools, deadline = sys.argv[1], "http://127.0.0.1:%d" % int(sys.argv[2]), time.monotonic() + float(sys.argv[3])
def call(path, method="GET"):
    req = urllib.request.Request(devtools + path, method=method)
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read() or b"null") if path.startswith("/json/new") or path == "/json/list" else None
while True:
    try:
        old = [t["id"] for t in call("/json/list") if t.get("type") == "page"]
        break
    except OSError:
        if time.monotonic() > deadline:
            subprocess.Popen(sys.argv[4:] + [url], stdin=subprocess.DEVNULL, start_new_session=True)
            sys.exit(0)
        time.sleep(0.2)
new = call("/json/new?" + urllib.parse.quote(url, safe=""), "PUT")
call("/json/activate/" + new["id"])
for target in old:
    call("/json/close/" + target)
'''


@dataclass(frozen=True)
class LoginBrowser:
    """How the login browser runs in the guest. The commands are data so tests can swap in stand-ins."""

    vnc_port: int = VNC_PORT
    devtools_port: int = DEVTOOLS_PORT
    open_wait_s: float = 240.0  # how long the opener waits for the idle Chromium before starting its own
    policy_path: str = POLICY_PATH
    # Stand-ins (tests, whose "guest" is the host): empty means Xtigervnc / Chromium / the opener below.
    server_argv: tuple[str, ...] = ()
    browser_argv: tuple[str, ...] = ()
    opener_argv: tuple[str, ...] = ()

    def opener_path(self, env: GuestEnv) -> str:
        return f"{env.login_dir}/open-url.py"

    def password_path(self, env: GuestEnv) -> str:
        return f"{env.login_dir}/vnc-password"  # /run is a tmpfs in the guest

    def vnc_server(self, env: GuestEnv) -> Command:
        width, height = GEOMETRY
        argv = list(self.server_argv) or [
            "Xtigervnc", LOGIN_DISPLAY, "-geometry", f"{width}x{height}", "-depth", "24",
            "-rfbport", str(self.vnc_port),
            # Listening on the guest's interface (not just its loopback) so QEMU's host forward reaches it;
            # but that forward is a 127.0.0.1 port any local user can open (tap mode: the slot's address any
            # local process can route to), so the server wants the login's password, which only the control
            # plane holds: the bridge authenticates with it behind the user's ticket (core/rfb.py). The file
            # is put by the agent before the server starts (files()); Xtigervnc reads it at each connection.
            "-SecurityTypes", "VncAuth", "-PasswordFile", self.password_path(env), "-localhost", "no",
            # Every connection comes from one address (the host, through QEMU or the slot), so TigerVNC's
            # blacklist (5 unauthenticated or failed connections: readiness probes, anyone guessing) would
            # lock the bridge out. A blacklist timeout of 0 lets every connection try; a guess per connection
            # does not get through VncAuth's 2^55 keys in a login's lifetime.
            "-BlacklistTimeout", "0",
            "-nolisten", "tcp",  # no X11 over TCP: X clients connect through the Unix socket only
            "-AlwaysShared", "-desktop", "Polydev sign-in"]
        # cwd "/": it exists in any guest (the home may not yet); neither program reads relative paths.
        return Command(argv, {"HOME": env.home, "PATH": "/usr/bin:/bin"}, cwd="/")

    def chromium_argv(self, env: GuestEnv) -> list[str]:
        width, height = GEOMETRY
        argv = ["chromium", "--kiosk", "--no-first-run", "--no-default-browser-check",
                # The guest runs everything as root, which Chromium's sandbox refuses; the VM is disposable,
                # holds nothing but this login and is itself the isolation boundary, so no sandbox in it.
                "--no-sandbox",
                "--disable-dev-shm-usage", "--disable-gpu", f"--user-data-dir={PROFILE_DIR}",
                # Fewer processes to start on an emulated CPU: no zygote (it exists for the sandbox), the GPU
                # (software) compositor inside the browser process, one renderer, no extensions.
                "--no-zygote", "--in-process-gpu", "--renderer-process-limit=1", "--disable-extensions",
                "--window-position=0,0", f"--window-size={width},{height}",
                f"--remote-debugging-port={self.devtools_port}",
                # Nothing but the login page goes out: no updates, sync, metrics or prefetching.
                "--disable-background-networking", "--disable-component-update", "--disable-sync",
                "--disable-default-apps", "--disable-breakpad", "--disable-domain-reliability", "--no-pings",
                "--password-store=basic", "--disable-features=Translate,MediaRouter,OptimizationHints",
                # Chromium's push channel (GCM check-in at android.clients.google.com, then a connection to
                # port 5228) and its own Google-account listing (ListAccounts at accounts.google.com) run
                # even with the policies and flags above: their endpoints point at a closed port on the
                # guest's loopback, which no proxy is asked for. Google's sign-in page itself still loads
                # (it is a page like any other to Chromium then).
                f"--gcm-checkin-url={_NOWHERE}/checkin", f"--gcm-registration-url={_NOWHERE}/register",
                f"--gcm-mcs-endpoint={_NOWHERE}", f"--gaia-url={_NOWHERE}"]
        if env.https_proxy:
            # The platform's proxy (the VM has no other way out); Chromium wants ';' between bypass entries.
            bypass = ";".join(h for h in env.no_proxy.split(",") if h)
            argv += [f"--proxy-server={env.https_proxy}", f"--proxy-bypass-list={bypass}"]
        return argv

    def idle_browser(self, env: GuestEnv) -> Command:
        argv = list(self.browser_argv) or [*self.chromium_argv(env), PLACEHOLDER]
        return Command(argv, {"HOME": env.home, "DISPLAY": LOGIN_DISPLAY, "PATH": "/usr/bin:/bin",
                              "LANG": "C.UTF-8", **env.proxy_vars()}, cwd="/")

    def files(self, env: GuestEnv, vnc_password: bytes, ca_pem: bytes | None = None) -> tuple[GuestFile, ...]:
        return (GuestFile(self.opener_path(env), OPENER.encode(), 0o755),
                GuestFile(self.policy_path, json.dumps(chromium_policy(ca_pem)).encode(), 0o644),
                GuestFile(self.password_path(env), password_file(vnc_password), 0o600))

    def hook_opener(self, env: GuestEnv) -> list[str]:
        """The command the hook runs (detached, once per http(s) URL; "{url}" stands for it) to show a URL."""
        if self.opener_argv:
            return list(self.opener_argv)
        return ["python3", self.opener_path(env), "{url}", str(self.devtools_port), str(self.open_wait_s),
                *self.chromium_argv(env)]


def chromium_policy(ca_pem: bytes | None) -> dict[str, object]:
    """Managed policy for the login Chromium: trust the platform's extra CA (the proxy's, GUEST_CA_CERT_FILE),
    never offer to save the user's password, send nothing of its own (metrics, Safe Browsing lookups; no
    browser sign-in or sync, whose account checks and push channel went to accounts.google.com,
    android.clients.google.com and www.google.com through the egress gateway even with the flags' background
    networking off)."""
    policy: dict[str, object] = {"PasswordManagerEnabled": False, "MetricsReportingEnabled": False,
                                 "SafeBrowsingProtectionLevel": 0, "TranslateEnabled": False,
                                 "DefaultBrowserSettingEnabled": False, "BrowserSignin": 0, "SyncDisabled": True,
                                 "SearchSuggestEnabled": False, "NetworkPredictionOptions": 2,
                                 "AlternateErrorPagesEnabled": False, "SpellCheckServiceEnabled": False,
                                 "UrlKeyedAnonymizedDataCollectionEnabled": False, "BackgroundModeEnabled": False,
                                 "ComponentUpdatesEnabled": False, "PromotionalTabsEnabled": False,
                                 "DefaultSearchProviderEnabled": False}
    if ca_pem:
        blocks = re.findall(rb"-----BEGIN CERTIFICATE-----(.+?)-----END CERTIFICATE-----", ca_pem, re.DOTALL)
        # Policy wants base64 DER: the PEM body without its line breaks.
        policy["CACertificates"] = [base64.b64encode(base64.b64decode(b"".join(b.split()))).decode()
                                    for b in blocks]
    return policy


async def rfb_banner(host: str, port: int, timeout: float = 5.0) -> bytes:
    """The first 12 bytes a VNC server sends (`RFB 003.008\\n`). Raises OSError if none arrives: nothing
    listens yet (QEMU's forward accepts and then closes when the guest's port is shut)."""
    reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    try:
        banner = await asyncio.wait_for(reader.readexactly(12), timeout)
    except (asyncio.IncompleteReadError, TimeoutError) as exc:
        raise ConnectionError("no RFB banner") from exc
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()
    if not banner.startswith(RFB_BANNER_PREFIX):
        raise ConnectionError("not a VNC server")
    return banner


async def wait_for_vnc(host: str, port: int, deadline_s: float) -> bytes:
    """Poll until the VNC server answers with its banner; TimeoutError after `deadline_s`."""
    async with asyncio.timeout(deadline_s):
        while True:
            try:
                return await rfb_banner(host, port)
            except OSError:
                await asyncio.sleep(0.1)
