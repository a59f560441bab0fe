"""Shared fixtures of the HTTP service tests: an app over the test database and keys of each scope."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from conftest import TestDB
from fastapi.testclient import TestClient

from engine.api import ServiceConfig, create_app
from engine.api.keys import create_key


@dataclass
class Api:
    client: TestClient
    db: TestDB
    read: dict[str, str]
    write: dict[str, str]
    admin: dict[str, str]


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def api(db: TestDB) -> Iterator[Api]:
    keys = {s: create_key(db.conn, f"test-{s}", [s])[0] for s in ("read", "write", "admin")}
    settings = db.settings.model_copy(update={"pool_timeout_s": 3.0})
    app = create_app(settings, ServiceConfig(max_body_bytes=64_000, key_cache_ttl_s=0.0, experiment_ttl_s=0.0))
    with TestClient(app) as client:
        yield Api(client, db, bearer(keys["read"]), bearer(keys["write"]), bearer(keys["admin"]))
