"""Stage 1 on tiny worlds whose answer is known: each source, the union, as_of, filters, fallbacks."""

from __future__ import annotations

import math
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from conftest import TEST_DIM, TestDB

from engine import candidates, cooccurrence, neighbors
from engine.errors import InvalidRequest, NotFound

NOW = datetime.now(UTC).replace(microsecond=0)
OLD = NOW - timedelta(days=400)


def _vec(degrees: float) -> list[float]:
    """A unit vector in the plane of the first two dimensions: cosine similarity = cos(angle difference)."""
    v = [0.0] * TEST_DIM
    v[0], v[1] = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
    return v


def _item(db: TestDB, item_id: str, *, degrees: float | None = None, categories: list[str] | None = None,
          created: datetime = OLD, available: bool = True) -> None:
    db.conn.execute("SELECT pgrec.upsert_item(%s, %s, NULL, %s, %s)",
                    (item_id, categories or ["c"], created, available))
    if degrees is not None:
        db.conn.execute("SELECT pgrec.set_item_embedding(%s, %s)", (item_id, _vec(degrees)))


def _event(db: TestDB, user: str, item: str, kind: str = "like", at: datetime | None = None) -> None:
    assert db.scalar("SELECT pgrec.track_event(%s, %s, %s, %s)", (user, item, kind, at or NOW)) == "stored"


def _fan(db: TestDB, count: int = 30, step: float = 3.0) -> None:
    """Items x0..x{count-1} at angles 0, step, 2*step, ... degrees."""
    for k in range(count):
        _item(db, f"x{k}", degrees=k * step)


def _ids(db: TestDB, rows: list[candidates.SourceRow]) -> list[str]:
    keys = [r.item_key for r in rows]
    names = dict(db.conn.execute("SELECT item_key, item_id FROM pgrec.items WHERE item_key = ANY(%s)", (keys,)).fetchall())
    return [names[k] for k in keys]


def _uk(db: TestDB, user: str) -> int:
    key = candidates.user_key(db.conn, user)
    assert key is not None
    return key


# ---------------------------------------------------------------- ann


def test_ann_follows_the_user_vector_and_a_new_event(db: TestDB) -> None:
    _fan(db)
    _event(db, "u1", "x0", at=NOW - timedelta(hours=2))
    uk = _uk(db, "u1")
    rows = candidates.run_source(db.conn, "ann", uk, 5)
    assert _ids(db, rows) == ["x0", "x1", "x2", "x3", "x4"]
    assert [r.rank for r in rows] == [1, 2, 3, 4, 5]
    assert rows[0].score == pytest.approx(1.0, abs=1e-5)
    before = rows
    _event(db, "u1", "x29", at=NOW - timedelta(hours=1))  # at 87 degrees: the vector turns to ~43.5
    after = _ids(db, candidates.run_source(db.conn, "ann", uk, 5))
    assert after != _ids(db, before)
    assert after == ["x15", "x14", "x16", "x13", "x17"]  # the older like weighs a bit less: just past 43.5 degrees
    # as_of before the new event: the old answer
    assert _ids(db, candidates.run_source(db.conn, "ann", uk, 5, as_of=NOW - timedelta(minutes=90))) == _ids(db, before)


def test_user_vector_formula(db: TestDB) -> None:
    _fan(db, 31)
    _event(db, "u1", "x0", "click", at=NOW - timedelta(days=30))  # weight 2, one half-life before the latest
    _event(db, "u1", "x30", "click", at=NOW - timedelta(hours=1))  # weight 2, at 90 degrees
    vec = db.scalar("SELECT pgrec.user_vector(%s, NULL)::float4[]", (_uk(db, "u1"),))
    # weights 2 * 2^(-(30 days - 1 hour) / 30 days) at 0 degrees and 2 at 90 degrees
    w0 = 2 * 2 ** (-(30 * 24 - 1) / (30 * 24))
    assert vec[0] == pytest.approx(w0 / math.hypot(w0, 2), abs=1e-5)
    assert vec[1] == pytest.approx(2 / math.hypot(w0, 2), abs=1e-5)
    assert db.scalar("SELECT pgrec.user_vector(NULL, NULL)") is None
    assert db.scalar("SELECT pgrec.user_vector(%s, %s)", (_uk(db, "u1"), NOW - timedelta(days=31))) is None


def test_events_decades_apart_weigh_nothing_instead_of_failing(db: TestDB) -> None:
    """A like 25 years before the user's latest: its weight 2^(-25 years / 30 days) is below a real's range; it
    counts as 0 (it raised an underflow error that failed every request of the user before candidates v6)."""
    _fan(db, 31)
    _event(db, "u1", "x0", "like", at=datetime(2001, 1, 1, tzinfo=UTC))
    _event(db, "u1", "x30", "like", at=NOW - timedelta(hours=1))  # at 90 degrees
    uk = _uk(db, "u1")
    vec = db.scalar("SELECT pgrec.user_vector(%s, NULL)::float4[]", (uk,))
    assert vec[0] == pytest.approx(0.0, abs=1e-6) and vec[1] == pytest.approx(1.0, abs=1e-6)
    assert _ids(db, candidates.run_source(db.conn, "ann", uk, 3))[0] == "x30"
    rows = candidates.candidates(db.conn, "u1", n=10)
    assert len([r for r in rows if r.item_id not in {"x0", "x30"}]) == 10
    # the old event alone: its own weight is 2^0 (relative to the latest event), so it still points the vector
    _event(db, "u2", "x0", "like", at=datetime(2001, 1, 1, tzinfo=UTC))
    assert _ids(db, candidates.run_source(db.conn, "ann", _uk(db, "u2"), 2)) == ["x0", "x1"]


def test_unavailable_and_future_items_are_not_candidates(db: TestDB) -> None:
    _fan(db, 10)
    _item(db, "gone", degrees=0.5, available=False)
    _item(db, "later", degrees=0.2, created=NOW - timedelta(hours=1))
    _event(db, "u1", "x0", at=NOW - timedelta(hours=3))
    uk = _uk(db, "u1")
    assert "gone" not in _ids(db, candidates.run_source(db.conn, "ann", uk, 5))
    assert "later" in _ids(db, candidates.run_source(db.conn, "ann", uk, 5))
    assert "later" not in _ids(db, candidates.run_source(db.conn, "ann", uk, 5, as_of=NOW - timedelta(hours=2)))


def test_filtered_ann_returns_min_of_n_and_matching_at_one_percent(db: TestDB) -> None:
    db.conn.execute(
        """INSERT INTO pgrec.items (item_id, categories, created_at)
           SELECT 'r' || g, CASE WHEN g %% 100 = 0 THEN ARRAY['rare'] ELSE ARRAY['common'] END, %s
             FROM generate_series(1, 2000) g""", (OLD,))
    db.conn.execute(
        """INSERT INTO pgrec.item_embeddings (item_key, embedding)
           SELECT i.item_key, (SELECT array_agg(sin(i.item_key * 7.3 + d * 1.7))::real[]::public.vector(16)
                                 FROM generate_series(1, 16) d)
             FROM pgrec.items i""")
    db.conn.execute("ANALYZE pgrec.items; ANALYZE pgrec.item_embeddings")
    _event(db, "u1", "r1", at=NOW - timedelta(hours=1))
    uk = _uk(db, "u1")
    # 20 rare items (1%): exact scan; ask for more than exist -> all of them
    rows = candidates.run_source(db.conn, "ann", uk, 50, categories=["rare"])
    assert len(rows) == 20
    assert len({r.item_key for r in rows}) == 20
    # force the index path (exact_max_rows below the match count): still min(n, matching) rows, in order
    params = {"ef_search": 10, "iterative_scan": "relaxed_order", "max_scan_tuples": 100, "exact_max_rows": 5}
    rows = candidates.run_source(db.conn, "ann", uk, 15, categories=["rare"], params=params)
    assert len(rows) == 15
    scores = [r.score for r in rows]
    assert scores == sorted(scores, reverse=True)
    exact = candidates.run_source(db.conn, "ann", uk, 15, categories=["rare"])
    assert len({r.item_key for r in rows} & {r.item_key for r in exact}) >= 13  # HNSW recall on 20 rows
    # unfiltered, k above the default ef_search: ef_search is raised to the LIMIT
    assert len(candidates.run_source(db.conn, "ann", uk, 300, params={"ef_search": 40})) == 300
    with pytest.raises(Exception, match="iterative_scan"):
        candidates.run_source(db.conn, "ann", uk, 5, params={"iterative_scan": "sideways"})


def _ann_read(db: TestDB, uk: int, k: int, unseen: int | None, seen: list[int]) -> list[int]:
    rows = db.conn.execute(
        "SELECT item_key, rank FROM pgrec.source_ann(%s, %s, NULL, NULL, '{}', %s, %s) ORDER BY rank",
        (uk, k, unseen, seen)).fetchall()
    assert [r[1] for r in rows] == list(range(1, len(rows) + 1))
    return [r[0] for r in rows]


def test_ann_reads_only_until_its_quota_of_unseen_items(db: TestDB) -> None:
    _fan(db, 60, step=1.5)
    _event(db, "u1", "x0", at=NOW - timedelta(hours=1))
    uk = _uk(db, "u1")
    full = _ann_read(db, uk, 40, None, [])
    assert len(full) == 40
    # a few seen items among the first rows: the read stops at the 10th unseen one, seen rows before it kept
    seen = [full[0], full[3], full[7]]
    early = _ann_read(db, uk, 40, 10, seen)
    assert early == full[:13]
    # nothing seen: exactly the quota
    assert _ann_read(db, uk, 40, 10, []) == full[:10]
    # seen items take more than the first read's margin (10 here): the scan runs again as far as k
    many = full[:25]
    again = _ann_read(db, uk, 40, 10, many)
    assert again == full[:35]
    # fewer unseen items than asked within k: all k rows
    assert _ann_read(db, uk, 30, 10, many) == full[:30]
    # a long seen list (a heavy user's; keys of no item among them) reads the same (v9 tests it by hash)
    assert _ann_read(db, uk, 40, 10, [*range(10**9, 10**9 + 20000), *seen]) == full[:13]
    # as in v5, a NULL in the list proves no row unseen: the read goes on to k
    assert _ann_read(db, uk, 40, 10, [None, *seen]) == full
    # the union passes its quota: a user with seen items still gets the ann quota of unseen items
    for item in ("x1", "x2", "x3"):
        _event(db, "u1", item, "view", at=NOW - timedelta(hours=2))
    rows = candidates.candidates(db.conn, "u1", n=20)
    ann_unseen = [r for r in rows if "ann" in r.sources and r.item_id not in {"x0", "x1", "x2", "x3"}]
    assert len(ann_unseen) >= math.ceil(0.4 * 20)


# ---------------------------------------------------------------- history


def _cooccurring_world(db: TestDB) -> None:
    _fan(db, 30)
    for u in range(2, 6):  # four users like x10 then x20
        _event(db, f"u{u}", "x10", at=NOW - timedelta(days=3))
        _event(db, f"u{u}", "x20", at=NOW - timedelta(days=3) + timedelta(hours=1))
    _event(db, "u1", "x10", at=NOW - timedelta(days=2))


def test_cooccurrence_build_known_scores(db: TestDB) -> None:
    _cooccurring_world(db)
    result = cooccurrence.build(db.conn)
    assert result.mode == "full"
    assert result.pairs == 2  # (x10, x20) both ways
    score = db.scalar("""SELECT n.score FROM pgrec.item_neighbors n JOIN pgrec.items a ON a.item_key = n.item_key
                          JOIN pgrec.items b ON b.item_key = n.neighbor_key WHERE a.item_id = 'x10' AND b.item_id = 'x20'""")
    assert score == pytest.approx(4 / math.sqrt(5 * 4), rel=1e-5)  # count / sqrt(users(x10) * users(x20))
    # incremental: a new pair after the build is added without a recount
    _event(db, "u1", "x20", at=datetime.now(UTC))  # after the build (older late events need a full build)
    with pytest.raises(InvalidRequest):
        cooccurrence.build(db.conn, incremental=True, as_of=result.as_of - timedelta(seconds=1))
    inc = cooccurrence.build(db.conn, incremental=True)
    assert inc.mode == "incremental"
    assert db.scalar("SELECT max(count) FROM pgrec.cooccurrence_pairs") == 5
    full = db.conn.execute("SELECT item_key, rank, neighbor_key, score FROM pgrec.item_neighbors ORDER BY 1, 2").fetchall()
    cooccurrence.build(db.conn)
    assert db.conn.execute("SELECT item_key, rank, neighbor_key, score FROM pgrec.item_neighbors ORDER BY 1, 2").fetchall() == full
    # as_of before every pair: nothing
    cooccurrence.build(db.conn, as_of=NOW - timedelta(days=10))
    assert db.scalar("SELECT count(*) FROM pgrec.item_neighbors") == 0


def test_full_build_counts_as_the_incremental_upserts_do(db: TestDB) -> None:
    """The full build sums its batches' pairs once at the end; an incremental build from an empty start upserts
    them batch by batch: the same pair counts (the full build keeps those seen min_count = 2 times, the
    incremental one every pair), item counts and neighbour lists."""
    from engine import datasets

    data = datasets.generate(datasets.GeneratorConfig(users=60, items=80, events=2500, days=30, dim=TEST_DIM,
                                                      seed=11), now=NOW)
    data.load(db.conn)
    pairs = "SELECT item_a, item_b, count FROM pgrec.cooccurrence_pairs ORDER BY 1, 2"
    neighbours = "SELECT item_key, rank, neighbor_key, score FROM pgrec.item_neighbors ORDER BY 1, 2"
    full = cooccurrence.build(db.conn, batches=7)
    full_pairs, full_nb = db.conn.execute(pairs).fetchall(), db.conn.execute(neighbours).fetchall()
    assert full.pairs == len(full_pairs) > 100 and min(c for _, _, c in full_pairs) == 2
    cooccurrence.build(db.conn, as_of=NOW - timedelta(days=400))  # empty: before every event
    assert db.scalar("SELECT count(*) FROM pgrec.cooccurrence_pairs") == 0
    cooccurrence.build(db.conn, incremental=True, as_of=full.as_of, batches=5)
    inc_pairs = db.conn.execute(pairs).fetchall()
    assert [p for p in inc_pairs if p[2] >= 2] == full_pairs
    assert any(p[2] == 1 for p in inc_pairs)  # the pairs the full build leaves out
    assert db.conn.execute(neighbours).fetchall() == full_nb


def test_incremental_build_equals_a_full_rebuild(db: TestDB) -> None:
    """A list's scores divide by its neighbours' user counts: new events of an item change the lists of every
    item paired with it, also those without new pairs (an incremental build once left them stale: 4,361 of
    30,219 scores differed from a full rebuild on generated data). With min_count 1 nothing is left out, so an
    incremental build after a full one equals a full rebuild exactly."""
    from engine import datasets

    datasets.generate(datasets.GeneratorConfig(users=60, items=80, events=2500, days=30, dim=TEST_DIM, seed=5),
                      now=NOW).load(db.conn)
    neighbours = "SELECT item_key, rank, neighbor_key, round(score::numeric, 12) FROM pgrec.item_neighbors ORDER BY 1, 2"
    cfg = cooccurrence.CooccurrenceConfig(min_count=1)
    cooccurrence.build(db.conn, as_of=NOW - timedelta(days=10), config=cfg)
    before = db.conn.execute(neighbours).fetchall()
    cooccurrence.build(db.conn, incremental=True, as_of=NOW, config=cfg)
    inc = db.conn.execute(neighbours).fetchall()
    cooccurrence.build(db.conn, as_of=NOW, config=cfg)
    assert inc == db.conn.execute(neighbours).fetchall() and inc != before
    # a list length or count threshold other than the last build's would mix two scorings: refused
    with pytest.raises(InvalidRequest, match="top_n"):
        cooccurrence.build(db.conn, incremental=True, as_of=NOW + timedelta(seconds=1),
                           config=cooccurrence.CooccurrenceConfig(min_count=1, top_n=3))


def test_full_build_keeps_pairs_seen_min_count_times_and_later_builds_count_on(db: TestDB) -> None:
    """A pair seen fewer than min_count times is left out of a full build; seen again after it, an incremental
    build counts it from zero (short by at most min_count - 1), and the next full build counts it exactly."""
    _fan(db, 30)
    for u in range(2, 5):  # three users: x10 then x20 (kept)
        _event(db, f"u{u}", "x10", at=NOW - timedelta(days=3))
        _event(db, f"u{u}", "x20", at=NOW - timedelta(days=3) + timedelta(hours=1))
    _event(db, "u5", "x11", at=NOW - timedelta(days=3))  # one user: x11 then x21 (left out)
    _event(db, "u5", "x21", at=NOW - timedelta(days=3) + timedelta(hours=1))
    count = """SELECT p.count FROM pgrec.cooccurrence_pairs p JOIN pgrec.items a ON a.item_key = p.item_a
                JOIN pgrec.items b ON b.item_key = p.item_b WHERE a.item_id = %s AND b.item_id = %s"""
    first = cooccurrence.build(db.conn, as_of=NOW - timedelta(days=1))
    assert first.pairs == 2  # (x10, x20) both ways; (x11, x21) seen once
    assert db.scalar(count, ("x10", "x20")) == 3
    assert db.scalar(count, ("x11", "x21")) is None
    _event(db, "u6", "x11", at=NOW - timedelta(hours=5))  # a second user with x11 then x21
    _event(db, "u6", "x21", at=NOW - timedelta(hours=4))
    cooccurrence.build(db.conn, incremental=True, as_of=NOW)
    assert db.scalar(count, ("x11", "x21")) == 1  # true count 2: short by 1 = min_count - 1
    assert db.scalar(count, ("x21", "x11")) == 1
    assert db.scalar(count, ("x10", "x20")) == 3
    cooccurrence.build(db.conn, as_of=NOW)
    assert db.scalar(count, ("x11", "x21")) == 2
    nb = """SELECT count(*) FROM pgrec.item_neighbors n JOIN pgrec.items a ON a.item_key = n.item_key
             JOIN pgrec.items b ON b.item_key = n.neighbor_key WHERE a.item_id = 'x11' AND b.item_id = 'x21'"""
    assert db.scalar(nb) == 1


def test_history_source_and_a_new_event(db: TestDB) -> None:
    _cooccurring_world(db)
    cooccurrence.build(db.conn)
    uk = _uk(db, "u1")
    params = {"embedding_k": 2}  # the seed's two neighbours on the fan

    def history(**kw: object) -> list[str]:
        return _ids(db, candidates.run_source(db.conn, "history", uk, 5, params=params, **kw))  # type: ignore[arg-type]

    names = history()
    assert names[0] == "x20"  # co-occurrence 4 * 0.894 beats embedding neighbours 4 * 0.5 * cos(3)
    assert set(names[1:3]) == {"x9", "x11"}
    assert "x10" not in names  # the user's own items are seeds, not candidates
    _event(db, "u1", "x25", at=NOW - timedelta(hours=1))
    after = history()
    assert after[0] == "x20" and set(after[1:3]) == {"x24", "x26"}  # 4 * 0.5 * cos(3) each
    # as_of before the new event ignores it
    assert history(as_of=NOW - timedelta(hours=2)) == names


def test_history_reads_stored_embedding_neighbours_only_while_current(db: TestDB) -> None:
    _cooccurring_world(db)
    uk = _uk(db, "u1")
    params = {"embedding_k": 2, "per_item": 0}  # embedding neighbours only

    def history() -> list[tuple[str, float]]:
        rows = candidates.run_source(db.conn, "history", uk, 5, params=params)
        return list(zip(_ids(db, rows), [r.score for r in rows], strict=True))

    live = history()
    assert {n for n, _ in live} == {"x9", "x11"}
    result = neighbors.build(db.conn, k=4)
    assert (result.items, result.rows) == (30, 120)
    stored = db.conn.execute(
        """SELECT i.item_id, mn.rank, round(mn.score::numeric, 4)::float8 FROM pgrec.model_neighbors mn
             JOIN pgrec.items s ON s.item_key = mn.item_key JOIN pgrec.items i ON i.item_key = mn.neighbor_key
            WHERE mn.model = 'embedding' AND s.item_id = 'x0' ORDER BY mn.rank""").fetchall()
    assert stored == [("x1", 1, round(math.cos(math.radians(3)), 4)), ("x2", 2, round(math.cos(math.radians(6)), 4)),
                      ("x3", 3, round(math.cos(math.radians(9)), 4)), ("x4", 4, round(math.cos(math.radians(12)), 4))]
    # the stored lists give the live search's answer (scores as real)
    assert [n for n, _ in history()] == [n for n, _ in live]
    assert [s for _, s in history()] == pytest.approx([s for _, s in live], rel=1e-6)
    # a current stored list is what the source reads: plant x29 as x10's first neighbour
    db.conn.execute(
        """UPDATE pgrec.model_neighbors SET neighbor_key = (SELECT item_key FROM pgrec.items WHERE item_id = 'x29')
            WHERE model = 'embedding' AND rank = 1
              AND item_key = (SELECT item_key FROM pgrec.items WHERE item_id = 'x10')""")
    assert "x29" in [n for n, _ in history()]
    # x10's vector changes after the list was built: the list is stale, the index is searched again
    db.conn.execute("SELECT pgrec.set_item_embedding('x10', %s)", (_vec(30.5),))
    after = dict(history())
    assert set(after) == {"x9", "x11"}  # x10 now at 30.5 degrees: x11 2.5 and x9 3.5 degrees away
    assert after["x11"] == pytest.approx(4 * 0.5 * math.cos(math.radians(2.5)), rel=1e-6)
    # rebuilding only the stale lists brings x10's back, current
    assert neighbors.build(db.conn, k=4, stale_only=True).items == 1
    assert "x29" not in [n for n, _ in history()]


def test_history_adds_ease_neighbours_when_weighted(db: TestDB) -> None:
    _cooccurring_world(db)
    cooccurrence.build(db.conn)
    uk = _uk(db, "u1")
    # x10's EASE list (as `pgrec train ease` stores it): x25 weight 0.2, x27 weight 0.05
    db.conn.execute(
        """INSERT INTO pgrec.model_neighbors (model, item_key, rank, neighbor_key, score)
           SELECT 'ease', s.item_key, v.rank, n.item_key, v.score
             FROM (VALUES (1, 'x25', 0.2), (2, 'x27', 0.05)) v(rank, id, score)
             JOIN pgrec.items s ON s.item_id = 'x10' JOIN pgrec.items n ON n.item_id = v.id""")

    def history(params: dict[str, object]) -> dict[str, float]:
        rows = candidates.run_source(db.conn, "history", uk, 10, params=params | {"embedding_items": 0})
        return dict(zip(_ids(db, rows), [r.score for r in rows], strict=True))

    assert set(history({})) == {"x20"}  # co-occurrence only: off by default
    with_ease = history({"ease_weight": 2.0})
    # one seed (x10, weight 4 for a like, newest): 4 * 2.0 * (score / best score of the seed's list)
    assert with_ease["x25"] == pytest.approx(4 * 2.0 * 1.0)
    assert with_ease["x27"] == pytest.approx(4 * 2.0 * 0.25)
    assert with_ease["x20"] == pytest.approx(history({})["x20"])


# ---------------------------------------------------------------- trending, popular, fresh


def _popularity_world(db: TestDB) -> None:
    for name in ("old_hit", "new_hit", "de_hit", "us_hit"):
        _item(db, name)
    db.conn.execute("SELECT pgrec.upsert_user('de1', '{\"country\": \"de\"}')")
    db.conn.execute("SELECT pgrec.upsert_user('us1', '{\"country\": \"us\"}')")
    for u in range(10):  # 10 likes 30 days ago
        _event(db, f"p{u}", "old_hit", at=NOW - timedelta(days=30))
    for u in range(2):  # 2 likes now
        _event(db, f"p{u}", "new_hit", at=NOW - timedelta(minutes=30))
    _event(db, "de1", "de_hit", "click", at=NOW - timedelta(hours=5))
    _event(db, "us1", "us_hit", "view", at=NOW - timedelta(hours=5))


def test_trending_popular_and_segments(db: TestDB) -> None:
    _popularity_world(db)
    glob = candidates.trending(db.conn, 10)
    assert glob[0][0] == "new_hit"
    assert glob[0][1] == pytest.approx(2 * 4 * 2 ** (-0.5 / 72), rel=1e-3)  # 2 likes of weight 4, 30 min old
    pop = candidates.run_source(db.conn, "popular", None, 4)
    assert _ids(db, pop)[0] == "old_hit"  # 40 * 2^(-30/60) > 8
    assert pop[0].score == pytest.approx(40 * 2 ** -0.5, rel=1e-3)
    assert [i for i, _ in candidates.trending(db.conn, 10, "de")] == ["de_hit"]
    de_rows = _ids(db, candidates.run_source(db.conn, "trending", _uk(db, "de1"), 2, params={"global_weight": 0.1}))
    assert de_rows[0] == "de_hit"  # 1.9 in segment + 0.1 * 1.9 beats 0.1 * 7.9 global
    us_rows = _ids(db, candidates.run_source(db.conn, "trending", _uk(db, "us1"), 2))
    assert us_rows[0] == "new_hit"  # us_hit: one view (1 + 0.5 * 1) < 0.5 * 8
    # a new event shows at once
    for u in range(3):
        _event(db, f"q{u}", "us_hit", "purchase", at=NOW - timedelta(minutes=1))
    assert candidates.trending(db.conn, 1)[0][0] == "us_hit"


def test_trending_as_of_ignores_later_events(db: TestDB) -> None:
    _popularity_world(db)
    past = NOW - timedelta(hours=2)
    names = [i for i, _ in candidates.trending(db.conn, 10, as_of=past)]
    assert "new_hit" not in names  # its events are after as_of
    assert names[0] in {"de_hit", "us_hit", "old_hit"}
    assert [i for i, _ in candidates.trending(db.conn, 10, as_of=NOW - timedelta(days=31))] == []
    # the recount for the past and the trigger-kept running sums agree just after the last event
    running = dict(candidates.trending(db.conn, 10))
    recount = dict(candidates.trending(db.conn, 10, as_of=datetime.now(UTC) - timedelta(milliseconds=1)))
    assert recount.keys() <= running.keys()
    for item, score in running.items():  # the recount looks back 10 half-lives: old_hit (2^-10) falls out
        assert recount.get(item, 0.0) == pytest.approx(score, rel=1e-3, abs=0.05)
    # and so does a full rebuild of the running sums
    db.conn.execute("SELECT pgrec.rebuild_trending()")
    for item, score in candidates.trending(db.conn, 10):
        assert running[item] == pytest.approx(score, rel=1e-3)


def test_fresh_source(db: TestDB) -> None:
    _item(db, "old")
    _item(db, "f_quiet", created=NOW - timedelta(days=2))
    _item(db, "f_liked", created=NOW - timedelta(days=3))
    _item(db, "f_newest", created=NOW - timedelta(hours=1))
    _event(db, "u1", "f_liked", at=NOW - timedelta(days=1))
    _event(db, "u1", "old", at=NOW - timedelta(days=1))
    rows = candidates.run_source(db.conn, "fresh", None, 10)
    assert _ids(db, rows) == ["f_liked", "f_newest", "f_quiet"]  # engagement, then newest
    past = candidates.run_source(db.conn, "fresh", None, 10, as_of=NOW - timedelta(days=2, hours=12))
    assert _ids(db, past) == ["f_liked"]  # the others did not exist yet; its like is in the future


def _cache_seconds(db: TestDB, seconds: float) -> None:
    db.conn.execute("UPDATE pgrec.config SET value = to_jsonb(%s::float8) WHERE key = 'source_cache_seconds'",
                    (seconds,))


def _shared_rows(db: TestDB, user: str | None, as_of: datetime | None = None) -> dict[str, list[tuple[int, float, int]]]:
    uk = _uk(db, user) if user else None
    return {s: [(r.item_key, r.score, r.rank) for r in candidates.run_source(db.conn, s, uk, 3, as_of=as_of)]
            for s in ("trending", "popular", "fresh")}


def test_shared_lists_equal_a_fresh_scan_and_age_out(db: TestDB) -> None:
    _popularity_world(db)
    _item(db, "f_new", created=NOW - timedelta(days=1))
    _event(db, "p0", "f_new", at=NOW - timedelta(hours=3))
    with db.conn.transaction():  # one moment (now()), so the decay factor is the same for every read
        _cache_seconds(db, 0)
        scanned = _shared_rows(db, "de1")
        _cache_seconds(db, 30)
        stored = _shared_rows(db, "de1")  # scans and stores the lists
        assert db.scalar("SELECT count(*) FROM pgrec.source_cache") >= 4  # trending:de, trending:, popular:, fresh
        cached = _shared_rows(db, "de1")  # reads them
    assert stored == scanned
    assert cached == scanned  # same items, order, scores and ranks as a scan
    # a past as_of (replays): the recount is shared too, keyed by the as_of
    past = NOW - timedelta(hours=2)
    _cache_seconds(db, 0)
    recount = _shared_rows(db, "de1", past)
    _cache_seconds(db, 30)
    assert _shared_rows(db, "de1", past) == recount  # computed and stored
    assert db.scalar("SELECT count(*) FROM pgrec.source_cache WHERE key LIKE '%%@%%'") >= 3
    assert _shared_rows(db, "us1", past)["popular"] == recount["popular"]  # read back, for another user too
    assert recount["trending"] and recount["popular"] and all(r[2] >= 1 for rows in recount.values() for r in rows)
    # a new event: in the trending API at once, in the sources once the shared list is older than the setting
    for u in range(3):
        _event(db, f"q{u}", "us_hit", "purchase", at=NOW - timedelta(minutes=1))
    assert candidates.trending(db.conn, 1)[0][0] == "us_hit"
    assert _ids(db, candidates.run_source(db.conn, "trending", None, 1)) != ["us_hit"]
    db.conn.execute("UPDATE pgrec.source_cache SET computed_at = computed_at - interval '31 seconds'")
    assert _ids(db, candidates.run_source(db.conn, "trending", None, 1)) == ["us_hit"]
    # a catalog change drops the lists at once: an unavailable item leaves every source
    _item(db, "us_hit", available=False)
    assert db.scalar("SELECT count(*) FROM pgrec.source_cache") == 0
    assert "us_hit" not in _ids(db, candidates.run_source(db.conn, "trending", None, 5))
    # a read-only transaction (a replica) reads and scans, never writes
    db.conn.execute("DELETE FROM pgrec.source_cache")
    with db.conn.transaction():
        db.conn.execute("SET TRANSACTION READ ONLY")
        assert candidates.run_source(db.conn, "popular", None, 2)
        assert db.scalar("SELECT count(*) FROM pgrec.source_cache") == 0


def test_shared_list_refresh_inside_a_repeatable_read_transaction(db: TestDB) -> None:
    """A caller's REPEATABLE READ transaction that finds the list stale while another session stores a newer one
    still gets its answer (the store is skipped, not the request)."""
    _popularity_world(db)
    assert candidates.run_source(db.conn, "popular", None, 2)  # stored
    db.conn.execute("UPDATE pgrec.source_cache SET computed_at = computed_at - interval '1 minute'")
    other = db.connect()
    try:
        with other.transaction():
            other.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
            other.execute("SELECT 1").fetchone()  # the snapshot: the stale list
            assert candidates.run_source(db.conn, "popular", None, 2)  # another session stores a fresh one
            rows = candidates.run_source(other, "popular", None, 2)  # stale in its snapshot: scans, cannot store
            assert [r.item_key for r in rows] == [r.item_key for r in candidates.run_source(db.conn, "popular", None, 2)]
    finally:
        other.close()


def test_quotas_are_exact_shares(db: TestDB) -> None:
    _fan(db, 60)
    for k in range(60):
        _event(db, f"w{k % 9}", f"x{k}", "view", at=NOW - timedelta(hours=k + 1))
    db.conn.execute("INSERT INTO pgrec.surfaces (surface) VALUES ('tenth')")
    db.conn.execute("INSERT INTO pgrec.candidate_sources (surface, source, quota, fallback_order) VALUES "
                    "('tenth', 'trending', 0.1, NULL), ('tenth', 'popular', 0.9, NULL)")
    rows = candidates.candidates(db.conn, "nobody", n=40, surface="tenth")
    # trending fetches its share, 4 rows (a real 0.1 times 40 is 4.0000000596, whose ceil is 5); every row it
    # found keeps its rank, whichever source put the item in the list
    assert sorted(r.trending_rank for r in rows if r.trending_rank is not None) == [1, 2, 3, 4]


# ---------------------------------------------------------------- the union


def test_cold_user_gets_a_full_list_from_fallbacks(db: TestDB) -> None:
    _fan(db, 40)
    for k in range(40):
        _event(db, f"w{k % 7}", f"x{k}", "view", at=NOW - timedelta(hours=k + 1))
    rows = candidates.candidates(db.conn, "nobody", n=25)
    assert len(rows) == 25
    assert {s for r in rows for s in r.sources} <= {"trending", "popular", "fresh"}
    assert len({r.item_key for r in rows}) == 25
    same = candidates.candidates_by_key(db.conn, None, n=25)
    assert [r.item_key for r in same] == [r.item_key for r in rows]


def test_a_user_with_more_seen_items_than_the_over_fetch_still_gets_n(db: TestDB) -> None:
    """The fallback fetches n plus the user's seen items (up to 4n): with only n plus the over-fetch cap, a heavy user whose seen
    items fill the top of the popular list got fewer than n unseen candidates although the catalog had them."""
    for k in range(100):
        _item(db, f"p{k}")
        for u in range(100 - k):  # p0 is the most popular, then p1, ...
            _event(db, f"w{u}", f"p{k}", "view", at=NOW - timedelta(days=2, minutes=k))
    for k in range(60):  # the heavy user had the 60 most popular
        _event(db, "heavy", f"p{k}", "view", at=NOW - timedelta(days=1, minutes=k))
    db.conn.execute("INSERT INTO pgrec.config (key, value) VALUES ('candidates_overfetch_max', '10') "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value")
    seen = {f"p{k}" for k in range(60)}
    rows = candidates.candidates(db.conn, "heavy", n=30)
    assert len([r for r in rows if r.item_id not in seen]) == 30


def test_fallback_fills_from_the_catalog_when_few_items_were_engaged_with(db: TestDB) -> None:
    """A new app: 30 items, only 6 of them with events. The popular fallback lists those 6, then the other
    available items created before as_of, newest first, with score 0, so a cold user and a user with history
    both get n unseen candidates while the catalog has them."""
    for k in range(30):
        _item(db, f"x{k}", degrees=k * 3.0, categories=["even" if k % 2 == 0 else "odd"],
              created=OLD + timedelta(days=k))
    _item(db, "gone", created=OLD + timedelta(days=50), available=False)
    _item(db, "later", created=NOW + timedelta(days=1))  # created after as_of
    for k in range(6):
        _event(db, f"w{k}", f"x{k}", "like", at=NOW - timedelta(hours=k + 1))
    assert len(candidates.run_source(db.conn, "popular", None, 20)) == 6  # the source itself is unchanged
    cold = candidates.candidates(db.conn, "nobody", n=20)
    assert len(cold) == 20 and len({r.item_key for r in cold}) == 20
    ids = [r.item_id for r in cold]
    assert "gone" not in ids and "later" not in ids
    filled = [r for r in cold if r.popular_score == 0]
    assert [r.popular_rank for r in sorted(filled, key=lambda r: r.popular_rank or 0)] == list(range(7, 7 + len(filled)))
    # the tail is newest first: the highest-numbered items (created last) before the lower ones
    tail = [r.item_id for r in sorted(filled, key=lambda r: r.popular_rank or 0)]
    assert tail[:3] == ["x29", "x28", "x27"]
    # a user with history: n unseen items
    for k in range(4):
        _event(db, "u1", f"x{10 + k}", "like", at=NOW - timedelta(days=1, hours=k))
    rows = candidates.candidates(db.conn, "u1", n=20)
    assert len([r for r in rows if r.item_id not in {"x10", "x11", "x12", "x13"}]) == 20
    # the whole catalog is less than n: every available item once
    everything = candidates.candidates(db.conn, "nobody", n=100)
    assert sorted(r.item_id for r in everything) == sorted(f"x{k}" for k in range(30))
    # categories and as_of bound the tail too
    odd = candidates.candidates(db.conn, "nobody", n=10, categories=["odd"])
    assert len(odd) == 10 and all(int(r.item_id[1:]) % 2 == 1 for r in odd)
    early = candidates.candidates(db.conn, "nobody", n=50, as_of=OLD + timedelta(days=9, hours=12))
    assert sorted(r.item_id for r in early) == sorted(f"x{k}" for k in range(10))


def test_union_counts_unseen_items_and_keeps_every_source(db: TestDB) -> None:
    _cooccurring_world(db)
    for k in range(30):
        _event(db, "w", f"x{k}", "view", at=NOW - timedelta(days=1, hours=k))
    for k in range(5):
        _event(db, "u1", f"x{k}", "view", at=NOW - timedelta(days=1))
    cooccurrence.build(db.conn)
    rows = candidates.candidates(db.conn, "u1", n=12)
    seen = {"x10", "x0", "x1", "x2", "x3", "x4"}
    unseen = [r for r in rows if r.item_id not in seen]
    assert len(unseen) == 12
    assert len({r.item_key for r in rows}) == len(rows)
    by_id = {r.item_id: r for r in rows}
    assert "history" in by_id["x20"].sources and by_id["x20"].history_rank == 1
    assert any("ann" in r.sources for r in rows)
    for r in rows:
        for s in candidates.SOURCES:
            assert (s in r.sources) == (r.rank(s) is not None)
    # as_of before everything: only items of that time, no history
    early = candidates.candidates(db.conn, "u1", n=5, as_of=NOW - timedelta(days=2, hours=12))
    assert all("history" not in r.sources for r in early)


def test_surfaces_and_bad_input(db: TestDB) -> None:
    _fan(db, 10)
    _event(db, "u1", "x0", at=NOW - timedelta(hours=2))
    db.conn.execute("INSERT INTO pgrec.surfaces (surface) VALUES ('similar_only')")
    db.conn.execute("INSERT INTO pgrec.candidate_sources (surface, source, quota, fallback_order) "
                    "VALUES ('similar_only', 'ann', 1.0, NULL)")
    rows = candidates.candidates(db.conn, "u1", n=4, surface="similar_only")
    assert {s for r in rows for s in r.sources} == {"ann"}
    assert len([r for r in rows if r.item_id != "x0"]) == 4
    with pytest.raises(InvalidRequest):
        candidates.candidates(db.conn, "u1", n=0)
    with pytest.raises(Exception, match="unknown surface"):
        candidates.candidates(db.conn, "u1", n=5, surface="nope")
    with pytest.raises(InvalidRequest):
        candidates.run_source(db.conn, "magic", None, 5)
    with pytest.raises(NotFound):
        candidates.similar(db.conn, "no-such-item")
    assert [i for i, *_ in candidates.similar(db.conn, "x0", 3)] == ["x1", "x2", "x3"]


def test_requests_with_an_infinite_as_of_or_a_bad_k_are_refused_by_name(db: TestDB) -> None:
    db.conn.execute("SELECT pgrec.upsert_item('a')")
    for sql, message in [
        ("SELECT * FROM pgrec.recommend('u', 5, as_of => '-infinity')", "as_of must be a finite time, got -infinity"),
        ("SELECT * FROM pgrec.candidates('u', as_of => 'infinity')", "pgrec.candidates: as_of must be a finite time"),
        ("SELECT * FROM pgrec.similar_items('a', -1)", "pgrec.similar_items: k must be between 1 and 1000, got -1"),
        ("SELECT * FROM pgrec.trending_items(NULL, 0)", "pgrec.trending_items: k must be between 1 and 1000, got 0"),
        ("SELECT * FROM pgrec.trending_items(NULL, 5, 'infinity')", "pgrec.trending_items: as_of must be a finite"),
    ]:
        with pytest.raises(psycopg.errors.InvalidParameterValue, match=message), db.conn.transaction():
            db.conn.execute(sql).fetchall()
    assert db.conn.execute("SELECT count(*) FROM pgrec.similar_items('a', 1)").fetchone() == (0,)
