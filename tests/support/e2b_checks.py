"""What the e2b SDK tests share, against the host agent (tests/integration) and real VMs (tests/vm)."""

from __future__ import annotations

import httpx
import pytest
from e2b import CommandExitException, PtySize, Sandbox, SandboxNotFoundException


def new_user(url: str, admin_token: str, name: str) -> str:
    """A user and their API token, made through Polydev's API."""
    with httpx.Client(base_url=url, headers={"Authorization": f"Bearer {admin_token}"}, timeout=30) as c:
        r = c.post("/api/users", json={"name": name})
        assert r.status_code == 201, r.text
        r = c.post(f"/api/users/{r.json()['id']}/tokens", json={"name": "e2b"})
        assert r.status_code == 201, r.text
        return str(r.json()["token"])


def pty_sizes(sandbox: Sandbox, first: tuple[int, int], second: tuple[int, int]) -> bytes:
    """A PTY made at `first` (rows, cols), asked its size, resized to `second`, asked again, exited; returns
    everything after the first answer (which must hold the second)."""
    out = bytearray()
    terminal = sandbox.pty.create(PtySize(rows=first[0], cols=first[1]))
    sandbox.pty.send_stdin(terminal.pid, b"stty size; tty\n")
    answer = f"{first[0]} {first[1]}".encode()
    for _, _, pty in terminal:  # the terminal's output as it comes, until the first answer
        out += pty or b""
        if answer in out and b"/dev/pts/" in out:
            break
    sandbox.pty.resize(terminal.pid, PtySize(rows=second[0], cols=second[1]))
    sandbox.pty.send_stdin(terminal.pid, b"stty size; exit\n")
    terminal.wait(on_pty=out.extend)
    return bytes(out.split(answer, 1)[1])


def stdin_and_kill(sandbox: Sandbox) -> None:
    """Input to a background process and the end of its input; a killed process ends and is gone."""
    reader = sandbox.commands.run("tr a-z A-Z", background=True, stdin=True)
    sandbox.commands.send_stdin(reader.pid, "shout\n")
    sandbox.commands.close_stdin(reader.pid)
    assert reader.wait().stdout == "SHOUT\n"
    sleeper = sandbox.commands.run("sleep 900", background=True)
    assert sandbox.commands.kill(sleeper.pid) is True
    with pytest.raises(CommandExitException):
        sleeper.wait()
    assert sleeper.pid not in [p.pid for p in sandbox.commands.list()]
    assert sandbox.commands.kill(sleeper.pid) is False  # gone: not found


def invisible_to(sandbox: Sandbox, other: dict[str, str]) -> None:
    """Another user (`other`: their SDK connection settings) can neither see nor touch `sandbox`."""
    assert sandbox.sandbox_id not in [s.sandbox_id for s in Sandbox.list(**other).next_items()]
    with pytest.raises(SandboxNotFoundException):
        Sandbox.get_info(sandbox.sandbox_id, **other)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.connect(sandbox.sandbox_id, **other)
    with pytest.raises(SandboxNotFoundException):
        Sandbox.set_timeout(sandbox.sandbox_id, 30, **other)
    assert Sandbox.kill(sandbox.sandbox_id, **other) is False
    assert sandbox.commands.run("echo still mine").stdout == "still mine\n"
