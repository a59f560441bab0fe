"""Alembic environment: everything, the version table included, lives in schema pgrec."""

from __future__ import annotations

import sys
from pathlib import Path

from alembic import context
from sqlalchemy import create_engine, pool, text

sys.path.insert(0, str(Path(__file__).resolve().parent))  # for sqlfiles.py

config = context.config
url = config.get_main_option("sqlalchemy.url")


def run_migrations_online() -> None:
    connectable = config.attributes.get("connection")
    if connectable is None:
        engine = create_engine(url, poolclass=pool.NullPool)
        with engine.connect() as connection:
            _run(connection)
    else:
        _run(connectable)


def _run(connection) -> None:  # type: ignore[no-untyped-def]
    # the schema is created in the migrations' own transaction (alembic runs inside the one already begun):
    # a failed first upgrade leaves no empty schema pgrec behind
    connection.execute(text("CREATE SCHEMA IF NOT EXISTS pgrec"))
    # every object is named with its schema; without public in the path no other role's function there runs
    # with the migrating role's rights (engine.db.SAFE_SEARCH_PATH)
    connection.execute(text("SET search_path = pg_catalog, pg_temp"))
    context.configure(
        connection=connection,
        version_table="alembic_version",
        version_table_schema="pgrec",
        transactional_ddl=True,
    )
    with context.begin_transaction():
        context.run_migrations()
    connection.commit()


if context.is_offline_mode():
    context.configure(url=url, version_table_schema="pgrec", literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    run_migrations_online()
