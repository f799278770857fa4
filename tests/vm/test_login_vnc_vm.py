"""The login browser in a real VM on the `full` image, end to end through the API: a login whose "CLI" (a short
script in the guest) opens its URL through the `$BROWSER` hook; the session gets `vnc_url`; a ticket opens the
WebSocket; through the bridge we speak RFB to the guest's Xtigervnc (banner, security None — the bridge
answered the VM's VncAuth —, ServerInit) and read framebuffers until Chromium has drawn something. Meanwhile
every TCP port the VM's QEMU listens on, tried as any local user could, lets nobody in (VncAuth only, a wrong
password fails; the agent wants its token), and the bridge still shows the screen after those attempts. The
login completes and the bridge closes with it.

Prints the measured times (start → VNC up, start → first non-blank frame, start → login URL loaded in
Chromium). Skips when the full image is not built, unless POLYDEV_REQUIRE_SERVERS=1 (then it is built)."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import struct
import sys
import time
import uuid
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from polydev.api.app import create_app
from polydev.config import Settings
from polydev.core.rfb import SECURITY_VNC_AUTH, new_password
from polydev.providers import ADAPTERS
from polydev.providers.base import GuestEnv, LoginPlan
from polydev.services import build_vm_engine, open_services
from polydev.vm import images
from polydev.vm.engine import VMEngine
from tests.support.app import make_settings
from tests.support.flow_fakes import FakeAdapter
from tests.support.listeners import failed, probe, tcp_listeners
from tests.support.live_asgi import serving
from tests.support.required import required, skip_switches, unmet
from tests.support.servers import serve_connections

SIGN_IN_ADDRESS = "127.0.0.60"  # the fake sign-in host's, pinned for the egress gateway (port 443)


class GuestFakeAdapter(FakeAdapter):
    """The scripted login CLI of tests/support/flow_fakes.py, run by the guest's own python3."""

    def login_plan(self, method: str, env: GuestEnv) -> LoginPlan:
        plan = super().login_plan(method, env)
        return replace(plan, command=replace(plan.command, argv=["python3", *plan.command.argv[1:]]))


def full_image() -> images.Image:
    skip_switches("POLYDEV_SKIP_VM_TESTS")
    if shutil.which("qemu-system-x86_64") is None:
        unmet("QEMU is not installed (scripts/test.sh installs it)")
    cache = Settings().cache_dir
    image = images.find(cache, images.recipe_for("full"))
    if image is None:
        if not required():  # a developer skips the minutes of a build; CI builds it here
            unmet(f"the full image (Xtigervnc + Chromium) is not built in {cache}: run `polydev image build "
                  "--profile full`, or set POLYDEV_REQUIRE_SERVERS=1 to build it here")
        image, _ = images.ensure(cache, "full", lambda stage, line: print(f"[image {stage}] {line}", file=sys.stderr))
    return image


class Rfb:
    """Just enough of an RFB 3.8 client, over the bridge's binary WebSocket messages."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.buf = b""

    async def read(self, n: int) -> bytes:
        while len(self.buf) < n:
            message = await asyncio.wait_for(self.ws.recv(), 120)
            assert isinstance(message, bytes)
            self.buf += message
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    async def handshake(self) -> tuple[int, int, int, str]:
        """Version, security None, ClientInit; returns (width, height, bits per pixel, desktop name)."""
        assert await self.read(12) == b"RFB 003.008\n"
        await self.ws.send(b"RFB 003.008\n")
        types = await self.read((await self.read(1))[0])
        assert types == b"\x01", types  # None alone: the bridge answered the VM's VncAuth, behind the ticket
        await self.ws.send(b"\x01")
        assert await self.read(4) == b"\0\0\0\0"  # SecurityResult OK
        await self.ws.send(b"\x01")  # ClientInit: shared
        width, height = struct.unpack(">HH", await self.read(4))
        pixel_format = await self.read(16)
        name = await self.read(struct.unpack(">I", await self.read(4))[0])
        await self.ws.send(struct.pack(">BxHi", 2, 1, 0))  # SetEncodings: raw only
        return width, height, pixel_format[0], name.decode()

    async def colours(self, width: int, height: int, bpp: int) -> int:
        """Distinct colours (sampled) in one full framebuffer update."""
        await self.ws.send(struct.pack(">BBHHHH", 3, 0, 0, 0, width, height))
        seen: set[bytes] = set()
        while True:
            kind = (await self.read(1))[0]
            if kind == 0:
                break
            assert kind in (2, 3), kind  # Bell, ServerCutText: skip
            if kind == 3:
                await self.read(3)
                await self.read(struct.unpack(">I", await self.read(4))[0])
        await self.read(1)
        for _ in range(struct.unpack(">H", await self.read(2))[0]):
            _, _, w, h, encoding = struct.unpack(">HHHHi", await self.read(12))
            assert encoding == 0, encoding
            size = bpp // 8
            pixels = await self.read(w * h * size)
            seen.update(pixels[i:i + size] for i in range(0, len(pixels), size * 97))
        return len(seen)


async def nobody_else_gets_in(engine: VMEngine, vm_id: uuid.UUID) -> None:
    """Every TCP port the VM's QEMU process listens on, opened as any local user could: an RFB server offers
    VncAuth alone and lets neither None nor a wrong password in; an HTTP server (the agent) answers 401
    without its token. Nothing else listens. Three rounds: more failures than TigerVNC's blacklist allows."""
    row = await engine.vms.get(vm_id)
    assert row is not None and row.backend_pid is not None
    listeners = tcp_listeners(row.backend_pid)
    for _ in range(3):
        probes = {address: await probe(*address, wrong_password=new_password()) for address in listeners}
        assert sorted(p.kind for p in probes.values()) == ["http", "rfb"], probes  # the agent, the VNC server
        for found in probes.values():
            if found.kind == "rfb":
                assert found.security_types == bytes([SECURITY_VNC_AUTH]), found
                assert failed(found.none_result) and failed(found.wrong_password_result), found
            else:
                assert set(found.http_status.values()) == {401}, found


async def test_login_browser_in_a_real_vm_through_the_vnc_bridge(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    full_image()
    monkeypatch.setitem(ADAPTERS, "claude_code", GuestFakeAdapter())
    # The fake sign-in host is pinned to a listener of the test's own (a refused sign-in host would end the
    # login at once): the gateway tunnels Chromium to it, which closes the connection, so Chromium shows its
    # error page for the login URL. What is tested here is the browser and its VNC, not the page.
    sign_in = socket.socket()
    sign_in.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sign_in.bind((SIGN_IN_ADDRESS, 443))
    sign_in.listen(16)
    serve_connections(sign_in, lambda conn: None)
    settings = make_settings(tmp_path, POLYDEV_CACHE_DIR=Settings().cache_dir, vm_image_profile="full",
                             login_browser="auto", login_timeout_seconds=1200, vm_warm_pool_size=0,
                             egress_hosts=json.dumps({"auth.fake.test": [SIGN_IN_ADDRESS]}))
    svc = await open_services(settings)
    svc.engine = build_vm_engine(svc)
    assert svc.login_browser() is not None  # auto: the full image has Chromium
    issued = await svc.users.bootstrap_admin()
    assert issued is not None
    h = {"Authorization": f"Bearer {issued.secret}"}
    times: dict[str, float] = {}
    try:
        async with serving(create_app(services=svc)) as base, \
                httpx.AsyncClient(base_url=f"http://{base}", timeout=60) as client:
            started = time.monotonic()
            sid = (await client.post("/api/auth/start", json={"provider": "claude_code"}, headers=h)).json()["session_id"]

            async def until(pred: str) -> dict:
                deadline = time.monotonic() + 1200
                while True:
                    body = (await client.get(f"/api/auth/sessions/{sid}", headers=h)).json()
                    if body.get(pred) or body.get("status") == pred:
                        return body
                    assert body["status"] not in ("failed", "timeout", "cancelled"), body
                    assert time.monotonic() < deadline, body
                    await asyncio.sleep(0.2)

            await until("vnc_url")
            times["vnc_url"] = time.monotonic() - started
            engine = svc.engine
            assert engine is not None
            (vm,) = await engine.list()
            assert vm.purpose == "browser"
            ticket = (await client.post(f"/api/auth/sessions/{sid}/vnc-ticket", headers=h)).json()
            async with connect(f"ws://{base}{ticket['url']}", subprotocols=["binary"],  # type: ignore[list-item]
                               open_timeout=60, max_size=None) as ws:
                rfb = Rfb(ws)
                width, height, bpp, name = await rfb.handshake()
                assert (width, height, name) == (1280, 800, "Polydev sign-in")
                deadline = time.monotonic() + 900
                while await rfb.colours(width, height, bpp) < 2:  # black until Chromium draws
                    assert time.monotonic() < deadline, "Chromium never drew anything"
                    await asyncio.sleep(1)
                times["first_frame_drawn"] = time.monotonic() - started
                await nobody_else_gets_in(engine, vm.id)
                # Past the strangers' failed attempts (TigerVNC's blacklist would count them), the ticketed
                # bridge still gets in and shows the screen.
                again = (await client.post(f"/api/auth/sessions/{sid}/vnc-ticket", headers=h)).json()
                async with connect(f"ws://{base}{again['url']}", subprotocols=["binary"],  # type: ignore[list-item]
                                   open_timeout=60, max_size=None) as second:
                    other = Rfb(second)
                    assert (await other.handshake())[:2] == (width, height)
                    assert await other.colours(width, height, bpp) >= 2
                auth_url = (await until("awaiting_user_auth"))["auth_url"]
                assert auth_url.startswith("https://auth.fake.test/")
                # The hook handed the URL to Chromium: wait until it is the page Chromium shows.
                agent = engine.agent(vm.id, timeout=900)
                probe = ("import json,sys,time,urllib.request\n"
                         "end, urls = time.monotonic() + 600, []\n"
                         "while time.monotonic() < end:\n"
                         " try:\n"
                         "  pages=json.load(urllib.request.urlopen('http://127.0.0.1:9222/json/list',timeout=10))\n"
                         "  urls=[p['url'] for p in pages if p['type']=='page']\n"
                         "  if urls==[sys.argv[1]]: break\n"
                         " except OSError: pass\n"
                         " time.sleep(0.5)\n"
                         "print(json.dumps(urls))\n")
                result = await asyncio.to_thread(agent.exec, ["python3", "-c", probe, auth_url], timeout_s=900)
                agent.close()
                assert json.loads(result.stdout) == [auth_url], result.stdout  # the placeholder page is gone
                times["login_page_in_chromium"] = time.monotonic() - started
                assert await rfb.colours(width, height, bpp) >= 2
                r = await client.post(f"/api/auth/sessions/{sid}/code", json={"code": "good-code"}, headers=h)
                assert r.status_code == 202, r.text
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await asyncio.wait_for(ws.recv(), 300)
                assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000
            assert (await until("completed"))["status"] == "completed"
            assert await engine.list() == []
    finally:
        await svc.close()
        sign_in.close()
        print("\nlogin browser timings (s, from POST /api/auth/start):",
              {k: round(v, 1) for k, v in times.items()}, file=sys.stderr)
