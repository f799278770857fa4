"""The workspace commands as a user runs them, in subprocesses against a live `polydev serve` on QEMU: a local
directory becomes a workspace (`create --from DIR --wait`), is listed and shown, comes back whole (`pull -o`
and `pull --extract`, its git history included), and is deleted."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import tarfile
from pathlib import Path

from polydev.vm import images
from tests.support.e2b_checks import new_user
from tests.support.live_server import start_server

pytest_plugins = ["tests.support.vm_fixtures"]


def polydev(*args: str, env: dict[str, str], timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "polydev", *args], env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_workspace_from_a_directory_round_trips_through_the_cli(tmp_path: Path, test_image: images.Image) -> None:
    server_env = {"POLYDEV_CACHE_DIR": str(test_image.dir.parent.parent), "VM_IMAGE_PROFILE": "test",
                  "VM_CLI_MEMORY_MB": "512", "VM_CLI_VCPU": "1", "VM_WARM_POOL_SIZE": "0"}
    (tmp_path / "server").mkdir()
    running = start_server(tmp_path / "server", "polydev", server_env)
    server = next(running)
    try:
        env = {"PATH": "/usr/bin:/bin", "POLYDEV_URL": server.url, "NO_COLOR": "1", "COLUMNS": "200",
               "POLYDEV_TOKEN": new_user(server.url, server.admin_token, "wscli")}
        project = {"README.md": b"# demo\n", "src/hello.py": b"print('hello')\n", "data/blob.bin": bytes(range(256))}
        local = tmp_path / "project"
        for name, data in project.items():
            (local / name).parent.mkdir(parents=True, exist_ok=True)
            (local / name).write_bytes(data)

        made = polydev("workspace", "create", "demo", "--from", str(local), "--wait", env=env, timeout=900)
        assert made.returncode == 0, made.stderr
        ws = made.stdout.strip()
        assert len(ws) == 36 and "ready" in made.stderr

        listed = polydev("workspace", "ls", env=env)
        assert listed.returncode == 0 and ws in listed.stdout and "ready" in listed.stdout and "demo" in listed.stdout
        shown = json.loads(polydev("workspace", "show", ws, "--json", env=env).stdout)
        assert (shown["state"], shown["source"], shown["name"]) == ("ready", "archive", "demo")
        assert shown["size_bytes"] > 0 and shown["vm_id"]
        assert json.loads(polydev("workspace", "conversations", ws, "--json", env=env).stdout) == []

        saved = tmp_path / "copy.tar.gz"
        pulled = polydev("pull", ws, "-o", str(saved), env=env, timeout=600)
        assert pulled.returncode == 0, pulled.stderr
        with tarfile.open(fileobj=io.BytesIO(saved.read_bytes()), mode="r:gz") as tar:
            names = {m.name.removeprefix("./") for m in tar.getmembers()}
        assert set(project) <= names and ".git/HEAD" in names  # the files, as a git repository
        assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".part")] == []

        checkout = tmp_path / "checkout"
        extracted = polydev("pull", ws, "--extract", str(checkout), env=env, timeout=600)
        assert extracted.returncode == 0, extracted.stderr
        assert {name: (checkout / name).read_bytes() for name in project} == project
        assert (checkout / ".git" / "HEAD").is_file()

        assert polydev("workspace", "rm", ws, env=env).stdout.strip() == f"deleted {ws}"
        gone = polydev("workspace", "show", ws, env=env)
        assert gone.returncode == 1 and "not_found" in gone.stderr
        assert ws not in polydev("workspace", "ls", env=env).stdout
    finally:
        running.close()
