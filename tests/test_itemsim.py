"""EASE neighbours (pgrec.model_neighbors, model 'ease') and the ranker features read from them: the stored lists
are EASE's top weights, a build as of a time ignores later events, the features are point in time and are what
the lists say, and a ranker using them scores the same in Python and compiled to SQL."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import lightgbm as lgb
import numpy as np
import pytest
from conftest import TEST_DIM, TestDB
from typer.testing import CliRunner

from engine import cooccurrence, datasets, itemsim
from engine.config import get_settings
from engine.pipeline import Recommender
from engine.ranking import features, registry
from engine.retrieval import ease
from engine.sql import query

NOW = datetime.now(UTC).replace(microsecond=0) - timedelta(minutes=5)
EASE_FEATURES = ["f_ease_sum", "f_ease_max", "f_ease_rank"]


def _load(db: TestDB, seed: int = 5) -> None:
    datasets.generate(datasets.GeneratorConfig(users=150, items=120, events=3000, days=60, dim=TEST_DIM, seed=seed),
                      now=NOW).load(db.conn)


def _stored(db: TestDB) -> list[tuple[int, int, int, float]]:
    return [(int(a), int(b), int(c), float(d)) for a, b, c, d in db.conn.execute(
        "SELECT item_key, rank, neighbor_key, score FROM pgrec.model_neighbors WHERE model = 'ease' "
        "ORDER BY item_key, rank").fetchall()]


def test_stored_neighbours_are_the_top_ease_weights(db: TestDB) -> None:
    _load(db)
    as_of = NOW - timedelta(days=10)
    cfg = itemsim.EaseConfig(lam=50.0, max_items=80, top_n=5)
    b = itemsim.build_ease(db.conn, as_of=as_of, config=cfg)
    assert b.items == 80 and b.rows > 0
    # the reference: dense EASE over the 80 items with the most users before as_of
    pairs = np.array(db.conn.execute("SELECT DISTINCT user_key, item_key FROM pgrec.events WHERE occurred_at < %s",
                                     (as_of,)).fetchall(), dtype=np.int64)
    users = {}
    for u, i in pairs:
        users.setdefault(int(i), set()).add(int(u))
    keys = np.array(sorted(users, key=lambda i: (-len(users[i]), i))[:80])
    sel = pairs[np.isin(pairs[:, 1], keys)]
    ukeys, uidx = np.unique(sel[:, 0], return_inverse=True)
    col = {int(k): j for j, k in enumerate(keys)}
    x = ease.interactions(uidx, np.array([col[int(i)] for i in sel[:, 1]]), len(ukeys), len(keys))
    B = ease.fit(x, 50.0)
    stored = _stored(db)
    assert {s[0] for s in stored} <= set(keys.tolist()) and {s[2] for s in stored} <= set(keys.tolist())
    for h in keys[:10]:
        row = B[col[int(h)]]
        best = np.argsort(-row, kind="stable")[:5]
        want = [(int(keys[j]), float(row[j])) for j in best if row[j] > 0]
        got = [(n, s) for k, _, n, s in stored if k == h]
        assert [g[0] for g in got] == [w[0] for w in want]
        np.testing.assert_allclose([g[1] for g in got], [w[1] for w in want], rtol=1e-6)


def test_a_build_as_of_a_time_ignores_later_events(db: TestDB) -> None:
    _load(db)
    as_of = NOW - timedelta(days=10)
    itemsim.build_ease(db.conn, as_of=as_of, config=itemsim.EaseConfig(top_n=10))
    before = _stored(db)
    item = db.scalar("SELECT item_id FROM pgrec.items ORDER BY item_key DESC LIMIT 1")
    for t in (as_of, as_of + timedelta(days=1)):
        for u in range(20):
            db.conn.execute("SELECT pgrec.track_event(%s, %s, 'purchase', %s)", (f"u{u}", item, t))
    itemsim.build_ease(db.conn, as_of=as_of, config=itemsim.EaseConfig(top_n=10))
    assert _stored(db) == before
    # the same events before as_of change the lists (the check is sensitive)
    for u in range(20):
        db.conn.execute("SELECT pgrec.track_event(%s, %s, 'purchase', %s)", (f"u{u}", item, as_of - timedelta(days=1)))
    itemsim.build_ease(db.conn, as_of=as_of, config=itemsim.EaseConfig(top_n=10))
    assert _stored(db) != before


def _busy_user(db: TestDB, as_of: datetime) -> int:
    return int(db.scalar("SELECT user_key FROM pgrec.events WHERE occurred_at < %s GROUP BY user_key "
                         "ORDER BY count(*) DESC, user_key LIMIT 1", (as_of,)))


def test_ease_features_are_what_the_lists_say(db: TestDB) -> None:
    _load(db)
    as_of = NOW - timedelta(days=10)
    cf = features.for_user_key(db.conn, _busy_user(db, as_of), n=60, as_of=as_of)
    # no EASE model yet: missing, not zero
    assert all(np.isnan(cf.column(n)).all() for n in EASE_FEATURES)
    itemsim.build_ease(db.conn, as_of=as_of, config=itemsim.EaseConfig(top_n=20))
    user = _busy_user(db, as_of)
    cf = features.for_user_key(db.conn, user, n=60, as_of=as_of)
    # the user's latest 100 distinct items before as_of (feature_ease_items), their stored weights
    hist = [int(r[0]) for r in db.conn.execute(
        "SELECT item_key FROM pgrec.events WHERE user_key = %s AND occurred_at < %s GROUP BY item_key "
        "ORDER BY max(occurred_at) DESC, item_key LIMIT 100", (user, as_of)).fetchall()]
    weights: dict[int, list[float]] = {}
    for h, _, n, s in _stored(db):
        if h in hist:
            weights.setdefault(n, []).append(s)
    want_sum = np.array([sum(weights.get(int(k), [])) for k in cf.item_keys])
    np.testing.assert_allclose(cf.column("f_ease_sum"), want_sum, rtol=1e-6, atol=1e-12)
    has = np.array([int(k) in weights for k in cf.item_keys])
    assert has.any() and (~has).any()
    np.testing.assert_allclose(cf.column("f_ease_max")[has], [max(weights[int(k)]) for k in cf.item_keys[has]],
                               rtol=1e-6)
    assert np.isnan(cf.column("f_ease_max")[~has]).all() and np.isnan(cf.column("f_ease_rank")[~has]).all()
    # rank 1 = the candidate with the largest sum (ties share a rank)
    s, r = cf.column("f_ease_sum")[has], cf.column("f_ease_rank")[has]
    assert r.tolist() == [1.0 + float(np.sum(s > v + 1e-12)) for v in s]
    # requested items (impressions, explain) get the same values, and a non-candidate where it would rank
    keys = [int(k) for k in cf.item_keys[:8]]
    got = features.for_user_key(db.conn, user, n=60, as_of=as_of, item_keys=keys)
    idx = [int(np.where(cf.item_keys == k)[0][0]) for k in got.item_keys]
    np.testing.assert_array_equal(got.matrix(EASE_FEATURES), cf.matrix(EASE_FEATURES)[idx])


def test_a_planted_future_event_never_changes_the_ease_features(db: TestDB) -> None:
    _load(db)
    as_of = NOW - timedelta(days=10)
    itemsim.build_ease(db.conn, as_of=as_of)
    user = _busy_user(db, as_of)
    user_id = db.scalar("SELECT user_id FROM pgrec.users WHERE user_key = %s", (user,))
    before = features.for_user_key(db.conn, user, n=60, as_of=as_of)
    # an item the user never had, with EASE neighbours among the candidates
    target = db.scalar(
        "SELECT i.item_id FROM pgrec.items i JOIN pgrec.model_neighbors nb ON nb.model = 'ease' "
        "AND nb.item_key = i.item_key AND nb.neighbor_key = ANY (%s) "
        "WHERE NOT EXISTS (SELECT 1 FROM pgrec.events e WHERE e.user_key = %s AND e.item_key = i.item_key) "
        "ORDER BY i.item_key LIMIT 1", ([int(k) for k in before.item_keys], user))
    for t in (as_of, as_of + timedelta(seconds=1), as_of + timedelta(days=2)):
        db.conn.execute("SELECT pgrec.track_event(%s, %s, 'purchase', %s)", (user_id, target, t))
    after = features.for_user_key(db.conn, user, n=60, as_of=as_of)
    assert after.item_keys.tolist() == before.item_keys.tolist()
    np.testing.assert_array_equal(after.matrix(EASE_FEATURES), before.matrix(EASE_FEATURES))
    # the same event before as_of moves them
    db.conn.execute("SELECT pgrec.track_event(%s, %s, 'purchase', %s)", (user_id, target, as_of - timedelta(hours=1)))
    moved = features.for_user_key(db.conn, user, n=60, as_of=as_of, item_keys=[int(k) for k in before.item_keys])
    order = [int(np.where(moved.item_keys == k)[0][0]) for k in before.item_keys]
    assert not np.array_equal(np.nan_to_num(moved.column("f_ease_sum")[order], nan=-1),
                              np.nan_to_num(before.column("f_ease_sum"), nan=-1))


def test_a_ranker_on_ease_features_scores_the_same_in_python_and_sql(db: TestDB) -> None:
    _load(db)
    db.conn.execute("INSERT INTO pgrec.policies (name, kind, params, priority, description, created_by, "
                    "updated_by) VALUES ('exclude-seen', 'exclude_interacted', '{}', 10, 'seen', 't', 't')")
    cooccurrence.build(db.conn, as_of=NOW)
    itemsim.build_ease(db.conn, as_of=NOW)
    users = [r[0] for r in db.conn.execute(query("serving.sample_users"), {"n": 6}).fetchall()]
    cutoff = NOW - timedelta(days=20)
    names = [*EASE_FEATURES, "f_pop_30d"]  # a model that can only split on these
    xs, ys = [], []
    for u in users:
        cf = features.for_user(db.conn, u, n=100, as_of=cutoff)
        later = {int(r[0]) for r in db.conn.execute(
            "SELECT e.item_key FROM pgrec.events e JOIN pgrec.users us USING (user_key) "
            "WHERE us.user_id = %s AND e.occurred_at >= %s", (u, cutoff)).fetchall()}
        xs.append(cf.matrix(names))
        ys.append(np.array([1.0 if int(k) in later else 0.0 for k in cf.item_keys]))
    booster = lgb.train({"objective": "regression", "num_leaves": 7, "min_data_in_leaf": 5, "verbose": -1,
                         "num_threads": 1, "seed": 1}, lgb.Dataset(np.vstack(xs), np.concatenate(ys),
                                                                   feature_name=names), num_boost_round=15)
    assert booster.feature_importance()[:3].sum() > 0, "the model never splits on an EASE feature"
    registry.save(db.conn, kind="ranker", artifact=booster.model_to_string().encode(), params={}, features=names,
                  metrics={}, data_window={}, activate=True)
    with Recommender(db.settings) as rec:
        for u in [*users[:4], "nobody-new"]:
            py = rec.recommend(u, k=10, as_of=NOW)
            rows = db.conn.execute(query("serving.recommend_sql"), {
                "user_id": u, "k": 10, "surface": "default", "context": json.dumps({}), "as_of": NOW,
                "model_version": None, "policy_set": None, "variant": None, "log": False}).fetchall()
            assert [i.item_id for i in py.items] == [r[2] for r in rows]
            np.testing.assert_allclose([i.score for i in py.items], [r[3] for r in rows], rtol=0, atol=1e-9)


def test_train_ease_command(db: TestDB, monkeypatch: pytest.MonkeyPatch) -> None:
    from engine.cli import app

    _load(db)
    monkeypatch.setenv("PGREC_DATABASE_URL", db.url)
    monkeypatch.setenv("PGREC_EMBEDDING_DIM", str(TEST_DIM))
    get_settings.cache_clear()
    try:
        out = CliRunner().invoke(app, ["train", "ease", "--max-items", "50", "--top-n", "3"])
        assert out.exit_code == 0, out.output
        assert db.scalar("SELECT count(DISTINCT item_key) FROM pgrec.model_neighbors WHERE model = 'ease'") <= 50
        assert db.scalar("SELECT max(rank) FROM pgrec.model_neighbors WHERE model = 'ease'") == 3
        out = CliRunner().invoke(app, ["train", "ease", "--max-items", "1"])
        assert out.exit_code == 1 and "max_items" in out.output
    finally:
        get_settings.cache_clear()
