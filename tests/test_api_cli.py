"""`pgrec keys create|list|revoke` and `pgrec report online` against the test database."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
from conftest import TestDB
from typer.testing import CliRunner

from engine.api.keys import hash_token
from engine.cli import app
from engine.config import get_settings


@pytest.fixture
def cli(db: TestDB, monkeypatch: pytest.MonkeyPatch) -> Iterator[CliRunner]:
    monkeypatch.setenv("PGREC_DATABASE_URL", db.url)
    monkeypatch.setenv("PGREC_EMBEDDING_DIM", "16")
    get_settings.cache_clear()
    yield CliRunner()
    get_settings.cache_clear()


def test_keys_commands(cli: CliRunner, db: TestDB) -> None:
    r = cli.invoke(app, ["keys", "create", "ops", "--scope", "write", "--scope", "read"])
    assert r.exit_code == 0, r.output
    token = re.search(r"pgr_\S+", r.output)
    assert token is not None
    assert db.scalar("SELECT scopes FROM pgrec.api_keys WHERE key_hash = %s", (hash_token(token.group(0)),)) == [
        "read", "write"]
    key_id = db.scalar("SELECT key_id FROM pgrec.api_keys WHERE name = 'ops'")
    listed = cli.invoke(app, ["keys", "list"])
    assert listed.exit_code == 0 and "ops" in listed.output and token.group(0) not in listed.output
    assert cli.invoke(app, ["keys", "revoke", str(key_id)]).exit_code == 0
    again = cli.invoke(app, ["keys", "revoke", str(key_id)])
    assert again.exit_code == 1 and "already revoked" in again.output
    bad = cli.invoke(app, ["keys", "create", "x", "--scope", "root"])
    assert bad.exit_code == 1 and "scopes" in bad.output
    assert db.scalar("SELECT count(*) FROM pgrec.api_keys WHERE name = 'x'") == 0


def test_report_online_command(cli: CliRunner, db: TestDB) -> None:
    r = cli.invoke(app, ["report", "online"])
    assert r.exit_code == 0 and "no impressions" in r.output
    db.conn.execute("SELECT pgrec.upsert_item('a'), pgrec.upsert_user('u')")
    db.conn.execute("""INSERT INTO pgrec.impressions (request_id, user_key, surface, position, item_key, variant)
                       SELECT gen_random_uuid(), u.user_key, 'default', 1, i.item_key, 'control'
                         FROM pgrec.users u, pgrec.items i WHERE u.user_id = 'u' AND i.item_id = 'a'""")
    db.conn.execute("SELECT pgrec.track_event('u', 'a', 'click')")
    r = cli.invoke(app, ["report", "online", "--json", "--surface", "default"])
    assert r.exit_code == 0, r.output
    assert '"clicks": 1' in r.output and '"variant": "control"' in r.output
