"""VM readiness through the engine, one run: cold boot, snapshot restore (p50/p95), overlay vs full copy,
and resident memory per idle VM.

    .venv/bin/python bench/vm_ready.py [--vms 10] [--memory 1024] [--profile test]

Runs the real engine (QEMU backend, user networking, SQLite in a temporary data directory). The cold boot
is the first VM's, which also makes the snapshot every later VM restores; the overlay is timed against a
full `dd` copy of the same base image (the seed's method), each done in this process.
"""

from __future__ import annotations

import argparse
import asyncio
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
from polydev.vm.backends.qemu import QemuBackend  # noqa: E402
from polydev.vm.engine import VMEngine, find_marked_processes  # noqa: E402


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
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


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vms", type=int, default=10, help="restored VMs to time (at least 10 for p95)")
    parser.add_argument("--memory", type=int, default=1024)
    parser.add_argument("--profile", default="test")
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
            engine.pool_size = 3
            await engine.fill_pool()
            acquires: list[float] = []
            for _ in range(3):
                t0 = time.perf_counter()
                vms.append(await engine.create(None, "cli"))
                acquires.append(time.perf_counter() - t0)
            procs = find_marked_processes(engine.tag)
            await asyncio.sleep(2)  # let the restored guests settle before reading their memory
            rss = [rss_mib(procs[vm.id]) for vm in vms if vm.id in procs]
            idle_report = ""
            if args.idle:
                for vm in vms:
                    await engine.destroy(vm.id)
                vms = []
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
    print(f"resident memory per idle VM (QEMU RSS): median {statistics.median(rss):.0f} MiB over {len(rss)} VMs")
    if idle_report:
        print(idle_report)


if __name__ == "__main__":
    asyncio.run(main())
