"""Schema versions through alembic, with the version table in schema pgrec."""

from __future__ import annotations

import io
from contextlib import redirect_stdout

import psycopg
from alembic import command
from alembic.config import Config
from sqlalchemy import create_engine, pool
from sqlalchemy.exc import DBAPIError

from engine.config import Settings
from engine.db import DatabaseError, database_url, describe_error
from engine.sql import resource_dir


def alembic_config(settings: Settings, stdout: io.StringIO | None = None) -> Config:
    url = database_url(settings).replace("postgresql://", "postgresql+psycopg://", 1)
    cfg = Config(stdout=stdout or io.StringIO())
    cfg.set_main_option("script_location", str(resource_dir("migrations")))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    cfg.attributes["embedding_dim"] = settings.embedding_dim
    cfg.attributes["segment_property"] = settings.segment_property
    cfg.attributes["event_partition_interval"] = settings.event_partition_interval
    return cfg


def _run(settings: Settings, fn: str, *args: str) -> str:
    """Run an alembic command in one transaction; a database error becomes a :class:`DatabaseError` whose
    message is the server's (with its hint), and nothing of the command stays."""
    out = io.StringIO()
    cfg = alembic_config(settings, out)
    engine = create_engine(cfg.get_main_option("sqlalchemy.url", "").replace("%%", "%"), poolclass=pool.NullPool)
    try:
        with engine.connect() as conn, redirect_stdout(out):
            cfg.attributes["connection"] = conn
            getattr(command, fn)(cfg, *args)
            conn.commit()
    except DBAPIError as exc:
        why = describe_error(exc.orig) if isinstance(exc.orig, psycopg.Error) else str(exc.orig)
        raise DatabaseError(f"db {fn} failed, nothing was changed: {why}") from exc
    finally:
        engine.dispose()
    return out.getvalue()


def upgrade(settings: Settings, revision: str = "head") -> None:
    _run(settings, "upgrade", revision)


def downgrade(settings: Settings, revision: str = "base") -> None:
    _run(settings, "downgrade", revision)


def current(settings: Settings) -> str:
    return _run(settings, "current").strip() or "(none)"


def heads(settings: Settings) -> str:
    return _run(settings, "heads").strip()
