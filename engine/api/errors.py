"""Exceptions to HTTP answers: 404 unknown ids, 422 bad input (naming the field), 503 database outage.

No answer carries a stack trace; unexpected errors are logged with one and answered 500 with the request id.
Database errors: the engine's SQL raises 22023 (invalid_parameter_value) for bad input, P0002 for an unknown id
and 55000 for a change the current state refuses; those (and unknown references, 23503) are the caller's. Any
other error, a data exception such as 22003 numeric out of range or 22012 division by zero included, is a
server fault: 500.
"""

from __future__ import annotations

import math
import re
from typing import Any

import psycopg
from fastapi import FastAPI, Request
from fastapi.encoders import jsonable_encoder
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from psycopg_pool import PoolTimeout

from engine.api import metrics
from engine.api.logs import log, request_id_var
from engine.errors import InvalidRequest, NotFound, Unavailable

# "pgrec.rerank: context must be ..." names the SQL function, not a request field
_SQL_PREFIX = re.compile(r"^pgrec\.\w+: ")
# the DETAIL of a foreign key violation
_FK_DETAIL = re.compile(r'^Key \((\w+)\)=\((.*)\) is not present in table "?[\w.]+"?\.?$', re.DOTALL)


def _field_error(message: str, status: int = 422) -> JSONResponse:
    """``{"detail": [{"loc": ["body", field], "msg", "type"}]}``, the shape of FastAPI's own 422s."""
    message = _SQL_PREFIX.sub("", message)
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


def _json_safe(v: Any) -> Any:
    """``v`` with non-finite floats as strings ('nan', 'inf'): JSON has no NaN or Infinity."""
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, list | tuple):
        return [_json_safe(x) for x in v]
    return v


async def request_invalid(request: Request, exc: Exception) -> JSONResponse:
    """FastAPI's 422, renderable whatever the input was (the errors echo it, NaN and 1e400 included)."""
    assert isinstance(exc, RequestValidationError)
    metrics.ERRORS.labels("validation").inc()
    return JSONResponse({"detail": _json_safe(jsonable_encoder(exc.errors()))}, status_code=422)


def unknown_reference(exc: psycopg.errors.ForeignKeyViolation) -> str:
    """``surface: unknown surface 'x'`` from ``Key (surface)=(x) is not present in table "surfaces".``"""
    found = _FK_DETAIL.match((exc.diag.message_detail or "").strip())
    if found is None:
        return "refers to an unknown id"
    column, value = found.groups()
    return f"{column}: unknown {column} {value!r}"


async def database_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, psycopg.Error)
    message = (exc.diag.message_primary if exc.diag else None) or str(exc)
    if isinstance(exc, psycopg.errors.NoDataFound):
        return _detail(404, message, "not_found")
    if isinstance(exc, psycopg.errors.QueryCanceled | psycopg.OperationalError):
        metrics.ERRORS.labels("unavailable").inc()
        return await unavailable(request, exc)
    if isinstance(exc, psycopg.errors.InvalidParameterValue):
        metrics.ERRORS.labels("validation").inc()
        return _field_error(message)
    if isinstance(exc, psycopg.errors.ObjectNotInPrerequisiteState):
        return _detail(409, _SQL_PREFIX.sub("", message), "conflict")
    if isinstance(exc, psycopg.errors.ForeignKeyViolation):
        metrics.ERRORS.labels("validation").inc()
        return _field_error(unknown_reference(exc))
    if isinstance(exc, psycopg.IntegrityError):
        metrics.ERRORS.labels("validation").inc()
        return JSONResponse({"detail": [{"loc": ["body"], "msg": message, "type": "value_error"}]},
                            status_code=422)
    # not the caller's: 22003 numeric out of range, 22012 division by zero, P0001, ...
    return await internal(request, exc)


async def bad_text(request: Request, exc: Exception) -> JSONResponse:
    metrics.ERRORS.labels("validation").inc()
    return JSONResponse({"detail": [{"loc": ["body"], "msg": "text is not valid unicode", "type": "value_error"}]},
                        status_code=422)


async def internal(request: Request, exc: Exception) -> JSONResponse:
    log.error("internal error", exc_info=(type(exc), exc, exc.__traceback__),
              extra={"request_id": request_id_var.get(), "path": request.url.path,
                     "sqlstate": getattr(exc, "sqlstate", None)})
    metrics.ERRORS.labels("internal").inc()
    return JSONResponse({"detail": "internal error", "request_id": request_id_var.get()}, status_code=500)


async def pool_timeout(request: Request, exc: Exception) -> JSONResponse:
    metrics.ERRORS.labels("unavailable").inc()
    return await unavailable(request, exc)


def install(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, request_invalid)
    app.add_exception_handler(NotFound, not_found)
    app.add_exception_handler(InvalidRequest, invalid)
    app.add_exception_handler(Unavailable, pool_timeout)
    app.add_exception_handler(PoolTimeout, pool_timeout)
    app.add_exception_handler(psycopg.Error, database_error)
    app.add_exception_handler(UnicodeEncodeError, bad_text)
