"""VM readiness through the engine, one run: cold boot, snapshot restore (p50/p95), where a restore's time
goes against the previous method, overlay vs full copy, and memory per idle VM.

    .venv/bin/python bench/vm_ready.py [--vms 10] [--memory 1024] [--profile test] [--rounds 6]

Runs the real engine (QEMU backend, user networking, SQLite in a temporary data directory). The cold boot
is the first VM's, which also makes the snapshot every later VM restores; the engine's VMs stay up while
later ones are timed. Baselines, each in this process: restores from the engine's snapshot (guest RAM in a
file, mapped copy-on-write) interleaved with restores from a full-state snapshot of the same guest (RAM in
the migration stream: the engine's previous method), one VM up at a time; and the overlay against a full
`dd` copy of the same base image (the seed's method). The machine is shared, so compare within one run.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polydev.config import Settings  # noqa: E402
from polydev.services import open_services  # noqa: E402
from polydev.store.leases import LeaseRepo  # noqa: E402
from polydev.store.vms import CleanupTaskRepo, VmRepo  # noqa: E402
from polydev.vm import images  # noqa: E402
from polydev.vm.backends.qemu.backend import QemuBackend  # noqa: E402
from polydev.vm.backends.qemu.machine import IGNORE_SHARED, QemuVM  # noqa: E402
from polydev.vm.backends.qemu.snapshot import Snapshot  # noqa: E402
from polydev.vm.engine import VMEngine, find_marked_processes  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pss_mib(pid: int) -> float:
    """Proportional set size: shared pages (the snapshot's RAM file in the page cache) split among sharers."""
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) / 1024
    return 0.0


def available_mib() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) / 1024
    return 0.0


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def time_overlay_vs_copy(base: Path, work: Path) -> tuple[float, float]:
    t0 = time.perf_counter()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-b", str(base), "-F", "raw",
                    str(work / "overlay.qcow2")], check=True)
    overlay = time.perf_counter() - t0
    t0 = time.perf_counter()
    subprocess.run(["dd", f"if={base}", f"of={work / 'copy.raw'}", "bs=4M", "status=none", "conv=fsync"], check=True)
    copy = time.perf_counter() - t0
    return overlay, copy


def full_state_snapshot(image: images.Image, snap: Snapshot, memory: int, work: Path) -> tuple[Path, Path, str]:
    """The previous method's snapshot of the same guest: restore the engine's snapshot once, then migrate it
    with its RAM in the stream (its RAM is a private mapping, so x-ignore-shared leaves it in; the capability
    must match on both sides). Returns (state, disk, token)."""
    token = secrets.token_urlsafe(16)
    vm = QemuVM(image, work / "full-src", token=snap.token, vcpus=1, memory_mb=memory, keep_console=False,
                backing=(snap.disk, "qcow2"), ram_file=(snap.ram, False), overlay_from=snap.empty_overlay)
    vm.restore(snap.state, snap.accel, token)
    try:
        vm.qmp("stop")
        vm.qmp("migrate-set-capabilities", IGNORE_SHARED)
        vm.qmp("migrate", {"uri": f"exec:cat > {work / 'full-state.bin'}"})
        while vm.qmp("query-migrate").get("status") != "completed":
            time.sleep(0.02)
        vm.kill()
        os.replace(vm.overlay, work / "full-disk.qcow2")
    finally:
        vm.stop()
    return work / "full-state.bin", work / "full-disk.qcow2", token


def timed_restore(vm: QemuVM, state: Path, accel: str) -> tuple[float, float]:
    """(QEMU start to guest resumed, resumed to the agent answering with its new token), seconds."""
    resumed: list[float] = []
    original = vm._resume_when_migrated

    def mark(deadline: float, uri: str) -> None:
        original(deadline, uri)
        resumed.append(time.perf_counter())

    vm._resume_when_migrated = mark  # type: ignore[method-assign]
    t0 = time.perf_counter()
    vm.restore(state, accel, secrets.token_urlsafe(16))
    done = time.perf_counter()
    vm.stop()
    return resumed[0] - t0, done - resumed[0]


def restore_breakdown(image: images.Image, snap: Snapshot, memory: int, work: Path, rounds: int) -> str:
    full_state, full_disk, full_token = full_state_snapshot(image, snap, memory, work)
    # Guest RAM for the full-state restores: a private mapping of an empty (sparse) file, so every page the
    # stream carries is loaded into memory of the VM's own, as with plain `-m` RAM.
    empty_ram = work / "empty.ram"
    with open(empty_ram, "wb") as f:
        f.truncate(memory * 2**20)
    times: dict[str, list[tuple[float, float]]] = {"RAM file (engine)": [], "full state (previous)": []}
    for i in range(rounds):  # interleaved, so both see the same machine load
        ram = QemuVM(image, work / f"ram-{i}", token=snap.token, vcpus=1, memory_mb=memory, keep_console=False,
                     backing=(snap.disk, "qcow2"), ram_file=(snap.ram, False), overlay_from=snap.empty_overlay)
        times["RAM file (engine)"].append(timed_restore(ram, snap.state, snap.accel))
        full = QemuVM(image, work / f"full-{i}", token=full_token, vcpus=1, memory_mb=memory, keep_console=False,
                      backing=(full_disk, "qcow2"), ram_file=(empty_ram, False))
        times["full state (previous)"].append(timed_restore(full, full_state, snap.accel))
    sizes = f"{snap.state.stat().st_size / 2**20:.1f} MiB vs {full_state.stat().st_size / 2**20:.0f} MiB"
    lines = [f"restore breakdown, {rounds} interleaved rounds, one VM up at a time (state file: {sizes}):"]
    totals = {}
    for kind, rows in times.items():
        start = statistics.median(r[0] for r in rows)
        answer = statistics.median(r[1] for r in rows)
        totals[kind] = statistics.median(r[0] + r[1] for r in rows)
        lines.append(f"  {kind:22s} QEMU start + state load to resumed p50 {start * 1000:4.0f} ms, resumed to agent "
                     f"answering p50 {answer * 1000:4.0f} ms, total p50 {totals[kind] * 1000:4.0f} ms")
    ratio = totals["full state (previous)"] / totals["RAM file (engine)"]
    lines.append(f"  -> the engine's restore takes {1 / ratio:.2f}x the previous method's time ({ratio:.2f}x faster)")
    return "\n".join(lines)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=10, help="restored VMs to time (at least 10 for p95)")
    parser.add_argument("--memory", type=int, default=1024)
    parser.add_argument("--profile", default="test")
    parser.add_argument("--rounds", type=int, default=6, help="interleaved restores for the breakdown")
    parser.add_argument("--idle", type=int, default=0, help="then hold this many VMs at once, idle, and "
                        "report the machine memory they take (the issue asks for 30)")
    args = parser.parse_args()

    image, _ = images.ensure(Settings().cache_dir, args.profile)
    with tempfile.TemporaryDirectory(prefix="polydev-vm-bench-") as tmp:
        settings = Settings(POLYDEV_DATA_DIR=Path(tmp) / "data")
        services = await open_services(settings)
        engine = VMEngine(backend=QemuBackend(image, settings.data_dir / "snapshots"), vms=VmRepo(services.factory),
                          cleanup=CleanupTaskRepo(services.factory), leases=LeaseRepo(services.factory),
                          data_dir=settings.data_dir, vcpus={"cli": 1, "browser": 1},
                          memory_mb={"cli": args.memory, "browser": args.memory})
        try:
            t0 = time.perf_counter()
            first = await engine.create(None, "cli")
            cold_and_snapshot = time.perf_counter() - t0
            backend = engine.backend
            assert isinstance(backend, QemuBackend)
            meta = (backend.snapshot_dir(1, args.memory) / "meta.json").read_text()
            restores: list[float] = []
            vms = [first]
            for _ in range(args.vms):
                t0 = time.perf_counter()
                vms.append(await engine.create(None, "cli"))
                restores.append(time.perf_counter() - t0)
            engine.pool.size = 3
            await engine.fill_pool()
            acquires: list[float] = []
            for _ in range(3):
                t0 = time.perf_counter()
                vms.append(await engine.create(None, "cli"))
                acquires.append(time.perf_counter() - t0)
            procs = find_marked_processes(engine.tag)
            await asyncio.sleep(2)  # let the restored guests settle before reading their memory
            rss = [rss_mib(procs[vm.id]) for vm in vms if vm.id in procs]
            pss = [pss_mib(procs[vm.id]) for vm in vms if vm.id in procs]
            for vm in vms:  # the breakdown runs one VM at a time
                await engine.destroy(vm.id)
            vms = []
            snap = backend.ensure_snapshot(1, args.memory, "unused")
            breakdown = await asyncio.to_thread(restore_breakdown, image, snap, args.memory, Path(tmp), args.rounds)
            idle_report = ""
            if args.idle:
                before = available_mib()
                t0 = time.perf_counter()
                vms = list(await asyncio.gather(*(engine.create(None, "cli") for _ in range(args.idle))))
                took = time.perf_counter() - t0
                await asyncio.sleep(5)
                used = before - available_mib()
                live = find_marked_processes(engine.tag)
                idle_report = (f"{len(live)} idle VMs up at once (created concurrently in {took:.1f} s): "
                               f"{used / 1024:.1f} GiB of machine memory, {used / max(1, len(live)):.0f} MiB each; "
                               f"{available_mib() / 1024:.1f} GiB still available")
            overlay, copy = time_overlay_vs_copy(image.rootfs.resolve(), Path(tmp))
            base_gib = image.rootfs.stat().st_size / 2**30
        finally:
            await engine.close()
            await services.close()

    print(f"image {image.hash} ({args.profile}), {args.memory} MiB / 1 vCPU guests, accel {backend.accel}")
    print(f"first VM (cold boot + snapshot) {cold_and_snapshot:6.2f} s   snapshot meta {meta}")
    print(f"restore to agent, {len(restores)} VMs: p50 {statistics.median(restores):.2f} s  "
          f"p95 {pct(restores, 0.95):.2f} s  min {min(restores):.2f} s  max {max(restores):.2f} s")
    print(f"warm pool acquire, {len(acquires)} VMs: p50 {statistics.median(acquires) * 1000:.1f} ms  "
          f"max {max(acquires) * 1000:.1f} ms")
    print(f"disk: qcow2 overlay {overlay * 1000:.1f} ms vs dd copy of the {base_gib:.1f} GiB base {copy:.2f} s "
          f"-> overlay {copy / overlay:.0f}x faster")
    print(breakdown)
    print(f"memory per idle VM: QEMU RSS median {statistics.median(rss):.0f} MiB, PSS (shared snapshot pages split "
          f"among the VMs) median {statistics.median(pss):.0f} MiB, over {len(rss)} VMs")
    if idle_report:
        print(idle_report)


if __name__ == "__main__":
    asyncio.run(main())
