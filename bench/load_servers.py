"""Run throughput of several servers on one PostgreSQL and one Redis beside one server, in the same run.

    .venv/bin/python bench/load_servers.py [--servers 3] [--runs 60] [--clients 12]

Each server is the real one with the stand-in hypervisor and the scripted CLI (tests/support/server_group.py,
tests/support/fake_vm_server.py): a run gets a "VM" (the guest agent as a host process), streams the CLI's
events and ends within a second or so, so what is measured is the control plane — admission, placement, rows,
the run's drive, event storage and streaming — not VM boots. Every setup gets a fresh database.

`--clients` users each send runs one after another (a user has one live run per credential), round-robin over
the servers as a load balancer without stickiness would: POST /api/runs to one server, its events to `done`
from the next. Printed per setup: runs/s, latency from POST to `done` (p50, p95), how the runs spread over
the servers (the `X-Polydev-Server` of each POST's answer), and the ratio against one server. On a machine
with few cores the servers share them with one another, PostgreSQL, Redis and the clients: the ratio then
shows the cost of the hops rather than a gain.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from polydev.client import PolydevClient
from polydev.core.cluster import SERVER_HEADER
from tests.support import servers
from tests.support.live_server import LiveServer
from tests.support.server_group import server_group

ROOMY = {"HOST_VCPUS": "512", "HOST_MEMORY_MB": str(4 * 1024 * 1024)}  # capacity never refuses a run here


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def users(group: list[LiveServer], n: int) -> list[str]:
    """`n` users, each with an API key for the scripted CLI; their tokens."""
    tokens = []
    with PolydevClient(group[0].url, group[0].admin_token) as admin:
        for i in range(n):
            user = admin.create_user(f"load{i}-{time.time_ns()}")
            token = admin.issue_token(user["id"])["token"]
            with PolydevClient(group[i % len(group)].url, token) as pd:
                pd.set_api_key("claude_code", "sk-fake-key-0123")
            tokens.append(token)
    return tokens


def drive(group: list[LiveServer], token: str, start: int, count: int, latencies: list[float],
          hosts: Counter[str], lock: threading.Lock) -> None:
    """`count` runs one after another, each sent to the next server and followed on the one after it."""
    h = {"Authorization": f"Bearer {token}"}
    with httpx.Client(timeout=120) as client:
        for k in range(count):
            sent, follow = group[(start + k) % len(group)], group[(start + k + 1) % len(group)]
            began = time.perf_counter()
            r = client.post(f"{sent.url}/api/runs", json={"provider": "claude_code", "prompt": "hello"}, headers=h)
            r.raise_for_status()
            with PolydevClient(follow.url, token) as pd:
                last = list(pd.run_events(r.json()["id"]))[-1]
            if last.get("type") != "done":
                raise RuntimeError(f"a run did not succeed: {last}")
            with lock:
                latencies.append(time.perf_counter() - began)
                hosts[r.headers.get(SERVER_HEADER, "?")] += 1


def measure(n_servers: int, runs: int, clients: int, pg: str, redis: str) -> dict[str, object]:
    with tempfile.TemporaryDirectory(prefix="polydev-load-") as tmp:
        root = Path(tmp)
        envs = [{**ROOMY, "POLYDEV_TEST_FAKE_CLI": str(root / f"guest{i}")} for i in range(n_servers)]
        # The default heartbeat: a machine this busy may hold a server's heartbeat up for seconds.
        with server_group(root, pg, redis, envs, heartbeat_s=5.0) as group:
            tokens = users(group, clients)
            latencies: list[float] = []
            hosts: Counter[str] = Counter()
            lock = threading.Lock()
            per = [runs // clients + (1 if i < runs % clients else 0) for i in range(clients)]
            began = time.perf_counter()
            with ThreadPoolExecutor(clients) as pool:
                for future in [pool.submit(drive, group, t, i, per[i], latencies, hosts, lock)
                               for i, t in enumerate(tokens)]:
                    future.result()
            elapsed = time.perf_counter() - began
    return {"servers": n_servers, "runs_per_s": len(latencies) / elapsed, "p50": statistics.median(latencies),
            "p95": pct(latencies, 0.95), "spread": sorted(hosts.values(), reverse=True)}


def report(base_servers: int, n_servers: int, *, runs: int, clients: int) -> None:
    """Measure `base_servers` then `n_servers` servers and print them side by side (also used by bench/load.py)."""
    pg, redis = servers.start_postgres(), servers.start_redis()
    try:
        rows = [measure(n, runs, clients, pg.url, redis.url) for n in (base_servers, n_servers)]
    finally:
        redis.close()
        pg.close()
    base = rows[0]["runs_per_s"]
    print(f"{runs} runs, {clients} clients, round-robin over the servers (scripted CLI, stand-in VMs)")
    print(f"{'servers':>7}  {'runs/s':>7}  {'p50':>8}  {'p95':>8}  {'vs one':>6}  runs per server")
    for row in rows:
        print(f"{row['servers']:>7}  {row['runs_per_s']:>7.2f}  {row['p50'] * 1000:>6.0f}ms  "  # type: ignore[operator]
              f"{row['p95'] * 1000:>6.0f}ms  {row['runs_per_s'] / base:>5.2f}×  {row['spread']}")  # type: ignore[operator]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--servers", type=int, default=3)
    parser.add_argument("--runs", type=int, default=60)
    parser.add_argument("--clients", type=int, default=12)
    args = parser.parse_args()
    report(1, args.servers, runs=args.runs, clients=args.clients)


if __name__ == "__main__":
    main()
