"""A sandbox's resource use as E2B's `get_metrics` reports it, sampled from inside its VM on request: CPU in
use over a short window (/proc/stat twice), memory (/proc/meminfo) and the root file system (statvfs).

E2B keeps a series sampled every few seconds; a sample taken when asked is what a single server can give
without a collector per sandbox, and what `get_metrics()` users read (the latest use).
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from polydev.vm.agent_client import AgentClient

# Runs in the guest (its python3, there for the agent): prints one JSON object.
SAMPLER = r"""
import json, os, time
def cpu():
    f = [int(x) for x in open("/proc/stat").readline().split()[1:]]
    return sum(f), f[3] + f[4]
t0, i0 = cpu(); time.sleep(0.2); t1, i1 = cpu()
mem = {l.split(":")[0]: int(l.split()[1]) * 1024 for l in open("/proc/meminfo")}
fs = os.statvfs("/")
print(json.dumps({"cpus": os.cpu_count(), "busy": 0 if t1 == t0 else 100 * (1 - (i1 - i0) / (t1 - t0)),
                  "mem_total": mem["MemTotal"], "mem_used": mem["MemTotal"] - mem["MemAvailable"],
                  "mem_cache": mem.get("Cached", 0), "disk_total": fs.f_blocks * fs.f_frsize,
                  "disk_used": (fs.f_blocks - fs.f_bfree) * fs.f_frsize}))
"""


class MetricsUnavailable(Exception):
    """The guest did not answer the sample (the reason in words)."""


def sample(agent: AgentClient) -> dict[str, Any]:
    """One sample in E2B's SandboxMetric shape (blocking: an agent call)."""
    result = agent.exec(["python3", "-c", SAMPLER], timeout_s=30)
    if result.exit_code != 0:
        raise MetricsUnavailable(f"the sandbox's metrics sampler failed (exit {result.exit_code})")
    got = json.loads(result.stdout)
    now = datetime.now(UTC)
    return {"timestamp": now.isoformat().replace("+00:00", "Z"), "timestampUnix": int(now.timestamp()),
            "cpuCount": got["cpus"], "cpuUsedPct": round(got["busy"], 2), "memUsed": got["mem_used"],
            "memTotal": got["mem_total"], "memCache": got["mem_cache"], "diskUsed": got["disk_used"],
            "diskTotal": got["disk_total"]}
