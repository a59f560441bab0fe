"""`pgrec keys create|list|revoke` and `pgrec report online` against the test database."""

from __future__ import annotations

import json
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
    # a fractional attribution window, as config accepts it (the report cast it to an integer and failed)
    assert cli.invoke(app, ["config", "set", "report_attribution_hours", "1.5"]).exit_code == 0
    r = cli.invoke(app, ["report", "online", "--json"])
    assert r.exit_code == 0 and '"clicks": 1' in r.output, r.output


def test_experiments_commands(cli: CliRunner, db: TestDB) -> None:
    from engine import policies

    policies.add(db.conn, "strict-boost", "boost", {"predicate": {"field": "categories", "op": "exists"},
                                                     "multiply": 1.0}, policy_set="strict")
    r = cli.invoke(app, ["experiments", "create", "exp-cli", "-v", "control=0.5", "-v", "strict=0.5,policy_set=strict",
                         "--description", "from the CLI"])
    assert r.exit_code == 0, r.output
    rows = db.conn.execute("SELECT variant, share, model_version, policy_set FROM pgrec.experiment_variants "
                           "WHERE experiment = 'exp-cli' ORDER BY variant").fetchall()
    assert rows == [("control", 0.5, None, None), ("strict", 0.5, None, "strict")]
    listed = cli.invoke(app, ["experiments", "list", "--json"])
    assert listed.exit_code == 0
    exp = json.loads(listed.output)
    assert [(e["name"], e["surface"], [v["name"] for v in e["variants"]]) for e in exp] == [
        ("exp-cli", "default", ["control", "strict"])]
    # refusals name what is wrong and change nothing
    for args, words in ((["-v", "a=0.5", "-v", "b=0.4"], "sum to 1"), (["-v", "a"], "NAME=SHARE"),
                        (["-v", "a=1,model=x"], "version number"), (["-v", "a=1,colour=red"], "model=VERSION"),
                        (["-v", "a=1,model=424242"], "unknown model version")):
        bad = cli.invoke(app, ["experiments", "create", "exp-bad", *args])
        assert bad.exit_code == 1 and words in bad.output, (args, bad.output)
    assert db.scalar("SELECT count(*) FROM pgrec.experiments WHERE experiment = 'exp-bad'") == 0
    busy = cli.invoke(app, ["experiments", "create", "exp-two", "-v", "a=1"])
    assert busy.exit_code == 1 and "already has an active experiment" in busy.output
    # an error quoting a pattern prints it whole (rich markup ate "[a-z0-9]")
    named = cli.invoke(app, ["experiments", "create", "t1", "-v", "A=1"])
    assert named.exit_code == 1 and "[a-z0-9" in named.output, named.output
    assert cli.invoke(app, ["experiments", "end", "exp-cli"]).exit_code == 0
    again = cli.invoke(app, ["experiments", "end", "exp-cli"])
    assert again.exit_code == 1 and "already ended" in again.output
    assert "no active experiments" in cli.invoke(app, ["experiments", "list"]).output
    assert "exp-cli" in cli.invoke(app, ["experiments", "list", "--all"]).output


def test_a_model_serving_an_active_experiment_cannot_be_deleted(cli: CliRunner, db: TestDB) -> None:
    import lightgbm as lgb
    import numpy as np
    import psycopg

    from engine.ranking import registry

    booster = lgb.train({"objective": "regression", "verbose": -1, "num_leaves": 2, "min_data_in_leaf": 1},
                        lgb.Dataset(np.array([[0.0], [1.0]]), np.array([0.0, 1.0])), num_boost_round=1)
    version = registry.save(db.conn, kind=registry.RANKER, artifact=booster.model_to_string().encode(), params={},
                            features=["f_pop_7d"], metrics={}, data_window={})
    r = cli.invoke(app, ["experiments", "create", "exp-model", "-v", "control=0.5", "-v", f"new=0.5,model={version}"])
    assert r.exit_code == 0, r.output
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match='variant "new" of the active experiment "exp-model"'):
        db.conn.execute("DELETE FROM pgrec.models WHERE version = %s", (version,))
    assert db.scalar("SELECT count(*) FROM pgrec.models WHERE version = %s", (version,)) == 1
    with pytest.raises(psycopg.errors.ForeignKeyViolation, match="exp-model"):
        db.conn.execute("TRUNCATE pgrec.models CASCADE")
    assert db.scalar("SELECT count(*) FROM pgrec.models WHERE version = %s", (version,)) == 1
    assert cli.invoke(app, ["experiments", "end", "exp-model"]).exit_code == 0
    db.conn.execute("DELETE FROM pgrec.models WHERE version = %s", (version,))   # an ended experiment: allowed
    assert db.scalar("SELECT count(*) FROM pgrec.models WHERE version = %s", (version,)) == 0
