"""Liveness, readiness and Prometheus metrics (no key needed)."""

from __future__ import annotations

import anyio
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from psycopg import Error as PgError
from psycopg_pool import PoolTimeout

from engine.api import metrics
from engine.api.deps import Services, get_services, schema_revision
from engine.api.schemas import Health, Readiness
from engine.sql import query

router = APIRouter(tags=["health"])

# The probes run on the event loop, not in the request threads: when every thread waits on a database that is
# gone, a liveness probe must still answer at once and a readiness probe within READY_TIMEOUT_S. The readiness
# query gets threads of its own.
READY_TIMEOUT_S = 2.0
_READY_THREADS = anyio.CapacityLimiter(2)


@router.get("/health", response_model=Health, summary="Liveness: the process answers (no database call)")
async def health() -> Health:
    return Health(status="ok")


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness}},
            summary="Readiness: the database answers and the schema is at this code's head revision")
async def ready(request: Request) -> JSONResponse:
    services = get_services(request)
    expected = services.head_revision
    try:
        with anyio.fail_after(READY_TIMEOUT_S):
            current = await anyio.to_thread.run_sync(_revision, services, abandon_on_cancel=True,
                                                     limiter=_READY_THREADS)
    except (PgError, PoolTimeout, TimeoutError) as exc:
        body = Readiness(status="unavailable", expected_revision=expected, detail=exc.__class__.__name__)
        return JSONResponse(body.model_dump(), status_code=503)
    if current != expected:
        body = Readiness(status="schema_mismatch", schema_revision=current, expected_revision=expected,
                         detail="run `pgrec db upgrade`")
        return JSONResponse(body.model_dump(), status_code=503)
    return JSONResponse(Readiness(status="ready", schema_revision=current, expected_revision=expected).model_dump())


def _revision(services: Services) -> str | None:
    # bounded inside the thread too: a probe the event loop gave up on (its thread is abandoned, not stopped)
    # must not keep waiting for, or holding, a pooled connection that requests need
    with services.pool.connection(timeout=READY_TIMEOUT_S) as conn, conn.transaction():
        conn.execute(query("service.probe_timeout"), {"ms": int(READY_TIMEOUT_S * 1000)})
        return schema_revision(conn)


@router.get("/metrics", include_in_schema=False)
async def prometheus() -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
