"""Requests per second for GET /api/auth/sessions/{id}, in-process session store vs Redis, one run.

Each store gets its own `polydev` API process (uvicorn, SQLite database, real HTTP on loopback) seeded
with live login sessions; this process drives it with concurrent keep-alive clients for a fixed time
and prints throughput, latency percentiles, and the ratio against the in-process store (the baseline).

    .venv/bin/python bench/api_bench.py [--seconds 5] [--concurrency 16] [--sessions 200]

Needs redis-server installed (scripts/test.sh installs it); a private one is started on a free port.
Uses wrk as the load generator when installed (`apt-get install wrk`), else a Python client, which
saturates long before the server does on a 2-core machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.support.servers import free_port, start_redis, stop_process, wait_http_ok  # noqa: E402


async def _serve(data_dir: str, port: int, sessions: int, info_file: str) -> None:
    """Child process: open services, seed sessions, then serve the API."""
    import uvicorn

    from polydev.api.app import create_app
    from polydev.config import Settings
    from polydev.logging import configure_logging
    from polydev.services import open_services

    settings = Settings()  # everything from the environment the parent set
    configure_logging(settings.log_level)  # the production log path (JSON lines), as `polydev serve` has it
    services = await open_services(settings)
    user = await services.users.create("bench")
    token = (await services.users.issue_token(user.id, "bench")).secret
    ids = [(await services.login_sessions.start(user.id, "claude_code"))["session_id"] for _ in range(sessions)]
    Path(info_file).write_text(json.dumps({"token": token, "sessions": ids}))
    server = uvicorn.Server(uvicorn.Config(create_app(services=services), host="127.0.0.1", port=port,
                                           log_level="warning", access_log=False))
    try:
        await server.serve()
    finally:
        await services.close()


_WRK_SCRIPT = """
local ids = {%s}
request = function()
  return wrk.format("GET", "/api/auth/sessions/" .. ids[math.random(#ids)])
end
done = function(summary, latency, requests)
  io.write(string.format("RESULT %%d %%d %%.3f %%.3f %%d\\n", summary.requests, summary.duration,
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, summary.errors.status + summary.errors.connect
    + summary.errors.read + summary.errors.write + summary.errors.timeout))
end
"""


def _load_wrk(url: str, token: str, ids: list[str], seconds: float, concurrency: int) -> dict[str, float]:
    """wrk (C, one thread) as the load generator: a Python client would saturate before the server does."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua") as script:
        script.write(_WRK_SCRIPT % ", ".join(f'"{i}"' for i in ids))
        script.flush()
        base = ["wrk", "-t1", f"-c{concurrency}", "-H", f"Authorization: Bearer {token}", "-s", script.name]
        subprocess.run([*base, "-d1s", url], check=True, capture_output=True)  # warm-up
        out = subprocess.run([*base, f"-d{seconds:.0f}s", url], check=True, capture_output=True, text=True).stdout
    line = next(x for x in out.splitlines() if x.startswith("RESULT"))
    n, micros, p50, p99, errors = line.split()[1:]
    return {"requests": int(n), "errors": int(errors), "rps": int(n) / (int(micros) / 1e6),
            "p50_ms": float(p50), "p99_ms": float(p99)}


async def _load(url: str, token: str, ids: list[str], seconds: float, concurrency: int) -> dict[str, float]:
    latencies: list[float] = []
    errors = 0
    headers = {"Authorization": f"Bearer {token}"}
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits) as client:
        async def worker(stop: float, record: bool) -> None:
            nonlocal errors
            rng = random.Random()
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                r = await client.get(f"/api/auth/sessions/{rng.choice(ids)}")
                if record:
                    latencies.append(time.perf_counter() - t0)
                    errors += r.status_code != 200

        await asyncio.gather(*(worker(time.perf_counter() + 1.0, False) for _ in range(concurrency)))  # warm-up
        start = time.perf_counter()
        await asyncio.gather(*(worker(start + seconds, True) for _ in range(concurrency)))
        elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "requests": len(latencies), "errors": errors, "rps": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1000,
        "p99_ms": latencies[int(len(latencies) * 0.99) - 1] * 1000,
    }


def _run_one(store: str, redis_url: str | None, args: argparse.Namespace) -> dict[str, float]:
    with tempfile.TemporaryDirectory(prefix=f"polydev-bench-{store}-") as tmp:
        port = free_port()
        info = Path(tmp) / "info.json"
        env = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "REDIS_URL")}
        env.update(POLYDEV_DATA_DIR=tmp)
        if redis_url:
            env["REDIS_URL"] = redis_url
        log = open(Path(tmp) / "server.log", "wb")
        proc = subprocess.Popen([sys.executable, __file__, "--serve", tmp, str(port), str(args.sessions), str(info)],
                                env=env, stderr=log)
        try:
            url = f"http://127.0.0.1:{port}"
            wait_http_ok(f"{url}/health", proc, f"{store} server", ready=info.exists)
            seeded = json.loads(info.read_text())
            if shutil.which("wrk"):
                return _load_wrk(url, seeded["token"], seeded["sessions"], args.seconds, args.concurrency)
            return asyncio.run(_load(url, seeded["token"], seeded["sessions"], args.seconds, args.concurrency))
        finally:
            stop_process(proc)
            log.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--sessions", type=int, default=200)
    parser.add_argument("--serve", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve:
        data_dir, port, sessions, info = args.serve
        asyncio.run(_serve(data_dir, int(port), int(sessions), info))
        return

    redis = start_redis()
    try:
        results = {"memory": _run_one("memory", None, args), "redis": _run_one("redis", redis.url, args)}
    finally:
        redis.close()
    base = results["memory"]["rps"]
    client = "wrk" if shutil.which("wrk") else "httpx (install wrk for figures the client does not cap)"
    print(f"GET /api/auth/sessions/{{id}} — {args.concurrency} concurrent clients ({client}), {args.seconds:.0f} s "
          f"each, SQLite database, one uvicorn worker")
    print(f"{'store':<8} {'req/s':>9} {'p50 ms':>8} {'p99 ms':>8} {'errors':>7} {'vs memory':>10}")
    for name, r in results.items():
        print(f"{name:<8} {r['rps']:>9.0f} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {r['errors']:>7.0f} "
              f"{r['rps'] / base:>9.2f}x")
    if any(r["errors"] for r in results.values()):
        raise SystemExit("some requests failed")


if __name__ == "__main__":
    main()
