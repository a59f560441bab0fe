"""The schema installs and the basic write path works (fuller foundation tests live beside this file)."""

from __future__ import annotations

from conftest import TestDB


def test_schema_installed(db: TestDB) -> None:
    assert db.scalar("SELECT value::int FROM pgrec.config WHERE key = 'embedding_dim'") == 16
    assert db.scalar("SELECT count(*) FROM pgrec.event_types") == 6


def test_track_event_roundtrip(db: TestDB) -> None:
    db.conn.execute("SELECT pgrec.upsert_item('a', ARRAY['x'])")
    assert db.scalar("SELECT pgrec.track_event('u1', 'a', 'click', event_id => 'e1')") == "stored"
    assert db.scalar("SELECT pgrec.track_event('u1', 'a', 'click', event_id => 'e1')") == "duplicate"
    assert db.scalar("SELECT count(*) FROM pgrec.events") == 1
