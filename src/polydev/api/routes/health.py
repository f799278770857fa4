from __future__ import annotations

from typing import Literal

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST
from pydantic import BaseModel

from polydev import __version__
from polydev.api.deps import ServicesDep
from polydev.store import db

router = APIRouter(tags=["health"])


class Component(BaseModel):
    ok: bool
    kind: str


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    version: str
    database: Component
    session_store: Component


@router.get("/health", response_model=Health, responses={503: {"model": Health}})
async def health(services: ServicesDep, response: Response) -> Health:
    db_ok = await db.ping(services.engine)
    store_ok = await services.sessions.ping()
    ok = db_ok and store_ok
    if not ok:
        response.status_code = 503
    return Health(
        status="ok" if ok else "degraded",
        version=__version__,
        database=Component(ok=db_ok, kind=services.engine.dialect.name),
        session_store=Component(ok=store_ok, kind=services.sessions.kind),
    )


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request, services: ServicesDep) -> Response:
    registry = request.app.state.metrics
    registry.set_sessions(await services.auth_sessions.count_by_status())
    return Response(registry.render(), media_type=CONTENT_TYPE_LATEST)
