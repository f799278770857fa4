"""The data directory full while a login and runs are under way (real VMs, the scripted CLI, the embedded
SQLite database in that directory, which is a small file system of this test's own).

Two runs write more than the space left: QEMU pauses their VMs when their disks cannot grow. One run's time
runs out while the disk is still full: it ends failed saying the host ran out of disk space (not "the VM
stopped responding"). A new run is refused with a 503 naming the disk. Once space is freed the other run's VM
goes on where it stopped and the run succeeds; the login completes with the code sent after; a new run
succeeds; nothing is left behind and nothing answered a bare 500."""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import subprocess
from pathlib import Path

from polydev.client import RUN_TERMINAL, SESSION_TERMINAL, PolydevClient
from polydev.vm import images
from tests.reliability.conftest import Row, ask, scripted_server
from tests.reliability.test_load import left_behind
from tests.support import required
from tests.support.load import make_users
from tests.support.waits import eventually

SIZE_MB = 1024  # the snapshot (its RAM file and disk), the database, the VMs' disks
MIN_FREE_MB = 32  # HOST_MIN_FREE_DISK_MB
LEFT_MB = 40  # what the ballast leaves: enough to admit the runs, less than either writes
WRITE_MB = 64
SHORT_TIMEOUT_S = 20


def _free_mb(path: Path) -> int:
    return os.statvfs(path).f_bavail * os.statvfs(path).f_frsize // (1024 * 1024)


def _fill(path: Path, leave_mb: int) -> None:
    """A ballast file that leaves `leave_mb` MiB free (allocated, not sparse)."""
    size = (_free_mb(path.parent) - leave_mb) * 1024 * 1024
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno != errno.ENOSPC:
            raise
    finally:
        os.close(fd)


@contextlib.contextmanager
def _small_file_system(where: Path, size_mb: int):  # type: ignore[no-untyped-def]
    """An ext4 file system of `size_mb` MiB (a loop-mounted image) at `where`, as a real data directory's disk
    would be. Not tmpfs: a restored VM maps its snapshot's RAM file privately, and on a full tmpfs a page the
    guest first touches cannot be read in from that sparse file (SIGBUS kills QEMU), where a disk gives zeros."""
    image = where.parent / "data.ext4"
    where.parent.mkdir(parents=True, exist_ok=True)
    with open(image, "wb") as f:
        f.truncate(size_mb * 1024 * 1024)
    subprocess.run(["mkfs.ext4", "-q", "-m", "0", str(image)], check=True)  # -m 0: root too stops at full
    where.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-o", "loop", str(image), str(where)], capture_output=True, text=True)
    if mounted.returncode != 0:
        required.unmet(f"cannot loop-mount a test file system here: {mounted.stderr.strip()}")
    try:
        yield where
    finally:  # the kept console logs of failed VMs stay readable beside the server's log
        with contextlib.suppress(OSError):
            shutil.copytree(where / "logs", where.parent / "vm-logs", dirs_exist_ok=True)
        subprocess.run(["umount", str(where)], check=False)
        image.unlink(missing_ok=True)


def _wait_run(pd: PolydevClient, run_id: str, timeout: float = 600) -> dict:
    row: dict = {}
    def ended() -> bool:
        nonlocal row
        with contextlib.suppress(Exception):  # (a read the server could not answer: asked again)
            row = pd.run(run_id)
        return row.get("status") in RUN_TERMINAL
    eventually(ended, timeout=timeout, every=1.0)
    return row


def test_a_full_data_directory_pauses_vms_refuses_new_ones_and_loses_nothing(
        tmp_path: Path, test_image: images.Image, report: list[Row]) -> None:
    required.root("mounts a small file system as the server's data directory")
    root = tmp_path / "full"
    answers: list[tuple[int, dict]] = []
    with _small_file_system(root / "data", SIZE_MB) as data:
        running = scripted_server(root, test_image, HOST_MIN_FREE_DISK_MB=str(MIN_FREE_MB),
                                  LOGIN_TIMEOUT_SECONDS="900")
        server = next(running)
        try:
            [token] = make_users(server.url, server.admin_token, 1, prefix="full")
            with PolydevClient(server.url, token, timeout=120) as pd:
                login = pd.start_login("claude_code")["session_id"]
                assert pd.wait_session(login, timeout=900)["status"] == "awaiting_user_auth"
                _fill(data / "ballast", LEFT_MB)
                short = pd.start_run("codex", f"write {WRITE_MB}", timeout=SHORT_TIMEOUT_S)["id"]
                long = pd.start_run("gemini_cli", f"write {WRITE_MB}", timeout=900)["id"]
                # Both VMs write more than is left: the disk fills, and QEMU pauses them.
                assert eventually(lambda: _free_mb(data) < MIN_FREE_MB, timeout=300, every=1.0), _free_mb(data)
                answers.append(refused := ask("POST", f"{server.url}/api/runs", token,
                                               json={"provider": "claude_code", "prompt": "hello"}))
                answers += [ask("GET", f"{server.url}/api/runs/{long}", token),
                            ask("GET", f"{server.url}/api/auth/sessions/{login}", token)]
                # The short run's time runs out while its VM is paused (it ends once its agent has been
                # silent past the run's time limit; its row is written when the database has room again).
                ended_short = _wait_run(pd, short, timeout=600)
                (data / "ballast").unlink()  # an operator frees space
                ended_long = _wait_run(pd, long, timeout=600)
                state = pd.session(login)
                if state["status"] == "awaiting_user_auth":
                    pd.submit_code(login, "good-code")
                ended_login = pd.wait_session(login, until=SESSION_TERMINAL, timeout=600)
                after = _wait_run(pd, pd.start_run("claude_code", "hello", timeout=600)["id"], timeout=600)
            found = left_behind(server)
        finally:
            running.close()

    jobs = [ended_short, ended_long, ended_login, after]
    # A 503 saying the host (its disk) or the database (on that disk) is out: the answer designed for it.
    designed = ("host_capacity", "store_unavailable")
    server_errors = [code for code, body in answers if code == 0 or code >= 500 and not (
        code == 503 and body.get("error", {}).get("code") in designed)]
    report.append(Row("data directory full", "1 login + 2 runs writing past the space left",
                      f"disk full ({LEFT_MB} MiB left), then freed",
                      f"{sum(1 for j in jobs if j['status'] in ('completed', 'succeeded') or j.get('error_message'))}"
                      f"/{len(jobs)}", sum(found.values()), len(server_errors)))
    assert refused[0] == 503, refused
    assert refused[1]["error"]["code"] == "host_capacity" and "out of disk space" in refused[1]["error"]["message"]
    assert server_errors == [], answers
    assert ended_short["status"] == "failed", ended_short
    assert "ran out of disk space" in ended_short["error_message"], ended_short
    # Nothing lost: the paused VM went on once space was back, the login finished, new work runs.
    assert ended_long["status"] == "succeeded", ended_long
    assert ended_login["status"] == "completed", ended_login
    assert after["status"] == "succeeded", after
    assert found == dict.fromkeys(found, 0), found
