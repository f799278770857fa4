"""The FastAPI application factory."""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from fastapi import FastAPI

from polydev import __version__
from polydev.api.e2b import control as e2b_control
from polydev.api.e2b import envd_app
from polydev.api.e2b.ports import serve_port
from polydev.api.e2b.routing import SCOPE_KEY, SandboxRouter
from polydev.api.errors import error_response, install_error_handlers
from polydev.api.metrics import Metrics
from polydev.api.middleware import (
    BodyLimitMiddleware,
    BodyTimeoutMiddleware,
    ObservabilityMiddleware,
)
from polydev.api.peers import PeerRouting, forward_sandbox
from polydev.api.routes import (
    credentials,
    egress,
    health,
    images,
    login_sessions,
    quotas,
    runs,
    sandboxes,
    users,
    vms,
    vnc,
    workspaces,
)
from polydev.config import Settings, get_settings
from polydev.services import BackendFactory, Services, open_services, start_vm_engine
from polydev.web.routes import install_dashboard

log = structlog.get_logger(__name__)


def announce_admin_token(services: Services, secret: str) -> None:
    """Show the bootstrap token once, on the terminal rather than in the (JSON, shipped-off) logs."""
    path = services.settings.data_dir / "admin.token"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(secret + "\n")
    print(
        "\n" + "=" * 72 + "\n"
        "  Polydev created the first user, 'admin'. Its API token (shown once):\n\n"
        f"    {secret}\n\n"
        f"  A copy is in {path} (mode 0600): store it elsewhere and delete the file.\n"
        + "=" * 72 + "\n",
        file=sys.stdout, flush=True,
    )
    log.info("admin_bootstrapped", file=str(path))


def create_app(settings: Settings | None = None, services: Services | None = None, *,
               backend_factory: BackendFactory | None = None) -> FastAPI:
    """The app. Without `services` it opens its own and runs the VM engine (built by `backend_factory`,
    default: the backend VM_BACKEND names); with `services`, the caller owns both, engine included."""
    settings = settings or (services.settings if services else get_settings())

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        owned = services is None
        svc = services or await open_services(settings)
        app.state.services = svc
        try:
            if owned:
                issued = await svc.users.bootstrap_admin()
                if issued is not None:
                    announce_admin_token(svc, issued.secret)
                # The VM rows of the other live servers are theirs: the engine's reconcile leaves them alone.
                await start_vm_engine(svc, backend_factory, keep=await svc.cluster.live_peers())
                # Logins and runs an earlier start of this server, or a server now gone, was driving lost their
                # VMs with it: say so (core/cluster.py).
                ended = await svc.cluster.start(runs_vms=svc.engine is not None)
                svc.sandboxes.start_sweeper()  # sandboxes past their end: paused (autoPause) or killed
                svc.workspaces.start_sweeper()  # idle workspaces: their VMs paused
                if ended["logins"] or ended["runs"]:
                    log.warning("flows_reclaimed", login_sessions=ended["logins"], runs=ended["runs"])
            log.info("started", database=svc.db_engine.dialect.name, session_store=svc.session_store.kind,
                     vm_engine=svc.engine is not None, port=settings.port)
            yield
        finally:
            if owned:
                await svc.close()  # stops the reaper and destroys this process's VMs before the database goes

    app = FastAPI(
        title="Polydev",
        version=__version__,
        description="Run Claude Code, Codex CLI and Gemini CLI in disposable microVMs.",
        lifespan=lifespan,
    )
    if services is not None:  # tests hand in ready services and drive the app without a lifespan
        app.state.services = services
    metrics = Metrics()
    app.state.metrics = metrics
    install_error_handlers(app)
    for router in (health.router, users.router, credentials.router, login_sessions.router, vnc.router,
                   runs.router, vms.router, egress.router, quotas.router, sandboxes.router, workspaces.router,
                   images.router, e2b_control.router):
        app.include_router(router)
    install_dashboard(app, settings, error_response)  # after the API: its /app catch-all must not shadow a route
    # Outermost first: observe everything (413s and 408s included), then enforce the size and time limits, then
    # pass what needs another server's VM on to it (api/peers.py).
    app.add_middleware(PeerRouting)
    app.add_middleware(BodyTimeoutMiddleware, seconds=settings.body_timeout_seconds)
    app.add_middleware(BodyLimitMiddleware, limit=settings.max_request_bytes,
                       paths={"/api/workspaces/upload": settings.workspace_upload_max_bytes})
    # envd's requests (file uploads included) have limits of their own: routed before the API's body limit.
    envd = envd_app.build(lambda: app.state.services, lambda request: request.scope.get(SCOPE_KEY))
    app.add_middleware(SandboxRouter, envd=envd, ports=functools.partial(serve_port, lambda: app.state.services),
                       domain=settings.sandbox_domain,
                       forward=lambda sid, *asgi: forward_sandbox(getattr(app.state, "services", None), sid, *asgi))
    app.add_middleware(ObservabilityMiddleware, metrics=metrics)
    return app
