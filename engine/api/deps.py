"""What the endpoints share (pool, key cache, variant assigner, the facade) and their Annotated dependencies."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Annotated, Any

import psycopg
from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from psycopg_pool import ConnectionPool

from engine import experiments
from engine.api import metrics
from engine.api.keys import ApiKey, KeyCache
from engine.config import Settings
from engine.sql import query, resource_dir

if TYPE_CHECKING:
    from engine.pipeline import Recommender


@dataclass(frozen=True)
class ServiceConfig:
    """Knobs of the HTTP layer (database timeouts and pool size are in :class:`engine.config.Settings`)."""

    max_body_bytes: int = 1_048_576
    """Larger request bodies get 413."""
    key_cache_ttl_s: float = 5.0
    """A key lookup (valid or not) is remembered this long: a revoked key dies everywhere within it."""
    experiment_ttl_s: float = 5.0
    """Active experiments are re-read this often: a new experiment reaches every copy within it."""


class Services:
    """One per app (per worker process). Holds nothing per request: copies of the service are stateless."""

    def __init__(self, settings: Settings, config: ServiceConfig, pool: ConnectionPool) -> None:
        self.settings = settings
        self.config = config
        self.pool = pool
        self.keys = KeyCache(pool, config.key_cache_ttl_s)
        self.assigner = experiments.Assigner(self._load_experiments, config.experiment_ttl_s)
        self._lock = threading.Lock()
        self._recommender: Recommender | None = None

    def _load_experiments(self) -> list[experiments.Experiment]:
        with self.pool.connection() as conn:
            return experiments.list_experiments(conn)

    @property
    def recommender(self) -> Recommender:
        """The serving facade, built on first use over the same pool."""
        if self._recommender is None:
            with self._lock:
                if self._recommender is None:
                    from engine.pipeline import Recommender

                    self._recommender = Recommender(self.settings, self.pool)
        return self._recommender

    @cached_property
    def head_revision(self) -> str | None:
        return head_revision()


def head_revision() -> str | None:
    """The newest migration of this code (the revision no other one builds on)."""
    revs: dict[str, str | None] = {}
    for path in (resource_dir("migrations") / "versions").glob("*.py"):
        text = path.read_text()
        rev = re.search(r'^revision\s*=\s*"([^"]+)"', text, re.MULTILINE)
        down = re.search(r'^down_revision\s*=\s*(?:"([^"]+)"|None)', text, re.MULTILINE)
        if rev:
            revs[rev.group(1)] = down.group(1) if down else None
    heads = set(revs) - {d for d in revs.values() if d}
    return sorted(heads)[0] if len(heads) == 1 else None


def get_services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


ServicesDep = Annotated[Services, Depends(get_services)]


def get_conn(services: ServicesDep) -> Iterator[psycopg.Connection[Any]]:
    """A pooled autocommit connection; waits at most ``pool_timeout_s`` (then 503)."""
    with services.pool.connection() as conn:
        yield conn


Conn = Annotated[psycopg.Connection[Any], Depends(get_conn)]

_bearer = HTTPBearer(auto_error=False, description="An API key from `pgrec keys create`.")


def require(scope: str) -> Callable[..., ApiKey]:
    def check(services: ServicesDep,
              creds: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]) -> ApiKey:
        if creds is None or not creds.credentials:
            metrics.ERRORS.labels("auth").inc()
            raise HTTPException(401, "missing API key (Authorization: Bearer <key>)",
                                headers={"WWW-Authenticate": "Bearer"})
        key = services.keys.lookup(creds.credentials)
        if key is None:
            metrics.ERRORS.labels("auth").inc()
            raise HTTPException(401, "invalid or revoked API key", headers={"WWW-Authenticate": "Bearer"})
        if not key.allows(scope):
            metrics.ERRORS.labels("auth").inc()
            raise HTTPException(403, f"this key lacks scope {scope!r}")
        return key

    check.__name__ = f"require_{scope}"
    return check


ReadKey = Annotated[ApiKey, Depends(require("read"))]
WriteKey = Annotated[ApiKey, Depends(require("write"))]
AdminKey = Annotated[ApiKey, Depends(require("admin"))]


def schema_revision(conn: psycopg.Connection[Any]) -> str | None:
    row = conn.execute(query("service.schema_revision")).fetchone()
    return None if row is None else str(row[0])
