"""Ranker training, the registry (activate / rollback / the serving cache) and explanations."""

from __future__ import annotations

import itertools
from dataclasses import replace
from datetime import datetime, timedelta

import lightgbm as lgb
import numpy as np
import pytest
from conftest import TestDB

from engine import datasets
from engine.errors import InvalidRequest, NotFound
from engine.ranking import explain, features, registry
from engine.ranking.train import RankerConfig, train_ranker

NOW = datetime.fromisoformat("2026-06-01T00:00:00+00:00")


def _tiny_model(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(60, 2))
    y = (x[:, 0] > 0).astype(int)
    b = lgb.train({"objective": "lambdarank", "verbosity": -1, "min_data_in_leaf": 2, "seed": seed},
                  lgb.Dataset(x, label=y, group=[20, 20, 20], feature_name=["f_a", "f_b"]), num_boost_round=3)
    return b.model_to_string().encode()


def _save(db: TestDB, seed: int) -> int:
    return registry.save(db.conn, kind="ranker", artifact=_tiny_model(seed), params={"seed": seed},
                         features=["f_a", "f_b"], metrics={}, data_window={})


def test_activate_and_rollback(db: TestDB) -> None:
    v1, v2, v3 = _save(db, 1), _save(db, 2), _save(db, 3)
    assert registry.active_version(db.conn) is None
    with pytest.raises(InvalidRequest, match="no earlier"):
        registry.rollback(db.conn)
    registry.activate(db.conn, v1)
    registry.activate(db.conn, v2)
    registry.activate(db.conn, v3)
    assert registry.active_version(db.conn) == v3
    assert [m.version for m in registry.list_models(db.conn, "ranker") if m.active] == [v3]
    assert registry.rollback(db.conn).version == v2
    assert registry.rollback(db.conn).version == v1
    assert registry.active_version(db.conn) == v1
    with pytest.raises(InvalidRequest, match="no earlier"):
        registry.rollback(db.conn)
    assert registry.active_version(db.conn) == v1  # a failed rollback changes nothing
    with pytest.raises(NotFound, match="999"):
        registry.activate(db.conn, 999)
    assert registry.active_version(db.conn) == v1


def test_active_model_cache_notices_a_change(db: TestDB) -> None:
    v1, v2 = _save(db, 1), _save(db, 2)
    registry.activate(db.conn, v1)
    now = [0.0]
    cache = registry.ActiveModel(check_every_s=5.0, clock=lambda: now[0])
    other = db.connect()  # another process's connection does the switch
    try:
        m = cache.get(db.conn)
        assert m is not None and m.version == v1 and m.features == ["f_a", "f_b"]
        registry.activate(other, v2)
        now[0] = 1.0
        assert cache.get(db.conn) is m  # within the check interval: the cached booster, no query
        now[0] = 6.0
        m2 = cache.get(db.conn)
        assert m2 is not None and m2.version == v2
        registry.rollback(other)
        now[0] = 12.0
        m3 = cache.get(db.conn)
        assert m3 is not None and m3.version == v1
        assert m3.predict(np.array([[1.0, 0.0]])).shape == (1,)
    finally:
        other.close()


def test_planted_signal_is_ranked_first(db: TestDB) -> None:
    """Planted: every user who comes back after a cutoff buys the item that sold most in the week before it.
    Trained on three cutoffs, the model must put that item first at a fourth, held-out one."""
    data = datasets.generate(datasets.GeneratorConfig(users=120, items=100, events=2500, days=60, dim=16, seed=5),
                             now=NOW)
    data.load(db.conn)
    db.conn.execute("SELECT pgrec.upsert_item('hit', ARRAY['x'], NULL, %s)", (NOW - timedelta(days=90),))
    cutoffs = [NOW - timedelta(days=d) for d in (40, 30, 20, 10)]
    # before each cutoff the hit is bought by 30 users that week and by no one otherwise;
    # every user active in the week after the cutoff buys it
    for c in cutoffs:
        for u in range(30):
            db.conn.execute("SELECT pgrec.track_event(%s, 'hit', 'purchase', %s)",
                            (f"u{60 + (u + int(c.timestamp())) % 60}", c - timedelta(days=1 + u % 6, hours=u)))
        active = db.conn.execute(
            "SELECT DISTINCT u.user_id FROM pgrec.events e JOIN pgrec.users u USING (user_key) "
            "WHERE e.occurred_at >= %s AND e.occurred_at < %s AND e.polarity = 1", (c, c + timedelta(days=7))).fetchall()
        for (uid,) in active:
            db.conn.execute("SELECT pgrec.track_event(%s, 'hit', 'purchase', %s) ", (uid, c + timedelta(hours=12)))
    config = RankerConfig(horizon_days=7, cutoffs=2, n_candidates=40, max_users_per_cutoff=60, num_boost_round=60,
                          early_stopping_rounds=20, min_data_in_leaf=5, num_threads=1)
    trained = train_ranker(db.conn, config, cutoffs=cutoffs[:3])
    version = trained.save(db.conn, activate=True)
    assert registry.active_version(db.conn) == version
    model = registry.load(db.conn, version)
    hit = db.scalar("SELECT item_key FROM pgrec.items WHERE item_id = 'hit'")
    # the held-out cutoff: users with history who have not bought the hit yet
    users = [r[0] for r in db.conn.execute(
        "SELECT user_key FROM pgrec.events WHERE occurred_at < %s GROUP BY user_key HAVING bool_and(item_key <> %s) "
        "ORDER BY user_key LIMIT 15", (cutoffs[3], hit)).fetchall()]
    firsts = 0
    for u, cf in features.for_user_keys(db.conn, users, n=40, as_of=cutoffs[3]).items():
        assert hit in cf.item_keys.tolist(), f"user {u}: the hit is not a candidate"
        scores = model.predict(cf.matrix(model.features))
        firsts += int(cf.item_keys[int(np.argmax(scores))] == hit)
    assert firsts >= 0.9 * len(users), f"the hit was first for {firsts} of {len(users)} users"
    # and the explanation names the features that carried it
    uid = db.scalar("SELECT user_id FROM pgrec.users WHERE user_key = %s", (users[0],))
    ex = explain.explain(db.conn, model, uid, "hit", as_of=cutoffs[3], n=40)
    assert ex.contributions[0].contribution > 0
    assert abs(ex.score - (ex.base + sum(c.contribution for c in ex.contributions))) < 1e-9
    with pytest.raises(NotFound):
        explain.explain(db.conn, model, uid, "no-such-item")


def test_label_windows_hold_equal_shares_of_events(db: TestDB) -> None:
    from engine.ranking.train import plan_windows

    datasets.generate(datasets.GeneratorConfig(users=60, items=50, events=1000, days=60, dim=16, seed=2),
                      now=NOW).load(db.conn)
    until = NOW - timedelta(days=5)
    before = db.scalar("SELECT count(*) FROM pgrec.events WHERE occurred_at < %s", (until,))
    windows = plan_windows(db.conn, until, RankerConfig(cutoffs=3, window_share=0.1))
    assert len(windows) == 4 and windows[-1][1] == until
    for (_, e), (nxt, _) in itertools.pairwise(windows):
        assert e == nxt  # consecutive, no overlap, the last (validation) ends at until
    for c, e in windows:
        n = db.scalar("SELECT count(*) FROM pgrec.events WHERE occurred_at >= %s AND occurred_at < %s", (c, e))
        assert abs(n - 0.1 * before) <= 2
    with pytest.raises(InvalidRequest, match="window_share"):
        plan_windows(db.conn, until, RankerConfig(cutoffs=3, window_share=0.3))


def test_latest_windows_validate_then_every_window_trains(db: TestDB) -> None:
    """Early stopping on the last ``valid_windows`` windows; the refit model is trained on every window for the
    chosen number of rounds; without refit the early-stopped model is kept."""
    from engine.ranking import dataset
    from engine.ranking.train import plan_windows

    datasets.generate(datasets.GeneratorConfig(users=80, items=60, events=2500, days=60, dim=16, seed=3),
                      now=NOW).load(db.conn)
    until = NOW - timedelta(days=1)
    config = RankerConfig(cutoffs=3, window_share=0.08, valid_windows=2, n_candidates=30, num_boost_round=40,
                          early_stopping_rounds=10, min_data_in_leaf=5, num_threads=1, min_rounds=0)
    windows = plan_windows(db.conn, until, config)
    per_window = [len(dataset.replay(db.conn, c, end=e, n=30).group) for c, e in windows]
    assert all(per_window)
    trained = train_ranker(db.conn, config, until=until)
    m = trained.metrics
    assert m["train_groups"] == sum(per_window[:2]) and m["valid_groups"] == sum(per_window[2:])
    assert trained.data_window["validation_cutoff"] == windows[2][0].isoformat()
    assert m["refit_rounds"] == m["best_iteration"] == trained.booster.current_iteration()
    kept = train_ranker(db.conn, replace(config, refit=False), until=until)
    assert "refit_rounds" not in kept.metrics and kept.metrics["best_iteration"] == m["best_iteration"]
    x = np.random.default_rng(0).normal(size=(5, len(trained.names)))
    assert not np.allclose(trained.booster.predict(x), kept.booster.predict(x, num_iteration=m["best_iteration"]))
    # min_rounds: the refit trains at least that many rounds (at most num_boost_round) whatever early stopping chose
    floor = m["best_iteration"] + 5
    floored = train_ranker(db.conn, replace(config, min_rounds=floor), until=until)
    assert floored.metrics["best_iteration"] == m["best_iteration"]
    assert floored.metrics["refit_rounds"] == floored.booster.current_iteration() == min(floor, 40)


def test_activating_the_active_model_changes_nothing_and_only_rankers_activate(db: TestDB) -> None:
    v1, v2 = _save(db, 1), _save(db, 2)
    registry.activate(db.conn, v1)
    registry.activate(db.conn, v2)
    assert registry.activate(db.conn, v2).version == v2  # already active: no new entry in the activation log
    assert registry.rollback(db.conn).version == v1  # so the rollback returns to the one before, not to v2
    retrieval = registry.save(db.conn, kind="retrieval", artifact=b"weights", params={}, features=[], metrics={},
                              data_window={})
    with pytest.raises(InvalidRequest, match=fr"model version {retrieval} \(retrieval\) cannot be activated"):
        registry.activate(db.conn, retrieval)
    with pytest.raises(InvalidRequest, match="retrieval models cannot be activated or rolled back"):
        registry.rollback(db.conn, "retrieval")
    assert registry.active_version(db.conn) == v1
    from engine.ranking.compile import CompileError, install_compiled_model

    with pytest.raises(CompileError, match="is a retrieval model: only rankers compile to SQL"):
        install_compiled_model(db.conn, retrieval)
