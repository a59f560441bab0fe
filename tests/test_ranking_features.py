"""Stage 2 features: point in time, and one definition for training and serving."""

from __future__ import annotations

import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import numpy as np
import pytest
from conftest import TestDB

from engine import datasets
from engine.errors import InvalidRequest
from engine.ranking import dataset, features

NOW = datetime.fromisoformat("2026-06-01T00:00:00+00:00")


def _load(db: TestDB, seed: int = 3) -> datasets.Synthetic:
    data = datasets.generate(datasets.GeneratorConfig(users=150, items=120, events=3000, days=60, dim=16,
                                                      seed=seed), now=NOW)
    data.load(db.conn)
    return data


def _same(a: features.CandidateFeatures, b: features.CandidateFeatures) -> None:
    assert a.names == b.names
    order_a, order_b = np.argsort(a.item_keys), np.argsort(b.item_keys)
    assert a.item_keys[order_a].tolist() == b.item_keys[order_b].tolist()
    # exact but for float summation order (the trending sources keep running sums rebased on new events)
    np.testing.assert_allclose(a.values[order_a], b.values[order_b], rtol=1e-12, atol=0)


def test_feature_list_read_from_sql(db: TestDB) -> None:
    _load(db)
    cf = features.for_user(db.conn, "u1", n=30, as_of=NOW - timedelta(days=10))
    assert len(cf) > 0
    assert all(n.startswith("f_") for n in cf.names)
    for name in ("f_ann_score", "f_n_sources", "f_pop_7d", "f_item_age_days", "f_pos_rate", "f_user_events",
                 "f_cat_affinity", "f_user_item_dot", "f_cooc_sum", "f_trend_segment", "f_cat_days_since"):
        assert name in cf.names
    assert cf.values.shape == (len(cf), len(cf.names))
    # the number of sources is the length of the sources column
    assert cf.column("f_n_sources").tolist() == [float(len(s)) for s in cf.sources]
    # the feature rows are exactly stage 1's candidates, with their source columns
    from engine import candidates

    for user in ("u1", "u2", "u7"):
        uk = candidates.user_key(db.conn, user)
        at = NOW - timedelta(days=10)
        own = candidates.candidates_by_key(db.conn, uk, n=30, as_of=at)
        via = features.for_user_key(db.conn, uk, n=30, as_of=at)
        assert sorted(r.item_key for r in own) == sorted(via.item_keys.tolist()) and len(own) >= 30
        ann = dict(zip(via.item_keys.tolist(), via.column("f_ann_score").tolist(), strict=True))
        assert all(ann[r.item_key] == r.ann_score if r.ann_score is not None else np.isnan(ann[r.item_key])
                   for r in own)
        assert any(r.ann_score is not None for r in own)


def test_a_planted_future_event_never_changes_earlier_features(db: TestDB) -> None:
    _load(db)
    as_of = NOW - timedelta(days=20)
    user = db.scalar("SELECT user_key FROM pgrec.events WHERE occurred_at < %s GROUP BY user_key "
                     "ORDER BY count(*) DESC LIMIT 1", (as_of,))
    user_id = db.scalar("SELECT user_id FROM pgrec.users WHERE user_key = %s", (user,))
    before = features.for_user_key(db.conn, user, n=60, as_of=as_of)
    keys = [int(k) for k in before.item_keys[:20]]
    fixed = features.for_user_key(db.conn, user, n=60, as_of=as_of, item_keys=keys)
    target = db.scalar("SELECT item_id FROM pgrec.items WHERE item_key = %s", (keys[0],))
    # the future: the same user, the same item, and many other users on it, at and after as_of
    for t in (as_of, as_of + timedelta(seconds=1), as_of + timedelta(days=2)):
        db.conn.execute("SELECT pgrec.track_event(%s, %s, 'purchase', %s)", (user_id, target, t))
        for u in range(5):
            db.conn.execute("SELECT pgrec.track_event(%s, %s, 'like', %s)", (f"u{u}", target, t))
    _same(before, features.for_user_key(db.conn, user, n=60, as_of=as_of))
    _same(fixed, features.for_user_key(db.conn, user, n=60, as_of=as_of, item_keys=keys))
    # ... while the same events a day before as_of do change them (the check is sensitive)
    db.conn.execute("SELECT pgrec.track_event(%s, %s, 'purchase', %s)", (user_id, target, as_of - timedelta(days=2)))
    after = features.for_user_key(db.conn, user, n=60, as_of=as_of, item_keys=keys)
    assert not np.array_equal(np.nan_to_num(fixed.values, nan=-1), np.nan_to_num(after.values, nan=-1))


def test_training_rows_equal_serving_features(db: TestDB) -> None:
    _load(db)
    cutoff = NOW - timedelta(days=15)
    ts = dataset.replay(db.conn, cutoff, timedelta(days=7), n=40, max_users=5)
    assert ts.group, "replay made no groups"
    start = 0
    for (user_key, as_of), size in zip(ts.queries, ts.group, strict=True):
        user_id = db.scalar("SELECT user_id FROM pgrec.users WHERE user_key = %s", (user_key,))
        served = features.for_user(db.conn, user_id, n=40, as_of=as_of)   # the serving path: by user id
        rows = {int(k): i for i, k in enumerate(served.item_keys)}
        keys = ts.item_keys[start:start + size]
        assert served.names == ts.names
        # equal up to float summation order inside the trending sources (1e-16 relative)
        np.testing.assert_allclose(ts.x[start:start + size], served.values[[rows[int(k)] for k in keys]],
                                   rtol=1e-12, atol=0)
        start += size


def test_bad_n_is_an_error(db: TestDB) -> None:
    with pytest.raises(InvalidRequest, match="n must be"):
        features.for_user(db.conn, "nobody", n=0)


def test_cold_user_gets_features(db: TestDB) -> None:
    _load(db)
    cf = features.for_user(db.conn, "never-seen", n=20, as_of=NOW)
    assert len(cf) > 0
    assert np.isnan(cf.column("f_user_item_dot")).all()


def test_daily_counts_follow_inserts_and_deletes(db: TestDB) -> None:
    _load(db)
    total = db.scalar("SELECT sum(n_events) FROM pgrec.item_daily_counts")
    assert total == db.scalar("SELECT count(*) FROM pgrec.events")
    db.conn.execute("DELETE FROM pgrec.events WHERE event_key IN (SELECT event_key FROM pgrec.events LIMIT 10)")
    assert db.scalar("SELECT sum(n_events) FROM pgrec.item_daily_counts") == total - 10


def test_impressions_make_the_same_table_as_replay(db: TestDB) -> None:
    import uuid

    _load(db)
    served_at = NOW - timedelta(days=10)
    users = [r[0] for r in db.conn.execute(
        "SELECT user_key FROM pgrec.events WHERE occurred_at < %s GROUP BY user_key ORDER BY count(*) DESC LIMIT 4",
        (served_at,)).fetchall()]
    clicked: dict[uuid.UUID, int] = {}
    for u in users:
        rid = uuid.uuid4()
        shown = features.for_user_key(db.conn, u, n=12, as_of=served_at)
        for pos, k in enumerate(shown.item_keys[:8].tolist(), start=1):
            db.conn.execute("INSERT INTO pgrec.impressions (request_id, user_key, surface, position, item_key, "
                            "served_at) VALUES (%s, %s, 'default', %s, %s, %s)", (rid, u, pos, k, served_at))
        item = int(shown.item_keys[3])
        clicked[rid] = item
        uid = db.scalar("SELECT user_id FROM pgrec.users WHERE user_key = %s", (u,))
        iid = db.scalar("SELECT item_id FROM pgrec.items WHERE item_key = %s", (item,))
        db.conn.execute("SELECT pgrec.track_event(%s, %s, 'click', %s, request_id => %s)",
                        (uid, iid, served_at + timedelta(minutes=5), rid))
    # a short attribution window: only the clicks tied by request_id count here
    ts = dataset.from_impressions(db.conn, served_at - timedelta(hours=1), served_at + timedelta(hours=1), n=12,
                                  window=timedelta(minutes=1))
    replayed = dataset.replay(db.conn, served_at, timedelta(days=7), n=12, max_users=3)
    assert ts.names == replayed.names  # one feature table shape for both modes
    assert ts.group == [8] * len(users)
    assert ts.position is not None and sorted(ts.position[:8].tolist()) == list(range(1, 9))
    assert int(ts.y.sum()) == dataset.grade(2.0, False) * len(users)  # exactly the clicked item per request
    for g, (_, _) in enumerate(ts.queries):
        rows = slice(8 * g, 8 * g + 8)
        assert int(ts.item_keys[rows][ts.y[rows] > 0][0]) in clicked.values()
    assert "position" not in " ".join(ts.names)  # the position is never a feature
    # ... it goes to LightGBM's position-bias correction instead
    from engine.ranking.train import RankerConfig, fit

    booster, _ = fit(ts, None, RankerConfig(min_data_in_leaf=1, num_boost_round=5, num_threads=1))
    assert booster.num_trees() == 5


def _serve_lists(db: TestDB, served: datetime, count: int, step: timedelta) -> list[tuple[uuid.UUID, int, int]]:
    """``count`` lists of 5 items shown to the busiest user, ``step`` apart; returns (request id, user key,
    third item's key) per list."""
    uk = db.scalar("SELECT user_key FROM pgrec.events WHERE occurred_at < %s GROUP BY user_key "
                   "ORDER BY count(*) DESC LIMIT 1", (served,))
    shown = features.for_user_key(db.conn, uk, n=12, as_of=served)
    out = []
    for n in range(count):
        rid = uuid.uuid4()
        for pos, k in enumerate(shown.item_keys[:5].tolist(), start=1):
            db.conn.execute("INSERT INTO pgrec.impressions (request_id, user_key, surface, position, item_key, "
                            "served_at) VALUES (%s, %s, 'default', %s, %s, %s)", (rid, uk, pos, k, served + n * step))
        out.append((rid, int(uk), int(shown.item_keys[2])))
    return out


def _track(db: TestDB, user_key: int, item_key: int, kind: str, at: datetime, request_id: uuid.UUID | None = None) -> None:
    uid = db.scalar("SELECT user_id FROM pgrec.users WHERE user_key = %s", (user_key,))
    iid = db.scalar("SELECT item_id FROM pgrec.items WHERE item_key = %s", (item_key,))
    db.conn.execute("SELECT pgrec.track_event(%s, %s, %s, %s, request_id => %s)", (uid, iid, kind, at, request_id))


def test_impression_labels_are_credited_once_and_end_at_label_until(db: TestDB) -> None:
    """An event without a request id counts for the latest list that showed its item before it (as the online
    report credits it), not for every list; and no label comes from an event at or after label_until."""
    _load(db)
    served = NOW - timedelta(days=10)
    (_, uk, item), _ = _serve_lists(db, served, 2, timedelta(hours=1))   # two lists, an hour apart, both showing it
    _track(db, uk, item, "purchase", served + timedelta(hours=2))
    ts = dataset.from_impressions(db.conn, served - timedelta(hours=1), served + timedelta(hours=3), n=12,
                                  window=timedelta(hours=6))
    assert ts.group == [5]   # only the later list has a positive label
    assert ts.y[2] > 0 and ts.y.tolist().count(0) == 4   # the purchased item, third on the list
    assert ts.queries == [(int(uk), served + timedelta(hours=1))]
    none = dataset.from_impressions(db.conn, served - timedelta(hours=1), served + timedelta(hours=3), n=12,
                                    window=timedelta(hours=6), label_until=served + timedelta(hours=2))
    assert none.group == []   # the purchase is at label_until: not a label


def test_a_click_stamped_before_its_list_is_a_label_never_a_feature(db: TestDB) -> None:
    """Client clocks: a click citing its list may be stamped up to the clock slack before the list was served.
    It is a label, and the list's features are computed as of the click, so it is not among them."""
    _load(db)
    served = NOW - timedelta(days=10)
    ((rid, uk, item),) = _serve_lists(db, served, 1, timedelta(hours=1))
    clicked_at = served - timedelta(minutes=2)
    _track(db, uk, item, "click", clicked_at, rid)
    ts = dataset.from_impressions(db.conn, served - timedelta(hours=1), served + timedelta(hours=1), n=12,
                                  window=timedelta(minutes=1))
    assert ts.group == [5] and ts.y[2] > 0                     # the click labels the third item
    assert ts.queries == [(uk, clicked_at)]                    # features as of the click ...
    before = features.for_user_key(db.conn, uk, n=12, as_of=clicked_at, item_keys=ts.item_keys.tolist())
    after = features.for_user_key(db.conn, uk, n=12, as_of=served, item_keys=ts.item_keys.tolist())
    assert np.array_equal(ts.x, before.values, equal_nan=True)   # ... which do not hold it
    assert not np.array_equal(ts.x, after.values, equal_nan=True)
    # a citing event stamped long before the list (a client clock days off) is no label and moves nothing
    _track(db, uk, int(ts.item_keys[0]), "click", served - timedelta(days=20), rid)
    again = dataset.from_impressions(db.conn, served - timedelta(hours=1), served + timedelta(hours=1), n=12,
                                     window=timedelta(minutes=1))
    assert again.queries == [(uk, clicked_at)] and again.y.tolist() == ts.y.tolist()


def test_training_from_served_lists_starts_at_the_first_list(db: TestDB) -> None:
    """Without --since the period starts at the first served list, not at the first event (which put every list
    in the validation fifth); no lists at all is a clear error."""
    from engine.ranking.train import RankerConfig, train_ranker

    _load(db)
    config = RankerConfig(source="impressions", num_boost_round=3, min_data_in_leaf=1, num_threads=1, n_candidates=12)
    with pytest.raises(InvalidRequest, match="no served lists"):
        train_ranker(db.conn, config)
    served = NOW - timedelta(days=10)
    lists = _serve_lists(db, served, 10, timedelta(hours=1))
    with pytest.raises(InvalidRequest, match="no served list in the training part"):  # nobody clicked yet
        train_ranker(db.conn, config, until=served + timedelta(hours=10))
    for n, (rid, uk, item) in enumerate(lists):
        _track(db, uk, item, "click", served + n * timedelta(hours=1) + timedelta(minutes=5), rid)
    db.conn.execute("INSERT INTO pgrec.config (key, value) VALUES ('report_attribution_hours', '1.5') "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
    trained = train_ranker(db.conn, config, until=served + timedelta(hours=10))
    assert trained.data_window["since"] == served.isoformat()
    assert trained.data_window["validation_from"] == (served + timedelta(hours=8)).isoformat()
    assert trained.data_window["attribution_hours"] == 1.5   # the online report's window, by default
    assert trained.metrics["train_groups"] == 8 and trained.metrics["valid_groups"] == 2


def test_ranker_trains_on_the_serving_count_of_candidates(db: TestDB) -> None:
    """Without an explicit n the ranker replays the serving count (config serving_candidates), so the source
    ranks and fills it learns from are those of the lists it ranks."""
    from engine.ranking.train import RankerConfig, train_ranker

    _load(db)
    db.conn.execute("INSERT INTO pgrec.config (key, value) VALUES ('serving_candidates', '25') "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
    trained = train_ranker(db.conn, RankerConfig(horizon_days=7, cutoffs=1, max_users_per_cutoff=10,
                                                 num_boost_round=5, min_data_in_leaf=5, num_threads=1))
    assert trained.params["config"]["n_candidates"] == 25


def test_item_counter_snapshot_equals_the_per_request_aggregate(db: TestDB) -> None:
    # data up to now: today's features first aggregate the daily counters per request (no snapshot yet),
    # then read the snapshot pgrec.refresh_item_stats builds; both must give the same numbers
    now = datetime.now(UTC)
    datasets.generate(datasets.GeneratorConfig(users=150, items=120, events=3000, days=60, dim=16, seed=4),
                      now=now - timedelta(hours=1)).load(db.conn)
    today = now.astimezone(UTC).date()
    user = db.scalar("SELECT user_key FROM pgrec.events GROUP BY user_key ORDER BY count(*) DESC LIMIT 1")
    assert db.scalar("SELECT count(*) FROM pgrec.item_stats_days") == 0
    # a user without a segment (no segment property; a cold user): the per-request aggregate once joined every
    # segment's trend to each of their candidates, one copy per segment
    segless = db.scalar("SELECT user_key FROM pgrec.events WHERE user_key <> %s GROUP BY user_key "
                        "ORDER BY count(*) DESC LIMIT 1", (user,))
    db.conn.execute("UPDATE pgrec.users SET properties = properties - 'country' WHERE user_key = %s", (segless,))
    assert db.scalar("SELECT count(DISTINCT segment) FROM pgrec.item_daily_counts") > 1
    at = datetime.now(UTC)   # one as_of for both reads (ages and recency move with the clock)
    fly = features.for_user_key(db.conn, user, n=60, as_of=at)
    fly_others = [features.for_user_key(db.conn, u, n=60, as_of=at) for u in (segless, None)]
    for cf in fly_others:
        assert len(cf.item_keys) == len(set(cf.item_keys.tolist())) >= 60
        assert np.nan_to_num(cf.column("f_trend_segment")).tolist() == [0.0] * len(cf.item_keys)
    assert db.scalar("SELECT count(*) FROM pgrec.item_stats_days") == 0   # serving never builds today's itself
    items = db.scalar("SELECT pgrec.refresh_item_stats()")
    assert items == db.scalar("SELECT count(DISTINCT item_key) FROM pgrec.item_daily_counts "
                              "WHERE day < %s AND day >= %s", (today, today - timedelta(days=365)))
    assert db.scalar("SELECT pgrec.refresh_item_stats(NULL, true)") is None   # already there
    snap = features.for_user_key(db.conn, user, n=60, as_of=at)
    _same(fly, snap)
    for u, cf in zip((segless, None), fly_others, strict=True):
        _same(cf, features.for_user_key(db.conn, u, n=60, as_of=at))
    assert np.count_nonzero(snap.column("f_pop_30d")) > 0
    # a past day's snapshot is built on first use; an event of an earlier day drops the later snapshots
    past = now - timedelta(days=10)
    features.for_user_key(db.conn, user, n=60, as_of=past)
    assert db.scalar("SELECT count(*) FROM pgrec.item_stats_days") == 2
    item = db.scalar("SELECT item_id FROM pgrec.items ORDER BY item_key LIMIT 1")
    uid = db.scalar("SELECT user_id FROM pgrec.users WHERE user_key = %s", (user,))
    db.conn.execute("SELECT pgrec.track_event(%s, %s, 'like', %s)", (uid, item, past - timedelta(days=1)))
    assert db.scalar("SELECT count(*) FROM pgrec.item_stats_days") == 0
    with pytest.raises(Exception, match="in the future"):
        db.conn.execute("SELECT pgrec.refresh_item_stats(%s)", (today + timedelta(days=1),))


def test_read_only_transaction_reads_past_features_without_building(db: TestDB) -> None:
    # a read replica (or a read-only transaction) cannot store a snapshot: the per-request aggregate serves
    _load(db)
    user = db.scalar("SELECT user_key FROM pgrec.events GROUP BY user_key ORDER BY count(*) DESC LIMIT 1")
    as_of = NOW - timedelta(days=10)
    db.conn.autocommit = False
    db.conn.execute("SET TRANSACTION READ ONLY")
    fly = features.for_user_key(db.conn, user, n=40, as_of=as_of)
    db.conn.rollback()
    db.conn.autocommit = True
    assert db.scalar("SELECT count(*) FROM pgrec.item_stats_days") == 0
    built = features.for_user_key(db.conn, user, n=40, as_of=as_of)
    assert db.scalar("SELECT count(*) FROM pgrec.item_stats_days") == 1
    _same(fly, built)


def test_refresh_stats_command(db: TestDB, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from engine.cli import app
    from engine.config import get_settings

    _load(db)
    monkeypatch.setenv("PGREC_DATABASE_URL", db.url)
    get_settings.cache_clear()
    try:
        runner = CliRunner()
        res = runner.invoke(app, ["db", "refresh-stats", "--day", "2026-05-20"])
        assert res.exit_code == 0, res.output
        assert db.scalar("SELECT items FROM pgrec.item_stats_days WHERE day = '2026-05-20'") == \
            db.scalar("SELECT count(*) FROM pgrec.item_stats WHERE day = '2026-05-20'") > 0
        res = runner.invoke(app, ["doctor"])
        assert res.exit_code == 0, res.output
        assert "none for today" in " ".join(res.output.split())
        res = runner.invoke(app, ["db", "refresh-stats"])
        assert res.exit_code == 0 and "snapshot of today" in res.output, res.output
        res = runner.invoke(app, ["doctor"])
        assert "none for today" not in " ".join(res.output.split()) and "built" in res.output
        res = runner.invoke(app, ["db", "refresh-stats", "--day", "tomorrow"])
        assert res.exit_code == 1 and "is not a date" in res.output
        res = runner.invoke(app, ["db", "refresh-stats", "--day", "2999-01-01"])
        assert res.exit_code == 1 and "in the future" in res.output
    finally:
        get_settings.cache_clear()


def test_v8_features_answer_as_v7(db: TestDB) -> None:
    """features v8 (migration 0030) picks the recent items before looking up their embeddings and looks up each
    distinct history item's categories once: the same rows and values as v7 for heavy, median, light and cold
    users, users whose history runs past feature_user_history_limit, latest events at one instant (ties at the
    recent-items cut), several as_of values (snapshot and per-request item counters), requested items, with
    co-occurrence and EASE neighbours built."""
    from engine import cooccurrence, itemsim
    from migrations import sqlfiles

    _load(db)
    conn = db.conn
    # the migrations installed v8
    assert "v8: the nrec latest" in db.scalar(
        "SELECT prosrc FROM pg_proc WHERE oid = 'pgrec.candidate_features_by_key(bigint, text, int, timestamptz, "
        "bigint[])'::regprocedure")
    built = NOW - timedelta(days=12)
    cooccurrence.build(conn, as_of=built)
    itemsim.build_ease(conn, as_of=built, config=itemsim.EaseConfig(top_n=20))
    assert db.scalar("SELECT count(*) FROM pgrec.model_neighbors WHERE model = 'ease'") > 0
    assert db.scalar("SELECT count(*) FROM pgrec.item_neighbors") > 0
    by_activity = [int(r[0]) for r in conn.execute(
        "SELECT user_key FROM pgrec.events GROUP BY user_key ORDER BY count(*) DESC, user_key").fetchall()]
    # a user whose latest positive events share one instant, over six items (the cut of the recent items falls
    # among them)
    tie_user = by_activity[5]
    tie_items = [r[0] for r in conn.execute("SELECT item_id FROM pgrec.items ORDER BY item_key LIMIT 6").fetchall()]
    uid = db.scalar("SELECT user_id FROM pgrec.users WHERE user_key = %s", (tie_user,))
    for item in tie_items:
        assert db.scalar("SELECT pgrec.track_event(%s, %s, 'like', %s)",
                         (uid, item, NOW - timedelta(days=3, hours=2))) == "stored"
    users: list[int | None] = [*by_activity[:6], *by_activity[70:73], *by_activity[-2:], None]
    some_items = [int(r[0]) for r in conn.execute("SELECT item_key FROM pgrec.items ORDER BY item_key DESC LIMIT 7")]
    cases: list[tuple[int | None, datetime | None, list[int] | None]] = []
    for i, u in enumerate(users):
        for at in (None, NOW - timedelta(days=1), NOW - timedelta(days=3), NOW - timedelta(days=20)):
            cases.append((u, at, None))
        if i % 3 == 0:
            seen = [] if u is None else [int(r[0]) for r in conn.execute(
                "SELECT DISTINCT item_key FROM pgrec.events WHERE user_key = %s ORDER BY 1 LIMIT 5", (u,))]
            cases.append((u, NOW - timedelta(days=2), [*some_items, *seen]))

    def answers(version: int) -> list[list[Any]]:
        conn.execute((sqlfiles.sql_root() / "features" / f"v{version}.sql").read_text())
        out = []
        for limit, recent in ((500, 10), (40, 3)):   # histories past the limit; few recent items
            for key, value in (("feature_user_history_limit", limit), ("feature_recent_items", recent)):
                conn.execute("UPDATE pgrec.config SET value = to_jsonb(%s::int) WHERE key = %s", (value, key))
            for u, at, keys in cases:
                out.append(sorted(conn.execute(
                    "SELECT * FROM pgrec.candidate_features_by_key(%s, 'default', 40, %s, %s)",
                    (u, at, keys)).fetchall(), key=lambda r: r[0]))
        return out

    def close(a: list[list[Any]], b: list[list[Any]]) -> None:
        assert [[r[0] for r in rows] for rows in a] == [[r[0] for r in rows] for rows in b]
        for rows_a, rows_b in zip(a, b, strict=True):
            for ra, rb in zip(rows_a, rows_b, strict=True):
                for va, vb in zip(ra, rb, strict=True):
                    if isinstance(va, float) and isinstance(vb, float):
                        assert va == vb or abs(va - vb) <= 1e-12 * max(abs(va), abs(vb)), (ra[0], va, vb)
                    else:
                        assert va == vb, (ra[0], va, vb)

    # one transaction: now() (as_of NULL) is the same instant for both versions; a past day's item counters
    # are the snapshot the first call builds
    conn.autocommit = False
    try:
        new, old = answers(8), answers(7)
        close(new, old)
        assert sum(len(rows) for rows in new) > 1000
        conn.rollback()
        # read-only: days without a snapshot, the per-request aggregate of the item counters
        ro_cases = [(u, NOW - timedelta(days=d), None) for u in [*users[:4], None] for d in (5, 9)]
        ro: dict[int, list[list[Any]]] = {}
        for version in (7, 8):
            conn.execute((sqlfiles.sql_root() / "features" / f"v{version}.sql").read_text())
            conn.commit()
            conn.execute("SET TRANSACTION READ ONLY")
            ro[version] = [sorted(conn.execute(
                "SELECT * FROM pgrec.candidate_features_by_key(%s, 'default', 40, %s, NULL)", (u, at)).fetchall(),
                key=lambda r: r[0]) for u, at, _ in ro_cases]
            conn.rollback()
        close(ro[8], ro[7])
        assert db.scalar("SELECT count(*) FROM pgrec.item_stats_days WHERE day IN (%s, %s)",
                         ((NOW - timedelta(days=5)).date(), (NOW - timedelta(days=9)).date())) == 0
    finally:
        conn.rollback()
        conn.autocommit = True
