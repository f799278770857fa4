"""`polydev workspace …`, `polydev diff` and `polydev pull` in subprocesses against a live `polydev serve` that
cannot run VMs (so no workspace can be made here; tests/vm/test_workspace_cli.py makes real ones): each command
reaches its route, sends what the route takes (a --from upload is accepted as an archive, not refused as the
wrong media type), and reports the server's answer the way the other remote commands do."""

from __future__ import annotations

import json
import subprocess
import sys
import uuid
from pathlib import Path

from polydev.client import PolydevClient
from tests.support.live_server import LiveServer

MISSING = str(uuid.UUID(int=0x5EED))


def polydev(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "polydev", *args], env=env, capture_output=True, text=True,
                          timeout=120)


def test_workspace_commands_against_a_server_without_vms(live_server: LiveServer, tmp_path: Path) -> None:
    with PolydevClient(live_server.url, live_server.admin_token) as pd:
        user = pd.create_user(f"wscli{uuid.uuid4().hex[:8]}")
        token = pd.issue_token(user["id"])["token"]
    env = {"PATH": "/usr/bin:/bin", "POLYDEV_URL": live_server.url, "POLYDEV_TOKEN": token, "NO_COLOR": "1",
           "COLUMNS": "200"}
    admin = env | {"POLYDEV_TOKEN": live_server.admin_token}

    listed = polydev("workspace", "ls", "--json", env=env)
    assert listed.returncode == 0 and json.loads(listed.stdout) == [], listed.stderr
    assert polydev("workspace", "ls", "--all", "--json", env=admin).returncode == 0
    forbidden = polydev("workspace", "ls", "--all", env=env)
    assert forbidden.returncode == 1 and "forbidden" in forbidden.stderr

    project = tmp_path / "project"
    project.mkdir()
    (project / "README.md").write_text("# demo\n")
    for args in (["workspace", "create", "scratch"], ["workspace", "create", "demo", "--from", str(project)]):
        made = polydev(*args, env=env)
        # The route took the request (an archive of the right type) and said why it cannot make it here.
        assert made.returncode == 1 and "workspaces are unavailable on this server" in made.stderr, made.stderr
        assert "(unavailable, HTTP 503)" in made.stderr and made.stdout == ""
    assert json.loads(polydev("workspace", "ls", "--json", env=env).stdout) == []

    for args in (["workspace", "show", MISSING], ["workspace", "rm", MISSING], ["workspace", "pause", MISSING],
                 ["workspace", "conversations", MISSING], ["diff", MISSING], ["pull", MISSING, "-o", "-"]):
        result = polydev(*args, env=env)
        assert result.returncode == 1 and "(not_found, HTTP 404)" in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr and token not in result.stdout + result.stderr
    bad = polydev("workspace", "show", "not-an-id", env=env)
    assert bad.returncode == 1 and "malformed_id" in bad.stderr

    target = tmp_path / "demo.tar.gz"
    failed = polydev("pull", MISSING, "-o", str(target), env=env)
    assert failed.returncode == 1 and not target.exists() and list(tmp_path.iterdir()) == [project]
