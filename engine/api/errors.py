"""Exceptions to HTTP answers: 404 unknown ids, 422 bad input (naming the field), 503 database outage.

No answer carries a stack trace; unexpected errors are logged with one and answered 500 with the request id.
"""

from __future__ import annotations

import psycopg
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from psycopg_pool import PoolTimeout

from engine.api import metrics
from engine.api.logs import log, request_id_var
from engine.errors import InvalidRequest, NotFound, Unavailable


def _field_error(message: str, status: int = 422) -> JSONResponse:
    """``{"detail": [{"loc": ["body", field], "msg", "type"}]}``, the shape of FastAPI's own 422s."""
    field, sep, reason = message.partition(": ")
    loc = ["body", *field.replace("[", ".").replace("]", "").split(".")] if sep and " " not in field else ["body"]
    return JSONResponse({"detail": [{"loc": loc, "msg": reason if sep and len(loc) > 1 else message,
                                     "type": "value_error"}]}, status_code=status)


def _detail(status: int, message: str, kind: str) -> JSONResponse:
    metrics.ERRORS.labels(kind).inc()
    return JSONResponse({"detail": message}, status_code=status)


async def not_found(request: Request, exc: Exception) -> JSONResponse:
    return _detail(404, str(exc), "not_found")


async def invalid(request: Request, exc: Exception) -> JSONResponse:
    metrics.ERRORS.labels("validation").inc()
    return _field_error(str(exc))


async def unavailable(request: Request, exc: Exception) -> JSONResponse:
    log.warning("database unavailable: %s", exc.__class__.__name__, extra={"error": str(exc)[:300]})
    return JSONResponse({"detail": "the database is unavailable; try again"}, status_code=503,
                        headers={"Retry-After": "1"})


async def database_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, psycopg.Error)
    message = (exc.diag.message_primary if exc.diag else None) or str(exc)
    if isinstance(exc, psycopg.errors.NoDataFound):
        return _detail(404, message, "not_found")
    if isinstance(exc, psycopg.errors.QueryCanceled | psycopg.OperationalError):
        metrics.ERRORS.labels("unavailable").inc()
        return await unavailable(request, exc)
    if isinstance(exc, psycopg.DataError | psycopg.IntegrityError | psycopg.errors.RaiseException):
        metrics.ERRORS.labels("validation").inc()
        return JSONResponse({"detail": [{"loc": ["body"], "msg": message, "type": "value_error"}]},
                            status_code=422)
    return await internal(request, exc)


async def bad_text(request: Request, exc: Exception) -> JSONResponse:
    metrics.ERRORS.labels("validation").inc()
    return JSONResponse({"detail": [{"loc": ["body"], "msg": "text is not valid unicode", "type": "value_error"}]},
                        status_code=422)


async def internal(request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error", exc_info=(type(exc), exc, exc.__traceback__))
    metrics.ERRORS.labels("internal").inc()
    return JSONResponse({"detail": "internal error", "request_id": request_id_var.get()}, status_code=500)


async def pool_timeout(request: Request, exc: Exception) -> JSONResponse:
    metrics.ERRORS.labels("unavailable").inc()
    return await unavailable(request, exc)


def install(app: FastAPI) -> None:
    app.add_exception_handler(NotFound, not_found)
    app.add_exception_handler(InvalidRequest, invalid)
    app.add_exception_handler(Unavailable, pool_timeout)
    app.add_exception_handler(PoolTimeout, pool_timeout)
    app.add_exception_handler(psycopg.Error, database_error)
    app.add_exception_handler(UnicodeEncodeError, bad_text)
