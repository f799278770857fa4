"""The run flow: one prompt, one fresh VM, the provider's CLI run non-interactively, its output streamed.

`start` checks what can be checked at once (a stored credential, no other live run on it) and answers with a
queued run; a background task then: VM from the snapshot → the user's credential written into the guest
(files 0600, or an API key in the environment) → the CLI's one-shot streaming run → every output line
normalized into Polydev events, stored and pushed to subscribers (core/run_events.py) → on exit the
credential files read back and, when the CLI refreshed them, sealed again (core/credential_sync.py) → VM
destroyed → run `succeeded` / `failed` / `timeout` / `cancelled` with the reason.

A VM from the warm pool has been prepared for runs (core/run_warmup.py): the run puts only its own files.
A cancel that reaches a replica not driving the run is left in the shared session store for the one that
does (core/relay.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Callable, Collection
from dataclasses import dataclass, replace
from datetime import timedelta
from typing import TYPE_CHECKING, Any

import structlog

from polydev.core import run_warmup, turns
from polydev.core.credential_sync import write_back
from polydev.core.errors import NoCredential, TurnRefused, describe
from polydev.core.guest import Guest, GuestProcess, base_files
from polydev.core.quotas import Hold
from polydev.core.relay import StoreRelay, wait_for
from polydev.core.run_events import EventWriter, RunEvents, stream
from polydev.core.tasks import LiveTask, end_all
from polydev.core.vm_flow import Admit, EngineSource, VmFlow, admit_all, failure_reason
from polydev.providers import get_adapter
from polydev.providers.base import (
    CredentialBundle,
    GuestEnv,
    GuestFile,
    ProviderAdapter,
    event,
    newer_than_written_for,
)
from polydev.providers.common import clean
from polydev.store.credentials import CredentialRepo
from polydev.store.db import when_reachable
from polydev.store.models import Run
from polydev.store.runs import RUN_TERMINAL, RunRepo, StoredEvent
from polydev.store.sessions import SessionStore
from polydev.vm.agent_client import AgentError, AgentUnreachable

if TYPE_CHECKING:
    from polydev.core.ports import VmPort
    from polydev.core.workspaces import Workspaces
    from polydev.store.conversations import ConversationRepo
    from polydev.store.models import Conversation
    from polydev.vm.agent_client import AgentClient
    from polydev.vm.engine import VM

log = structlog.get_logger(__name__)
CANCEL_WAIT_S = 10.0  # how long a cancel waits for the replica driving the run to end it
CANCEL_POLL_S = 0.5
RESTARTED = "the server restarted before the run finished"
STDERR_LINES = 3  # of a CLI's stderr, kept in a timed-out run's reason
MAX_REASON = 300  # characters of the CLI's own words in that reason
KILLED = -9  # the exit code the agent reports for a process ended by SIGKILL
# What the guest kernel logs when its OOM killer ends a process (mm/oom_kill.c).
OOM_MARKS = (b"Out of memory: Killed process", b"oom-kill:")

__all__ = ["RunEvents", "RunFlow"]


def _cancel_key(run_id: uuid.UUID) -> str:
    return f"run-cancel:{run_id}"


@dataclass(eq=False)
class _Live(LiveTask):
    run_id: uuid.UUID
    writer: EventWriter
    proc: GuestProcess | None = None


class RunFlow(VmFlow):
    def __init__(self, *, runs: RunRepo, credentials: CredentialRepo, engine: EngineSource,
                 guest_env: Callable[[str], GuestEnv], ca_pem: bytes | None = None, default_timeout: int = 900,
                 events: RunEvents | None = None, poll_interval: float = 0.5,
                 signals: SessionStore | None = None, admit: Admit = admit_all) -> None:
        super().__init__(credentials=credentials, engine=engine, guest_env=guest_env, ca_pem=ca_pem, admit=admit)
        self.runs = runs
        self.default_timeout = default_timeout
        self.events = events or RunEvents()
        self.poll_interval = poll_interval
        self._live: dict[uuid.UUID, _Live] = {}
        # Turns on workspaces (set by the services once both exist): a run with a workspace runs in its VM.
        self.workspaces: Workspaces | None = None
        self.conversations: ConversationRepo | None = None
        # With a store other replicas share (Redis), a cancel that reaches a replica not driving the run is
        # left there for the one that does; with the in-process store there is no other replica.
        self._signals = signals if signals is not None and signals.kind != "memory" else None
        self._cancels: StoreRelay[_Live] | None = None if self._signals is None else \
            StoreRelay(self._signals, name="run_cancel_watch", id_key="run_id", poll_s=CANCEL_POLL_S)

    # -- API-facing ---------------------------------------------------------------------------------------

    async def start(self, user_id: uuid.UUID, provider: str, prompt: str, *, files: dict[str, bytes] | None = None,
                    timeout: int | None = None, workspace_id: uuid.UUID | None = None,
                    conversation_id: uuid.UUID | None = None) -> Run:
        """A run in a fresh VM; or, given a workspace or a conversation, a turn in the workspace's VM that
        continues the conversation (a new one when none is given)."""
        adapter = get_adapter(provider)
        conversation = await self._conversation(user_id, provider, workspace_id, conversation_id)
        if conversation is not None:
            workspace_id = conversation.workspace_id
        if workspace_id is not None:
            assert self.workspaces is not None
            await self.workspaces.get(user_id, workspace_id)  # WorkspaceNotFound for another user's
        found = await self.credentials.reveal_with_kind(user_id, provider)
        if found is None:
            raise NoCredential(provider)
        engine = self._running_engine()
        # A turn's VM is its workspace's, admitted when the workspace was made.
        hold = await self.admit(user_id, "run", "cli") if workspace_id is None else Hold.nothing(user_id)
        kind, secret = found
        bundle = CredentialBundle.from_bytes(secret, kind)
        timeout = timeout or self.default_timeout
        made = False
        try:
            if workspace_id is not None and conversation is None:
                assert self.conversations is not None
                conversation = await self.conversations.create(user_id, workspace_id, provider)
                made = True
            row = await self.runs.create(user_id, provider, prompt, timeout_seconds=timeout, credential_kind=kind,
                                         workspace_id=workspace_id,
                                         conversation_id=conversation.id if conversation else None)
        except BaseException:
            hold.release()
            if made and conversation is not None and self.conversations is not None:
                with contextlib.suppress(Exception):  # a refused turn leaves no conversation behind
                    await self.conversations.delete(conversation.id)
            raise
        hold.counted("runs")  # its row counts it from here on; its VM's share is held until that VM's row
        live = _Live(row.id, self._writer(row.id))
        self._live[row.id] = live
        resume = conversation.cli_session if conversation is not None else None
        live.task = asyncio.create_task(self._drive(live, row, adapter, bundle, files or {}, engine, hold, resume),
                                        name=f"run-{row.id}")
        if self._cancels is not None:
            self._cancels.watch(lambda: list(self._live.items()), self._relayed_cancel)
        log.info("run_started", run_id=str(row.id), provider=provider, credential_kind=kind,
                 workspace_id=str(workspace_id) if workspace_id else None)
        return row

    async def _conversation(self, user_id: uuid.UUID, provider: str, workspace_id: uuid.UUID | None,
                            conversation_id: uuid.UUID | None) -> Conversation | None:
        if conversation_id is None:
            return None
        if self.conversations is None:
            raise TurnRefused("no such conversation", not_found=True)
        conversation = await self.conversations.get_owned(user_id, conversation_id)
        if conversation is None:
            raise TurnRefused("no such conversation", not_found=True)
        if workspace_id is not None and conversation.workspace_id != workspace_id:
            raise TurnRefused("the conversation is on another workspace")
        if conversation.provider != provider:
            raise TurnRefused(f"the conversation is with {conversation.provider}: a conversation keeps its "
                              "provider (start another on the same workspace)")
        return conversation

    async def cancel(self, user_id: uuid.UUID, run_id: uuid.UUID) -> Run | None:
        row = await self.runs.get_owned(user_id, run_id)
        if row is None:
            return None
        live = self._live.get(run_id)
        if live is not None and live.running:
            await live.cancel_and_wait(by_user=True)  # (one already ending finishes its clean-up first)
        elif row.status not in RUN_TERMINAL and not await self._driver_cancelled(run_id):
            # Nobody drives it (the process that did has stopped): the stream's last event goes after what
            # that process stored, so its number comes from the table.
            await self._writer(run_id).emit(event("error", message="cancelled by the user"), seq_from_db=True)
            await self.runs.finish(run_id, "cancelled", error="cancelled by the user")
        return await self.runs.get_owned(user_id, run_id)

    async def _driver_cancelled(self, run_id: uuid.UUID) -> bool:
        """Ask the replica driving the run, if any, to cancel it (it kills the CLI, writes back refreshed
        tokens, destroys the VM and frees the credential); True once the run has ended."""
        if self._signals is None:
            return False
        key = _cancel_key(run_id)
        await self._signals.create(key, {"cancel": True}, ttl=int(CANCEL_WAIT_S) + 30)

        async def ended() -> bool | None:
            row = await self.runs.get(run_id)
            return True if row is None or row.status in RUN_TERMINAL else None

        if await wait_for(ended, CANCEL_WAIT_S):
            return True
        await self._signals.delete(key)
        return False

    async def _relayed_cancel(self, run_id: uuid.UUID, live: _Live) -> None:
        """A cancel another replica left for a run this one drives."""
        assert self._signals is not None
        if not live.running or live.ending.is_set() or not await self._signals.get(_cancel_key(run_id)):
            return
        await self._signals.delete(_cancel_key(run_id))
        log.info("run_cancel_relayed", run_id=str(run_id))
        live.cancel(by_user=True)  # its own ending does the rest, as for a cancel received here

    def stream(self, run_id: uuid.UUID, after: int = -1) -> AsyncIterator[StoredEvent | None]:
        """Every event after `after`, then the live ones as they come, until the run has ended. Yields None
        while nothing happens (the caller sends a keep-alive)."""
        return stream(self.runs, self.events, run_id, after, poll_interval=self.poll_interval)

    async def close(self) -> None:
        await end_all(list(self._live.values()))
        if self._cancels is not None:
            await self._cancels.close()

    async def reclaim(self, servers: Collection[uuid.UUID | None] | None = None, reason: str = RESTARTED) -> int:
        """Runs a gone server was driving can never finish now: end them failed with `reason`, as the last
        event of their stream too. Given `servers`, only theirs (None standing for runs that name no
        server); else every one not driven here (one server alone on its database, at start-up)."""
        n = 0
        for row in await self.runs.live(servers):
            if row.id not in self._live:
                await self._writer(row.id).emit(event("error", message=reason), seq_from_db=True)
                n += await self.runs.finish(row.id, "failed", error=reason)
        return n

    # -- the warm pool's preparation (core/run_warmup.py) -------------------------------------------------

    def staged_files(self) -> list[GuestFile]:
        return run_warmup.staged_files(self._guest_env, self.ca_pem)

    async def prepare_vm(self, vm: VM, client: AgentClient) -> None:
        """The engine's `pool_prepare` hook."""
        await run_warmup.prepare_vm(vm, client, self._guest_env, self.ca_pem)

    # -- the flow -----------------------------------------------------------------------------------------

    def _writer(self, run_id: uuid.UUID) -> EventWriter:
        return EventWriter(self.runs, self.events, run_id)

    async def _drive(self, live: _Live, row: Run, adapter: ProviderAdapter, bundle: CredentialBundle,
                     files: dict[str, bytes], engine: VmPort, hold: Hold, resume: str | None = None) -> None:
        run_id = row.id
        turn = row.workspace_id is not None  # in the workspace's VM, which stays; else a fresh VM, destroyed
        began = False  # the workspace's turn began (its VM is kept running until end_turn)
        base: str | None = None  # the workspace's commit the turn started from
        session: str | None = None  # the CLI's own session id, as its first events name it
        timeout = row.timeout_seconds or self.default_timeout
        env = self._guest_env(adapter.name)
        vm_id: uuid.UUID | None = None
        guest: Guest | None = None
        status, error, exit_code = "failed", None, None
        usage: dict[str, Any] | None = None
        result: str | None = None
        refreshed = False
        ended = False  # a done or error event has been sent
        try:
            # Stored while the VM is handed out and the CLI started: neither needs to wait for it.
            live.writer.emit_soon(first_status(adapter, engine, turn))
            prepared = False
            if turn:
                assert self.workspaces is not None and row.workspace_id is not None
                began = True
                workspace = await self.workspaces.begin_turn(row.user_id, row.workspace_id)
                vm_id = workspace.vm_id
                env = replace(env, workdir=turns.ROOT)  # the CLI works on the workspace, where its session is
            else:
                try:
                    vm = await engine.create(row.user_id, "cli", ttl=timedelta(seconds=timeout + 180),
                                             on_row=hold.at_row)
                except BaseException:
                    hold.release()
                    raise
                vm_id, prepared = vm.id, vm.prepared
            assert vm_id is not None
            engine.label(vm_id, purpose="run", provider=adapter.name)
            guest = Guest(engine.agent(vm_id, timeout=timeout + 60))
            if turn:
                base = await asyncio.to_thread(turns.start, guest.client)
            command = adapter.run_command(row.prompt, env, api_key=bundle.api_key if bundle.kind == "api_key"
                                          else None, resume=resume)
            to_put = self._files_for(env, bundle, files, command.files)
            if prepared:  # the pool's preparation put these already
                staged = self.staged_files()
                to_put = [f for f in to_put if f not in staged]
            await guest.put(*to_put)
            live.proc = proc = guest.start(command, timeout_s=timeout)
            # Stored while the guest starts the CLI (its output is read only after these): the row and the
            # status are not on the way to the CLI's first line.
            await when_reachable(lambda: self.runs.mark_running(run_id, vm_id), "a run's start")
            await live.writer.emit(event("status", message=f"running {adapter.display_name}"))
            parser = adapter.new_parser()
            warning: str | None = None  # the last error the CLI reported and carried on from (a retry)
            # stderr too: the parsers ignore its noise but take crash reasons from it.
            async for line in proc.lines("stdout", "stderr"):
                for ev in parser.feed(line):
                    if ev["type"] == "status" and ev.get("session_id") and session is None:
                        session = str(ev["session_id"])
                    ended = ended or ev["type"] in ("done", "error")
                    usage = ev.get("usage", usage) if ev["type"] == "done" else usage
                    result = ev.get("result", result) if ev["type"] == "done" else result
                    if ev["type"] == "status" and ev.get("level") == "warning":
                        warning = ev.get("message") or warning
                    await live.writer.emit(ev)
            exit_code = proc.exit_code
            # A CLI that ran the VM out of memory dies by SIGKILL: "exited with status -9" does not say why.
            oom = exit_code == KILLED and not proc.timed_out and await _oom_killed(guest)
            final = [event("error", message=_out_of_memory(adapter.display_name))] if oom else \
                parser.finish(exit_code if exit_code is not None else -1)
            if proc.timed_out:
                status = "timeout"
                error = _timed_out(timeout, adapter.display_name, warning, bytes(proc.stderr_tail))
                final = [event("error", message=error)]
            for ev in final:  # the parsers emit their `done` here, at the end, with the result
                ended = ended or ev["type"] in ("done", "error")
                usage = ev.get("usage", usage) if ev["type"] == "done" else usage
                result = ev.get("result", result) if ev["type"] == "done" else result
                await live.writer.emit(ev)
            if status != "timeout":
                errors = [ev for ev in final if ev["type"] == "error"]
                if exit_code == 0 and not errors:
                    status = "succeeded"
                else:
                    error = (errors[0].get("message") if errors else None) or \
                        f"{adapter.display_name} exited with status {exit_code}"
            refreshed = await self._write_back(guest, env, adapter, bundle, row)
        except asyncio.CancelledError:
            status = "cancelled"
            error = "cancelled by the user" if live.cancelled_by_user else "the server shut down"
            if live.proc is not None:
                await live.proc.kill()
            if guest is not None:  # the CLI may have refreshed its tokens before it was stopped
                with contextlib.suppress(Exception):
                    refreshed = await self._write_back(guest, env, adapter, bundle, row)
        except Exception as exc:  # VM failed to start, died mid-run, agent broke
            error = _reason(exc, vm_id is not None)
            log.warning("run_failed", run_id=str(run_id), error=error)
        finally:
            hold.release()  # its VM is gone (or never came)
            if status in ("failed", "timeout"):
                error = await failure_reason(engine, vm_id, error)
            live.ending.set()
            with contextlib.suppress(Exception):  # a failure to store it has failed the run already
                await live.writer.settle()
            if status != "succeeded" and (not ended or status == "cancelled"):
                with contextlib.suppress(Exception):  # every stream ends in done or error
                    await live.writer.emit(event("error", message=error or "the run failed"))
            if turn and guest is not None:
                with contextlib.suppress(Exception):  # a workspace whose VM died with the turn has nothing to say
                    await self._end_turn(guest, env, bundle, row, base, session)
            if guest is not None:
                guest.close()
            if began:
                assert self.workspaces is not None and row.workspace_id is not None
                await self.workspaces.end_turn(row.workspace_id)
            elif vm_id is not None:
                with contextlib.suppress(Exception):
                    await engine.destroy(vm_id)
            # The row must end whatever happened, a database restart included: else it reads running forever.
            await when_reachable(lambda: self.runs.finish(run_id, status, error=error, exit_code=exit_code,
                                                          usage=usage, result=result, refreshed=refreshed),
                                 "a run's end")
            self.events.notify(run_id)
            self._live.pop(run_id, None)
            log.info("run_ended", run_id=str(run_id), status=status, credential_refreshed=refreshed)

    async def _end_turn(self, guest: Guest, env: GuestEnv, bundle: CredentialBundle, row: Run, base: str | None,
                        session: str | None) -> None:
        """The workspace's VM stays: the credential files are taken out of it (read back already), what the
        turn changed is committed and kept with the run, and the conversation counts the turn."""
        paths = [env.home_path(rel) for rel in bundle.files]
        if paths:
            await asyncio.to_thread(guest.client.exec, ["rm", "-f", "--", *paths], timeout_s=60)
        if base is not None:
            message = f"polydev turn: {row.prompt.strip().splitlines()[0][:72] if row.prompt.strip() else ''}"
            changes, patch = await asyncio.to_thread(turns.finish, guest.client, base, message)
            await self.runs.set_changes(row.id, changes, patch)
        if row.conversation_id is not None and self.conversations is not None:
            await self.conversations.turn_done(row.conversation_id, session)

    def _files_for(self, env: GuestEnv, bundle: CredentialBundle, files: dict[str, bytes],
                   command_files: tuple[GuestFile, ...]) -> list[GuestFile]:
        out = [*base_files(env, self.ca_pem), *command_files]
        for rel, (data, _mode) in bundle.files.items():
            out.append(GuestFile(env.home_path(rel), data, 0o600))  # the run's copy is private, whatever it was
        out += [GuestFile(f"{env.workdir}/{name}", data, 0o644) for name, data in files.items()]
        return out

    async def _write_back(self, guest: Guest, env: GuestEnv, adapter: ProviderAdapter,
                          bundle: CredentialBundle, row: Run) -> bool:
        return await write_back(guest, env, adapter, bundle, credentials=self.credentials, user_id=row.user_id,
                                run_id=row.id)


def _timed_out(timeout: int, cli: str, warning: str | None, stderr: bytes) -> str:
    """A run stopped at its time limit, with why the CLI may have been stuck in its own words: the last
    error it reported and carried on from (a retry: no network, an overloaded API), else its last stderr
    lines. "Did not finish" alone does not tell a slow task from a CLI waiting for a network it lacks."""
    text = f"the run did not finish within {timeout} s"
    lines = [line.strip() for line in stderr.decode("utf-8", "replace").splitlines() if line.strip()]
    why = warning or " / ".join(lines[-STDERR_LINES:])
    return f"{text}; {cli}'s last error: {clean(why, MAX_REASON)}" if why else text


async def _oom_killed(guest: Guest) -> bool:
    """Whether the guest kernel's OOM killer has ended a process in this VM (its log says so); False when the
    guest cannot tell (it died with the CLI, say)."""
    try:
        result = await asyncio.to_thread(guest.client.exec, ["dmesg"], timeout_s=10)
    except Exception:  # noqa: BLE001 - no answer is no evidence: the CLI's own exit status stands
        return False
    return any(mark in result.stdout for mark in OOM_MARKS)


def _out_of_memory(cli: str) -> str:
    return (f"{cli} ran out of memory: the VM's kernel killed it (out-of-memory killer); the task needs more "
            "memory than the VM has (VM_CLI_MEMORY_MB)")


def _reason(exc: BaseException, vm_started: bool) -> str:
    text = describe(exc)[:400]
    if isinstance(exc, AgentUnreachable) or vm_started and isinstance(exc, (AgentError, OSError)):
        return f"the VM stopped responding during the run ({text})"
    return text


def first_status(adapter: ProviderAdapter, engine: VmPort, turn: bool) -> dict[str, Any]:
    """The run's first status: what it is doing first, and the CLI's version in the image when it is newer
    than the one its adapter was written for (events it does not know then come as status, see
    providers/common.py)."""
    doing = "waking the workspace" if turn else "starting a VM"
    version = engine.describe().image_clis.get(adapter.package)
    if not newer_than_written_for(adapter, version):
        return event("status", message=doing)
    return event("status", message=f"{doing}; {adapter.display_name} {version} is newer than {adapter.written_for}, "
                 "the version this adapter was written for", cli_version=version, written_for=adapter.written_for)
