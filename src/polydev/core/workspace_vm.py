"""What is done inside a workspace's VM, through its agent: putting the files in (an archive unpacked, a
repository cloned), pushing a branch, measuring it, and streaming a command's output (the archive download).

These run in a thread (the agent client is synchronous), except `stream_stdout`, which runs its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import shlex
import threading
import uuid
from collections.abc import AsyncIterator, Callable

from polydev.core import workspace_git
from polydev.core.workspace_git import Remote
from polydev.core.workspace_models import (
    GitAccess,
    Source,
    WorkspaceBusy,
    WorkspaceError,
    WorkspaceInvalid,
)
from polydev.vm.agent_client import AgentClient

ROOT = "/workspace"
UPLOAD = "/tmp/polydev-workspace-upload"
ARCHIVE_KINDS = ("tar", "zip")  # tar: plain or compressed (tar finds out), zip
PREPARE_TIMEOUT_S = 600
GIT_IDENTITY = ["-c", "user.name=Polydev", "-c", "user.email=polydev@localhost"]


class InVm:
    def __init__(self, git: GitAccess, refusal: Callable[[uuid.UUID, str], str | None]) -> None:
        """`refusal(vm_id, host)`: why the egress gateway last refused that VM's connection to host, if it did."""
        self.git = git
        self.refusal = refusal

    def prepare(self, agent: AgentClient, vm_id: uuid.UUID, source: Source, remote: Remote | None) -> int:
        """Put the files under ROOT and make it a git repository with a first commit; returns its size."""
        run(agent, ["mkdir", "-p", ROOT], "making the workspace directory")
        if remote is not None:
            self._clone(vm_id, agent, remote, source.git_token)
        elif source.kind == "archive":
            assert source.archive is not None
            agent.put_file(UPLOAD, source.archive, 0o600)
            unpack = (["tar", "-xf", UPLOAD, "-C", ROOT, "--no-same-owner"] if source.archive_kind == "tar"
                      else ["python3", "-m", "zipfile", "-e", UPLOAD, ROOT])
            run(agent, unpack, "unpacking the archive", user_error=True)
            agent.exec(["rm", "-f", UPLOAD])
        identity = " ".join(GIT_IDENTITY)
        script = (f"cd {shlex.quote(ROOT)} && if [ ! -e .git ]; then git init -q -b main; fi && "
                  # A first commit, unless it has one (a clone): every turn diffs against a commit.
                  f"(git rev-parse -q --verify HEAD >/dev/null || (git add -A && git {identity} commit -q "
                  "--allow-empty -m 'workspace created')) && "
                  # The marker file every run puts in its working directory is Polydev's, not the project's.
                  "echo /.polydev >> .git/info/exclude && sync")
        run(agent, ["sh", "-c", script], "making the workspace a git repository")
        return size(agent)

    def _git_env(self, agent: AgentClient, host: str, token: str | None) -> dict[str, str]:
        if self.git.ca_pem:
            workspace_git.install_ca(agent, self.git.ca_pem)
        return workspace_git.git_env(self.git.proxy(), host, token, has_ca=self.git.ca_pem is not None)

    def _clone(self, vm_id: uuid.UUID, agent: AgentClient, remote: Remote, token: str | None) -> None:
        env = self._git_env(agent, remote.host, token)
        result = agent.exec(workspace_git.clone_args(remote, ROOT), env=env, timeout_s=PREPARE_TIMEOUT_S)
        if result.exit_code != 0:
            raise WorkspaceBusy(self._git_failure("cloning", vm_id, remote.host, result.stderr, token))

    def push(self, agent: AgentClient, vm_id: uuid.UUID, remote: Remote, branch: str, token: str | None) -> str:
        """HEAD to `branch` on the remote; returns the commit pushed."""
        env = self._git_env(agent, remote.host, token)
        check = agent.exec(["git", "check-ref-format", f"refs/heads/{branch}"], timeout_s=60)
        if check.exit_code != 0:
            raise WorkspaceInvalid(f"{branch!r} is not a usable branch name")
        result = agent.exec(workspace_git.push_args(ROOT, branch), env=env, timeout_s=PREPARE_TIMEOUT_S)
        if result.exit_code != 0:
            raise WorkspaceBusy(self._git_failure("pushing", vm_id, remote.host, result.stderr, token))
        return agent.exec(["git", "-C", ROOT, "rev-parse", "HEAD"], timeout_s=60).stdout.decode().strip()

    def _git_failure(self, what: str, vm_id: uuid.UUID, host: str, stderr: bytes, token: str | None) -> str:
        """git's own words (its last lines), and the gateway's when it refused the connection."""
        said = " / ".join(stderr.decode("utf-8", "replace").strip().splitlines()[-3:]) or "git failed"
        refusal = self.refusal(vm_id, host)
        reason = f"{what} {host} failed: {said}" + (f" (egress gateway: {refusal})" if refusal else "")
        return workspace_git.redact(reason, token)[:1000]


def run(agent: AgentClient, args: list[str], what: str, user_error: bool = False) -> None:
    result = agent.exec(args, timeout_s=PREPARE_TIMEOUT_S)
    if result.exit_code != 0:
        detail = (result.stderr or result.stdout).decode("utf-8", "replace").strip().splitlines()[-3:]
        reason = f"{what} failed: {' / '.join(detail) or f'exit status {result.exit_code}'}"
        raise (WorkspaceBusy if user_error else WorkspaceError)(reason[:500])


def size(agent: AgentClient) -> int:
    result = agent.exec(["du", "-sb", ROOT], timeout_s=120)
    try:
        return int(result.stdout.split()[0])
    except (IndexError, ValueError):
        return 0


async def stream_stdout(agent: AgentClient, args: list[str]) -> AsyncIterator[bytes]:
    """A command's stdout as it comes, read in a thread, at most a few chunks ahead of the reader (an archive
    may be large, its reader slow); when the reader stops, so does the thread, and the command is killed."""
    queue: asyncio.Queue[bytes | BaseException | None] = asyncio.Queue(maxsize=16)
    loop = asyncio.get_running_loop()
    stopped = threading.Event()

    def put(item: bytes | BaseException | None) -> bool:
        while not stopped.is_set():
            future = asyncio.run_coroutine_threadsafe(queue.put(item), loop)
            try:
                future.result(timeout=1.0)
                return True
            except concurrent.futures.TimeoutError:
                if not future.cancel():  # it went in just then
                    return True
        return False

    def pump() -> None:
        try:
            for event in agent.exec_stream(args, timeout_s=PREPARE_TIMEOUT_S):
                if event.type == "stdout" and not put(event.bytes()):
                    return  # leaving the stream closes its connection: the agent kills the command
                if event.type == "exit" and event.code != 0:
                    raise WorkspaceError(f"{args[0]} exited with status {event.code}")
            put(None)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, who raises it
            put(exc)
        finally:
            agent.close()

    worker = asyncio.ensure_future(asyncio.to_thread(pump))
    try:
        while True:
            item = await queue.get()
            if item is None:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stopped.set()
        with contextlib.suppress(BaseException):
            await worker
