"""pgrec.config refuses bad settings on write (sql/config/v1.sql), `pgrec config list|set`, and the upgrade
that checks the rows already there."""

from __future__ import annotations

import json
import re
from pathlib import Path

import psycopg
import pytest
from conftest import TestDB
from psycopg.types.json import Jsonb
from typer.testing import CliRunner

from engine import migrate
from engine.cli import app
from engine.config import get_settings
from engine.db import connect


def _set(db: TestDB, key: str, value: object) -> None:
    db.conn.execute("UPDATE pgrec.config SET value = %s WHERE key = %s", (Jsonb(value), key))


def _refused(db: TestDB, key: str, value: object) -> psycopg.Error:
    before = db.scalar("SELECT value FROM pgrec.config WHERE key = %s", (key,))
    with pytest.raises(psycopg.Error) as exc, db.conn.transaction():
        _set(db, key, value)
    assert db.scalar("SELECT value FROM pgrec.config WHERE key = %s", (key,)) == before
    return exc.value


def test_every_seeded_key_has_a_spec_and_passes_it(db: TestDB) -> None:
    keys = {r[0] for r in db.conn.execute("SELECT key FROM pgrec.config").fetchall()}
    specs = {r[0] for r in db.conn.execute("SELECT key FROM pgrec.config_specs()").fetchall()}
    assert keys == specs
    for key, value in db.conn.execute("SELECT key, value FROM pgrec.config").fetchall():
        _set(db, key, value)  # the values as seeded are valid (writing them again passes the check)


@pytest.mark.parametrize(("key", "value", "expects"), [
    ("source_cache_seconds", "abc", "a number >= 0 and <= 86400"),
    ("source_cache_seconds", -1, "a number >= 0 and <= 86400"),
    ("fresh_max_scan", 2.5, "an integer >= 1 and <= 100000"),
    ("fresh_days", 0, "a number > 0 and <= 36500"),
    ("trending_half_life_hours", None, "a number > 0 and <= 876000"),
    ("policy_max_k", "100", "an integer >= 1 and <= 100000"),
    ("segment_property", "", "a non-empty string"),
    ("segment_property", 3, "a non-empty string"),
    ("report_click_types", "click", "a JSON list of event type names (rows of pgrec.event_types)"),
    ("report_click_types", ["click", 3], "a JSON list of event type names (rows of pgrec.event_types)"),
])
def test_wrong_type_or_range_is_refused_naming_the_key(db: TestDB, key: str, value: object, expects: str) -> None:
    err = _refused(db, key, value)
    assert err.sqlstate == "22023"
    assert err.diag.message_primary is not None
    assert err.diag.message_primary.startswith(f"pgrec.config: {key} must be {expects}, got ")


def test_unknown_keys_and_event_types_are_refused_with_the_known_ones(db: TestDB) -> None:
    with pytest.raises(psycopg.Error) as exc, db.conn.transaction():
        db.conn.execute("INSERT INTO pgrec.config (key, value) VALUES ('fresh_day', '3')")
    assert exc.value.diag.message_primary == "pgrec.config: unknown key 'fresh_day'"
    assert "fresh_days" in (exc.value.diag.message_hint or "")
    err = _refused(db, "report_conversion_types", ["purchase", "checkout", "tap"])
    assert err.diag.message_primary == "pgrec.config: report_conversion_types names unknown event types: checkout, tap"
    assert "purchase" in (err.diag.message_hint or "")
    with pytest.raises(psycopg.Error, match="cannot be renamed"), db.conn.transaction():
        db.conn.execute("UPDATE pgrec.config SET key = 'fresh_dayz' WHERE key = 'fresh_days'")


def test_keys_fixed_at_install_cannot_change_or_go(db: TestDB) -> None:
    dim = db.scalar("SELECT value FROM pgrec.config WHERE key = 'embedding_dim'")
    err = _refused(db, "embedding_dim", dim + 1)
    assert err.sqlstate == "55000" and "embedding_dim is fixed at install" in str(err)
    _refused(db, "event_partition_interval", "year")
    with pytest.raises(psycopg.Error, match="cannot be deleted"), db.conn.transaction():
        db.conn.execute("DELETE FROM pgrec.config WHERE key = 'embedding_dim'")
    _set(db, "embedding_dim", dim)  # writing the same value is fine
    db.conn.execute("DELETE FROM pgrec.config WHERE key = 'fresh_days'")  # other keys fall back to defaults
    assert db.scalar("SELECT count(*) FROM pgrec.config WHERE key = 'fresh_days'") == 0


def test_good_values_are_stored_and_used(db: TestDB) -> None:
    old = db.scalar("SELECT updated_at FROM pgrec.config WHERE key = 'fresh_days'")
    db.conn.commit()
    _set(db, "fresh_days", 7.5)
    _set(db, "source_cache_seconds", 0)
    _set(db, "report_click_types", ["click", "like"])
    _set(db, "segment_property", "region")
    assert db.scalar("SELECT value FROM pgrec.config WHERE key = 'fresh_days'") == 7.5
    assert db.scalar("SELECT updated_at FROM pgrec.config WHERE key = 'fresh_days'") > old
    # the readers cast the stored values as the specs promise
    assert db.scalar("SELECT pgrec.candidates_setting('source_cache_seconds', 30)") == 0


def test_upgrade_fails_on_an_existing_bad_row(empty_db: TestDB) -> None:
    migrate.upgrade(empty_db.settings, "0014")
    with connect(empty_db.settings) as c:
        c.execute("UPDATE pgrec.config SET value = '\"30s\"' WHERE key = 'source_cache_seconds'")
    with pytest.raises(Exception, match=r"nothing was changed: pgrec\.config: source_cache_seconds must be a number"):
        migrate.upgrade(empty_db.settings, "0015")
    assert migrate.current(empty_db.settings).split()[0] == "0014"
    with connect(empty_db.settings) as c:  # nothing was fixed silently
        assert c.execute("SELECT value FROM pgrec.config WHERE key = 'source_cache_seconds'").fetchone() == ("30s",)
        c.execute("UPDATE pgrec.config SET value = '30' WHERE key = 'source_cache_seconds'")
    migrate.upgrade(empty_db.settings, "0015")
    migrate.downgrade(empty_db.settings, "0014")
    with connect(empty_db.settings) as c:  # the check is gone with its revision
        c.execute("INSERT INTO pgrec.config (key, value) VALUES ('anything', '1')")


@pytest.fixture
def cli_db(db: TestDB, monkeypatch: pytest.MonkeyPatch) -> TestDB:
    db.conn.commit()
    monkeypatch.setenv("PGREC_DATABASE_URL", db.url)
    monkeypatch.setenv("PGREC_EMBEDDING_DIM", str(db.settings.embedding_dim))
    get_settings.cache_clear()
    return db


def _cli(*args: str, ok: bool = True) -> str:
    res = CliRunner().invoke(app, ["config", *args])
    get_settings.cache_clear()
    assert (res.exit_code == 0) == ok, res.output
    if not ok:
        assert res.exit_code == 1 and "Traceback" not in res.output
    return " ".join(res.output.split())


def test_cli_list_and_set(cli_db: TestDB) -> None:
    rows = {r["key"]: r for r in json.loads(_cli("list", "--json"))}
    assert rows["fresh_days"]["value"] == 14 and rows["fresh_days"]["expects"] == "a number > 0 and <= 36500"
    assert rows["embedding_dim"]["fixed"] and rows["trending_half_life_hours"]["after_change"]
    out = _cli("set", "trending_half_life_hours", "48")
    assert "trending_half_life_hours = 48" in out and "now run: SELECT pgrec.rebuild_trending()" in out
    assert "segment_property = \"region\"" in _cli("set", "segment_property", "region")  # not JSON: a string
    assert "report_click_types = [\"click\", \"like\"]" in _cli("set", "report_click_types", '["click","like"]')
    out = _cli("set", "fresh_days", "-3", ok=False)  # a negative value needs no "--"
    assert "pgrec.config: fresh_days must be a number > 0 and <= 36500, got -3" in out
    assert "1e400 is not a finite number" in _cli("set", "fresh_days", "1e400", ok=False)
    assert "NaN is not a number JSON allows" in _cli("set", "fresh_days", "NaN", ok=False)
    out = _cli("set", "fresh_dayz", "3", ok=False)
    assert "unknown key 'fresh_dayz'" in out and "fresh_days" in out
    assert "fixed at install" in _cli("set", "embedding_dim", "128", ok=False)
    with connect(cli_db.settings) as c:
        got = dict(c.execute("SELECT key, value FROM pgrec.config WHERE key IN "
                             "('trending_half_life_hours', 'fresh_days', 'segment_property')").fetchall())
    assert got == {"trending_half_life_hours": 48, "fresh_days": 14, "segment_property": "region"}
    listed = _cli("list")  # a table: rich folds long keys across lines, short ones stay whole
    assert "fresh_days" in listed and "policy_max_k" in listed and "fixed at install" in listed


def test_docs_and_code_name_only_known_keys(db: TestDB) -> None:
    """Every key a SQL file or Python module reads is one the specs know (a typo would read the default)."""
    known = {r[0] for r in db.conn.execute("SELECT key FROM pgrec.config_specs()").fetchall()}
    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"FROM pgrec\.config(?: c)? WHERE (?:c\.)?key = '([a-z_]+)'|candidates_setting\('([a-z_]+)'")
    read: set[str] = set()
    for path in [*root.glob("sql/*/v*.sql"), *root.glob("sql/queries/*.sql"), *root.glob("engine/**/*.py")]:
        for m in pattern.finditer(path.read_text()):
            read.add(m.group(1) or m.group(2))
    assert read, "the pattern found no reads"
    assert read <= known, sorted(read - known)
