"""Provider-flow latency through the real platform, one run: (i) POST /api/auth/start to `auth_url`, and
(ii) the platform's added latency to the first streamed event of a run.

    .venv/bin/python bench/run_latency.py [--n 5] [--provider claude_code] [--memory 2048] [--only login|run]

Runs the real app (uvicorn on loopback, SQLite, the QEMU engine on the `test` image) with the stand-ins on
the host's loopback, reached by the guests only through VM_GUEST_FORWARDS, as in
tests/vm/test_provider_flows_vm.py. Every VM is a restore of the engine's snapshot (made by the first
VM, not timed). Each platform measurement is interleaved with its baseline, so both see the same load:

(i)  login: POST /api/auth/start → the flow publishes `auth_url` (the moment it stores it, observed in the
     flow: a client polling every few ms takes CPU the emulated guest needs), the warm pool off, so the VM
     restore is included; against the same login command started through the agent
     in an already-running VM (exec → the URL in the `$BROWSER` hook's file). The session's own status
     changes (vm_created, ready) split the platform's time.
(ii) run: POST /api/runs → the first CLI-originated event on GET /api/runs/{id}/events (a real streaming
     HTTP client), with VM_WARM_POOL_SIZE=1 so VM creation is not measured (the pool's VMs are prepared as
     the server prepares them: common files staged, the agent warmed); against the same CLI command
     through the agent in an already-running VM (a pooled VM too: exec → first stdout line). The run flow
     is observed (not changed) at the exec call, the first output line and the stored event, so the
     platform's own part is also given piece by piece: before the exec (pool hand-out, rows, file PUTs,
     status events) and after the CLI's line reached the host (parse, event stored, SSE wake-up, HTTP).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polydev.api.app import create_app
from polydev.config import Settings
from polydev.core import guest as guest_mod
from polydev.core import run_events as run_events_mod
from polydev.core import run_flow as run_flow_mod
from polydev.core.login_sessions import LoginSessions
from polydev.logging import configure_logging
from polydev.providers import ADAPTERS
from polydev.providers.base import CredentialBundle, GuestFile, hook_files
from polydev.vm import images
from polydev.vm.engine import VMEngine
from tests.standins import api as standin_api
from tests.standins.vm import VmStandins
from tests.support.servers import free_port

PLATFORM_STATUSES = ("starting a VM", "running ")  # the run flow's own status events, before the CLI's
API_KEY = "sk-bench-" + uuid.uuid4().hex  # the stand-in takes any key


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:8.1f} ms  p95 {pct(values, 0.95) * 1000:8.1f} ms"


class Marks:
    """Timestamps the run flow reaches, recorded by wrapping (not changing) its collaborators."""

    def __init__(self) -> None:
        self.exec_called: float | None = None
        self.first_line: float | None = None
        self.stored: float | None = None
        self.vm_ready: float | None = None  # the engine handed out the VM
        self.run_started: float | None = None  # RunFlow.start returned: run row written, its task created
        self.puts: tuple[float, float] | None = None  # first Guest.put began, last ended (before the exec)
        self.statuses: dict[str, float] = {}  # login session status -> when the flow published it
        self.active = False

    def reset(self) -> None:
        self.exec_called = self.first_line = self.stored = self.vm_ready = self.run_started = None
        self.puts = None
        self.active = True

    def install(self) -> None:
        marks = self
        start, lines, emit = guest_mod.Guest.start, guest_mod.GuestProcess.lines, run_events_mod.EventWriter.emit
        put, create = guest_mod.Guest.put, VMEngine.create
        update = LoginSessions.update
        run_start = run_flow_mod.RunFlow.start

        async def timed_run_start(self: Any, *args: Any, **kw: Any) -> Any:
            row = await run_start(self, *args, **kw)
            if marks.active and marks.run_started is None:
                marks.run_started = time.perf_counter()
            return row

        async def timed_update(self: Any, session_id: Any, **changes: Any) -> Any:
            out = await update(self, session_id, **changes)
            if "status" in changes:
                marks.statuses.setdefault(changes["status"], time.perf_counter())
            return out

        async def timed_put(self: Any, *files: Any) -> None:
            t0 = time.perf_counter()
            await put(self, *files)
            # Only the run's own PUTs: the pool refilling meanwhile (and preparing its next VM) puts too.
            if marks.active and marks.exec_called is None and _in_run_task():
                marks.puts = (min(t0, marks.puts[0]) if marks.puts else t0, time.perf_counter())

        async def timed_create(self: Any, *args: Any, **kw: Any) -> Any:
            vm = await create(self, *args, **kw)
            if marks.active and marks.vm_ready is None:
                marks.vm_ready = time.perf_counter()
            return vm

        def timed_start(self: Any, command: Any, timeout_s: float | None = None) -> Any:
            if marks.active and marks.exec_called is None and _in_run_task():  # not the pool's warm-up exec
                marks.exec_called = time.perf_counter()
            return start(self, command, timeout_s)

        async def timed_lines(self: Any, *streams: str) -> Any:
            async for line in lines(self, *streams):
                if marks.active and marks.first_line is None and _in_run_task():
                    marks.first_line = time.perf_counter()
                yield line

        async def timed_emit(self: Any, ev: dict[str, Any], seq_from_db: bool = False) -> None:
            await emit(self, ev, seq_from_db)
            if marks.active and marks.stored is None and not _platform_event(ev):
                marks.stored = time.perf_counter()

        guest_mod.Guest.start = timed_start  # type: ignore[method-assign]
        guest_mod.Guest.put = timed_put  # type: ignore[method-assign]
        VMEngine.create = timed_create  # type: ignore[method-assign]
        LoginSessions.update = timed_update  # type: ignore[method-assign]
        guest_mod.GuestProcess.lines = timed_lines  # type: ignore[method-assign]
        run_events_mod.EventWriter.emit = timed_emit  # type: ignore[method-assign]
        run_flow_mod.RunFlow.start = timed_run_start  # type: ignore[method-assign]


def _in_run_task() -> bool:
    task = asyncio.current_task()
    return task is not None and task.get_name().startswith("run-")


def _platform_event(ev: dict[str, Any]) -> bool:
    return ev.get("type") == "status" and str(ev.get("message", "")).startswith(PLATFORM_STATUSES)


class Bench:
    def __init__(self, client: httpx.AsyncClient, services: Any, provider: str, headers: dict[str, str]) -> None:
        self.client = client
        self.services = services
        self.engine = services.engine
        self.provider = provider
        self.adapter = ADAPTERS[provider]
        self.h = headers
        self.env = services.guest_env(provider)
        self.ca_pem = services.settings.guest_ca_cert_file.read_bytes()
        self.skew: float | None = None

    # -- (i) login ------------------------------------------------------------------------------------
    async def platform_login(self, marks: Marks) -> dict[str, float]:
        """POST /api/auth/start, then the moments the flow published each status (observed in the flow, so
        that no polling client takes CPU from the emulated guest on a 2-core machine)."""
        marks.statuses = {}
        t0 = time.perf_counter()
        r = await self.client.post("/api/auth/start", json={"provider": self.provider}, headers=self.h)
        r.raise_for_status()
        sid = r.json()["session_id"]
        seen: dict[str, float] = {"answered": time.perf_counter() - t0}
        async with asyncio.timeout(600):
            while "awaiting_user_auth" not in marks.statuses:
                await asyncio.sleep(0.05)
        body = (await self.client.get(f"/api/auth/sessions/{sid}", headers=self.h)).json()
        if not body.get("auth_url"):
            raise RuntimeError(f"login {body['status']} without auth_url: {body.get('error_message')}")
        seen.update({k: v - t0 for k, v in marks.statuses.items()})
        seen["auth_url"] = seen["awaiting_user_auth"]
        await self.client.post(f"/api/auth/sessions/{sid}/cancel", headers=self.h)
        return seen

    async def pre_started_logins(self, marks: Marks, n: int) -> list[dict[str, float]]:
        """(i) again with LOGIN_POOL on: each start takes a login the pool drove up to its URL beforehand."""
        flow = self.services.login_flow
        method = self.adapter.login_methods[0]
        flow.set_pool({(self.provider, method): 1})
        flow.start_pool()
        out = []
        try:
            for i in range(n):
                async with asyncio.timeout(600):  # the pool's CLI start (not timed)
                    while flow.pool.counts()[f"{self.provider}:{method}"]["ready"] < 1:
                        await asyncio.sleep(0.2)
                out.append(await self.platform_login(marks))
                print(f"  pre-started login {i + 1}/{n}: {out[-1]['auth_url'] * 1000:.0f} ms", flush=True)
        finally:
            await flow.stop_pool()
        return out

    @contextlib.asynccontextmanager
    async def running_vm(self) -> AsyncIterator[tuple[guest_mod.Guest, list[guest_mod.GuestProcess]]]:
        """An already-running VM (restored, or from the pool when it is on) for a baseline, destroyed after;
        the processes put in the list are killed first."""
        vm = await self.engine.create(None, "cli")
        g = guest_mod.Guest(self.engine.agent(vm.id, timeout=300))
        procs: list[guest_mod.GuestProcess] = []
        try:
            yield g, procs
        finally:
            for proc in procs:
                await proc.kill()
            g.close()
            await self.engine.destroy(vm.id)

    async def direct_login(self) -> dict[str, float]:
        """The same login command in a running VM: when the hook caught a URL, and when the URL the platform
        publishes was there (a paste-code login without the in-VM browser publishes the URL the CLI prints,
        which the user can open from outside the VM; the others the hook's)."""
        async with self.running_vm() as (g, procs):
            plan = self.adapter.login_plan("browser", self.env)
            await g.put(*hook_files(self.env), *plan.command.files,
                        GuestFile(self.env.ca_cert_path or "/tmp/ca.pem", self.ca_pem, 0o644))
            t0 = time.perf_counter()
            procs.append(g.start(plan.command, timeout_s=300))
            seen: dict[str, float] = {}

            async def printed() -> None:
                output = ""
                async for ev in procs[0].events():
                    if ev.type in ("stdout", "stderr"):
                        output += ev.bytes().decode("utf-8", "replace")
                        if "printed" not in seen and self.adapter.parse_login_output(output).auth_url:
                            seen["printed"] = time.perf_counter() - t0

            async def hooked() -> None:
                while await g.watch([self.env.urls_file], 30) is None:
                    pass
                seen["hook"] = time.perf_counter() - t0

            tasks = [asyncio.create_task(printed()), asyncio.create_task(hooked())]
            wanted = "printed" if plan.accepts_code else "hook"
            async with asyncio.timeout(300):
                while wanted not in seen:
                    await asyncio.sleep(0.01)
            seen["published"] = seen[wanted]
            await asyncio.sleep(0.5)  # the other one, if it comes right after
            for task in tasks:
                task.cancel()
            return seen

    # -- (ii) first streamed event ----------------------------------------------------------------------
    async def platform_run(self, marks: Marks, prompt: str) -> dict[str, float]:
        await self.pool_full()
        marks.reset()
        t0 = time.perf_counter()
        r = await self.client.post("/api/runs", json={"provider": self.provider, "prompt": prompt}, headers=self.h)
        r.raise_for_status()
        answered = time.perf_counter()
        rid = r.json()["id"]
        first: float | None = None
        async with self.client.stream("GET", f"/api/runs/{rid}/events", headers=self.h) as resp:
            async for line in resp.aiter_lines():
                if first is None and line.startswith("data: ") and not _platform_event(json.loads(line[6:])):
                    first = time.perf_counter()
        marks.active = False
        body = (await self.client.get(f"/api/runs/{rid}", headers=self.h)).json()
        if body["status"] != "succeeded" or None in (first, marks.exec_called, marks.first_line, marks.stored):
            raise RuntimeError(f"run {body['status']}: {body.get('error_message')}")
        assert first is not None and marks.exec_called and marks.first_line and marks.stored
        assert marks.vm_ready is not None and marks.run_started is not None
        puts = marks.puts[1] - marks.puts[0] if marks.puts else 0.0
        # The run's task hands out the VM and starts the CLI while the POST's answer travels back, so the
        # answer is timed on its own, not as a part of the path to the exec.
        return {"total": first - t0, "before_exec": marks.exec_called - t0, "answered": answered - t0,
                "run_started": marks.run_started - t0, "to_vm": marks.vm_ready - marks.run_started,
                "puts": puts, "rest": marks.exec_called - marks.vm_ready - puts,
                "cli": marks.first_line - marks.exec_called, "line_to_stored": marks.stored - marks.first_line,
                "stored_to_client": first - marks.stored, "added": (marks.exec_called - t0) + (first - marks.first_line)}

    async def direct_run(self, prompt: str) -> float:
        await self.pool_full()
        async with self.running_vm() as (g, procs):  # a pooled VM, as the platform's run gets
            command = self.adapter.run_command(prompt, self.env, api_key=API_KEY)
            bundle = CredentialBundle("api_key", api_key=API_KEY)  # the files the platform puts, exactly
            await g.put(*self.services.run_flow._files_for(self.env, bundle, {}, command.files))
            if self.skew is None:  # once: how far the restored guest's clock is from the host's
                out = await asyncio.to_thread(g.client.exec, ["date", "+%s.%N"], timeout_s=30)
                self.skew = float(out.stdout.strip()) - time.time()
            t0 = time.perf_counter()
            procs.append(g.start(command, timeout_s=300))
            took = None
            async for _ in procs[0].lines():
                took = took or time.perf_counter() - t0
            if took is None:
                raise RuntimeError(f"the direct run printed nothing (exit {procs[0].exit_code})")
            return took

    async def pool_full(self) -> None:
        while len(self.engine.pool.ready) < self.engine.pool.size:
            await asyncio.sleep(0.05)


async def _drain(proc: guest_mod.GuestProcess) -> None:
    with contextlib.suppress(Exception):
        async for _ in proc.events():
            pass


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=5, help="measurements of each kind")
    parser.add_argument("--provider", default="claude_code", choices=sorted(ADAPTERS))
    parser.add_argument("--memory", type=int, default=2048)
    parser.add_argument("--only", choices=("login", "run"), help="measure only this part")
    args = parser.parse_args()

    import uvicorn

    configure_logging("warning")  # the server's per-request log lines would bury the figures
    image, _ = images.ensure(Settings().cache_dir, "test")
    marks = Marks()
    marks.install()
    with tempfile.TemporaryDirectory(prefix="polydev-run-bench-") as tmp, \
            VmStandins(Path(tmp) / "standins", standin_api.Script(text="Hello from the bench.")) as si:
        settings = Settings(POLYDEV_DATA_DIR=Path(tmp) / "data", POLYDEV_CACHE_DIR=image.dir.parent.parent,
                            vm_image_profile="test", vm_cli_memory_mb=args.memory, vm_cli_vcpu=1,
                            vm_warm_pool_size=0, login_browser="off", log_level="warning", **si.settings())
        app = create_app(settings)
        port = free_port()
        server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                               access_log=False))
        serving = asyncio.create_task(server.serve())
        while not server.started:
            await asyncio.sleep(0.05)
        try:
            services = app.state.services
            if services.engine is None:
                raise SystemExit(f"no VM engine: {services.engine_unavailable}")
            admin = {"Authorization": f"Bearer {(settings.data_dir / 'admin.token').read_text().strip()}"}
            async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=600) as client:
                uid = (await client.post("/api/users", json={"name": "bench"}, headers=admin)).json()["id"]
                token = (await client.post(f"/api/users/{uid}/tokens", json={"name": "t"}, headers=admin)).json()
                h = {"Authorization": f"Bearer {token['token']}"}
                r = await client.put(f"/api/credentials/{args.provider}/api-key", json={"api_key": API_KEY}, headers=h)
                r.raise_for_status()
                bench = Bench(client, services, args.provider, h)
                t0 = time.perf_counter()
                await services.engine.destroy((await services.engine.create(None, "cli")).id)
                print(f"snapshot for {args.memory} MiB made (first VM, cold boot): {time.perf_counter() - t0:.1f} s "
                      f"[{services.engine.describe().accel}]", flush=True)
                name = ADAPTERS[args.provider].display_name
                if args.only != "run":
                    logins: list[dict[str, float]] = []
                    direct_seen: list[dict[str, float]] = []
                    for i in range(args.n):
                        logins.append(await bench.platform_login(marks))
                        direct_seen.append(await bench.direct_login())
                        print(f"  login {i + 1}/{args.n}: platform {logins[-1]['auth_url']:.2f} s, "
                              f"direct {direct_seen[-1]}", flush=True)
                    direct = [x["published"] for x in direct_seen]
                    urls = [x["auth_url"] for x in logins]
                    print(f"\n(i) {name} login, POST /api/auth/start -> auth_url, VM restored from the snapshot, "
                          f"n={args.n}")
                    print(f"  platform                                  {ms(urls)}")
                    for a, b in (("answered", "POST answered"), ("vm_created", "VM restored"),
                                 ("ready", "files put, CLI started"), ("auth_url", "auth_url shown")):
                        vals = [x[a] for x in logins if a in x]
                        if vals:
                            print(f"    start -> {b:30s} {ms(vals)}")
                    print(f"  baseline: login command in a running VM   {ms(direct)}  (the URL the platform publishes)")
                    for key, label in (("hook", "the $BROWSER hook called"), ("printed", "the URL printed")):
                        vals = [x[key] for x in direct_seen if key in x]
                        if vals:
                            print(f"    exec -> {label:31s} {ms(vals)}")
                    print(f"  -> platform / baseline p50: {statistics.median(urls) / statistics.median(direct):.2f}x; "
                          f"target <= 3 s p50: {'met' if statistics.median(urls) <= 3 else 'missed'}")
                    pooled = await bench.pre_started_logins(marks, args.n)
                    print(f"\n(i') {name} login with pre-started logins (LOGIN_POOL={args.provider}=1; each "
                          f"measured once the pool holds a login with its URL), n={args.n}")
                    print(f"  platform: POST /api/auth/start -> auth_url  {ms([x['auth_url'] for x in pooled])}")
                    print(f"    start -> POST answered (with auth_url)   {ms([x['answered'] for x in pooled])}")
                    print(f"  -> target <= 3 s p50: "
                          f"{'met' if statistics.median([x['auth_url'] for x in pooled]) <= 3 else 'missed'}")
                if args.only == "login":
                    return
                services.engine.pool.size = 1
                services.engine.start_pool()
                runs: list[dict[str, float]] = []
                direct_runs: list[float] = []
                prompt = "Say hello."
                for i in range(args.n):
                    runs.append(await bench.platform_run(marks, prompt))
                    direct_runs.append(await bench.direct_run(prompt))
                    print(f"  run {i + 1}/{args.n}: platform {runs[-1]['total']:.2f} s, direct "
                          f"{direct_runs[-1]:.2f} s", flush=True)
                total = [x["total"] for x in runs]
                print(f"\n(ii) {name} run, first CLI-originated event, warm pool (VM creation not measured), n={args.n}")
                print(f"  platform: POST /api/runs -> first CLI event on SSE   {ms(total)}")
                print(f"  baseline: exec -> first stdout line, running VM      {ms(direct_runs)}")
                diff = statistics.median(total) - statistics.median(direct_runs)
                print(f"  difference of the p50s: {diff * 1000:+.0f} ms (CLI start-up noise under TCG included)")
                print("  the platform's own part, per run:")
                for key, label in (("before_exec", "POST -> exec called (pool, rows, PUTs)"),
                                   ("run_started", "  of which POST -> run row + task (HTTP, auth, cred.)"),
                                   ("to_vm", "  of which then -> VM handed out by the pool"),
                                   ("puts", "  of which the run's file PUTs into the guest"),
                                   ("rest", "  of which the rest up to the exec"),
                                   ("answered", "meanwhile: POST -> its answer at the client"),
                                   ("cli", "exec called -> first line at host (the CLI)"),
                                   ("line_to_stored", "first line -> event stored"),
                                   ("stored_to_client", "event stored -> SSE client has it"),
                                   ("added", "added = before exec + after the line")):
                    print(f"    {label:46s} {ms([x[key] for x in runs])}")
                print(f"  (a restored guest's clock was {bench.skew:+.0f} s off the host's: the snapshot's time)")
                added = statistics.median([x["added"] for x in runs])
                print(f"  -> added p50 {added * 1000:.1f} ms; target <= 20 ms p50: {'met' if added <= 0.020 else 'missed'}")
        finally:
            server.should_exit = True
            await serving


if __name__ == "__main__":
    asyncio.run(main())
