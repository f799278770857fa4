"""A conversation's follow-up turn against a first turn in a fresh VM, one run, real VMs and the real Claude Code
CLI (the test image, TCG on this machine), the model played by the stand-ins (tests/standins/vm.py).

    .venv/bin/python bench/turn_latency.py [--n 5] [--memory 2048] [--profile test]

Starts `polydev serve` on a free loopback port (a data directory of its own, the stand-ins wired in through
the egress gateway as the VM tests do, an API-key credential), makes one workspace and a conversation on it
(untimed), then times POST /api/runs → the run's "running Claude Code" status event (the flow emits it as
soon as the CLI process was started in the guest), read from GET /api/runs/{id}/events, for, alternating:
- a first turn in a fresh VM: a run with no workspace (the VM restored from the engine's snapshot; the warm
  pool is off, so the restore is in the time), the baseline;
- a follow-up turn on the conversation with its workspace's VM running (used within WORKSPACE_IDLE_PAUSE);
- a follow-up turn with the workspace's VM paused (hibernated: memory, devices and disk), as it is between
  turns once idle: the wake is in the time.
Each follow-up also gives the whole turn (POST → done) beside the first turn's. The machine is shared (two
cores, other work running): compare within one run.
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "src"))

from live_server import serve

from polydev.config import Settings
from polydev.vm import images
from tests.standins import api as standin_api
from tests.standins.vm import VmStandins

PROVIDER = "claude_code"
STARTED = "running Claude Code"


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def ms(values: list[float]) -> str:
    return f"p50 {statistics.median(values) * 1000:8.1f} ms  p95 {pct(values, 0.95) * 1000:8.1f} ms"


def turn(api: httpx.Client, body: dict[str, object]) -> tuple[float, float, dict[str, object]]:
    """(POST → the CLI started, POST → done, the run) for one run."""
    t0 = time.perf_counter()
    r = api.post("/api/runs", json={"provider": PROVIDER, "prompt": "Say ok.", **body})
    r.raise_for_status()
    run_id = r.json()["id"]
    started = None
    with api.stream("GET", f"/api/runs/{run_id}/events", timeout=600) as events:
        for raw in events.iter_lines():
            if not raw.startswith("data:"):
                continue
            event = json.loads(raw[5:])
            if started is None and event.get("type") == "status" and event.get("message") == STARTED:
                started = time.perf_counter() - t0
            if event.get("type") in ("done", "error"):
                break
    done = time.perf_counter() - t0
    run = api.get(f"/api/runs/{run_id}").json()
    while run["status"] in ("queued", "running"):  # the row is finished just after the last event is sent
        time.sleep(0.1)
        run = api.get(f"/api/runs/{run_id}").json()
    if run["status"] != "succeeded" or started is None:
        raise SystemExit(f"run {run_id} did not succeed: {run}")
    return started, done, run


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=5)
    parser.add_argument("--memory", type=int, default=2048)
    parser.add_argument("--profile", default="test")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))  # a stopped bench stops its server (finally below)

    cache = Settings().cache_dir
    images.ensure(cache, args.profile)
    with tempfile.TemporaryDirectory(prefix="polydev-turn-bench-") as tmp, VmStandins(Path(tmp) / "standins") as si:
        si.api.script = standin_api.Script(text="ok")
        wiring = si.settings()
        env = {"VM_IMAGE_PROFILE": args.profile, "VM_CLI_MEMORY_MB": str(args.memory), "VM_CLI_VCPU": "1",
               "VM_WARM_POOL_SIZE": "0", "WORKSPACE_IDLE_PAUSE_SECONDS": "3600", "EGRESS_RESOLVE": "pinned",
               "EGRESS_HOSTS": json.dumps(wiring["egress_hosts"]),
               "GUEST_CA_CERT_FILE": str(wiring["guest_ca_cert_file"]),
               "PROVIDER_API_BASE_URLS": json.dumps(wiring["provider_api_base_urls"])}
        with serve(tmp, cache, env, stop_timeout=300) as (url, token):
            measure(httpx.Client(base_url=url, headers={"Authorization": f"Bearer {token}"}, timeout=900), args.n)


def measure(api: httpx.Client, n: int) -> None:
    api.put(f"/api/credentials/{PROVIDER}/api-key", json={"api_key": "sk-ant-bench"}).raise_for_status()
    t0 = time.perf_counter()
    turn(api, {})  # the first VM boots cold and makes the snapshot
    print(f"first run (cold boot + snapshot): {time.perf_counter() - t0:.1f} s", flush=True)
    workspace = api.post("/api/workspaces", json={"name": "bench"}).json()["id"]
    while api.get(f"/api/workspaces/{workspace}").json()["state"] != "ready":
        time.sleep(0.5)
    _, _, first = turn(api, {"workspace_id": workspace})  # the conversation (its first turn, untimed)
    follow = {"conversation_id": first["conversation_id"]}

    fresh, awake, asleep = [], [], []
    fresh_done, awake_done, asleep_done = [], [], []
    for _ in range(n):
        started, done, _ = turn(api, {})
        fresh.append(started), fresh_done.append(done)
        started, done, _ = turn(api, follow)
        awake.append(started), awake_done.append(done)
        api.post(f"/api/workspaces/{workspace}/pause").raise_for_status()
        started, done, _ = turn(api, follow)
        asleep.append(started), asleep_done.append(done)
    base = statistics.median(fresh)
    print(f"POST → CLI started, first turn in a fresh VM   {ms(fresh)}   (baseline)")
    print(f"POST → CLI started, follow-up, VM running      {ms(awake)}   ratio {statistics.median(awake) / base:5.2f}")
    print(f"POST → CLI started, follow-up, VM paused       {ms(asleep)}   ratio {statistics.median(asleep) / base:5.2f}")
    base_done = statistics.median(fresh_done)
    print(f"POST → done, first turn in a fresh VM          {ms(fresh_done)}   (baseline)")
    print(f"POST → done, follow-up, VM running             {ms(awake_done)}   ratio "
          f"{statistics.median(awake_done) / base_done:5.2f}")
    print(f"POST → done, follow-up, VM paused              {ms(asleep_done)}   ratio "
          f"{statistics.median(asleep_done) / base_done:5.2f}")
    api.delete(f"/api/workspaces/{workspace}")


if __name__ == "__main__":
    main()
