"""E2B-compatible sandboxes against Polydev's own VM API, one run, real VMs (the test image, TCG on this machine).

    .venv/bin/python bench/sandbox_bench.py [--creates 5] [--round-trips 20] [--pauses 5] [--profile test]

Starts `polydev serve` on a free loopback port with a data directory of its own, warms the snapshot with one
untimed VM, then times each operation through the unmodified e2b SDK (E2B_API_URL / E2B_SANDBOX_URL) and the
same operation through `/api/vms` (create + exec) as the baseline, alternating the two:
- create → first output of `echo hi`   (SDK: Sandbox.create + commands.run; baseline: POST /api/vms + exec)
  (every baseline exec runs `/bin/bash -l -c CMD`, the process the SDK asks envd for)
- a command's round trip in a live sandbox (SDK: commands.run("true"); baseline: POST /api/vms/{id}/exec),
  0.5 s after the last command (an agent's think time) and back to back
- 1 MiB written and read back (SDK: files.write + files.read; baseline: exec `cat > f` with stdin, exec `cat f`)
- pause (SDK: pause; baseline: DELETE /api/vms/{id}) and resume → first output (SDK: Sandbox.connect of the
  paused sandbox + commands.run; baseline: a new VM's create → first output).
The machine is shared (two cores, other work running): compare within one run.
"""

from __future__ import annotations

import argparse
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from e2b import Sandbox, SandboxException

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "src"))

from live_server import serve

from polydev.config import Settings
from polydev.vm import images


THINK_S = 0.5  # between two commands of the round-trip test, as an agent's model takes (seconds) to answer


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def line(name: str, ours: list[float], base: list[float]) -> str:
    p50, b50 = statistics.median(ours), statistics.median(base)
    return (f"{name:<37} e2b SDK p50 {p50 * 1000:8.1f} ms  p95 {pct(ours, 0.95) * 1000:8.1f} ms   |   "
            f"/api/vms p50 {b50 * 1000:8.1f} ms  p95 {pct(base, 0.95) * 1000:8.1f} ms   ratio {p50 / b50:5.2f}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--creates", type=int, default=5)
    parser.add_argument("--round-trips", type=int, default=20)
    parser.add_argument("--pauses", type=int, default=5)
    parser.add_argument("--profile", default="test")
    args = parser.parse_args()

    cache = Settings().cache_dir
    images.ensure(cache, args.profile)
    with tempfile.TemporaryDirectory(prefix="polydev-sandbox-bench-") as tmp:
        env = {"VM_IMAGE_PROFILE": args.profile, "VM_CLI_MEMORY_MB": "1024",
               "VM_CLI_VCPU": "1", "VM_WARM_POOL_SIZE": "0", "QUOTA_VMS": "50", "QUOTA_VCPUS": "50",
               "QUOTA_MEMORY_MB": "100000", "MAX_REQUEST_BYTES": str(8 * 1024 * 1024)}  # the baseline's 1 MiB body
        with serve(tmp, cache, env) as (url, token):
            run(url, token, args)


def run(url: str, token: str, args: argparse.Namespace) -> None:
    conn = {"api_url": url, "sandbox_url": url, "api_key": token}
    api = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=900)

    def api_vm() -> str:
        r = api.post("/api/vms", json={"purpose": "cli", "ttl_seconds": 900})
        r.raise_for_status()
        return str(r.json()["id"])

    def api_exec(vm_id: str, command: str, stdin: str | None = None) -> dict[str, object]:
        # The shell the SDK asks envd for (`/bin/bash -l -c CMD`), so both sides run the same process.
        r = api.post(f"/api/vms/{vm_id}/exec", json={"args": ["/bin/bash", "-l", "-c", command],
                                                     **({"stdin": stdin} if stdin else {})})
        r.raise_for_status()
        return dict(r.json())

    t0 = time.perf_counter()
    warm = Sandbox.create(timeout=900, request_timeout=900, **conn)  # the first VM boots cold: the snapshot
    print(f"first sandbox (cold boot + snapshot): {time.perf_counter() - t0:.1f} s", flush=True)
    warm.kill()

    ours, base = [], []
    for _ in range(args.creates):
        t0 = time.perf_counter()
        sbx = Sandbox.create(timeout=900, request_timeout=900, **conn)
        assert sbx.commands.run("echo hi").stdout == "hi\n"
        ours.append(time.perf_counter() - t0)
        sbx.kill()
        t0 = time.perf_counter()
        vm_id = api_vm()
        assert api_exec(vm_id, "echo hi")["stdout"] == "hi\n"
        base.append(time.perf_counter() - t0)
        api.delete(f"/api/vms/{vm_id}")
    print(line("create -> first output of echo hi", ours, base), flush=True)

    sbx = Sandbox.create(timeout=900, request_timeout=900, **conn)
    vm_id = api_vm()
    try:
        # An agent thinks between its commands; the guest uses that pause to start the next login shell
        # (guest/warm.py). Back to back, each command waits for its shell's start-up (bash -l under TCG).
        for label, gap in (("command round trip, 0.5 s apart", THINK_S), ("command round trip, back to back", 0.0)):
            ours, base = [], []
            for _ in range(args.round_trips):
                time.sleep(gap)
                ours.append(timed(lambda: sbx.commands.run("true")))
                time.sleep(gap)
                base.append(timed(lambda: api_exec(vm_id, "true")))
            print(line(label, ours, base), flush=True)

        blob = secrets.token_hex(512 * 1024)  # 1 MiB of text: the baseline's exec takes text stdin
        ours, base = [], []
        for _ in range(5):
            def sdk_io() -> None:
                sbx.files.write("/tmp/blob", blob)
                assert sbx.files.read("/tmp/blob") == blob

            def api_io() -> None:
                api_exec(vm_id, "cat > /tmp/blob", stdin=blob)
                assert api_exec(vm_id, "cat /tmp/blob")["stdout"] == blob
            ours.append(timed(sdk_io))
            base.append(timed(api_io))
        print(line("1 MiB write + read", ours, base), flush=True)

        # Pause saves the VM (memory by migration to a file) and ends its process; resume starts it again from
        # there. Their nearest /api/vms operations: deleting a VM, and a new one's create → first output.
        paused, resumed, deleted, created = [], [], [], []
        try:
            for _ in range(args.pauses):
                sbx.files.write("marker", "kept")
                paused.append(timed(sbx.pause))
                t0 = time.perf_counter()
                sbx = Sandbox.connect(sbx.sandbox_id, timeout=900, request_timeout=900, **conn)
                assert sbx.commands.run("cat marker").stdout == "kept"
                resumed.append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                other = api_vm()
                assert api_exec(other, "echo hi")["stdout"] == "hi\n"
                created.append(time.perf_counter() - t0)
                deleted.append(timed(lambda: api.delete(f"/api/vms/{other}").raise_for_status()))
            print(line("pause (vs deleting a VM)", paused, deleted), flush=True)
            # The first is the sandbox's first pause, the slow one (bench/README.md).
            print("  pauses in order: " + ", ".join(f"{t:.2f} s" for t in paused), flush=True)
            print(line("resume -> first output (vs create)", resumed, created), flush=True)
        except SandboxException as exc:
            print(f"pause / resume: not available on this server ({str(exc)[:80]})", flush=True)
    finally:
        sbx.kill()
        api.delete(f"/api/vms/{vm_id}")


if __name__ == "__main__":
    main()
