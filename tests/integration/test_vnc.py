"""The login browser's VNC through the control plane, with the real guest agent as the "VM" (on the host) and a
fake VNC server as the VM's VNC port: `vnc_url` once it answers, tickets (single use, expiry, owner only),
the WebSocket bridge both ways, and every way a session ends closing it or refusing it.

The API runs under uvicorn on a loopback port in the test's event loop, so the WebSocket is a real one
(subprotocol negotiation included) and the flows' tasks share the loop with it."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from polydev.api.app import create_app
from polydev.core.login_browser import LoginBrowser
from polydev.providers import ADAPTERS
from polydev.services import build_vm_engine, open_services
from polydev.store.sessions import MemorySessionStore
from tests.support.agent_backend import AgentBackend
from tests.support.app import Api, make_settings
from tests.support.flow_fakes import FakeAdapter, host_guest_paths
from tests.support.live_asgi import serving

BANNER = b"RFB 003.008\n"
# Stand-ins for Xtigervnc and Chromium in a "guest" that is the host: processes that just run until killed.
IDLE = (sys.executable, "-c", "import time; time.sleep(600)")
# Chromium's stand-in notes the display it was given, then idles.
BROWSER = "import os, sys, time; open(sys.argv[1], 'w').write(os.environ['DISPLAY']); time.sleep(600)"
RECORD_URL = "import sys; open(sys.argv[1], 'a').write(sys.argv[2] + '\\n')"


class FakeVnc:
    """The VM side: sends the RFB banner, then echoes every byte back (so both directions are checked)."""

    def __init__(self) -> None:
        self.connections = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> tuple[str, int]:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return "127.0.0.1", self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.write(BANNER)
        try:
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()


class Stack:
    def __init__(self, api: Api, base: str, vnc: FakeVnc, guest_dir: Path) -> None:
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
    fake = FakeVnc()
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
    assert fake.server is not None
    fake.server.close()


def _cmdlines() -> list[bytes]:
    out = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                out.append((entry / "cmdline").read_bytes())
            except OSError:
                pass
    return out


async def bridged(ws: ClientConnection) -> None:
    """The bridge carries the VM's banner to the user and the user's bytes to the VM (and, echoed, back)."""
    assert ws.subprotocol == "binary"
    assert await asyncio.wait_for(ws.recv(), 30) == BANNER
    await ws.send(BANNER)  # what noVNC answers first
    assert await asyncio.wait_for(ws.recv(), 30) == BANNER


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
    await vnc_stack.api.services.session_store.delete(sid)  # what the store's TTL does to an idle session
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
