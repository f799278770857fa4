"""The unmodified e2b SDK against Polydev, with the real guest agent on the host as each sandbox's "VM"
(tests/support/agent_backend.py): the control plane, envd's process and filesystem services and /files,
end to end over real HTTP, in seconds. tests/vm/test_e2b_sdk.py runs the SDK against real VMs."""

from __future__ import annotations

import asyncio
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    AuthenticationException,
    CommandExitException,
    FileNotFoundException,
    FilesystemEventType,
    InvalidArgumentException,
    NotFoundException,
    RateLimitException,
    Sandbox,
    SandboxException,
    SandboxNotFoundException,
    SandboxQuery,
)

from polydev.api.e2b.connect import frame
from polydev.config import Settings
from tests.support.app import make_settings
from tests.support.e2b_checks import invisible_to, pty_sizes, stdin_and_kill
from tests.support.servers import free_port
from tests.support.threaded_server import ThreadedServer, threaded_server
from tests.support.waits import eventually

SANDBOX_DOMAIN = "sbx.polydev.test"
LIMIT = 3  # sandboxes per user, running or paused (below QUOTA_VMS: 4)


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ThreadedServer]:
    tmp = tmp_path_factory.mktemp("e2b")
    with threaded_server(make_settings(tmp, VM_WARM_POOL_SIZE=0, SANDBOX_DOMAIN=SANDBOX_DOMAIN,
                                       SANDBOX_LIMIT_PER_USER=LIMIT,
                                       # The agent runs on this host, which has no E2B `user` account.
                                       SANDBOX_DEFAULT_USER="root")) as running:
        yield running


@pytest.fixture(scope="module")
def conn(server: ThreadedServer) -> dict[str, str]:
    return {"api_url": server.url, "sandbox_url": server.url, "api_key": server.new_user("alice")}


@pytest.fixture(scope="module")
def sandbox(conn: dict[str, str]) -> Iterator[Sandbox]:
    sbx = Sandbox.create(metadata={"purpose": "test"}, envs={"GREETING": "hello"}, timeout=600, **conn)
    yield sbx
    sbx.kill()


def test_a_command_runs_with_the_sandboxs_env_and_its_exit_code(sandbox: Sandbox) -> None:
    result = sandbox.commands.run("echo $GREETING; echo err >&2")
    assert (result.stdout, result.stderr, result.exit_code) == ("hello\n", "err\n", 0)
    with pytest.raises(CommandExitException) as failed:
        sandbox.commands.run("exit 3")
    assert failed.value.exit_code == 3


def test_output_streams_to_callbacks_and_cwd_and_envs_apply(sandbox: Sandbox, tmp_path: Path) -> None:
    seen: list[str] = []
    result = sandbox.commands.run("pwd; echo $X", cwd=str(tmp_path), envs={"X": "y"}, on_stdout=seen.append)
    assert result.stdout == f"{tmp_path}\ny\n" and "".join(seen) == result.stdout


def test_a_background_process_survives_its_client_and_connect_follows_it(sandbox: Sandbox, tmp_path: Path) -> None:
    go = tmp_path / "go"
    handle = sandbox.commands.run(f"echo started; while [ ! -e {go} ]; do sleep 0.05; done; "
                                  "for i in 1 2 3; do echo $i; done", background=True)
    pid = handle.pid
    for stdout, _, _ in handle:  # the SDK's handle yields output as it comes
        if stdout and "started" in stdout:
            break
    handle.disconnect()
    assert pid in [p.pid for p in sandbox.commands.list()]  # it runs with nobody following it
    again = sandbox.commands.connect(pid)
    sandbox.files.write(str(go), "")
    result = again.wait()
    assert result.stdout == "1\n2\n3\n"  # from the connect on: not what was printed before
    assert pid not in [p.pid for p in sandbox.commands.list()]


def test_stdin_and_kill(sandbox: Sandbox) -> None:
    stdin_and_kill(sandbox)


def test_a_pty_session(sandbox: Sandbox) -> None:
    assert b"40 120" in pty_sizes(sandbox, (30, 100), (40, 120))


def test_files(sandbox: Sandbox, tmp_path: Path) -> None:
    base = str(tmp_path / "files")
    info = sandbox.files.write(f"{base}/a.txt", "alpha")
    assert info.path == f"{base}/a.txt"
    assert sandbox.files.read(f"{base}/a.txt") == "alpha"
    payload = bytes(range(256)) * 4096
    sandbox.files.write(f"{base}/b.bin", payload)
    assert sandbox.files.read(f"{base}/b.bin", format="bytes") == payload
    import io

    sandbox.files.write(f"{base}/c.txt", io.BytesIO(b"streamed"))  # octet-stream
    sandbox.files.write_files([{"path": f"{base}/d.txt", "data": "d"}, {"path": f"{base}/e.txt", "data": "e"}])
    assert sorted(e.name for e in sandbox.files.list(base)) == ["a.txt", "b.bin", "c.txt", "d.txt", "e.txt"]
    assert sandbox.files.exists(f"{base}/a.txt") and not sandbox.files.exists(f"{base}/zz")
    assert sandbox.files.make_dir(f"{base}/sub/deeper") is True
    assert sandbox.files.make_dir(f"{base}/sub/deeper") is False
    deep = sandbox.files.list(base, depth=3)
    assert f"{base}/sub/deeper" in [e.path for e in deep]
    moved = sandbox.files.rename(f"{base}/a.txt", f"{base}/sub/a2.txt")
    assert moved.path == f"{base}/sub/a2.txt" and sandbox.files.read(moved.path) == "alpha"
    info = sandbox.files.get_info(moved.path)
    assert info.size == 5 and info.type.value == "file"
    sandbox.files.remove(f"{base}/sub")
    assert not sandbox.files.exists(f"{base}/sub")
    with pytest.raises(FileNotFoundException):
        sandbox.files.read(f"{base}/nothing")
    with pytest.raises(NotFoundException):
        sandbox.files.list(f"{base}/nothing")


def test_control_plane_list_info_timeout_and_kill(conn: dict[str, str], sandbox: Sandbox) -> None:
    info = sandbox.get_info()
    assert info.sandbox_id == sandbox.sandbox_id and info.metadata == {"purpose": "test"}
    assert info.template_id == "base" and info.state.value == "running"
    listed = Sandbox.list(query=None, **conn).next_items()
    assert sandbox.sandbox_id in [s.sandbox_id for s in listed]
    assert Sandbox.list(query=SandboxQuery(metadata={"purpose": "other"}), **conn).next_items() == []
    sandbox.set_timeout(1200)
    assert sandbox.get_info().end_at > info.end_at
    again = Sandbox.connect(sandbox.sandbox_id, **conn)
    assert again.commands.run("echo same").stdout == "same\n"  # the same access token works
    other = Sandbox.create(timeout=60, **conn)
    assert other.is_running()
    assert Sandbox.kill(other.sandbox_id, **conn) is True
    assert Sandbox.kill(other.sandbox_id, **conn) is False
    assert not other.is_running()
    with pytest.raises(SandboxException):
        other.commands.run("echo no")


def test_paging(conn: dict[str, str], sandbox: Sandbox) -> None:
    extra = [Sandbox.create(timeout=60, metadata={"page": "yes"}, **conn) for _ in range(2)]
    try:
        pager = Sandbox.list(query=SandboxQuery(metadata={"page": "yes"}), limit=1, **conn)
        seen = [s.sandbox_id for s in pager.next_items()]
        assert pager.has_next
        seen += [s.sandbox_id for s in pager.next_items()]
        assert sorted(seen) == sorted(s.sandbox_id for s in extra)
        assert not pager.has_next or pager.next_items() == []
    finally:
        for sbx in extra:
            sbx.kill()


def test_another_user_sees_nothing(server: ThreadedServer, conn: dict[str, str], sandbox: Sandbox) -> None:
    bob = {**conn, "api_key": server.new_user("bob")}
    assert Sandbox.list(**bob).next_items() == []
    invisible_to(sandbox, bob)


def test_bad_inputs_get_the_sdks_errors(conn: dict[str, str], sandbox: Sandbox) -> None:
    with pytest.raises(AuthenticationException):
        Sandbox.create(**{**conn, "api_key": "pd_wrong"})
    with pytest.raises(SandboxException) as missing:  # what the SDK makes of a 404 on create
        Sandbox.create(template="nope", **conn)
    assert "404" in str(missing.value) and "base" in str(missing.value)
    profile = Settings().vm_image_profile  # the server's image profile is a template too
    assert f"base, {profile}" in str(missing.value) or f"{profile}, base" in str(missing.value)
    Sandbox.create(template=profile, timeout=60, **conn).kill()
    with pytest.raises(SandboxException):
        Sandbox.create(timeout=10 ** 9, **conn)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info("i" + uuid.uuid4().hex[:19], **conn)
    with pytest.raises(InvalidArgumentException):
        sandbox.files.list("/", depth=0)
    with pytest.raises(SandboxException):
        sandbox.commands.run("echo", cwd="/no/such/dir")


def test_envd_checks_the_access_token_on_every_call(conn: dict[str, str], sandbox: Sandbox) -> None:
    # A wrong or missing token gets what a missing sandbox gets: the id alone opens nothing.
    for token in ("wrong", None):
        h = {"E2b-Sandbox-Id": sandbox.sandbox_id, **({"X-Access-Token": token} if token else {})}
        r = httpx.get(f"{conn['sandbox_url']}/files", params={"path": "/etc/hostname"}, headers=h)
        assert r.status_code == 502 and "was not found" in r.json()["message"]
        r = httpx.post(f"{conn['sandbox_url']}/process.Process/List", json={}, headers=h)
        assert r.status_code == 502 and r.json()["code"] == "unavailable"


def test_bad_requests_answer_in_the_sdks_error_shapes(conn: dict[str, str], sandbox: Sandbox) -> None:
    api = httpx.Client(base_url=conn["api_url"], headers={"X-API-KEY": conn["api_key"]}, timeout=30)
    for method, path, kw in (("POST", "/v2/sandboxes", {"content": b"{not json"}),
                             ("POST", "/v2/sandboxes", {"json": {"templateID": 5}}),
                             ("POST", "/v2/sandboxes", {"json": {"templateID": "base", "timeout": -1}}),
                             ("POST", "/v2/sandboxes", {"json": {"templateID": "base", "envVars": {"A": 1}}}),
                             ("GET", "/v2/sandboxes?limit=0", {}),
                             ("GET", "/v2/sandboxes?nextToken=%%%", {}),
                             ("GET", "/v2/sandboxes?state=gone", {}),
                             ("POST", "/v2/sandboxes", {"json": {"templateID": "base", "autoPauseMemory": "x"}}),
                             ("POST", f"/sandboxes/{sandbox.sandbox_id}/pause", {"json": {"memory": "x"}}),
                             ("POST", f"/sandboxes/{sandbox.sandbox_id}/timeout", {"json": {"timeout": "x"}})):
        r = api.request(method, path, **kw)
        assert r.status_code == 400, (path, r.text)
        assert isinstance(r.json()["code"], int) and isinstance(r.json()["message"], str)
    assert sandbox.get_info().state == "running"  # the refused pause changed nothing
    r = httpx.get(f"{conn['api_url']}/v2/sandboxes", timeout=30)
    assert r.status_code == 401 and r.json()["code"] == 401
    r = api.get("/sandboxes/" + "x" * 300)
    assert r.status_code == 404 and r.json()["code"] == 404

    envd = httpx.Client(base_url=conn["sandbox_url"], timeout=30, headers={
        "E2b-Sandbox-Id": sandbox.sandbox_id, "X-Access-Token": sandbox._envd_access_token or ""})
    stream = {"Content-Type": "application/connect+json"}
    r = envd.post("/process.Process/Start", content=b"\x00\x00\x00\x00\x07garbage", headers=stream)
    assert r.status_code == 200 and r.content[0] == 2 and b'"invalid_argument"' in r.content
    r = envd.post("/process.Process/Start", content=frame({"process": {"args": ["x"]}}), headers=stream)
    assert r.content[0] == 2 and b'"invalid_argument"' in r.content
    r = envd.post("/process.Process/Nope", json={})
    assert r.status_code == 501 and r.json()["code"] == "unimplemented"
    r = envd.post("/process.Process/SendSignal", json={"process": {"pid": 1}, "signal": "SIGNAL_SIGKILL"})
    assert r.status_code == 404 and r.json()["code"] == "not_found"  # only processes started through envd
    r = envd.post("/filesystem.Filesystem/Stat", json={"path": 5})
    assert r.status_code == 400 and r.json()["code"] == "invalid_argument"
    r = envd.post("/files", params={"path": "/tmp/x"}, content=b"x",
                  headers={"Content-Type": "application/octet-stream", "Content-Encoding": "gzip"})
    assert r.status_code == 400 and isinstance(r.json()["code"], int)


def test_a_sandbox_whose_vm_is_gone_has_ended(server: ThreadedServer, conn: dict[str, str]) -> None:
    admin = {"Authorization": f"Bearer {server.admin_token}"}

    def running_vms() -> set[str]:
        vms = httpx.get(f"{server.url}/api/vms", headers=admin, timeout=30).json()
        return {vm["id"] for vm in vms if vm["status"] == "running"}

    before = running_vms()
    sbx = Sandbox.create(timeout=60, metadata={"doomed": "yes"}, **conn)
    [vm_id] = running_vms() - before  # the sandbox's VM, among the VMs
    assert 'polydev_sandboxes{state="running"}' in httpx.get(f"{server.url}/metrics", timeout=30).text
    # The VM goes (as with a server restart or a crash): the sandbox goes with it.
    assert httpx.delete(f"{server.url}/api/vms/{vm_id}", headers=admin, timeout=30).status_code == 204
    assert Sandbox.list(query=SandboxQuery(metadata={"doomed": "yes"}), **conn).next_items() == []
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sbx.sandbox_id, **conn)


def test_get_host_reaches_a_server_in_the_sandbox(conn: dict[str, str], sandbox: Sandbox, tmp_path: Path) -> None:
    port = free_port()
    (tmp_path / "index.html").write_text("served from the sandbox")
    server = sandbox.commands.run(f"cd {tmp_path} && exec python3 -m http.server {port} --bind 127.0.0.1",
                                  background=True)
    try:
        host = sandbox.get_host(port)
        assert host == f"{port}-{sandbox.sandbox_id}.{SANDBOX_DOMAIN}"
        with httpx.Client(base_url=conn["api_url"], headers={"Host": host}, timeout=30) as c:
            for _ in range(600):  # until the server in the sandbox listens (a closed port answers 502 until then)
                r = c.get("/index.html")
                if r.status_code != 502:
                    break
                assert "port is not open" in r.json()["message"]
                time.sleep(0.05)
            assert r.status_code == 200 and r.text == "served from the sandbox"
            assert c.get("/missing").status_code == 404  # the sandbox's server's own answer
            posted = c.post("/index.html", content=b"x" * 1000)
            assert posted.status_code == 501  # http.server has no POST: its answer, passed through
            agent = c.get("/livez", headers={"Host": f"8080-{sandbox.sandbox_id}.{SANDBOX_DOMAIN}"})
            assert agent.status_code == 403  # the guest agent's port is never forwarded
            gone = c.get("/", headers={"Host": f"{port}-inosuchsandbox.{SANDBOX_DOMAIN}"})
            assert gone.status_code == 502 and "was not found" in gone.json()["message"]
    finally:
        sandbox.commands.kill(server.pid)


ECHO = """
import asyncio
from websockets.asyncio.server import serve
async def echo(ws):
    async for message in ws:
        await ws.send(message)
async def main():
    async with serve(echo, "127.0.0.1", {port}):
        await asyncio.Future()
asyncio.run(main())
"""


def test_get_host_carries_websockets_to_a_server_in_the_sandbox(conn: dict[str, str], sandbox: Sandbox,
                                                                tmp_path: Path) -> None:
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    port = free_port()
    (tmp_path / "echo.py").write_text(ECHO.format(port=port))
    server = sandbox.commands.run(f"exec {sys.executable} {tmp_path / 'echo.py'}", background=True)
    api = urlsplit(conn["api_url"])

    def dial(host: str) -> Any:
        return connect(f"ws://{host}/echo", sock=socket.create_connection((api.hostname, api.port)), open_timeout=30)

    try:
        host = sandbox.get_host(port)
        for _ in range(600):  # until the server in the sandbox listens (the handshake is refused until then)
            try:
                ws = dial(host)
                break
            except InvalidStatus:
                time.sleep(0.05)
        with ws:
            ws.send("hello")
            assert ws.recv(timeout=30) == "hello"
            ws.send(b"\x00\x01" * 40_000)  # binary, and more than one read's worth
            assert ws.recv(timeout=30) == b"\x00\x01" * 40_000
        with pytest.raises(InvalidStatus):  # a sandbox that does not exist: refused
            dial(f"{port}-inosuchsandbox.{SANDBOX_DOMAIN}")
        with pytest.raises(InvalidStatus):  # the guest agent's port: never
            dial(f"8080-{sandbox.sandbox_id}.{SANDBOX_DOMAIN}")
    finally:
        sandbox.commands.kill(server.pid)


def test_a_user_past_their_quota_gets_the_sdks_rate_limit_error(server: ThreadedServer, conn: dict[str, str]) -> None:
    carol = server.new_user("carol")
    admin = {"Authorization": f"Bearer {server.admin_token}"}
    users = httpx.get(f"{server.url}/api/users", headers=admin, timeout=30).json()
    [carol_id] = [u["id"] for u in users if u["name"] == "carol"]
    r = httpx.put(f"{server.url}/api/users/{carol_id}/quotas", json={"limits": {"vms": 0}}, headers=admin, timeout=30)
    assert r.status_code == 200, r.text
    with pytest.raises(RateLimitException) as refused:  # at once: Should-Retry: false, no minutes of retries
        Sandbox.create(**{**conn, "api_key": carol})
    assert "quota vms" in str(refused.value)


def test_past_the_sandboxes_per_user_the_sdks_rate_limit_error_and_a_kill_makes_room(server: ThreadedServer,
                                                                                       conn: dict[str, str]) -> None:
    dave = {**conn, "api_key": server.new_user("dave")}
    mine = [Sandbox.create(timeout=300, **dave) for _ in range(LIMIT)]
    with pytest.raises(RateLimitException) as refused:  # at once (Should-Retry: false)
        Sandbox.create(**dave)
    assert f"{LIMIT} sandboxes running or paused" in str(refused.value)
    Sandbox.create(timeout=300, **conn).kill()  # another user is not held back by dave's
    mine.pop().kill()
    mine.append(Sandbox.create(timeout=300, **dave))  # room again
    for sbx in mine:
        sbx.kill()


def test_watch_dir_reports_creates_writes_and_removes(sandbox: Sandbox, tmp_path: Path) -> None:
    watched = tmp_path / "watched"
    sandbox.files.make_dir(str(watched))
    handle = sandbox.files.watch_dir(str(watched))
    seen: list[tuple[str, FilesystemEventType]] = []

    def saw(event: tuple[str, FilesystemEventType]) -> bool:
        seen.extend((e.name, e.type) for e in handle.get_new_events())
        return event in seen

    sandbox.files.write(f"{watched}/a.txt", "1")
    assert eventually(lambda: saw(("a.txt", FilesystemEventType.CREATE)), timeout=30, every=0.2), seen
    sandbox.files.write(f"{watched}/a.txt", "22")
    assert eventually(lambda: saw(("a.txt", FilesystemEventType.WRITE)), timeout=30, every=0.2), seen
    sandbox.files.remove(f"{watched}/a.txt")
    assert eventually(lambda: saw(("a.txt", FilesystemEventType.REMOVE)), timeout=30, every=0.2), seen
    handle.stop()
    with pytest.raises(SandboxException):  # stopped: its id is gone
        handle.get_new_events()
    with pytest.raises(SandboxException):  # NotFoundException: no such directory
        sandbox.files.watch_dir(str(tmp_path / "missing"))


def test_get_metrics_reports_the_sandboxs_use_now(sandbox: Sandbox) -> None:
    [now] = sandbox.get_metrics()
    assert now.cpu_count >= 1 and 0 <= now.cpu_used_pct <= 100
    assert 0 < now.mem_used < now.mem_total and 0 < now.disk_used < now.disk_total
    later = datetime.now(UTC) + timedelta(hours=1)
    assert sandbox.get_metrics(start=later) == []  # nothing from the future


async def test_the_async_sdk_works_too(conn: dict[str, str], tmp_path: Path) -> None:
    sbx = await AsyncSandbox.create(timeout=60, **conn)
    try:
        out: list[str] = []
        result = await sbx.commands.run("echo async", on_stdout=out.append)
        assert result.stdout == "async\n" and out == ["async\n"]
        await sbx.files.write(str(tmp_path / "a.txt"), "from async")
        assert await sbx.files.read(str(tmp_path / "a.txt")) == "from async"
        # The async SDK watches over envd's WatchDir stream (the sync one polls GetWatcherEvents).
        events: list[tuple[str, FilesystemEventType]] = []
        handle = await sbx.files.watch_dir(str(tmp_path), on_event=lambda e: events.append((e.name, e.type)))
        await sbx.files.write(str(tmp_path / "b.txt"), "new")
        for _ in range(300):
            if ("b.txt", FilesystemEventType.CREATE) in events:
                break
            await asyncio.sleep(0.1)
        assert ("b.txt", FilesystemEventType.CREATE) in events, events
        await handle.stop()
    finally:
        await sbx.kill()


def test_polydevs_own_api_lists_sandboxes_by_owner(server: ThreadedServer, conn: dict[str, str],
                                                   sandbox: Sandbox) -> None:
    def listed(token: str, everyone: bool = False) -> httpx.Response:
        return httpx.get(f"{server.url}/api/sandboxes", params={"all": "true"} if everyone else {},
                         headers={"Authorization": f"Bearer {token}"}, timeout=30)

    mine = listed(conn["api_key"])
    assert mine.status_code == 200 and sandbox.sandbox_id in [s["id"] for s in mine.json()]
    assert "access" not in mine.text.lower() and (sandbox._envd_access_token or "") not in mine.text
    assert sandbox.sandbox_id in [s["id"] for s in listed(server.admin_token, everyone=True).json()]
    assert sandbox.sandbox_id not in [s["id"] for s in listed(server.admin_token).json()]  # the admin's own
    assert listed(conn["api_key"], everyone=True).status_code == 403


def test_acting_as_root_works_and_an_account_the_guest_lacks_is_refused(sandbox: Sandbox, tmp_path: Path) -> None:
    assert sandbox.commands.run("id -un", user="root").stdout == "root\n"
    assert sandbox.commands.run("id -un; pwd").stdout == "root\n/root\n"  # the server's default account, home
    with pytest.raises(InvalidArgumentException) as refused:
        sandbox.commands.run("id -un", user="nosuchaccount")
    assert "user 'nosuchaccount' does not exist" in str(refused.value)
    with pytest.raises(InvalidArgumentException) as refused:
        sandbox.commands.run("id -un", user="No Such/Name")  # type: ignore[arg-type]
    assert "not an account name" in str(refused.value)
    with pytest.raises(SandboxException) as refused:
        sandbox.files.write(str(tmp_path / "x"), "x", user="nosuchaccount")  # type: ignore[arg-type]
    assert "does not exist" in str(refused.value) and not (tmp_path / "x").exists()
    with pytest.raises(SandboxException):
        sandbox.files.make_dir(str(tmp_path / "d"), user="nosuchaccount")  # type: ignore[arg-type]
    assert not (tmp_path / "d").exists()
