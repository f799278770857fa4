from __future__ import annotations

import contextlib
from typing import Literal

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel, Field

from polydev import __version__
from polydev.api.deps import ServicesDep
from polydev.core.vm_admin import VmUnavailable
from polydev.services import Services
from polydev.store import db

router = APIRouter(tags=["health"])


class Component(BaseModel):
    ok: bool
    kind: str


class VmComponent(BaseModel):
    backend: str = Field(description="qemu, firecracker, or the backend a test injected")
    available: bool = Field(description="whether this server can create VMs now")
    reason: str | None = Field(None, description="why not, when it cannot")
    accel: str | None = Field(None, description="kvm or tcg (software emulation), as the backend reports it")
    network_mode: str
    live_vms: int | None = Field(None, description="VMs creating or running; null when it could not be read")
    login_pool: dict[str, dict[str, int]] = Field(
        default_factory=dict, description="pre-started logins (LOGIN_POOL) by `provider:method`: held, ready "
        "(their URL known) and wanted")


class EgressComponent(BaseModel):
    status: Literal["on", "off"] = Field(description="whether VMs' traffic goes through the egress gateway")
    reason: str | None = Field(None, description="why it is off")
    guest_address: str | None = Field(None, description="the gateway as a guest reaches it")
    attached_vms: int | None = None
    address_pool: str | None = Field(None, description="EGRESS_ADDRESS_POOL, for users in address mode")
    sandbox_open: bool | None = None
    allow_extra: list[str] = Field(default_factory=list, description="EGRESS_ALLOW")


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    version: str
    database: Component
    session_store: Component
    vm: VmComponent
    egress: EgressComponent


def egress_component(services: Services) -> EgressComponent:
    if services.egress is not None:
        return EgressComponent.model_validate(services.egress.describe())
    s = services.settings
    reason = ("EGRESS_GATEWAY=off" if s.egress_gateway == "off"
              else "tap network mode: a slot's egress is its firewall's" if s.network_mode != "user"
              else "this server runs no VM engine" if services.engine is None
              else "the VM backend does not forward its guests to the gateway")
    return EgressComponent(status="off", reason=reason)


async def vm_component(services: Services) -> VmComponent:
    engine = services.engine
    settings = services.settings
    if engine is None:
        return VmComponent(backend=settings.vm_backend, available=False,
                           reason=services.engine_unavailable or "this server runs no VM engine",
                           network_mode=settings.network_mode)
    try:
        live: int | None = sum((await services.vm_admin.live_counts()).values())
    except Exception:  # the database check above already says what is wrong; keep /health answering
        live = None
    info = engine.describe()
    return VmComponent(backend=info.backend, available=True, accel=info.accel,
                       network_mode=settings.network_mode, live_vms=live,
                       login_pool=services.login_flow.pool.counts())


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(services: ServicesDep, response: Response) -> Health:
    db_ok = await db.ping(services.db_engine)
    store_ok = await services.session_store.ping()
    # VMs do not count towards the status: without them the credential and account API still works, and a
    # load balancer must not take a replica out of service because this machine lacks an image or KVM.
    ok = db_ok and store_ok
    if not ok:
        response.status_code = 503
    return Health(
        status="ok" if ok else "degraded",
        version=__version__,
        database=Component(ok=db_ok, kind=services.db_engine.dialect.name),
        session_store=Component(ok=store_ok, kind=services.session_store.kind),
        vm=await vm_component(services),
        egress=egress_component(services),
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, services: ServicesDep) -> Response:
    registry = request.app.state.metrics
    registry.set_login_sessions(await services.login_sessions.repo.count_by_status())
    registry.set_runs(await services.runs.count_by_status())
    registry.set_sandboxes(await services.sandboxes.live_counts())
    with contextlib.suppress(VmUnavailable):
        registry.set_vms(await services.vm_admin.live_counts())
    registry.set_login_pool(services.login_flow.pool.counts())
    registry.set_host(await services.admission.host_report())
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)
