"""Runs per minute and the platform's added latency under concurrent load: 1, 10 and 50 runs at once, each in a
real VM (QEMU on the `test` image) with the scripted CLI (tests/support/scripted_vm_server.py), driven over
HTTP by locust (tests/support/load_locust.py), in one run.

    .venv/bin/python bench/load.py [--levels 1,10,50] [--memory 256]

For each level every run is started at once (one locust user each, spread over 20 users, one run per user and
provider at a time) and followed on its event stream to the end:
- runs per minute: the level's runs over the time from the first POST to the last run's last event;
- added latency of a run: from its POST to its last event at the client, less the scripted CLI's own time
  (measured by the CLI in the guest, from its first line to its answer, and sent as an event): the VM
  restore, the files and the exec, the interpreter's start in the guest, the events' way out, the VM's end;
  p50 and p99 over the level's runs.

Then, in the same run, three servers on one PostgreSQL and one Redis beside one server (bench/load_servers.py:
stand-in VMs, so the control plane is what is measured; three servers on one 2-core machine share its cores,
so the ratio shows the cost of the hops, not a gain). `--servers 0` skips it. Figures are printed, never
asserted.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import load_servers  # bench/load_servers.py

from polydev.config import Settings
from polydev.vm import build_steps, images
from tests.support import orphans
from tests.support.live_server import LiveServer, start_server
from tests.support.load import make_users, run_jobs

USERS = 20


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


@dataclass
class Level:
    concurrency: int
    runs_per_minute: float
    added_p50_s: float
    added_p99_s: float
    cli_p50_s: float
    failed: int


def throughput(urls: list[str], tokens: list[list[str]], concurrency: int) -> Level:
    """`concurrency` runs at once, spread over the servers `urls` (tokens[i]: server i's users)."""
    result = run_jobs(urls, tokens, logins=0, runs=concurrency, prompt="timed hello", timeout=900, wall_s=1800)
    done = [j for j in result.jobs if j.get("status") == "succeeded" and "cli_ms" in j and "t_last_event" in j]
    if result.server_errors:
        print(f"  5xx / unanswered: {result.server_errors[:5]}", file=sys.stderr)
    if not done:
        raise SystemExit(f"no run succeeded at {concurrency}: {[(j.get('status'), j.get('reason')) for j in result.jobs][:5]}")
    span = max(j["t_last_event"] for j in done) - min(j["t_start"] for j in result.jobs)
    added = [j["t_last_event"] - j["t_start"] - j["cli_ms"] / 1000 for j in done]
    return Level(concurrency, len(done) / span * 60, statistics.median(added), pct(added, 0.99),
                 statistics.median(j["cli_ms"] / 1000 for j in done), len(result.jobs) - len(done))


def one_server(root: Path, image: images.Image, memory_mb: int) -> Iterator[LiveServer]:
    """A server with real VMs and the scripted CLI, sized so every level's runs are admitted."""
    vms = USERS * 3 + 10
    env = {"POLYDEV_CACHE_DIR": str(image.dir.parent.parent), "VM_IMAGE_PROFILE": "test",
           "VM_CLI_MEMORY_MB": str(memory_mb), "VM_CLI_VCPU": "1", "VM_WARM_POOL_SIZE": "0",
           "QUOTA_VMS": "4", "QUOTA_RUNS": "3", "QUOTA_VCPUS": "4", "QUOTA_MEMORY_MB": str(4 * memory_mb),
           "HOST_VCPUS": str(vms), "HOST_MEMORY_MB": str(vms * memory_mb)}
    return start_server(root, "tests.support.scripted_vm_server", env)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="1,10,50", help="concurrent runs, comma separated")
    parser.add_argument("--memory", type=int, default=256, help="MiB per VM")
    parser.add_argument("--servers", type=int, default=3, help="servers beside one in the scale-out part (0: none)")
    args = parser.parse_args()
    levels = [int(n) for n in args.levels.split(",")]
    progress = lambda stage, line: print(f"[image {stage}] {line}", file=sys.stderr)
    build_steps.host_tools(progress)
    image, _ = images.ensure(Settings().cache_dir, "test", progress)
    with tempfile.TemporaryDirectory(prefix="polydev-bench-load-") as tmp:
        running = one_server(Path(tmp), image, args.memory)
        server = next(running)
        try:
            tokens = [make_users(server.url, server.admin_token, USERS, prefix="bench")]
            run_jobs([server.url], tokens, logins=0, runs=1, prompt="hello", timeout=900)  # makes the snapshot
            print(f"one server, scripted CLI, {args.memory} MiB VMs, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}")
            print("| concurrent runs | runs/min | added latency p50 | p99 | CLI's own time p50 | not succeeded |")
            print("|---|---|---|---|---|---|")
            for n in levels:
                level = throughput([server.url], tokens, n)
                print(f"| {n} | {level.runs_per_minute:.1f} | {level.added_p50_s:.2f} s | {level.added_p99_s:.2f} s "
                      f"| {level.cli_p50_s * 1000:.0f} ms | {level.failed} |", flush=True)
            left = orphans.find(server.data_dir)
            print(f"left behind after the runs: {orphans.describe(left)}")
        finally:
            running.close()  # stops the server, which destroys its VMs
    if args.servers:
        print()
        load_servers.report(1, args.servers, runs=60, clients=12)


if __name__ == "__main__":
    main()
