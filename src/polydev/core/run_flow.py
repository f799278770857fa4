"""The run flow: one prompt, one fresh VM, the provider's CLI run non-interactively, its output streamed.

`start` checks what can be checked at once (a stored credential, no other live run on it) and answers with a
queued run; a background task then: VM from the snapshot → the user's credential written into the guest
(files 0600, or an API key in the environment) → the CLI's one-shot streaming run → every output line
normalized into Polydev events, stored and pushed to subscribers → on exit the credential files read back
and, when the CLI refreshed them, sealed again → VM destroyed → run `succeeded` / `failed` / `timeout` /
`cancelled` with the reason.

With the warm pool on, the engine hands out VMs that `prepare_vm` has already been through: the files every
run puts first are there, and the agent has served each kind of request a run makes, so a run's first
requests are not the guest's first since its snapshot restore (slow under TCG, where every code path is
translated again after a restore). A run on such a VM puts only its own files.

Events are stored in `run_events` as they arrive, so a client that connects late or reconnects with
Last-Event-ID reads the whole run; `RunEvents` wakes the subscribers of this process at once and the others
(other replicas) poll.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Callable
from datetime import timedelta
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any

import structlog

from polydev.core.guest import Guest, GuestProcess, base_files
from polydev.core.tasks import cancel_and_wait
from polydev.providers import ADAPTERS, get_adapter
from polydev.providers.base import (
    Command,
    CredentialBundle,
    GuestEnv,
    GuestFile,
    ProviderAdapter,
    event,
)
from polydev.store.credentials import CredentialRepo
from polydev.store.models import Run
from polydev.store.runs import RUN_TERMINAL, CredentialBusy, RunRepo, StoredEvent
from polydev.store.sessions import SessionStore

if TYPE_CHECKING:
    from polydev.vm.agent_client import AgentClient
    from polydev.vm.engine import VM

log = structlog.get_logger(__name__)
WARM_UP_INPUT = b"polydev warm-up\n"
CANCEL_WAIT_S = 10.0  # how long a cancel waits for the replica driving the run to end it
CANCEL_POLL_S = 0.5


def _cancel_key(run_id: uuid.UUID) -> str:
    return f"run-cancel:{run_id}"

__all__ = ["BadRunFiles", "CredentialBusy", "NoCredential", "RunEvents", "RunFlow"]


class NoCredential(Exception):
    """The user has stored nothing for this provider."""


class BadRunFiles(ValueError):
    pass


class Wake(asyncio.Event):
    """Set when a run's events are stored; `stored` holds those the writer passed along (already in the table)."""

    def __init__(self) -> None:
        super().__init__()
        self.stored: list[StoredEvent] = []


class RunEvents:
    """Wakes the readers of a run when new events are stored. In-process only: readers on another replica
    fall back to polling the table, so this is a latency shortcut, not the source of truth."""

    def __init__(self) -> None:
        self._waiters: dict[uuid.UUID, Wake] = {}

    def waiter(self, run_id: uuid.UUID) -> Wake:
        ev = self._waiters.get(run_id)
        if ev is None or ev.is_set():
            ev = self._waiters[run_id] = Wake()
        return ev

    def notify(self, run_id: uuid.UUID, stored: list[StoredEvent] | None = None) -> None:
        """Call after the events are committed: readers may hand `stored` on without reading it back."""
        ev = self._waiters.pop(run_id, None)
        if ev is not None:
            ev.stored = stored or []
            ev.set()


def check_files(files: dict[str, str] | None, limit: int) -> dict[str, bytes]:
    """Files the user sends with a run: relative paths inside the run's working directory."""
    out: dict[str, bytes] = {}
    total = 0
    for name, content in (files or {}).items():
        path = PurePosixPath(name)
        if not name or path.is_absolute() or ".." in path.parts or "\0" in name or len(name) > 255:
            raise BadRunFiles(f"file name {name[:80]!r} must be a relative path inside the working directory")
        data = content.encode()
        total += len(data)
        out[str(path)] = data
    if total > limit:
        raise BadRunFiles(f"files total {total} bytes; the limit is {limit}")
    return out


class _Live:
    def __init__(self, run_id: uuid.UUID) -> None:
        self.run_id = run_id
        self.task: asyncio.Task[None] | None = None
        self.proc: GuestProcess | None = None
        self.cancelled_by_user = False
        self.seq = -1
        self.pending: asyncio.Task[None] | None = None  # an event being stored in the background
        self.ending = False  # its task is in its clean-up: a cancel now would cut that short


class RunFlow:
    def __init__(self, *, runs: RunRepo, credentials: CredentialRepo, engine: Callable[[], Any],
                 guest_env: Callable[[str], GuestEnv], ca_pem: bytes | None = None,
                 default_timeout: int = 900, events: RunEvents | None = None,
                 poll_interval: float = 0.5, signals: SessionStore | None = None) -> None:
        self.runs = runs
        self.credentials = credentials
        self._engine = engine  # () -> (VMEngine | None, reason when None)
        self._guest_env = guest_env  # provider -> GuestEnv (API base URLs differ per provider)
        self.ca_pem = ca_pem
        self.default_timeout = default_timeout
        self.events = events or RunEvents()
        self.poll_interval = poll_interval
        self._live: dict[uuid.UUID, _Live] = {}
        # With a store other replicas share (Redis), a cancel that reaches a replica not driving the run is
        # left there for the one that does; with the in-process store there is no other replica.
        self._signals = signals if signals is not None and signals.kind != "memory" else None
        self._cancel_watch: asyncio.Task[None] | None = None

    # -- API-facing ---------------------------------------------------------------------------------------

    async def start(self, user_id: uuid.UUID, provider: str, prompt: str, *, files: dict[str, bytes] | None = None,
                    timeout: int | None = None) -> Run:
        from polydev.core.login_flow import FlowUnavailable

        adapter = get_adapter(provider)
        found = await self.credentials.reveal_with_kind(user_id, provider)
        if found is None:
            raise NoCredential(provider)
        engine, reason = self._engine()
        if engine is None:
            raise FlowUnavailable(reason or "this server runs no VMs")
        kind, secret = found
        bundle = CredentialBundle.from_bytes(secret, kind)
        timeout = timeout or self.default_timeout
        row = await self.runs.create(user_id, provider, prompt, timeout_seconds=timeout, credential_kind=kind)
        live = _Live(row.id)
        self._live[row.id] = live
        live.task = asyncio.create_task(self._drive(live, row, adapter, bundle, files or {}, engine),
                                        name=f"run-{row.id}")
        self._watch_cancels()
        log.info("run_started", run_id=str(row.id), provider=provider, credential_kind=kind)
        return row

    async def cancel(self, user_id: uuid.UUID, run_id: uuid.UUID) -> Run | None:
        row = await self.runs.get_owned(user_id, run_id)
        if row is None:
            return None
        live = self._live.get(run_id)
        if live is not None and live.task is not None and not live.task.done():
            if live.ending:  # it is ending anyway: let it finish its clean-up
                await asyncio.wait([live.task])
            else:
                live.cancelled_by_user = True
                await cancel_and_wait([live.task])
        elif row.status not in RUN_TERMINAL and not await self._driver_cancelled(run_id):
            # Nobody drives it (the process that did has stopped): the stream's last event goes after what
            # that process stored, so its number comes from the table.
            await self._emit(_Live(run_id), event("error", message="cancelled by the user"), seq_from_db=True)
            await self.runs.finish(run_id, "cancelled", error="cancelled by the user")
        return await self.runs.get_owned(user_id, run_id)

    async def _driver_cancelled(self, run_id: uuid.UUID) -> bool:
        """Ask the replica driving the run, if any, to cancel it (it kills the CLI, writes back refreshed
        tokens, destroys the VM and frees the credential); True once the run has ended."""
        if self._signals is None:
            return False
        key = _cancel_key(run_id)
        await self._signals.create(key, {"cancel": True}, ttl=int(CANCEL_WAIT_S) + 30)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + CANCEL_WAIT_S
        while loop.time() < deadline:
            await asyncio.sleep(0.2)
            row = await self.runs.get(run_id)
            if row is None or row.status in RUN_TERMINAL:
                return True
        await self._signals.delete(key)
        return False

    def _watch_cancels(self) -> None:
        """While this replica drives runs, look for cancels other replicas left for them."""
        if self._signals is None or (self._cancel_watch is not None and not self._cancel_watch.done()):
            return
        self._cancel_watch = asyncio.get_running_loop().create_task(self._cancel_loop(), name="run-cancels")

    async def _cancel_loop(self) -> None:
        assert self._signals is not None
        while self._live:
            for run_id, live in list(self._live.items()):
                try:
                    if live.task is None or live.task.done() or live.ending or \
                            not await self._signals.get(_cancel_key(run_id)):
                        continue
                    await self._signals.delete(_cancel_key(run_id))
                    log.info("run_cancel_relayed", run_id=str(run_id))
                    live.cancelled_by_user = True
                    live.task.cancel()  # its own ending does the rest, as for a cancel received here
                except Exception:  # one run's trouble must not stop the others' cancels
                    log.exception("run_cancel_watch_failed", run_id=str(run_id))
            await asyncio.sleep(CANCEL_POLL_S)

    async def stream(self, run_id: uuid.UUID, after: int = -1) -> AsyncIterator[StoredEvent | None]:
        """Every event after `after`, then the live ones as they come, until the run has ended. Yields None
        while nothing happens (the caller sends a keep-alive)."""
        idle_since = time.monotonic()
        while True:
            waiter = self.events.waiter(run_id)  # taken before reading, so no event slips between the two
            batch = await self.runs.events_after(run_id, after)
            for ev in batch:
                after = ev.seq
                yield ev
            if batch:
                idle_since = time.monotonic()
                continue
            row = await self.runs.get(run_id)
            if row is None or row.status in RUN_TERMINAL:
                for ev in await self.runs.events_after(run_id, after):  # written just before the end
                    yield ev
                return
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.poll_interval):
                    await waiter.wait()
            if waiter.stored and waiter.stored[0].seq == after + 1:
                # What woke us follows on from what we sent: on without a read back (the next loop reads).
                for ev in waiter.stored:
                    after = ev.seq
                    yield ev
                idle_since = time.monotonic()
                continue
            if time.monotonic() - idle_since > 15:
                idle_since = time.monotonic()
                yield None

    async def close(self) -> None:
        await cancel_and_wait([x.task for x in list(self._live.values())])
        if self._cancel_watch is not None:
            await cancel_and_wait([self._cancel_watch])

    async def reclaim(self) -> int:
        """At start-up: runs a previous process was driving can never finish now."""
        n = 0
        for row in await self.runs.live():
            if row.id not in self._live:
                reason = "the server restarted before the run finished"
                await self._emit(_Live(row.id), event("error", message=reason), seq_from_db=True)
                n += await self.runs.finish(row.id, "failed", error=reason)
        return n

    # -- the warm pool's preparation ---------------------------------------------------------------------

    def staged_files(self) -> list[GuestFile]:
        """What `prepare_vm` puts in every pooled VM: the base files that are the same whichever provider the
        VM will run (the guest paths come per provider; today the working directory and the CA are common)."""
        per_provider = [base_files(self._guest_env(name), self.ca_pem) for name in ADAPTERS]
        return [f for f in per_provider[0] if all(f in other for other in per_provider[1:])]

    async def prepare_vm(self, vm: VM, client: AgentClient) -> None:
        """The engine's `pool_prepare` hook: stage the common files, then make one request of each kind a
        run makes (file PUT above, a streamed exec with stdin, a file GET), so that the agent's code paths
        are translated and warm before a run's requests arrive. Raises when the guest does not do them."""
        guest = Guest(client)
        staged = self.staged_files()
        await guest.put(*staged)
        workdirs = {self._guest_env(name).workdir for name in ADAPTERS}
        cwd = workdirs.pop() if len(workdirs) == 1 else "/"
        proc = guest.start(Command(["/bin/sh", "-c", "cat"], {}, cwd, stdin=WARM_UP_INPUT), timeout_s=60)
        lines = [line async for line in proc.lines()]
        if proc.exit_code != 0 or lines != [WARM_UP_INPUT.decode().strip()]:
            raise RuntimeError(f"warm-up exec in VM {vm.id} exited {proc.exit_code} with {lines[:3]!r}")
        if staged and await guest.read(staged[-1].path) != (staged[-1].data, staged[-1].mode):
            raise RuntimeError(f"VM {vm.id} does not hold the staged {staged[-1].path}")

    # -- the flow -----------------------------------------------------------------------------------------

    def _emit_soon(self, live: _Live, ev: dict[str, Any]) -> None:
        """Store an event while the caller goes on; the next `_emit` waits for it, so the order holds."""
        live.pending = asyncio.create_task(self._store(live, ev))

    async def _settle(self, live: _Live) -> None:
        """Wait until the event being stored in the background is; raises what storing it raised."""
        pending = live.pending
        if pending is not None:
            await asyncio.wait([pending])  # not `await pending`: cancelling the run must not cancel the store
            live.pending = None
            pending.result()

    async def _emit(self, live: _Live, ev: dict[str, Any], seq_from_db: bool = False) -> None:
        await self._settle(live)
        await self._store(live, ev, seq_from_db)

    async def _store(self, live: _Live, ev: dict[str, Any], seq_from_db: bool = False) -> None:
        if seq_from_db:
            live.seq = await self.runs.last_seq(live.run_id)
        live.seq += 1
        stored = [StoredEvent(live.seq, ev)]
        await self.runs.append_events(live.run_id, stored)
        self.events.notify(live.run_id, stored)

    async def _drive(self, live: _Live, row: Run, adapter: ProviderAdapter, bundle: CredentialBundle,
                     files: dict[str, bytes], engine: Any) -> None:
        run_id = row.id
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
            self._emit_soon(live, event("status", message="starting a VM"))
            vm = await engine.create(row.user_id, "cli", ttl=timedelta(seconds=timeout + 180))
            vm_id = vm.id
            guest = Guest(engine.agent(vm.id, timeout=timeout + 60))
            command = adapter.run_command(row.prompt, env, api_key=bundle.api_key if bundle.kind == "api_key"
                                          else None)
            to_put = self._files_for(env, bundle, files, command.files)
            if vm.prepared:  # the pool's preparation put these already
                staged = self.staged_files()
                to_put = [f for f in to_put if f not in staged]
            await guest.put(*to_put)
            live.proc = proc = guest.start(command, timeout_s=timeout)
            # Stored while the guest starts the CLI (its output is read only after these): the row and the
            # status are not on the way to the CLI's first line.
            await self.runs.mark_running(run_id, vm.id)
            await self._emit(live, event("status", message=f"running {adapter.display_name}"))
            parser = adapter.new_parser()
            # stderr too: the parsers ignore its noise but take crash reasons from it.
            async for line in proc.lines("stdout", "stderr"):
                for ev in parser.feed(line):
                    ended = ended or ev["type"] in ("done", "error")
                    usage = ev.get("usage", usage) if ev["type"] == "done" else usage
                    result = ev.get("result", result) if ev["type"] == "done" else result
                    await self._emit(live, ev)
            exit_code = proc.exit_code
            final = parser.finish(exit_code if exit_code is not None else -1)
            if proc.timed_out:
                status, error = "timeout", f"the run did not finish within {timeout} s"
                final = [event("error", message=error)]
            for ev in final:  # the parsers emit their `done` here, at the end, with the result
                ended = ended or ev["type"] in ("done", "error")
                usage = ev.get("usage", usage) if ev["type"] == "done" else usage
                result = ev.get("result", result) if ev["type"] == "done" else result
                await self._emit(live, ev)
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
            live.ending = True
            with contextlib.suppress(Exception):  # a failure to store it has failed the run already
                await self._settle(live)
            if status != "succeeded" and (not ended or status == "cancelled"):
                with contextlib.suppress(Exception):  # every stream ends in done or error
                    await self._emit(live, event("error", message=error or "the run failed"))
            if guest is not None:
                guest.close()
            if vm_id is not None:
                with contextlib.suppress(Exception):
                    await engine.destroy(vm_id)
            await self.runs.finish(run_id, status, error=error, exit_code=exit_code, usage=usage, result=result,
                                   refreshed=refreshed)
            self.events.notify(run_id)
            self._live.pop(run_id, None)
            log.info("run_ended", run_id=str(run_id), status=status, credential_refreshed=refreshed)

    def _files_for(self, env: GuestEnv, bundle: CredentialBundle, files: dict[str, bytes],
                   command_files: tuple[GuestFile, ...]) -> list[GuestFile]:
        out = [*base_files(env, self.ca_pem), *command_files]
        for rel, (data, _mode) in bundle.files.items():
            out.append(GuestFile(env.home_path(rel), data, 0o600))  # the run's copy is private, whatever it was
        out += [GuestFile(f"{env.workdir}/{name}", data, 0o644) for name, data in files.items()]
        return out

    async def _write_back(self, guest: Guest, env: GuestEnv, adapter: ProviderAdapter,
                          bundle: CredentialBundle, row: Run) -> bool:
        """Seal the credential files again when the CLI changed them (a refresh); True if it did."""
        if bundle.kind != "oauth":
            return False
        fresh = CredentialBundle("oauth")
        for rel in adapter.credential_files:
            found = await guest.read(env.home_path(rel))
            if found is not None and found[0].strip():
                fresh.files[rel] = (found[0], bundle.files.get(rel, (b"", 0o600))[1])
        if any(rel not in fresh.files for rel in adapter.required_credential_files):
            return False  # a CLI that deleted its login: keep what we had rather than store half of it
        # Only the token files decide: the CLIs rewrite their other files (Claude's ~/.claude.json counts
        # start-ups) on every run, which is no refresh and not worth a new sealed record.
        if all(fresh.files[rel][0] == bundle.files.get(rel, (b"", 0))[0]
               for rel in adapter.required_credential_files):
            return False
        await self.credentials.put(row.user_id, adapter.name, "oauth", fresh.to_bytes())
        log.info("credential_refreshed", run_id=str(row.id), provider=adapter.name)
        return True


def _reason(exc: BaseException, vm_started: bool) -> str:
    from polydev.vm.agent_client import AgentError

    text = f"{type(exc).__name__}: {exc}"[:400]
    if vm_started and isinstance(exc, (AgentError, OSError)) or "httpx" in type(exc).__module__:
        return f"the VM stopped responding during the run ({text})"
    return text
