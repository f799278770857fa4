"""Prometheus metrics. One registry per app instance, so tests can build many apps in one process."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from polydev.egress import usage as egress_usage
from polydev.store.models import AUTH_SESSION_STATUSES, RUN_STATUSES


class EgressTotals(Collector):
    """The egress gateway's counters (polydev/egress/usage.py: tunnels by purpose and result, bytes by
    direction; no per-user label) live on the process's default registry, where this app's /metrics does
    not look: this collector shows them in the app's own registry too."""

    def collect(self) -> Iterator[Metric]:
        yield from egress_usage.TUNNELS.collect()
        yield from egress_usage.BYTES.collect()


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("polydev_http_requests", "HTTP requests by route and status",
                                ["method", "route", "status"], registry=self.registry)
        self.latency = Histogram("polydev_http_request_duration_seconds", "HTTP request latency by route",
                                 ["method", "route"], registry=self.registry,
                                 buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.login_sessions = Gauge("polydev_auth_sessions", "Login sessions recorded, by status", ["status"],
                              registry=self.registry)
        # Live VMs only: ended ones (destroyed, failed) are history, counted by the creations counter.
        self.vms = Gauge("polydev_vms", "VMs alive now, by status", ["status"], registry=self.registry)
        self.runs = Gauge("polydev_runs", "Runs recorded, by status", ["status"], registry=self.registry)
        self.sandboxes = Gauge("polydev_sandboxes", "E2B-compatible sandboxes alive now, by state", ["state"],
                               registry=self.registry)
        self.login_pool = Gauge("polydev_login_pool", "Pre-started logins (LOGIN_POOL): held, ready (URL known) "
                                "and wanted, by provider and method", ["provider", "method", "state"],
                                registry=self.registry)
        self.vm_creations = Counter("polydev_vm_creations", "VM creations by outcome (created, failed, unavailable)",
                                    ["outcome"], registry=self.registry)
        # The host's admission control (core/quotas.py): what live VMs hold against its capacity; no per-user
        # label (GET /api/users/{id}/quotas has each user's use).
        self.host_used = Gauge("polydev_host_used", "vCPUs and MiB of memory all live VMs hold", ["resource"],
                               registry=self.registry)
        self.host_capacity = Gauge("polydev_host_capacity", "vCPUs and MiB of memory live VMs may hold (HOST_*)",
                                   ["resource"], registry=self.registry)
        self.registry.register(EgressTotals())

    def observe_request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.latency.labels(method, route).observe(seconds)

    def set_login_sessions(self, counts: dict[str, int]) -> None:
        for status in AUTH_SESSION_STATUSES:
            self.login_sessions.labels(status).set(counts.get(status, 0))

    def set_runs(self, counts: dict[str, int]) -> None:
        for status in RUN_STATUSES:
            self.runs.labels(status).set(counts.get(status, 0))

    def set_sandboxes(self, counts: dict[str, int]) -> None:
        for state, n in counts.items():
            self.sandboxes.labels(state).set(n)

    def set_vms(self, counts: dict[str, int]) -> None:
        """`counts` by live status, every live status present (VmAdmin.live_counts)."""
        for status, n in counts.items():
            self.vms.labels(status).set(n)

    def set_login_pool(self, counts: dict[str, dict[str, int]]) -> None:
        for key, states in counts.items():
            provider, _, method = key.partition(":")
            for state, n in states.items():
                self.login_pool.labels(provider, method, state).set(n)

    def set_host(self, report: dict[str, dict[str, int]]) -> None:
        for resource, values in report.items():
            self.host_used.labels(resource).set(values["used"])
            self.host_capacity.labels(resource).set(values["capacity"])

    def render(self) -> bytes:
        return generate_latest(self.registry)
