"""Workspaces from git repositories and their terminal, on real VMs through a live `polydev serve` on QEMU.

The git host is tests/standins/git_server.py: `git http-backend` over TLS (the test CA) on a loopback address
of its own, pinned for the egress gateway, the only git host the server's WORKSPACE_GIT_HOSTS allows. The
VM's git reaches it through the gateway like any egress (EGRESS_RESOLVE=pinned: nothing else resolves).
Covered: a private repository cloned with the user's token (which no answer shows), a clone that fails
without it (the workspace says why and holds no VM), URLs refused before anything is made, a branch pushed
back, the terminal's round trip (a command typed and its output read, a resize seen by the shell, a bad
ticket refused), and the paused-VM limit (429, then a pause with the disk only, booted cold when used).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from polydev.vm import images
from polydev.vm.engine import engine_tag, find_marked_processes
from tests.standins.git_server import GIT_HOST, GitHost
from tests.standins.tls import TestCA
from tests.support.live_server import start_server
from tests.support.workspace_checks import state, untar, user_api, vm_env
from tests.support.waits import eventually

pytest_plugins = ["tests.support.vm_fixtures"]

TOKEN = "ghp_stand_in_token_1234567890"


async def _terminal(base: str, url: str) -> tuple[str, str]:
    """Type two commands in the terminal; (what the first printed, the size the shell saw after a resize)."""
    async with connect(base.replace("http", "ws", 1) + url + "&rows=30&cols=100", open_timeout=120) as ws:
        seen = b""

        async def until(marker: bytes) -> bytes:
            nonlocal seen
            while marker not in seen:
                seen += await asyncio.wait_for(ws.recv(), 60)  # type: ignore[operator]
            return seen

        await ws.send(b"echo $((6*7))-$(pwd)\r")
        first = (await until(b"42-/workspace")).decode(errors="replace")
        await ws.send(json.dumps({"type": "resize", "rows": 33, "cols": 111}))
        await ws.send(b"stty size\r")
        sized = (await until(b"33 111")).decode(errors="replace")
        await ws.send(b"exit 3\r")  # the shell ends: the server closes the socket saying so
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                await asyncio.wait_for(ws.recv(), 60)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1000, closed.value
        assert "shell exited (3)" in closed.value.rcvd.reason
        return first, sized


def test_git_workspaces_push_and_terminal(tmp_path, test_image: images.Image) -> None:  # type: ignore[no-untyped-def]
    ca = TestCA(tmp_path / "ca")
    with GitHost(tmp_path / "git", ca) as git:
        git.make_repo("alice/app.git", {"README.md": b"# app\n", "src/main.py": b"print(1)\n"}, token=TOKEN)
        settings = git.settings()
        env = vm_env(test_image, EGRESS_HOSTS=json.dumps(settings["egress_hosts"]), EGRESS_RESOLVE="pinned",
                     GUEST_CA_CERT_FILE=str(ca.cert_path), WORKSPACE_GIT_HOSTS=GIT_HOST,
                     WORKSPACE_PAUSED_PER_USER="0", WORKSPACE_IDLE_PAUSE_SECONDS="3600")
        running = start_server(tmp_path, "polydev", env)
        server = next(running)
        try:
            alice = user_api(server.url, server.admin_token, "alice")
            bob = user_api(server.url, server.admin_token, "bob", timeout=60)
            url = git.url("alice/app.git")

            # Refused before anything is made: each a 422 that names the problem.
            for body, words in (({"repo_url": "http://git.stand.test/alice/app.git"}, "https://"),
                                ({"repo_url": f"https://alice:{TOKEN}@git.stand.test/alice/app.git"}, "credentials"),
                                ({"repo_url": "https://elsewhere.example/alice/app.git"}, "WORKSPACE_GIT_HOSTS"),
                                ({"repo_url": url, "branch": "bad..name"}, "branch")):
                refused = alice.post("/api/workspaces", json={"name": "x", "source": "git", **body})
                assert refused.status_code == 422, refused.text
                assert words in refused.json()["error"]["message"] and TOKEN not in refused.text
            assert alice.get("/api/workspaces").json() == []

            # Without the token the clone fails: the workspace says git's reason and holds no VM.
            bob_made = bob.post("/api/workspaces", json={"name": "nope", "source": "git", "repo_url": url}).json()
            assert eventually(lambda: state(bob, bob_made["id"]) == "failed", timeout=180)
            failed = bob.get(f"/api/workspaces/{bob_made['id']}").json()
            assert "cloning git.stand.test failed" in failed["error"] and failed["vm_id"] is None

            made = alice.post("/api/workspaces", json={"name": "app", "source": "git", "repo_url": url,
                                                       "branch": "main", "git_token": TOKEN})
            assert made.status_code == 202 and TOKEN not in made.text, made.text
            ws = made.json()
            assert ws["repo_url"] == url and ws["branch"] == "main"
            assert eventually(lambda: state(alice, ws["id"]) == "ready", timeout=180)
            files = untar(alice.get(f"/api/workspaces/{ws['id']}/archive").content)
            assert files["README.md"] == b"# app\n" and files["src/main.py"] == b"print(1)\n"
            config = files[".git/config"].decode()
            assert url in config and TOKEN not in config  # the token never lands in the repository
            assert any(r.authorized and r.service == "upload-pack" for r in git.requests)
            assert bob.post(f"/api/workspaces/{ws['id']}/push", json={"branch": "x"}).status_code == 404

            # The terminal: a ticket, then a shell in /workspace; a used ticket is refused.
            ticket = alice.post(f"/api/workspaces/{ws['id']}/terminal-ticket").json()
            assert bob.post(f"/api/workspaces/{ws['id']}/terminal-ticket").status_code == 404
            first, sized = asyncio.run(_terminal(server.url, ticket["url"]))
            assert "42-/workspace" in first and "33 111" in sized
            with pytest.raises(InvalidStatus):
                asyncio.run(_terminal(server.url, ticket["url"]))

            # A change made in the terminal's workspace, committed, pushed to a new branch with the token.
            terminal_ticket = alice.post(f"/api/workspaces/{ws['id']}/terminal-ticket").json()

            async def commit_in_terminal() -> None:
                uri = server.url.replace("http", "ws", 1) + terminal_ticket["url"]
                async with connect(uri, open_timeout=120) as sock:
                    await sock.send(b"echo pushed > NOTE && git add NOTE && git -c user.name=a -c "
                                    b"user.email=a@b commit -qm 'from the terminal' && echo DONE-$((1+1))\r")
                    seen = b""
                    while b"DONE-2" not in seen:
                        seen += await asyncio.wait_for(sock.recv(), 60)  # type: ignore[operator]

            asyncio.run(commit_in_terminal())
            pushed = alice.post(f"/api/workspaces/{ws['id']}/push", json={"branch": "polydev/turn-1"})
            assert pushed.status_code == 200, pushed.text
            assert git.log("alice/app.git", "polydev/turn-1")[0] == "from the terminal"
            assert git.show("alice/app.git", "polydev/turn-1", "NOTE") == b"pushed\n"
            assert len(pushed.json()["commit"]) == 40 and TOKEN not in pushed.text
            assert alice.post(f"/api/workspaces/{ws['id']}/push", json={"branch": "-x"}).status_code == 422
            assert TOKEN not in server.log.read_text()

            # The paused-VM limit (0 here): a pause with memory is refused; with the disk only it pauses, and
            # the next use boots it cold with the files as they were.
            over = alice.post(f"/api/workspaces/{ws['id']}/pause")
            assert over.status_code == 429 and over.json()["error"]["code"] == "workspace_limit"
            assert alice.post(f"/api/workspaces/{ws['id']}/pause", params={"memory": "false"}).json()["state"] == "paused"
            assert untar(alice.get(f"/api/workspaces/{ws['id']}/archive").content)["NOTE"] == b"pushed\n"

            def sealed_token() -> str | None:
                with sqlite3.connect(server.data_dir / "polydev.db") as db:
                    row = db.execute("SELECT sealed_git_token FROM workspaces WHERE id = ?",
                                     (uuid.UUID(ws["id"]).hex,)).fetchone()
                return row[0]

            assert sealed_token() and TOKEN not in (sealed_token() or "")  # sealed, not the token itself
            assert alice.delete(f"/api/workspaces/{ws['id']}").status_code == 204
            assert sealed_token() is None  # deleting it drops the secrets it held
            assert bob.delete(f"/api/workspaces/{bob_made['id']}").status_code == 204
            assert find_marked_processes(engine_tag(server.data_dir)) == {}
        finally:
            running.close()
