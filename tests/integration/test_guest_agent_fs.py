"""The agent's POST /fs (stat, list, mkdir, move, remove) and POST /resize, against a local agent process."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from polydev.vm.agent_client import AgentClient, AgentError

pytest_plugins = ["tests.support.vm_fixtures"]  # fixtures: agent, local_agent


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[Path]:
    root = tmp_path / f"fs-{secrets.token_hex(4)}"
    (root / "a" / "b").mkdir(parents=True)
    (root / "a" / "b" / "deep.txt").write_text("deep")
    (root / "top.txt").write_text("12345")
    os.chmod(root / "top.txt", 0o640)
    (root / "link").symlink_to("top.txt")
    yield root


def test_stat_describes_a_file_and_a_symlink_as_itself(agent: AgentClient, tree: Path) -> None:
    [top] = agent.fs("stat", str(tree / "top.txt"))
    assert (top.name, top.type, top.size, top.mode, top.permissions) == ("top.txt", "file", 5, 0o640, "-rw-r-----")
    assert top.owner and top.group and top.mtime > 0
    [link] = agent.fs("stat", str(tree / "link"))
    assert (link.type, link.symlink_target) == ("symlink", "top.txt")


def test_list_goes_as_deep_as_asked(agent: AgentClient, tree: Path) -> None:
    shallow = {e.path for e in agent.fs("list", str(tree))}
    assert shallow == {str(tree / n) for n in ("a", "link", "top.txt")}
    deep = {e.path for e in agent.fs("list", str(tree), depth=3)}
    assert str(tree / "a" / "b" / "deep.txt") in deep and str(tree / "a" / "b") in deep


def test_mkdir_move_remove(agent: AgentClient, tree: Path) -> None:
    [made] = agent.fs("mkdir", str(tree / "x" / "y"))
    assert made.type == "dir" and (tree / "x" / "y").is_dir()
    with pytest.raises(AgentError) as exists:
        agent.fs("mkdir", str(tree / "x" / "y"))
    assert exists.value.status == 409
    [moved] = agent.fs("move", str(tree / "top.txt"), destination=str(tree / "x" / "z" / "moved.txt"))
    assert moved.path == str(tree / "x" / "z" / "moved.txt") and (tree / "x" / "z" / "moved.txt").read_text() == "12345"
    assert agent.fs("remove", str(tree / "a")) == [] and not (tree / "a").exists()
    agent.fs("remove", str(tree / "link"))
    assert not (tree / "link").is_symlink()


@pytest.mark.parametrize("op", ["stat", "list", "remove"])
def test_a_missing_path_is_404(agent: AgentClient, tree: Path, op: str) -> None:
    with pytest.raises(AgentError) as missing:
        agent.fs(op, str(tree / "nothing"))
    assert missing.value.status == 404


def test_list_of_a_file_and_bad_requests_are_refused(agent: AgentClient, local_agent: tuple[str, str],
                                                     tree: Path) -> None:
    with pytest.raises(AgentError) as not_dir:
        agent.fs("list", str(tree / "top.txt"))
    assert not_dir.value.status == 400
    url, token = local_agent
    h = {"Authorization": f"Bearer {token}"}
    for body in ({"op": "chmod", "path": "/tmp"}, {"op": "stat", "path": "relative"},
                 {"op": "list", "path": "/tmp", "depth": 0}, {"op": "move", "path": "/tmp/a"},
                 {"op": "stat", "path": "/tmp", "extra": 1}):
        r = httpx.post(f"{url}/fs", json=body, headers=h)
        assert r.status_code == 400, body


def test_resize_answers_404_for_a_pipe_exec(agent: AgentClient) -> None:
    with pytest.raises(AgentError) as missing:
        agent.resize("0123456789abcdef", 10, 10)
    assert missing.value.status == 404
