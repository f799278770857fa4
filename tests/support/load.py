"""Load through locust (tests/support/load_locust.py) against one or more servers running the scripted CLI
(tests/support/scripted_vm_server.py): users and their API keys made over the admin API, jobs spread over the
servers, locust run as its own process (it patches the standard library with gevent, which must not happen in
pytest's process), and every job's end read back. Shared by tests/reliability/ and bench/load.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from polydev.client import PolydevClient
from polydev.config import PROVIDERS

LOCUSTFILE = Path(__file__).resolve().with_name("load_locust.py")
ROOT = LOCUSTFILE.parents[2]


@dataclass
class LoadResult:
    jobs: list[dict[str, Any]]  # one per job, in job order: kind, status, reason, codes, times
    requests: int
    server_errors: list[str] = field(default_factory=list)  # every 5xx (or unanswered request), by route
    wall_s: float = 0.0

    def ended(self, kind: str | None = None) -> list[dict[str, Any]]:
        return [j for j in self.jobs if kind is None or j["kind"] == kind]

    def without_reason(self) -> list[dict[str, Any]]:
        """Jobs that did not succeed and do not say why (a success's reason is the success)."""
        return [j for j in self.jobs if j.get("status") not in ("completed", "succeeded") and not j.get("reason")]


def make_users(url: str, admin_token: str, n: int, prefix: str = "load") -> list[str]:
    """`n` users, each with an API key stored for every provider (so each can run one run per provider at
    once); their API tokens."""
    tokens = []
    with PolydevClient(url, admin_token, timeout=60) as admin:
        for i in range(n):
            user = admin.create_user(f"{prefix}{i}-{time.time_ns()}")
            token = admin.issue_token(user["id"])["token"]
            with PolydevClient(url, token, timeout=60) as pd:
                for provider in PROVIDERS:
                    pd.set_api_key(provider, f"sk-load-{i}-{provider}")
            tokens.append(token)
    return tokens


def run_jobs(urls: list[str], tokens: list[list[str]], *, logins: int, runs: int, prompt: str = "hello",
             timeout: int = 600, wall_s: int = 1200) -> LoadResult:
    """`logins` logins (one per user, claude_code) and `runs` runs at once, spread over the servers `urls`
    (tokens[i]: server i's users). Runs go to the users in turn, each user's next run on their next provider,
    so no two of one user's runs share a credential while there are at most 3 × users of them."""
    jobs: list[dict[str, Any]] = []
    users = [(url, token) for url, server_tokens in zip(urls, tokens, strict=True) for token in server_tokens]
    for i in range(logins):
        url, token = users[i % len(users)]
        jobs.append({"kind": "login", "url": url, "token": token, "provider": "claude_code", "timeout": timeout})
    for i in range(runs):
        url, token = users[i % len(users)]
        provider = PROVIDERS[(i // len(users)) % len(PROVIDERS)]
        jobs.append({"kind": "run", "url": url, "token": token, "provider": provider, "prompt": prompt,
                     "timeout": timeout})
    return drive(jobs, host=urls[0], wall_s=wall_s)


def drive(jobs: list[dict[str, Any]], *, host: str, wall_s: int = 1200) -> LoadResult:
    """Every job at once, one locust user each; back when all have ended (or after `wall_s`)."""
    with tempfile.TemporaryDirectory(prefix="polydev-load-") as tmp:
        jobs_file, out = Path(tmp) / "jobs.json", Path(tmp) / "out.jsonl"
        jobs_file.write_text(json.dumps(jobs))
        env = {**os.environ, "POLYDEV_LOAD_JOBS": str(jobs_file), "POLYDEV_LOAD_OUT": str(out)}
        n = str(len(jobs))
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "--only-summary",
                               "-u", n, "-r", n, "--run-time", f"{wall_s}s", "--stop-timeout", "30",
                               "--host", host, "--loglevel", "WARNING"],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=wall_s + 120, check=False)
        wall = time.monotonic() - started
        lines = [json.loads(line) for line in out.read_text().splitlines()] if out.exists() else []
    summary = next((line["summary"] for line in lines if "summary" in line), None)
    if summary is None:
        raise RuntimeError(f"locust ended ({done.returncode}) without its summary:\n{done.stderr[-3000:]}")
    results = sorted((line for line in lines if "summary" not in line), key=lambda r: r["index"])
    missing = sorted(set(range(len(jobs))) - {r["index"] for r in results})
    for index in missing:  # locust stopped at wall_s with these still under way
        results.append({"index": index, "kind": jobs[index]["kind"], "status": None,
                        "reason": f"unfinished after {wall_s} s", "codes": []})
    return LoadResult(sorted(results, key=lambda r: r["index"]), summary["requests"], summary["server_errors"], wall)
