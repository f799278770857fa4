"""The login browser's VNC through the control plane, with the real guest agent as the "VM" (on the host) and a
scripted VNC server as the VM's VNC port (VncAuth with the password file the flow put in the guest, as the
login VM's Xtigervnc): `vnc_url` once it answers, tickets (single use, expiry, owner only), the bridge's RFB
handshakes (VncAuth to the VM, None to the viewer), the WebSocket bridge both ways, and every way a session
ends closing it or refusing it.

The API runs under uvicorn on a loopback port in the test's event loop, so the WebSocket is a real one
(subprotocol negotiation included) and the flows' tasks share the loop with it."""

from __future__ import annotations

import asyncio
import logging
import sys
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from structlog.testing import capture_logs
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from polydev.api.app import create_app
from polydev.core.login_browser import LoginBrowser
from polydev.providers import ADAPTERS
from polydev.services import build_vm_engine, open_services
from polydev.store.sessions import MemorySessionStore
from tests.support.agent_backend import AgentBackend
from tests.support.app import Api, idle_login, make_settings
from tests.support.flow_fakes import FakeAdapter, host_guest_paths
from tests.support.live_asgi import serving
from tests.support.rfb_server import (
    NONE,
    VERSION,
    VNC_AUTH,
    ScriptedVnc,
    password_from_file,
)

# Stand-ins for Xtigervnc and Chromium in a "guest" that is the host: processes that just run until killed.
IDLE = (sys.executable, "-c", "import time; time.sleep(600)")
# Chromium's stand-in notes the display it was given, then idles.
BROWSER = "import os, sys, time; open(sys.argv[1], 'w').write(os.environ['DISPLAY']); time.sleep(600)"
RECORD_URL = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')"


class Stack:
    def __init__(self, api: Api, base: str, vnc: ScriptedVnc, guest_dir: Path) -> None:
        self.api, self.base, self.vnc, self.guest_dir = api, base, vnc, guest_dir

    async def user(self) -> dict[str, str]:
        return self.api.auth((await self.api.new_user())[1])

    async def start_login(self, h: dict[str, str]) -> str:
        r = await self.api.client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h)
        assert r.status_code == 202, r.text
        return r.json()["session_id"]

    async def wait(self, h: dict[str, str], sid: str, until: str) -> dict:
        deadline = asyncio.get_running_loop().time() + 60
        while True:
            r = await self.api.client.get(f"/api/auth/sessions/{sid}", headers=h)
            body = r.json()
            if r.status_code == 200 and (body.get(until) if until == "vnc_url" else body["status"] == until):
                return body
            assert asyncio.get_running_loop().time() < deadline, f"session stuck: {body}"
            await asyncio.sleep(0.05)

    async def ticket(self, h: dict[str, str], sid: str) -> httpx.Response:
        return await self.api.client.post(f"/api/auth/sessions/{sid}/vnc-ticket", headers=h)

    def ws(self, url: str) -> connect:
        return connect(f"ws://{self.base}{url}", subprotocols=["binary"], open_timeout=30)  # type: ignore[list-item]


@pytest.fixture
async def vnc_stack(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Stack]:
    monkeypatch.setitem(ADAPTERS, "claude_code", FakeAdapter())
    settings = make_settings(tmp_path, login_timeout_seconds=60, login_browser="on")
    # The VM's VNC server: VncAuth with the password file the flow put in the "guest", as Xtigervnc.
    fake = ScriptedVnc(tmp_path / "guest" / "login" / "vnc-password")
    address = await fake.start()
    svc = await open_services(settings)
    svc.guest_paths = host_guest_paths(str(tmp_path / "guest"))
    opened = str(tmp_path / "guest" / "opened")
    browser = (sys.executable, "-c", BROWSER, str(tmp_path / "guest" / "browser-display"))
    svc.login_flow._browser = lambda: LoginBrowser(server_argv=IDLE, browser_argv=browser,
                                                   opener_argv=(sys.executable, "-c", RECORD_URL, opened, "{url}"),
                                                   policy_path=str(tmp_path / "guest" / "chromium-policy.json"))
    issued = await svc.users.bootstrap_admin()
    assert issued is not None
    svc.engine = build_vm_engine(svc, lambda _settings: AgentBackend(vnc_endpoint=address))
    async with serving(create_app(services=svc)) as base, \
            httpx.AsyncClient(base_url=f"http://{base}", timeout=60) as client:
        yield Stack(Api(svc, client, issued.secret), base, fake, tmp_path / "guest")
    await svc.close()
    # The flow killed its browser processes: none of this test's stand-ins outlives it.
    mine = str(tmp_path / "guest" / "browser-display").encode()
    deadline = asyncio.get_running_loop().time() + 30
    while any(mine in cmdline for cmdline in _cmdlines()):
        assert asyncio.get_running_loop().time() < deadline, "a login browser process was left running"
        await asyncio.sleep(0.05)
    fake.close()


def _cmdlines() -> list[bytes]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out.append((entry / "cmdline").read_bytes())
            except OSError:
                pass
    return out


async def received(ws: ClientConnection, n: int, buffer: bytearray) -> bytes:
    while len(buffer) < n:
        message = await asyncio.wait_for(ws.recv(), 30)
        assert isinstance(message, bytes)
        buffer += message
    out = bytes(buffer[:n])
    del buffer[:n]
    return out


async def bridged(ws: ClientConnection) -> None:
    """What noVNC sees: RFB 3.8 offering security type None alone (the bridge answered the VM's VncAuth),
    then the VM itself: the user's bytes reach it and (echoed) come back."""
    assert ws.subprotocol == "binary"
    buffer = bytearray()
    assert await received(ws, 12, buffer) == VERSION
    await ws.send(VERSION)
    assert await received(ws, 2, buffer) == bytes([1, NONE])
    await ws.send(bytes([NONE]))
    assert await received(ws, 4, buffer) == b"\0\0\0\0"
    await ws.send(b"\x01ClientInit and on")
    assert await received(ws, 18, buffer) == b"\x01ClientInit and on"


async def refused(stack: Stack, url: str) -> int:
    with pytest.raises(InvalidStatus) as info:
        async with stack.ws(url):
            pass
    return info.value.response.status_code


async def closed_with(ws: ClientConnection) -> tuple[int, str]:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), 30)
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason


async def test_login_browser_session_bridges_vnc_until_the_session_ends(vnc_stack: Stack) -> None:
    h = await vnc_stack.user()
    sid = await vnc_stack.start_login(h)
    body = await vnc_stack.wait(h, sid, "vnc_url")
    assert body["vnc_url"] == f"/api/auth/sessions/{sid}/vnc"
    engine = vnc_stack.api.services.engine
    assert engine is not None and [vm.purpose for vm in await engine.list()] == ["browser"]
    display = vnc_stack.guest_dir / "browser-display"  # Chromium was started on the VNC display
    deadline = asyncio.get_running_loop().time() + 60
    while not display.exists() or not display.read_text():
        assert asyncio.get_running_loop().time() < deadline, "the browser was not started"
        await asyncio.sleep(0.05)
    assert display.read_text() == ":1"
    r = await vnc_stack.ticket(h, sid)
    assert r.status_code == 200, r.text
    assert r.headers["cache-control"] == "no-store"
    ticket = r.json()
    assert ticket["expires_in"] == 30
    assert ticket["url"] == f"{body['vnc_url']}?ticket={ticket['ticket']}"
    async with vnc_stack.ws(ticket["url"]) as ws:
        await bridged(ws)
        # The hook showed the login URL in the browser, and still recorded it for the flow.
        auth_url = (await vnc_stack.wait(h, sid, "awaiting_user_auth"))["auth_url"]
        urls = (vnc_stack.guest_dir / "login" / "urls").read_text()
        assert urls.splitlines() == [auth_url]
        r = await vnc_stack.api.client.post(f"/api/auth/sessions/{sid}/code", json={"code": "good-code"}, headers=h)
        assert r.status_code == 202, r.text
        assert await closed_with(ws) == (1000, "session_ended")
    assert (await vnc_stack.wait(h, sid, "completed"))["status"] == "completed"
    assert await engine.list() == []
    opened = vnc_stack.guest_dir / "opened"
    assert opened.read_text().splitlines() == [auth_url]
    # Ended: no new ticket, and "start a new session" like GET of an expired session.
    r = await vnc_stack.ticket(h, sid)
    assert r.status_code == 410
    assert r.json()["error"]["code"] == "session_expired"
    assert r.json()["error"]["action"] == "start_new_session"


async def test_a_ticket_opens_one_websocket_only(vnc_stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="uvicorn.error")
    h = await vnc_stack.user()
    sid = await vnc_stack.start_login(h)
    await vnc_stack.wait(h, sid, "vnc_url")
    url = (await vnc_stack.ticket(h, sid)).json()["url"]
    async with vnc_stack.ws(url) as ws:
        await bridged(ws)
    before = vnc_stack.vnc.connections
    assert await refused(vnc_stack, url) == 403
    assert await refused(vnc_stack, url.split("?")[0]) == 403  # no ticket at all
    assert await refused(vnc_stack, url.split("?")[0] + "?ticket=made-up") == 403
    assert vnc_stack.vnc.connections == before  # nothing was bridged for them
    # uvicorn logs each handshake with its query string: the ticket is blanked out of those lines.
    ticket = url.split("ticket=")[1]
    assert "?ticket=[redacted]\" [accepted]" in caplog.text and "?ticket=[redacted]\" 403" in caplog.text
    assert ticket not in caplog.text and "made-up" not in caplog.text


async def test_an_expired_ticket_is_refused(vnc_stack: Stack) -> None:
    h = await vnc_stack.user()
    sid = await vnc_stack.start_login(h)
    await vnc_stack.wait(h, sid, "vnc_url")
    url = (await vnc_stack.ticket(h, sid)).json()["url"]
    store = vnc_stack.api.services.vnc_tickets.store
    assert isinstance(store, MemorySessionStore)
    real_clock = store._clock
    store._clock = lambda: real_clock() + 31  # the ticket's 30 s are over; the session's 600 s are not
    try:
        assert await refused(vnc_stack, url) == 403
    finally:
        store._clock = real_clock


async def test_another_users_ticket_or_session_is_refused(vnc_stack: Stack) -> None:
    alice, bob = await vnc_stack.user(), await vnc_stack.user()
    sid_a = await vnc_stack.start_login(alice)
    sid_b = await vnc_stack.start_login(bob)
    await vnc_stack.wait(alice, sid_a, "vnc_url")
    await vnc_stack.wait(bob, sid_b, "vnc_url")
    # Bob can neither see Alice's session nor get a ticket for it.
    assert (await vnc_stack.api.client.get(f"/api/auth/sessions/{sid_a}", headers=bob)).status_code == 404
    r = await vnc_stack.ticket(bob, sid_a)
    assert r.status_code == 404, r.text
    # Bob's ticket, for his own session, does not open Alice's, and is used up by trying.
    bobs = (await vnc_stack.ticket(bob, sid_b)).json()
    assert await refused(vnc_stack, f"/api/auth/sessions/{sid_a}/vnc?ticket={bobs['ticket']}") == 403
    assert await refused(vnc_stack, bobs["url"]) == 403


async def test_ticket_for_a_session_that_ends_before_connecting(vnc_stack: Stack) -> None:
    h = await vnc_stack.user()
    sid = await vnc_stack.start_login(h)
    await vnc_stack.wait(h, sid, "vnc_url")
    url = (await vnc_stack.ticket(h, sid)).json()["url"]
    r = await vnc_stack.api.client.post(f"/api/auth/sessions/{sid}/cancel", headers=h)
    assert r.json()["status"] == "cancelled"
    async with vnc_stack.ws(url) as ws:
        assert await closed_with(ws) == (4410, "session_expired: start a new session")
    assert (await vnc_stack.ticket(h, sid)).status_code == 410


async def test_expired_session_answers_start_a_new_session_everywhere(vnc_stack: Stack) -> None:
    h = await vnc_stack.user()
    sid = await vnc_stack.start_login(h)
    await vnc_stack.wait(h, sid, "vnc_url")
    url = (await vnc_stack.ticket(h, sid)).json()["url"]
    # What the store's TTL does to an idle session: no activity for the TTL, and its live state gone.
    await idle_login(vnc_stack.api, sid, vnc_stack.api.services.session_store.default_ttl + 5)
    await vnc_stack.api.services.session_store.delete(sid)
    got = await vnc_stack.api.client.get(f"/api/auth/sessions/{sid}", headers=h)
    r = await vnc_stack.ticket(h, sid)
    assert got.status_code == r.status_code == 410
    assert r.json()["error"]["code"] == got.json()["error"]["code"] == "session_expired"
    assert r.json()["error"]["action"] == "start_new_session"
    async with vnc_stack.ws(url) as ws:
        assert (await closed_with(ws))[0] == 4410


async def test_no_ticket_before_the_vnc_server_answers(vnc_stack: Stack) -> None:
    engine = vnc_stack.api.services.engine
    assert engine is not None
    engine.backend.vnc_endpoint = None  # type: ignore[attr-defined]  # this "VM" has no VNC server
    h = await vnc_stack.user()
    sid = await vnc_stack.start_login(h)
    body = await vnc_stack.wait(h, sid, "awaiting_user_auth")
    assert body["vnc_url"] is None
    r = await vnc_stack.ticket(h, sid)
    assert r.status_code == 409 and r.json()["error"]["code"] == "vnc_unavailable"


async def test_the_bridge_answers_the_vms_password_which_goes_nowhere_else(
        vnc_stack: Stack, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    with capture_logs() as events:
        h = await vnc_stack.user()
        sid = await vnc_stack.start_login(h)
        await vnc_stack.wait(h, sid, "vnc_url")
        ticket = await vnc_stack.ticket(h, sid)
        async with vnc_stack.ws(ticket.json()["url"]) as ws:
            await bridged(ws)
            session = await vnc_stack.api.client.get(f"/api/auth/sessions/{sid}", headers=h)
    # The VM's server was asked for VncAuth and got the right answer; the viewer only ever saw None.
    assert vnc_stack.vnc.chosen == [VNC_AUTH] and vnc_stack.vnc.results == ["ok"]
    path = vnc_stack.guest_dir / "login" / "vnc-password"
    assert path.stat().st_mode & 0o777 == 0o600
    file = path.read_bytes()
    password = password_from_file(file)
    assert len(password) == 8
    login = vnc_stack.api.services.login_flow._live[uuid.UUID(sid)]
    assert login.vnc_password == password and repr(password) not in repr(login)
    # Nowhere else: not in an API answer, a log line, or a process's command line.
    shown = (ticket.text + session.text + caplog.text + repr(events)).encode()
    for form in (password, password.hex().encode(), file.hex().encode(), repr(password).encode()):
        assert form not in shown
        assert not any(form in cmdline for cmdline in _cmdlines())


async def test_a_vnc_server_that_lets_anyone_in_is_not_bridged(vnc_stack: Stack) -> None:
    vnc_stack.vnc.offer = bytes([NONE, VNC_AUTH])  # what the login VM's Xtigervnc offered before issue 13
    h = await vnc_stack.user()
    sid = await vnc_stack.start_login(h)
    await vnc_stack.wait(h, sid, "vnc_url")
    async with vnc_stack.ws((await vnc_stack.ticket(h, sid)).json()["url"]) as ws:
        assert await nothing_but_close(ws) == (4409, "vnc_unavailable")
    assert vnc_stack.vnc.chosen == []


async def test_a_vnc_server_that_refuses_the_password_is_not_bridged(vnc_stack: Stack) -> None:
    h = await vnc_stack.user()
    sid = await vnc_stack.start_login(h)
    await vnc_stack.wait(h, sid, "vnc_url")
    (vnc_stack.guest_dir / "login" / "vnc-password").write_bytes(bytes(8))  # the server now wants another
    async with vnc_stack.ws((await vnc_stack.ticket(h, sid)).json()["url"]) as ws:
        assert await nothing_but_close(ws) == (4409, "vnc_unavailable")
    assert vnc_stack.vnc.results == ["failed"]


async def test_a_viewer_that_asks_for_vnc_auth_is_refused(vnc_stack: Stack) -> None:
    h = await vnc_stack.user()
    sid = await vnc_stack.start_login(h)
    await vnc_stack.wait(h, sid, "vnc_url")
    async with vnc_stack.ws((await vnc_stack.ticket(h, sid)).json()["url"]) as ws:
        buffer = bytearray()
        assert await received(ws, 12, buffer) == VERSION
        await ws.send(VERSION)
        assert await received(ws, 2, buffer) == bytes([1, NONE])
        await ws.send(bytes([VNC_AUTH]))  # as a viewer that wants to send a password of its own
        assert (await received(ws, 4, buffer)) == b"\0\0\0\1"
        assert await closed_with(ws) == (1002, "rfb_handshake_failed")


async def nothing_but_close(ws: ClientConnection) -> tuple[int, str]:
    """The close code and reason of a WebSocket that was closed without a byte of RFB."""
    with pytest.raises(ConnectionClosed) as info:
        message = await asyncio.wait_for(ws.recv(), 30)
        raise AssertionError(f"the viewer was sent {message!r}")
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason
