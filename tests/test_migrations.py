"""The schema installs into an existing database beside the app's own alembic history, and goes
up -> down to base -> up again on a database holding data."""

from __future__ import annotations

import pytest
from conftest import TestDB

from engine import migrate
from engine.db import connect


def test_upgrade_downgrade_upgrade_with_data(empty_db: TestDB) -> None:
    conn = empty_db.conn
    # the application already has its own alembic history in public
    conn.execute("CREATE TABLE public.alembic_version (version_num varchar(32) PRIMARY KEY)")
    conn.execute("INSERT INTO public.alembic_version VALUES ('app_rev_1')")
    conn.execute("CREATE TABLE public.orders (id int)")

    migrate.upgrade(empty_db.settings)
    assert "(head)" in migrate.current(empty_db.settings)
    with connect(empty_db.settings) as c:
        c.execute("SELECT pgrec.upsert_item('a', ARRAY['x'])")
        c.execute("SELECT pgrec.track_event('u', 'a', 'click', '2024-01-05')")
        c.execute("SELECT pgrec.track_event('u', 'a', 'click', '2024-03-05')")
        assert c.execute("SELECT count(*) FROM pgrec.events").fetchone() == (2,)

    migrate.downgrade(empty_db.settings, "base")
    assert conn.execute("SELECT count(*) FROM pg_tables WHERE schemaname = 'pgrec' "
                        "AND tablename <> 'alembic_version'").fetchone() == (0,)
    assert conn.execute("SELECT count(*) FROM pg_proc WHERE pronamespace = 'pgrec'::regnamespace").fetchone() == (0,)

    migrate.upgrade(empty_db.settings)
    with connect(empty_db.settings) as c:
        c.execute("SELECT pgrec.upsert_item('a')")
        assert c.execute("SELECT pgrec.track_event('u', 'a', 'click', '2024-01-05')").fetchone() == ("stored",)
    # the application's tables and version row are untouched; ours lives in schema pgrec
    assert conn.execute("SELECT version_num FROM public.alembic_version").fetchall() == [("app_rev_1",)]
    assert conn.execute("SELECT to_regclass('public.orders') IS NOT NULL").fetchone() == (True,)
    assert conn.execute("SELECT count(*) FROM pgrec.alembic_version").fetchone() == (1,)


def test_each_step_down_and_up(empty_db: TestDB) -> None:
    """Every revision's downgrade undoes its upgrade (walks the chain one step at a time)."""
    migrate.upgrade(empty_db.settings)
    head = migrate.current(empty_db.settings).split()[0]
    steps = int(head)
    for _ in range(steps):
        migrate.downgrade(empty_db.settings, "-1")
    assert migrate.current(empty_db.settings) == "(none)"
    migrate.upgrade(empty_db.settings)
    assert migrate.current(empty_db.settings).split()[0] == head


@pytest.mark.parametrize("dim", [8, 32])
def test_dimension_fixed_at_install(empty_db: TestDB, dim: int) -> None:
    settings = empty_db.settings.model_copy(update={"embedding_dim": dim})
    migrate.upgrade(settings, "0002")
    assert empty_db.scalar("SELECT value::int FROM pgrec.config WHERE key = 'embedding_dim'") == dim
    assert empty_db.scalar("SELECT atttypmod FROM pg_attribute WHERE attrelid = 'pgrec.item_embeddings'::regclass "
                           "AND attname = 'embedding'") == dim


def test_yearly_event_partitions(empty_db: TestDB) -> None:
    """A long, thin event log can be partitioned by year (fixed at install), fewer partitions to plan over."""
    settings = empty_db.settings.model_copy(update={"event_partition_interval": "year"})
    migrate.upgrade(settings)
    with connect(settings) as c:
        c.execute("SELECT pgrec.upsert_item('a')")
        for when in ("2019-03-01", "2019-11-30", "2021-06-01T12:00:00Z"):
            assert c.execute("SELECT pgrec.track_event('u', 'a', 'view', %s::timestamptz)", (when,)).fetchone() == (
                "stored",)
        parts = [r[0] for r in c.execute(
            "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
            "WHERE i.inhparent = 'pgrec.events'::regclass ORDER BY 1").fetchall()]
    assert parts == ["events_2019", "events_2021"]


def test_previous_revision_serves_after_a_step_down(empty_db: TestDB) -> None:
    """One step down from head leaves the previous release's request path working on the same data."""
    migrate.upgrade(empty_db.settings)
    with connect(empty_db.settings) as c:
        for item in ("a", "b", "c"):
            c.execute("SELECT pgrec.upsert_item(%s, ARRAY['x'])", (item,))
        c.execute("SELECT pgrec.track_event('u', 'a', 'like', now() - interval '1 hour')")
        c.execute("SELECT pgrec.track_event('v', 'b', 'like', now() - interval '2 hours')")
        at_head = c.execute("SELECT item_id FROM pgrec.candidate_features('u', 'default', 10) ORDER BY 1").fetchall()
    assert len(at_head) == 3  # a (seen) and b (engaged), then c from the fallback's catalog fill (0016)
    head = migrate.current(empty_db.settings).split()[0]
    migrate.downgrade(empty_db.settings, "-1")
    with connect(empty_db.settings) as c:
        feats = c.execute("SELECT * FROM pgrec.candidate_features('u', 'default', 10) ORDER BY item_id")
        assert {d.name for d in feats.description or ()} >= {"item_key", "f_pop_30d"}
        assert 2 <= len(feats.fetchall()) <= len(at_head)  # before 0016: the engaged items only
        assert len(c.execute("SELECT * FROM pgrec.recommend('u', 2)").fetchall()) == 2
    migrate.upgrade(empty_db.settings)
    assert migrate.current(empty_db.settings).split()[0] == head


def test_a_failed_first_upgrade_leaves_no_schema(empty_db: TestDB) -> None:
    """A role that may create schemas but not the vector extension: the upgrade fails and leaves nothing, not
    even an empty schema pgrec (it was created and committed before the migrations: found by review)."""
    import os
    import uuid

    from psycopg import sql as psql
    from sqlalchemy.engine import make_url

    from engine.db import DatabaseError

    role = f"pgrec_mig_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    empty_db.conn.execute(psql.SQL("CREATE ROLE {} LOGIN PASSWORD 'x'").format(psql.Identifier(role)))
    empty_db.conn.execute(psql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
        psql.Identifier(empty_db.name), psql.Identifier(role)))
    url = make_url(empty_db.url).set(username=role, password="x").render_as_string(hide_password=False)
    try:
        with pytest.raises(DatabaseError, match=r"(?i)extension|permission"):
            migrate.upgrade(empty_db.settings.model_copy(update={"database_url": url}))
        assert empty_db.scalar("SELECT to_regnamespace('pgrec') IS NULL") is True
    finally:
        empty_db.conn.execute(psql.SQL("DROP OWNED BY {}").format(psql.Identifier(role)))
        empty_db.conn.execute(psql.SQL("DROP ROLE {}").format(psql.Identifier(role)))
