"""Liveness, readiness and Prometheus metrics (no key needed)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from psycopg import Error as PgError
from psycopg_pool import PoolTimeout

from engine.api import metrics
from engine.api.deps import ServicesDep, schema_revision
from engine.api.schemas import Health, Readiness

router = APIRouter(tags=["health"])


@router.get("/health", response_model=Health, summary="Liveness: the process answers (no database call)")
def health() -> Health:
    return Health(status="ok")


@router.get("/ready", response_model=Readiness, responses={503: {"model": Readiness}},
            summary="Readiness: the database answers and the schema is at this code's head revision")
def ready(services: ServicesDep) -> JSONResponse:
    expected = services.head_revision
    try:
        with services.pool.connection() as conn:
            current = schema_revision(conn)
    except (PgError, PoolTimeout) as exc:
        body = Readiness(status="unavailable", expected_revision=expected, detail=exc.__class__.__name__)
        return JSONResponse(body.model_dump(), status_code=503)
    if current != expected:
        body = Readiness(status="schema_mismatch", schema_revision=current, expected_revision=expected,
                         detail="run `pgrec db upgrade`")
        return JSONResponse(body.model_dump(), status_code=503)
    return JSONResponse(Readiness(status="ready", schema_revision=current, expected_revision=expected).model_dump())


@router.get("/metrics", include_in_schema=False)
def prometheus() -> Response:
    body, content_type = metrics.exposition()
    return Response(body, media_type=content_type)
