"""The FastAPI application: ``create_app(settings)``; ``pgrec serve`` runs it under uvicorn."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio.to_thread
from fastapi import FastAPI

from engine.api import errors
from engine.api.deps import ServiceConfig, Services
from engine.api.middleware import ServiceMiddleware
from engine.api.routes import admin, catalog, events, health, manage, recommend
from engine.config import Settings, get_settings
from engine.db import make_pool

DESCRIPTION = """pgrec's HTTP service: a stateless wrapper over the recommendation engine in PostgreSQL.
Run any number of copies against one database.

Authenticate with `Authorization: Bearer <key>` (keys from `pgrec keys create --scope read|write|admin`;
`admin` may call everything). Errors: 401 missing or invalid key, 403 wrong scope, 404 unknown id,
413 body too large, 422 invalid input (the field is named in `detail[].loc`), 503 database unavailable.
Every answer carries `X-Request-ID` (yours if you sent one), which the JSON logs carry too."""


def create_app(settings: Settings, config: ServiceConfig | None = None) -> FastAPI:
    """The service over one connection pool. The pool opens in the background: the app starts even when the
    database is down (``/ready`` says so, other endpoints answer 503 after ``pool_timeout_s``)."""
    config = config or ServiceConfig()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        pool = make_pool(settings, name="pgrec-api")
        app.state.services = Services(settings, config, pool)
        # sync endpoints (and their dependencies) run in anyio's worker threads: 40 unless settings.service_threads
        if settings.service_threads:
            anyio.to_thread.current_default_thread_limiter().total_tokens = settings.service_threads
        try:
            yield
        finally:
            pool.close()

    app = FastAPI(title="pgrec", version="0.1.0", description=DESCRIPTION, lifespan=lifespan)
    errors.install(app)
    for module in (health, recommend, events, catalog, admin, manage):
        app.include_router(module.router)
    app.add_middleware(ServiceMiddleware, max_body_bytes=config.max_body_bytes)
    return app


def app_from_env() -> FastAPI:
    """The uvicorn factory of ``pgrec serve`` (each worker builds its own app from the environment)."""
    from engine.api.logs import configure_logging

    settings = get_settings()
    configure_logging(settings.log_level)
    return create_app(settings)
