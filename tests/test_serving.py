"""Serving end to end on generated data: the Python path and the SQL-only path agree, both log impressions,
a least-privilege role can call pgrec.recommend and cannot read the tables, and an event changes the answer."""

from __future__ import annotations

import json
import os
import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from typing import Any

import lightgbm as lgb
import numpy as np
import psycopg
import pytest
from conftest import TEST_DIM, TestDB, _clone, _drop
from psycopg import sql as psql

from engine import datasets
from engine.config import Settings
from engine.db import connect
from engine.errors import InvalidRequest, NotFound
from engine.pipeline import Recommender
from engine.ranking import registry
from engine.ranking.features import feature_names
from engine.sql import query

NOW = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)  # the generated events end here
AS_OF = NOW
# the migrations seed only exclude-disliked; serving lists here also leave out what the user already had
EXCLUDE_SEEN = ("INSERT INTO pgrec.policies (name, kind, params, priority, description, created_by, updated_by) "
                "VALUES ('exclude-seen', 'exclude_interacted', '{}', 10, 'seen items', 'test', 'test')")


def _train_small_ranker(conn: psycopg.Connection[Any]) -> int:
    """A real LightGBM model over the real feature columns (labels: did the user engage with the item later)."""
    users = [r[0] for r in conn.execute(query("serving.sample_users"), {"n": 6}).fetchall()]
    cutoff = NOW - timedelta(days=20)
    cur = conn.execute(query("serving.candidate_features_many"), {"user_ids": users, "surface": "default",
                                                                   "as_of": cutoff})
    rows = cur.fetchall()
    cols = [d.name for d in cur.description or ()]
    names = feature_names(cur.description or ())
    later = set(conn.execute("SELECT u.user_id, i.item_key FROM pgrec.events e JOIN pgrec.users u USING (user_key) "
                             "JOIN pgrec.items i USING (item_key) WHERE e.occurred_at >= %s", (cutoff,)).fetchall())
    x = np.array([[r[cols.index(n)] for n in names] for r in rows], dtype=np.float64)
    y = np.array([1.0 if (r[0], r[cols.index("item_key")]) in later else 0.0 for r in rows])
    booster = lgb.train({"objective": "regression", "num_leaves": 7, "min_data_in_leaf": 5, "verbose": -1,
                         "num_threads": 1, "seed": 1}, lgb.Dataset(x, y, feature_name=names), num_boost_round=15)
    version = registry.save(conn, kind="ranker", artifact=booster.model_to_string().encode(), params={},
                            features=names, metrics={}, data_window={}, activate=True)
    # activation compiles the model for the SQL-only path (no separate compile step)
    return version


@pytest.fixture(scope="module")
def serving_template(pg_admin_url: str, template_db: str) -> Iterator[str]:
    """A migrated database with generated data, co-occurrence and an active compiled ranker (cloned per test)."""
    from engine import cooccurrence

    name, url = _clone(pg_admin_url, template_db)
    settings = Settings(database_url=url, embedding_dim=TEST_DIM)
    with connect(settings) as conn:
        data = datasets.generate(datasets.GeneratorConfig(users=120, items=300, events=5000, days=60, dim=TEST_DIM,
                                                          seed=3), now=NOW)
        data.load(conn)
        cooccurrence.build(conn, as_of=NOW)
        conn.execute(EXCLUDE_SEEN)
        _train_small_ranker(conn)
    try:
        yield name
    finally:
        _drop(pg_admin_url, name)


@pytest.fixture
def sdb(pg_admin_url: str, serving_template: str) -> Iterator[TestDB]:
    name, url = _clone(pg_admin_url, serving_template)
    # past as_of values take the slow (bucketed) path of stage 1; a loaded machine must not time out
    settings = Settings(database_url=url, embedding_dim=TEST_DIM, pool_min_size=1, pool_max_size=2,
                        statement_timeout_ms=120_000)
    conn = connect(settings)
    try:
        yield TestDB(url, name, settings, conn)
    finally:
        conn.close()
        _drop(pg_admin_url, name)


def _sql_recommend(conn: psycopg.Connection[Any], user: str, k: int = 10, as_of: datetime | None = AS_OF,
                   log: bool = True, context: dict[str, Any] | None = None) -> list[tuple[Any, ...]]:
    return conn.execute(query("serving.recommend_sql"), {
        "user_id": user, "k": k, "surface": "default", "context": json.dumps(context or {}), "as_of": as_of,
        "model_version": None, "policy_set": None, "variant": None, "log": log}).fetchall()


def _users(db: TestDB, n: int) -> list[str]:
    return [r[0] for r in db.conn.execute(query("serving.sample_users"), {"n": n}).fetchall()]


def _assert_same(py: Any, sql_rows: list[tuple[Any, ...]]) -> None:
    assert [i.item_id for i in py.items] == [r[2] for r in sql_rows]
    assert [i.position for i in py.items] == [r[1] for r in sql_rows]
    assert np.max(np.abs(np.array([i.score for i in py.items]) - np.array([r[3] for r in sql_rows])),
                  initial=0.0) <= 1e-9


def test_python_and_sql_paths_agree_with_and_without_a_model(sdb: TestDB) -> None:
    users = [*_users(sdb, 4), "nobody-new"]  # active users and a cold one
    version = registry.active_version(sdb.conn)
    assert version is not None
    with Recommender(sdb.settings) as rec:
        for u in users:
            py = rec.recommend(u, k=10, as_of=AS_OF, log=True)
            assert py.model_version == version and len(py.items) == 10
            _assert_same(py, _sql_recommend(sdb.conn, u))
        # no active ranker: both fall back to pgrec.fallback_score; the running Recommender notices by itself
        sdb.conn.execute("UPDATE pgrec.models SET active = false")
        for u in users[:2]:
            py = rec.recommend(u, k=10, as_of=AS_OF, log=True)
            assert py.model_version is None and len(py.items) == 10
            _assert_same(py, _sql_recommend(sdb.conn, u))


def test_both_paths_log_impressions_in_the_same_call(sdb: TestDB) -> None:
    user = _users(sdb, 1)[0]
    version = registry.active_version(sdb.conn)
    with Recommender(sdb.settings) as rec:
        py = rec.recommend(user, k=5, as_of=AS_OF, log=True)
        quiet = rec.recommend(user, k=5, as_of=AS_OF, log=False)
    sql_rows = _sql_recommend(sdb.conn, user, k=5)
    assert quiet.request_id is None
    assert py.request_id is not None and sql_rows[0][0] is not None and py.request_id != sql_rows[0][0]
    assert len({r[0] for r in sql_rows}) == 1
    for rid, items in ((py.request_id, [(i.position, i.item_id, i.score) for i in py.items]),
                       (sql_rows[0][0], [(r[1], r[2], r[3]) for r in sql_rows])):
        logged = sdb.conn.execute(query("serving.impressions_of_request"), {"request_id": rid}).fetchall()
        assert [(r[0], r[1], r[2]) for r in logged] == items
        assert all(r[3] == version and r[7] == "default" and r[4] is not None for r in logged)
    assert sdb.scalar("SELECT count(*) FROM pgrec.impressions") == 10
    # an event may cite the request that showed the item
    first = py.items[0].item_id
    assert sdb.scalar("SELECT pgrec.track_event(%s, %s, 'click', %s, NULL, NULL, NULL, %s)",
                      (user, first, AS_OF + timedelta(seconds=5), py.request_id)) == "stored"
    assert sdb.scalar("SELECT request_id FROM pgrec.events WHERE request_id IS NOT NULL") == py.request_id


def _served_rows(db: TestDB, request_id: Any) -> tuple[list[str], list[int], np.ndarray] | None:
    row = db.conn.execute("SELECT coalesce(fs.names, sf.names), sf.item_keys, sf.features FROM pgrec.served_features "
                          "sf LEFT JOIN pgrec.feature_sets fs USING (feature_set) WHERE sf.request_id = %s",
                          (request_id,)).fetchone()
    if row is None:
        return None
    names, keys, values = row   # values: one 1 x F slice per item; NULL (None) and NaN are both missing
    return list(names), list(keys), np.array(values, dtype=np.float64).reshape(len(keys), len(names))


def _close(a: np.ndarray, b: np.ndarray) -> None:
    """Equal but for float summation order: features are sums (trends, co-occurrence scores) that one plan adds
    in another order than another (the Python path's batched statement, pgrec.recommend's, a recomputation)."""
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-12)


def test_served_lists_keep_the_feature_rows_they_were_ranked_with(sdb: TestDB) -> None:
    """Both paths store the shown items' feature rows, in position order, under the ranker's feature list: the
    rows the candidate features give at the serving time, the same from either path; none when not logged or
    when config log_served_features is false."""
    from engine.ranking import features

    user = _users(sdb, 1)[0]
    version = registry.active_version(sdb.conn)
    model = registry.load(sdb.conn, version)
    with Recommender(sdb.settings) as rec:
        py = rec.recommend(user, k=6, as_of=AS_OF, log=True)
        quiet = rec.recommend(user, k=6, as_of=AS_OF, log=False)
    sql_rows = _sql_recommend(sdb.conn, user, k=6)
    shown = [sdb.scalar("SELECT item_key FROM pgrec.items WHERE item_id = %s", (i.item_id,)) for i in py.items]
    uk = sdb.scalar("SELECT user_key FROM pgrec.users WHERE user_id = %s", (user,))
    now = features.for_user_key(sdb.conn, uk, n=features.serving_count(sdb.conn), as_of=AS_OF, item_keys=shown)
    expected = now.matrix(model.features)[[now.item_keys.tolist().index(k) for k in shown]]
    logged = [_served_rows(sdb, py.request_id), _served_rows(sdb, sql_rows[0][0])]
    for got in logged:
        assert got is not None
        names, keys, x = got
        assert names == list(model.features) and keys == shown
        _close(x, expected)
    assert quiet.request_id is None and sdb.scalar("SELECT count(*) FROM pgrec.served_features") == 2
    # switched off: the lists are logged, their features are not
    sdb.conn.execute("INSERT INTO pgrec.config (key, value) VALUES ('log_served_features', 'false') "
                     "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
    with Recommender(sdb.settings) as rec:
        off = rec.recommend(user, k=6, as_of=AS_OF, log=True)
    assert off.request_id is not None and _served_rows(sdb, off.request_id) is None
    assert _served_rows(sdb, _sql_recommend(sdb.conn, user, k=6)[0][0]) is None
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="log_served_features must be true or false"):
        sdb.conn.execute("UPDATE pgrec.config SET value = '\"yes\"' WHERE key = 'log_served_features'")


def test_a_list_served_in_an_open_transaction_does_not_hold_up_others(sdb: TestDB) -> None:
    """A ranker registers its feature list when stored; serving only looks it up, so the first list of a new
    ranker, served in a transaction still open, makes no other request wait."""
    version = registry.active_version(sdb.conn)
    model = registry.load(sdb.conn, version)
    names = list(reversed(model.features))   # another feature list: a new ranker
    booster = lgb.train({"objective": "regression", "verbose": -1, "num_threads": 1, "min_data_in_leaf": 1},
                        lgb.Dataset(np.random.default_rng(1).random((40, len(names))),
                                    np.random.default_rng(2).random(40), feature_name=names), num_boost_round=3)
    registry.save(sdb.conn, kind="ranker", artifact=booster.model_to_string().encode(), params={}, features=names,
                  metrics={}, data_window={}, activate=True)
    assert sdb.scalar("SELECT count(*) FROM pgrec.feature_sets WHERE names = %s", (names,)) == 1
    first, second = _users(sdb, 2)
    with connect(sdb.settings) as a, connect(sdb.settings) as b:
        a.autocommit = False
        a.execute("SELECT count(*) FROM pgrec.recommend(%s)", (first,))   # its transaction stays open
        b.execute("SET statement_timeout = 5000")
        assert b.execute("SELECT count(*) FROM pgrec.recommend(%s)", (second,)).fetchone() == (10,)
        a.rollback()
    assert sdb.scalar("SELECT count(*) FROM pgrec.served_features WHERE feature_set IS NOT NULL") == 1


def test_training_from_served_lists_reads_the_rows_they_were_ranked_with(sdb: TestDB) -> None:
    """After a stage-1 model changed (here: the item vectors), recomputed features differ from those a list was
    ranked with; training from served lists reads the stored rows (and recomputes only on request)."""
    from engine.ranking import dataset, features

    user = _users(sdb, 1)[0]
    with Recommender(sdb.settings) as rec:
        served = rec.recommend(user, k=6, log=True)
    clicked = served.items[2].item_id
    assert sdb.scalar("SELECT pgrec.track_event(%s, %s, 'click', now(), NULL, NULL, NULL, %s)",
                      (user, clicked, served.request_id)) == "stored"
    stored = _served_rows(sdb, served.request_id)
    assert stored is not None
    names, keys, x = stored
    sdb.conn.execute("UPDATE pgrec.item_embeddings SET embedding = (SELECT array_agg(-v ORDER BY o) FROM "
                     "unnest(embedding::real[]) WITH ORDINALITY AS t(v, o))::public.vector "
                     "WHERE item_key = ANY(%s)", (keys,))  # a retrained stage 1: the shown items' vectors
    now = sdb.scalar("SELECT now()")
    window = {"window": timedelta(minutes=1), "n": features.serving_count(sdb.conn)}
    ts = dataset.from_impressions(sdb.conn, now - timedelta(hours=1), now + timedelta(hours=1), **window)
    again = dataset.from_impressions(sdb.conn, now - timedelta(hours=1), now + timedelta(hours=1), use_logged=False,
                                     **window)
    assert ts.group == [6] and ts.logged_groups == 1 and again.group == [6] and again.logged_groups == 0
    assert ts.names == again.names == names and ts.item_keys.tolist() == keys and ts.position is not None
    assert ts.position.tolist() == [1, 2, 3, 4, 5, 6] and ts.y.tolist().index(max(ts.y)) == 2  # the click
    assert np.array_equal(ts.x, x, equal_nan=True)                    # exactly the rows the list was ranked with
    order = [again.item_keys.tolist().index(k) for k in keys]
    dot = names.index("f_user_item_dot")
    assert not np.allclose(again.x[order][:, dot], x[:, dot], equal_nan=True)  # recomputed: the new vectors
    # the trainer reads them too, and says how many groups had them
    from engine.ranking.train import RankerConfig, train_ranker

    with Recommender(sdb.settings) as rec:
        for u in _users(sdb, 5)[1:]:
            shown = rec.recommend(u, k=6, log=True)
            sdb.conn.execute("SELECT pgrec.track_event(%s, %s, 'click', now(), NULL, NULL, NULL, %s)",
                             (u, shown.items[0].item_id, shown.request_id))
    sdb.conn.execute("INSERT INTO pgrec.config (key, value) VALUES ('report_attribution_hours', '0') "
                     "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
    config = RankerConfig(source="impressions", num_boost_round=3, min_data_in_leaf=1, num_threads=1)
    trained = train_ranker(sdb.conn, config, until=now + timedelta(hours=1))
    m = trained.metrics
    assert m["train_groups"] + m["valid_groups"] == 5 and m["train_logged_groups"] + m["valid_logged_groups"] == 5
    again = train_ranker(sdb.conn, replace(config, recompute_features=True), until=now + timedelta(hours=1))
    assert again.metrics["train_logged_groups"] + again.metrics["valid_logged_groups"] == 0


def test_explain_a_served_item_with_the_row_it_was_ranked_with(sdb: TestDB, monkeypatch: pytest.MonkeyPatch) -> None:
    """`pgrec explain USER ITEM --request RID`: the contributions of the stored row add up to the score the item
    was ranked with; after the stored row is gone, features are recomputed as of the serving time (and say so)."""
    from typer.testing import CliRunner

    import engine.cli
    from engine.config import get_settings

    user = _users(sdb, 1)[0]
    with Recommender(sdb.settings) as rec:
        served = rec.recommend(user, k=5, log=True)
    version = registry.active_version(sdb.conn)
    item = served.items[1]
    monkeypatch.setenv("PGREC_DATABASE_URL", sdb.url)
    monkeypatch.setenv("PGREC_EMBEDDING_DIM", str(TEST_DIM))
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        args = ["explain", user, item.item_id, "--request", str(served.request_id), "--json"]
        res = runner.invoke(engine.cli.app, args)
        assert res.exit_code == 0, res.output
        ex = json.loads(res.output)
        assert ex["stored_features"] is True and ex["position"] == 2 and ex["model_version"] == version
        assert ex["request_id"] == str(served.request_id)
        # no boost on this surface: the served score is the ranker's, which the contributions add up to
        assert ex["score"] == pytest.approx(item.score, abs=1e-9) and ex["served_score"] == pytest.approx(item.score)
        assert ex["sources"] and ex["as_of"] is not None
        sdb.conn.execute("DELETE FROM pgrec.served_features")
        # without the stored row, features are recomputed as training does: before a citing click stamped (client
        # clock) just before the list, so the click is not among them
        at = sdb.scalar("SELECT min(served_at) FROM pgrec.impressions WHERE request_id = %s", (served.request_id,))
        assert sdb.scalar("SELECT pgrec.track_event(%s, %s, 'click', %s, NULL, NULL, NULL, %s)",
                          (user, item.item_id, at - timedelta(seconds=2), served.request_id)) == "stored"
        res = runner.invoke(engine.cli.app, args)
        assert res.exit_code == 0, res.output
        recomputed = json.loads(res.output)
        assert recomputed["stored_features"] is False and recomputed["sources"] == ex["sources"]
        assert datetime.fromisoformat(recomputed["as_of"]) == at - timedelta(seconds=2)
        for bad, why in (([user, item.item_id, "--request", "nope"], "--request must be a request id"),
                         ([user, item.item_id, "--request", str(served.request_id), "--n", "5"], "do not apply"),
                         (["someone-else", item.item_id, "--request", str(served.request_id)], "was served to user"),
                         ([user, item.item_id, "--request", str(uuid.uuid4())], "did not show item")):
            res = runner.invoke(engine.cli.app, ["explain", *bad])
            assert res.exit_code == 1 and why in " ".join(res.output.split()), (bad, res.output)
    finally:
        get_settings.cache_clear()


def test_a_feature_matrix_of_the_wrong_shape_is_refused_and_changes_nothing(sdb: TestDB) -> None:
    from engine.pipeline import FeatureMatrix

    user = _users(sdb, 1)[0]
    keys = [r[0] for r in sdb.conn.execute("SELECT item_key FROM pgrec.items ORDER BY item_key LIMIT 3").fetchall()]
    args = {"user_id": user, "surface": "default", "k": 3, "item_keys": "{" + ",".join(map(str, keys)) + "}",
            "scores": "{3,2,1}", "sources": '["a","a","a"]', "context": "{}", "as_of": AS_OF, "policy_set": None,
            "model_version": None, "variant": None, "log": True, "experiment": None, "async_commit": False,
            "feature_names": ["f_a", "f_b"]}
    before = sdb.scalar("SELECT count(*) FROM pgrec.impressions")
    for bad in (np.zeros((2, 2)), np.zeros((3, 3))):
        with pytest.raises(psycopg.errors.InvalidParameterValue,
                           match=r"one row per item key \(3\) and one column per feature name \(2\)"):
            sdb.conn.execute(query("serving.finish_request"), args | {"features": FeatureMatrix(bad)})
    assert sdb.scalar("SELECT count(*) FROM pgrec.impressions") == before
    sdb.conn.execute(query("serving.finish_request"), args | {"features": FeatureMatrix(
        np.array([[1.0, np.nan], [2.0, 0.5], [3.0, -1.0]]))})
    rid = sdb.scalar("SELECT request_id FROM pgrec.impressions ORDER BY served_at DESC LIMIT 1")
    got = _served_rows(sdb, rid)
    assert got is not None
    names, served, x = got
    rows = {k: r for k, r in zip(keys, ([1.0, np.nan], [2.0, 0.5], [3.0, -1.0]), strict=True)}
    assert names == ["f_a", "f_b"] and sorted(served) == sorted(keys)
    assert np.array_equal(x, np.array([rows[k] for k in served]), equal_nan=True)
    # an unregistered feature list is stored with the row (finish_request never inserts into feature_sets)
    assert sdb.scalar("SELECT feature_set IS NULL AND names = '{f_a,f_b}' FROM pgrec.served_features "
                      "WHERE request_id = %s", (rid,))
    assert sdb.scalar("SELECT count(*) FROM pgrec.feature_sets WHERE names = '{f_a,f_b}'") == 0
    # lower bounds other than 1, an empty matrix: refused the same way
    for bad in ("[0:2][0:1]={{1,2},{3,4},{5,6}}", "{}"):
        with pytest.raises(psycopg.errors.InvalidParameterValue, match="one row per item key"):
            sdb.conn.execute(query("serving.finish_request").replace("%(features)s::float8[]", f"'{bad}'::float8[]"),
                             args | {"features": None})


def test_impressions_commit_without_waiting_for_the_flush_unless_asked(sdb: TestDB) -> None:
    # the finish statement turns synchronous_commit off for its own transaction only (async_commit), and leaves
    # it alone otherwise; the impressions are written either way
    user = _users(sdb, 1)[0]
    args = {"user_id": user, "surface": "default", "k": 3, "item_keys": "{}", "scores": "{}", "sources": "[]",
            "context": "{}", "as_of": AS_OF, "policy_set": None, "model_version": None, "variant": None,
            "log": True, "experiment": None, "feature_names": None, "features": None}
    keys = [r[0] for r in sdb.conn.execute("SELECT item_key FROM pgrec.items ORDER BY item_key LIMIT 3").fetchall()]
    args |= {"item_keys": "{" + ",".join(map(str, keys)) + "}", "scores": "{3,2,1}", "sources": '["a","a","a"]'}
    for async_commit, during in ((True, "off"), (False, "on")):
        with sdb.conn.transaction():
            sdb.conn.execute(query("serving.finish_request"), args | {"async_commit": async_commit})
            assert sdb.scalar("SELECT current_setting('synchronous_commit')") == during
        assert sdb.scalar("SELECT current_setting('synchronous_commit')") == "on"
    assert sdb.scalar("SELECT count(*) FROM pgrec.impressions WHERE user_key = "
                      "(SELECT user_key FROM pgrec.users WHERE user_id = %s)", (user,)) == 6


def test_the_python_path_commits_impressions_asynchronously_unless_asked(sdb: TestDB) -> None:
    # a deferred trigger on the impressions runs at commit and records the commit mode then in force
    sdb.conn.execute("""
        CREATE TABLE public.commit_modes (mode text);
        CREATE FUNCTION public.note_commit_mode() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN INSERT INTO public.commit_modes VALUES (current_setting('synchronous_commit')); RETURN NULL; END $$;
        CREATE CONSTRAINT TRIGGER note_commit_mode AFTER INSERT ON pgrec.impressions
            DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION public.note_commit_mode()""")
    users = _users(sdb, 2)

    def modes(settings: Settings, **kw: Any) -> list[str]:
        sdb.conn.execute("TRUNCATE public.commit_modes")
        many = kw.pop("many", False)
        with Recommender(settings) as rec:
            if many:
                rec.recommend_many(users, k=2, as_of=AS_OF, **kw)
            else:
                rec.recommend(users[0], k=2, as_of=AS_OF, **kw)
            with rec.pool.connection() as conn:  # the pooled connection is back to the session's mode
                assert conn.execute("SELECT current_setting('synchronous_commit')").fetchone() == ("on",)
        return sorted({r[0] for r in sdb.conn.execute("SELECT mode FROM public.commit_modes").fetchall()})

    assert modes(sdb.settings, log=True) == ["off"]                    # one user: its own statement's commit
    assert modes(sdb.settings, log=True, many=True) == ["off"]         # several: one transaction
    assert modes(sdb.settings, log=False) == []                        # nothing written
    durable = sdb.settings.model_copy(update={"impressions_sync_commit": True})
    assert modes(durable, log=True) == ["on"]
    assert modes(durable, log=True, many=True) == ["on"]


def test_an_event_changes_the_next_answer(sdb: TestDB) -> None:
    user = _users(sdb, 3)[2]
    with Recommender(sdb.settings) as rec:
        before = rec.recommend(user, k=10, as_of=AS_OF, log=False)
        history_before = _history(sdb, user, AS_OF)
        top = before.items[0].item_id
        sdb.conn.execute("SELECT pgrec.track_event(%s, %s, 'purchase', %s)", (user, top, AS_OF + timedelta(minutes=1)))
        later = AS_OF + timedelta(minutes=2)
        after = rec.recommend(user, k=10, as_of=later, log=False)
    assert top not in [i.item_id for i in after.items]                       # excluded as seen
    assert top not in [r[2] for r in _sql_recommend(sdb.conn, user, as_of=later, log=False)]
    assert _history(sdb, user, later) != history_before                       # the history source moved


def _history(db: TestDB, user: str, as_of: datetime) -> list[str]:
    return [r[0] for r in db.conn.execute(
        "SELECT item_id FROM pgrec.candidates(%s, 'default', 200, %s) WHERE history_rank IS NOT NULL "
        "ORDER BY history_rank", (user, as_of)).fetchall()]


def test_recommend_many_matches_single_requests(sdb: TestDB) -> None:
    users = [*_users(sdb, 5), "cold-one"]
    with Recommender(sdb.settings) as rec:
        many = rec.recommend_many(users, k=7, as_of=AS_OF, log=False)
        singles = [rec.recommend(u, k=7, as_of=AS_OF, log=False) for u in users]
    assert [m.user_id for m in many] == users
    for m, s in zip(many, singles, strict=True):
        assert [(i.item_id, i.score) for i in m.items] == [(i.item_id, i.score) for i in s.items]
    assert set(many[0].timings_ms) >= {"candidates_features", "rank", "rerank_log", "total"}


def test_recommend_many_failing_in_a_later_batch_leaves_nothing(sdb: TestDB, monkeypatch: pytest.MonkeyPatch) -> None:
    """A call over more users than one batch that fails after its first batch was logged leaves no impressions
    and no new users (the review found 16 users and 48 impressions left behind)."""
    from engine import pipeline

    users = [*_users(sdb, 3), *[f"new-{n}" for n in range(pipeline.BATCH + 2)]]
    before = sdb.scalar("SELECT count(*) FROM pgrec.users")
    calls = []
    serve = Recommender._serve

    def failing(self: Recommender, conn: psycopg.Connection[Any], *args: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:  # the second batch: the database refuses a statement
            conn.execute("SELECT 1 / 0")
        return serve(self, conn, *args)

    monkeypatch.setattr(Recommender, "_serve", failing)
    with Recommender(sdb.settings) as rec, pytest.raises(psycopg.errors.DivisionByZero):
        rec.recommend_many(users, k=3, as_of=AS_OF, log=True)
    assert len(calls) == 2
    assert sdb.scalar("SELECT count(*) FROM pgrec.impressions") == 0
    assert sdb.scalar("SELECT count(*) FROM pgrec.users") == before
    # a NUL in an id is refused before any work, naming the id
    with Recommender(sdb.settings) as rec, pytest.raises(InvalidRequest, match=r"#2 .*NUL"):
        rec.recommend_many([users[0], "bad\x00id"], k=3, as_of=AS_OF)
    assert sdb.scalar("SELECT count(*) FROM pgrec.impressions") == 0


def test_bad_requests_are_refused_and_change_nothing(sdb: TestDB) -> None:
    user = _users(sdb, 1)[0]
    with Recommender(sdb.settings) as rec:
        with pytest.raises(InvalidRequest, match="k must be"):
            rec.recommend(user, k=0)
        with pytest.raises(InvalidRequest, match="surface"):
            rec.recommend(user, surface="no-such-surface", as_of=AS_OF)
        with pytest.raises(InvalidRequest, match="timezone"):
            rec.recommend(user, as_of=datetime(2024, 1, 1))
        with pytest.raises(InvalidRequest, match="context"):
            rec.recommend(user, context=["not", "an", "object"])  # type: ignore[arg-type]
        with pytest.raises(NotFound, match="no-such-item"):
            rec.similar("no-such-item")
        assert rec.trending(k=5)
        # wrong types are refused by name, never a raw AttributeError or psycopg error
        for bad in ("2024-01-01", 1700000000, datetime(2024, 1, 1).date()):
            with pytest.raises(InvalidRequest, match="as_of must be a datetime"):
                rec.recommend(user, as_of=bad)  # type: ignore[arg-type]
            with pytest.raises(InvalidRequest, match="as_of must be a datetime"):
                rec.trending(as_of=bad)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest, match="timezone"):
            rec.trending(as_of=datetime(2024, 1, 1))
        with pytest.raises(InvalidRequest, match="item_id"):
            rec.similar(1)  # type: ignore[arg-type]
        with pytest.raises(InvalidRequest, match="segment must be a string"):
            rec.trending(segment=5)  # type: ignore[arg-type]
        # one string is not a list of users (it would serve one user per character)
        with pytest.raises(InvalidRequest, match="user_ids must be a list"):
            rec.recommend_many(user, k=3)
        assert len(rec.recommend_many(np.array([user]), k=3, log=False)) == 1  # any ordered collection of ids
        assert len(rec.recommend_many((u for u in [user, user]), k=3, log=False)) == 2  # a generator too
        with pytest.raises(InvalidRequest, match="ordered collection"):
            rec.recommend_many({user}, k=3)
        # a replay of the past is not a list anybody was shown: not logged unless asked for
        assert rec.recommend(user, k=3, as_of=AS_OF).request_id is None
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="k must be between"):
        _sql_recommend(sdb.conn, user, k=5000)
    assert sdb.scalar("SELECT count(*) FROM pgrec.impressions") == 0
    assert sdb.scalar("SELECT count(*) FROM pgrec.users WHERE user_id = 'no-such-surface'") == 0


def test_the_answer_names_policies_that_did_not_run(sdb: TestDB) -> None:
    """A content filter whose request parameter is missing does not run: the caller is told (Recommendation.skipped,
    the CLI and the HTTP answer), not left to find out from `pgrec policy explain`."""
    from engine import policies

    user = _users(sdb, 1)[0]
    pol = policies.add(sdb.conn, "age", "attribute_filter",
                       {"predicate": {"property": "age_rating", "op": "range", "max": {"param": "max_age"}}})
    with Recommender(sdb.settings) as rec:
        without = rec.recommend(user, k=5, as_of=AS_OF)
        given = rec.recommend(user, k=5, as_of=AS_OF, context={"params": {"max_age": 99}})
    assert list(without.skipped) == [pol.label] and "params.max_age" in without.skipped[pol.label]
    assert given.skipped == {}


def test_least_privilege_role_can_recommend_and_cannot_read(sdb: TestDB, app_role: str) -> None:
    role = app_role
    user = _users(sdb, 1)[0]
    with psycopg.connect(_with_user(sdb.url, role), autocommit=True) as app:
        rows = app.execute("SELECT request_id, position, item_id, score, reasons "
                           "FROM pgrec.recommend(%s, 5, as_of => %s)", (user, AS_OF)).fetchall()
        assert len(rows) == 5 and rows[0][0] is not None
        assert app.execute("SELECT count(*) FROM pgrec.similar_items(%s, 3)", (rows[0][2],)).fetchone()
        assert app.execute("SELECT pgrec.track_event(%s, %s, 'click', %s, NULL, NULL, NULL, %s)",
                           (user, rows[0][2], AS_OF, rows[0][0])).fetchone() == ("stored",)
        for forbidden in ("SELECT count(*) FROM pgrec.items", "SELECT count(*) FROM pgrec.impressions",
                          "SELECT count(*) FROM pgrec.events",
                          "SELECT pgrec.finish_request('u', 'default', 1, '{}', '{}', '{}')",
                          "SELECT pgrec.upsert_item('x')",
                          "SELECT count(*) FROM pgrec.candidate_features('u', 'default', 10, NULL)",
                          # internal functions that write (the review found them callable: migration 0017)
                          "SELECT pgrec.item_stats_invalidate('1970-01-01')",
                          "SELECT pgrec.refresh_embedding_neighbors('{}'::bigint[], 1)",
                          "SELECT count(*) FROM pgrec.unengaged_items(10, NULL, NULL, NULL)"):
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                app.execute(forbidden)
    # what the role did is logged like any other request
    assert sdb.scalar("SELECT count(*) FROM pgrec.impressions WHERE request_id = %s", (rows[0][0],)) == 5


def test_an_app_role_asking_for_past_days_stores_no_snapshots(sdb: TestDB, app_role: str) -> None:
    """pgrec.recommend at a past as_of builds that day's item-counter snapshot for the schema owner (training asks
    for the same days again and again), not for an app role, which gets the same list from the per-request
    aggregate (before, an app could make the database store one snapshot per past day it named)."""
    role = app_role
    user = _users(sdb, 1)[0]
    days = "SELECT count(*) FROM pgrec.item_stats_days"
    with psycopg.connect(_with_user(sdb.url, role), autocommit=True) as app:
        for back in (3, 4):
            before = sdb.scalar(days)
            as_app = [r[2:4] for r in _sql_recommend(app, user, k=5, as_of=AS_OF - timedelta(days=back), log=False)]
            assert sdb.scalar(days) == before
            as_owner = [r[2:4] for r in _sql_recommend(sdb.conn, user, k=5, as_of=AS_OF - timedelta(days=back),
                                                      log=False)]
            assert sdb.scalar(days) == before + 1
            assert [i for i, _ in as_app] == [i for i, _ in as_owner] and len(as_app) == 5
            assert [sc for _, sc in as_app] == pytest.approx([sc for _, sc in as_owner], abs=1e-9)


def test_a_function_another_role_puts_in_public_never_runs_for_pgrec(sdb: TestDB, app_role: str) -> None:
    """pgrec's connections leave public out of the search path: where an app role may create in public (databases
    from before PostgreSQL 15, or granted), its exact-type overload of a built-in (text[] beats pg_catalog's
    anyarray) would otherwise run with the service's rights inside the Python path's statements."""
    role = app_role
    sdb.conn.execute(psql.SQL("GRANT CREATE ON SCHEMA public TO {}").format(psql.Identifier(role)))
    user = _users(sdb, 1)[0]
    try:
        with psycopg.connect(_with_user(sdb.url, role), autocommit=True) as app:
            for sig in ("array_to_string(text[], text)", "cardinality(text[])", "unnest(text[])"):
                returns = "SETOF text" if sig.startswith("unnest") else "text" if "string" in sig else "int"
                app.execute(f"CREATE FUNCTION public.{sig} RETURNS {returns} LANGUAGE plpgsql "
                            "AS $$ BEGIN RAISE EXCEPTION 'ran as %', current_user; END $$")
        with Recommender(sdb.settings) as rec:
            got = rec.recommend(user, k=5, as_of=AS_OF, log=False)
        assert len(got.items) == 5
        with connect(sdb.settings) as conn:
            assert conn.execute("SELECT count(*) FROM pgrec.candidates(%s, 'default', 20, %s)",
                                (user, AS_OF)).fetchone()[0] >= 20
    finally:
        for sig in ("array_to_string(text[], text)", "cardinality(text[])", "unnest(text[])"):
            sdb.conn.execute(f"DROP FUNCTION IF EXISTS public.{sig}")
        sdb.conn.execute(psql.SQL("REVOKE CREATE ON SCHEMA public FROM {}").format(psql.Identifier(role)))


def test_an_app_role_cannot_fan_out_old_event_partitions(sdb: TestDB, app_role: str) -> None:
    """pgrec.track_event creates the month's partition on demand; for an app role only within the last 31 days
    (else one call per month back to 1970 left ~680 partitions that every request scanned). Old months that have a
    partition take its events; the schema owner (imports, backfills) creates any."""
    role = app_role
    user, item = _users(sdb, 1)[0], sdb.scalar("SELECT item_id FROM pgrec.items ORDER BY item_key LIMIT 1")
    parts = "SELECT count(*) FROM pg_catalog.pg_inherits WHERE inhparent = 'pgrec.events'::regclass"
    before = sdb.scalar(parts)
    track = "SELECT pgrec.track_event(%s, %s, 'view', %s)"
    with psycopg.connect(_with_user(sdb.url, role), autocommit=True) as app:
        with pytest.raises(psycopg.errors.InvalidParameterValue,
                           match=r"only the sessions of the owner of pgrec\.events create partitions") as refused:
            app.execute(track, (user, item, datetime(1990, 5, 1, tzinfo=UTC)))
        assert "pgrec import events" in (refused.value.diag.message_hint or "")
        assert sdb.scalar(parts) == before
        assert app.execute(track, (user, item, NOW - timedelta(days=2))).fetchone() == ("stored",)
        sdb.conn.execute(track, (user, item, datetime(1990, 5, 1, tzinfo=UTC)))   # the owner backfills
        assert sdb.scalar(parts) == before + 1
        assert app.execute(track, (user, item, datetime(1990, 5, 2, tzinfo=UTC))).fetchone() == ("stored",)


def test_only_the_named_functions_are_callable_by_other_roles(sdb: TestDB) -> None:
    """No function of schema pgrec is executable by PUBLIC (a NULL ACL means it is); pgrec_app may call exactly
    the functions it is granted by name (migrations 0006 and 0007)."""
    public = sdb.conn.execute(
        """SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p
            WHERE p.pronamespace = 'pgrec'::regnamespace
              AND (p.proacl IS NULL OR EXISTS (SELECT 1 FROM aclexplode(p.proacl) a WHERE a.grantee = 0))
            ORDER BY 1""").fetchall()
    assert public == []
    granted = {r[0] for r in sdb.conn.execute(
        """SELECT p.oid::regprocedure::text FROM pg_catalog.pg_proc p, aclexplode(p.proacl) a
            WHERE p.pronamespace = 'pgrec'::regnamespace AND a.grantee = 'pgrec_app'::regrole
              AND a.privilege_type = 'EXECUTE'""").fetchall()}
    assert {g.split("(")[0] for g in granted} == {
        "pgrec.recommend", "pgrec.similar_items", "pgrec.trending_items", "pgrec.track_event",
        "pgrec.assign_variant", "pgrec.variant_bucket"}


@pytest.fixture
def app_role(sdb: TestDB) -> Iterator[str]:
    """A login in the least-privilege role pgrec_app (roles belong to the server: dropped after the test)."""
    role = f"pgrec_app_test_{os.getpid()}_{uuid.uuid4().hex[:6]}"
    sdb.conn.execute(psql.SQL("CREATE ROLE {} LOGIN PASSWORD 'x' IN ROLE pgrec_app").format(psql.Identifier(role)))
    try:
        yield role
    finally:
        sdb.conn.execute(psql.SQL("DROP ROLE IF EXISTS {}").format(psql.Identifier(role)))


def _with_user(url: str, role: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).set(username=role, password="x").render_as_string(hide_password=False)


def test_cli_batch_file_and_single_user(sdb: TestDB, tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    import engine.cli
    from engine.config import get_settings

    monkeypatch.setenv("PGREC_DATABASE_URL", sdb.url)
    monkeypatch.setenv("PGREC_EMBEDDING_DIM", str(TEST_DIM))
    get_settings.cache_clear()
    try:
        users = [*_users(sdb, 3), "someone-new"]
        src = tmp_path / "users.txt"
        src.write_text("# campaign\n" + "\n".join(users) + "\n\n")
        out = tmp_path / "recs.jsonl"
        runner = CliRunner()
        res = runner.invoke(engine.cli.app, ["recommend", "--users-file", str(src), "--k", "5", "--as-of",
                                             AS_OF.isoformat(), "--output", str(out), "--no-log"])
        assert res.exit_code == 0, res.output
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert [x["user_id"] for x in lines] == users
        for x in lines:
            assert len(x["items"]) == 5 and [i["position"] for i in x["items"]] == [1, 2, 3, 4, 5]
            scores = [i["score"] for i in x["items"]]
            assert scores == sorted(scores, reverse=True)
            seen = {r[0] for r in sdb.conn.execute(
                "SELECT i.item_id FROM pgrec.events e JOIN pgrec.items i USING (item_key) "
                "JOIN pgrec.users u USING (user_key) WHERE u.user_id = %s", (x["user_id"],)).fetchall()}
            assert not seen & {i["item_id"] for i in x["items"]}
        res = runner.invoke(engine.cli.app, ["recommend", users[0], "--k", "3", "--as-of", AS_OF.isoformat(),
                                             "--json", "--via", "sql", "--no-log"])
        assert res.exit_code == 0, res.output
        assert [i["item_id"] for i in json.loads(res.output)["items"]] == [i["item_id"] for i in lines[0]["items"][:3]]
        res = runner.invoke(engine.cli.app, ["recommend", "--users-file", str(tmp_path / "missing.txt"),
                                             "--output", str(out)])
        assert res.exit_code == 1 and "missing.txt: no such file" in " ".join(res.output.split())
        assert sdb.scalar("SELECT count(*) FROM pgrec.impressions") == 0
        # a replay at --as-of logs nothing unless asked; a repeated id is served once; an unwritable --output
        # fails before anything is served, and leaves no .part file
        src.write_text("\n".join([users[0], users[1], users[0]]) + "\n")
        res = runner.invoke(engine.cli.app, ["recommend", "--users-file", str(src), "--k", "2", "--as-of",
                                             AS_OF.isoformat(), "--output", str(out)])
        assert res.exit_code == 0, res.output
        assert [json.loads(x)["user_id"] for x in out.read_text().splitlines()] == users[:2]
        assert sdb.scalar("SELECT count(*) FROM pgrec.impressions") == 0
        for bad in (tmp_path, tmp_path / "recs.jsonl" / "nested.jsonl"):
            res = runner.invoke(engine.cli.app, ["recommend", "--users-file", str(src), "--output", str(bad)])
            assert res.exit_code == 1 and "--output" in res.output and "Traceback" not in res.output, res.output
        assert sdb.scalar("SELECT count(*) FROM pgrec.impressions") == 0
        assert not list(tmp_path.glob("*.part"))
        # every id is checked before the first list is served: a bad line far down (here after 20 good ones,
        # beyond the first batch) fails the command naming its line, with nothing logged
        for bad_line, why in (('{"user_id": ""}', "user_id is empty"), ('{"user_id": null}', "must be a string"),
                              ('{"user_id": ["a"]}', "must be a string"), ("\xff", "not UTF-8")):
            raw = ("\n".join([users[0]] * 20) + "\n").encode() + bad_line.encode("latin-1") + b"\n"
            src.write_bytes(raw)
            res = runner.invoke(engine.cli.app, ["recommend", "--users-file", str(src), "--output", str(out)])
            assert res.exit_code == 1 and f"{src.name}:21" in " ".join(res.output.split()), res.output
            assert why in " ".join(res.output.split()) and "Traceback" not in res.output, res.output
        assert sdb.scalar("SELECT count(*) FROM pgrec.impressions") == 0
        # a byte order mark is not part of the first id; --output without --users-file is an error
        src.write_bytes(b"\xef\xbb\xbf" + users[0].encode() + b"\n")
        res = runner.invoke(engine.cli.app, ["recommend", "--users-file", str(src), "--k", "2", "--as-of",
                                             AS_OF.isoformat(), "--output", str(out)])
        assert res.exit_code == 0 and json.loads(out.read_text())["user_id"] == users[0], res.output
        res = runner.invoke(engine.cli.app, ["recommend", users[0], "--output", str(out)])
        assert res.exit_code == 1 and "--output goes with --users-file" in res.output
    finally:
        get_settings.cache_clear()


def test_exclude_seen_without_a_policy(sdb: TestDB) -> None:
    # the surface's exclude-seen policy off: lists may hold seen items; exclude_seen=True leaves them out
    sdb.conn.execute("UPDATE pgrec.policies SET enabled = false WHERE name = 'exclude-seen'")
    users = _users(sdb, 4)

    def seen(uid: str) -> set[str]:
        return {r[0] for r in sdb.conn.execute(
            "SELECT i.item_id FROM pgrec.events e JOIN pgrec.items i USING (item_key) JOIN pgrec.users u "
            "USING (user_key) WHERE u.user_id = %s AND e.occurred_at < %s", (uid, AS_OF)).fetchall()}

    with Recommender(sdb.settings) as rec:
        plain = rec.recommend_many(users, k=10, as_of=AS_OF, log=False)
        clean = rec.recommend_many(users, k=10, as_of=AS_OF, log=False, exclude_seen=True,
                                   context={"exclude": ["not-an-item"]})
        with pytest.raises(InvalidRequest, match=r"context\.exclude"):
            rec.recommend(users[0], as_of=AS_OF, exclude_seen=True, context={"exclude": "x"})
    assert any(seen(r.user_id) & {i.item_id for i in r.items} for r in plain), "no seen item to leave out"
    for r in clean:
        assert len(r.items) == 10
        assert not seen(r.user_id) & {i.item_id for i in r.items}
        assert r.dropped.get("request_exclude", 0) > 0


def test_exclude_seen_on_the_sql_path(sdb: TestDB) -> None:
    sdb.conn.execute("UPDATE pgrec.policies SET enabled = false WHERE name = 'exclude-seen'")
    user = _users(sdb, 1)[0]
    seen = {r[0] for r in sdb.conn.execute(
        "SELECT i.item_id FROM pgrec.events e JOIN pgrec.items i USING (item_key) JOIN pgrec.users u "
        "USING (user_key) WHERE u.user_id = %s AND e.occurred_at < %s", (user, AS_OF)).fetchall()}

    def sql(context: dict[str, Any]) -> list[str]:
        return [r[2] for r in sdb.conn.execute(query("serving.recommend_sql"), {
            "user_id": user, "k": 10, "surface": "default", "context": json.dumps(context), "as_of": AS_OF,
            "model_version": None, "policy_set": None, "variant": None, "log": False}).fetchall()]

    assert seen & set(sql({}))
    clean = sql({"exclude_seen": True})
    assert len(clean) == 10 and not seen & set(clean)
    with Recommender(sdb.settings) as rec:   # the Python path sends the same flag: the same list
        assert [i.item_id for i in rec.recommend(user, as_of=AS_OF, log=False, exclude_seen=True).items] == clean
    with pytest.raises(psycopg.errors.InvalidParameterValue, match="exclude_seen must be true or false"):
        sql({"exclude_seen": "yes"})
    sdb.conn.rollback()
