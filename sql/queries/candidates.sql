-- Stage 1: statements the Python layer runs (engine/candidates.py, engine/cooccurrence.py, CLI, eval, bench).

-- name: candidates
SELECT * FROM pgrec.candidates(%(user_id)s, %(surface)s, %(n)s, %(as_of)s, %(categories)s)

-- name: candidates_by_key
SELECT * FROM pgrec.candidates_by_key(%(user_key)s, %(surface)s, %(n)s, %(as_of)s, %(categories)s)

-- name: source_rows
-- One source alone (the name is checked against the registry in engine/candidates.py before it gets here).
SELECT s.item_key, s.source, s.score, s.rank
  FROM pgrec.candidate_sources_call(%(source)s, %(user_key)s, %(k)s, %(as_of)s, %(categories)s, %(params)s) s

-- name: source_params
SELECT c.source, c.enabled, c.quota, c.fallback_order, c.params
  FROM pgrec.candidate_sources c
 WHERE c.surface = (CASE WHEN EXISTS (SELECT 1 FROM pgrec.candidate_sources x WHERE x.surface = %(surface)s)
                         THEN %(surface)s ELSE 'default' END)
 ORDER BY c.source

-- name: user_key
SELECT u.user_key FROM pgrec.users u WHERE u.user_id = %(user_id)s

-- name: similar
SELECT s.item_id, s.score, s.cooccurrence_score, s.embedding_score FROM pgrec.similar_items(%(item_id)s, %(k)s) s

-- name: trending
SELECT t.item_id, t.score FROM pgrec.trending_items(%(segment)s, %(k)s, %(as_of)s) t

-- name: user_vector
SELECT pgrec.user_vector(%(user_key)s, %(as_of)s)

-- name: bare_probe
-- The reference for the benchmark: a plain HNSW top-k on the same table, no joins, no filters.
SELECT e.item_key FROM pgrec.item_embeddings e
 ORDER BY e.embedding OPERATOR(public.<=>) %(vector)s::public.vector
 LIMIT %(k)s

-- ---------------------------------------------------------------- co-occurrence build

-- name: cooc_last_build
SELECT b.build_id, b.as_of, b.params FROM pgrec.cooccurrence_builds b
 WHERE b.finished_at IS NOT NULL ORDER BY b.build_id DESC LIMIT 1

-- name: cooc_config
SELECT c.key, (c.value #>> '{}')::float8 FROM pgrec.config c
 WHERE c.key IN ('cooccurrence_window_hours', 'cooccurrence_max_gap', 'cooccurrence_top_n', 'cooccurrence_min_count')

-- name: cooc_start_build
INSERT INTO pgrec.cooccurrence_builds (mode, as_of, params) VALUES (%(mode)s, %(as_of)s, %(params)s)
RETURNING build_id

-- name: cooc_finish_build
UPDATE pgrec.cooccurrence_builds
   SET finished_at = clock_timestamp(),
       pairs = (SELECT count(*) FROM pgrec.cooccurrence_pairs),
       items = (SELECT count(DISTINCT n.item_key) FROM pgrec.item_neighbors n)
 WHERE build_id = %(build_id)s
RETURNING pairs, items

-- name: cooc_reset
TRUNCATE pgrec.cooccurrence_pairs, pgrec.cooccurrence_items, pgrec.item_neighbors

-- name: cooc_drop_temp
-- the temporary tables of an earlier build in the same transaction (an evaluation builds again and again in one
-- transaction that it rolls back; ON COMMIT DROP only drops them at its end)
DROP TABLE IF EXISTS pg_temp.cooc_ev, pg_temp.cooc_touched, pg_temp.cooc_new

-- name: cooc_stage
-- Each user's first positive event per item before as_of, numbered in time order. Incremental builds stage
-- only the users with a positive event in [since, as_of).
CREATE TEMP TABLE cooc_ev ON COMMIT DROP AS
SELECT f.user_key, f.item_key, f.t,
       row_number() OVER (PARTITION BY f.user_key ORDER BY f.t, f.item_key) AS rn
  FROM (SELECT e.user_key, e.item_key, min(e.occurred_at) AS t
          FROM pgrec.events e
         WHERE e.polarity = 1 AND e.occurred_at < %(as_of)s
           AND (%(since)s::timestamptz IS NULL OR e.user_key IN (
                SELECT e2.user_key FROM pgrec.events e2
                 WHERE e2.polarity = 1 AND e2.occurred_at >= %(since)s::timestamptz AND e2.occurred_at < %(as_of)s))
         GROUP BY e.user_key, e.item_key) f

-- name: cooc_stage_index
CREATE INDEX ON cooc_ev (user_key, rn)

-- name: cooc_touched
CREATE TEMP TABLE cooc_touched (item_key bigint PRIMARY KEY) ON COMMIT DROP

-- name: cooc_users
SELECT DISTINCT c.user_key FROM cooc_ev c ORDER BY 1

-- name: cooc_items
-- Items whose user count changes are touched: their lists' scores divide by it.
WITH up AS (
    INSERT INTO pgrec.cooccurrence_items AS ci (item_key, users)
    SELECT c.item_key, count(*) FROM cooc_ev c
     WHERE %(since)s::timestamptz IS NULL OR c.t >= %(since)s::timestamptz
     GROUP BY c.item_key
    ON CONFLICT (item_key) DO UPDATE SET users = ci.users + excluded.users
    RETURNING ci.item_key
)
INSERT INTO cooc_touched (item_key) SELECT up.item_key FROM up ON CONFLICT DO NOTHING

-- name: cooc_touch_partners
-- An incremental build: every item paired with one whose user count changed is scored again too (the score of
-- (a, b) divides by users(b)); without this, lists of untouched items kept old scores and an incremental build
-- differed from a full rebuild of the same events. Pairs are stored both ways, so b's pairs name them.
INSERT INTO cooc_touched (item_key)
SELECT DISTINCT p.item_b FROM pgrec.cooccurrence_pairs p
 WHERE p.item_a IN (SELECT t.item_key FROM cooc_touched t)
ON CONFLICT DO NOTHING

-- name: cooc_new
-- Each batch's pairs are counted here (no index, no WAL) and merged into the pair table once at the end:
-- upserting batch after batch into the indexed pair table made every batch slower than the last (a full build
-- over 10M events had not finished after 33 minutes).
CREATE TEMP TABLE cooc_new (item_a bigint, item_b bigint, count bigint) ON COMMIT DROP

-- name: cooc_pairs
-- Pairs of a user's positive items at most max_gap events and window apart, counted in both directions.
-- Incremental: only pairs whose later event is new (>= since).
INSERT INTO cooc_new (item_a, item_b, count)
SELECT x.a, x.b, count(*)
  FROM (SELECT a.item_key AS a, b.item_key AS b
          FROM cooc_ev a
          JOIN cooc_ev b ON b.user_key = a.user_key AND b.rn > a.rn AND b.rn <= a.rn + %(gap)s
                        AND b.t - a.t <= %(window)s
         WHERE a.user_key >= %(lo)s AND a.user_key <= %(hi)s
           AND (%(since)s::timestamptz IS NULL OR b.t >= %(since)s::timestamptz)) y
 CROSS JOIN LATERAL (VALUES (y.a, y.b), (y.b, y.a)) x(a, b)
 GROUP BY x.a, x.b

-- name: cooc_merge
-- The batches' counts summed per pair and added to the pair table, in key order (an incremental build).
WITH ins AS (
    INSERT INTO pgrec.cooccurrence_pairs AS p (item_a, item_b, count)
    SELECT n.item_a, n.item_b, sum(n.count) FROM cooc_new n GROUP BY n.item_a, n.item_b ORDER BY n.item_a, n.item_b
    ON CONFLICT (item_a, item_b) DO UPDATE SET count = p.count + excluded.count
    RETURNING p.item_a
)
INSERT INTO cooc_touched (item_key) SELECT DISTINCT ins.item_a FROM ins ON CONFLICT DO NOTHING

-- name: cooc_merge_full
-- cooc_merge into the truncated table of a full build: no conflict can happen, and without the ON CONFLICT
-- check the insert is faster (78 s instead of 109 s for 21M pairs). Only pairs seen min_count times are kept:
-- the serving bench's 2M events make 21.4M pairs, 1.6M of them seen twice or more, and the rest (1.6 GB of the
-- 1.7 GB table) never reach a neighbour list; at 10M events the full table outgrew the disk.
WITH ins AS (
    INSERT INTO pgrec.cooccurrence_pairs (item_a, item_b, count)
    SELECT n.item_a, n.item_b, sum(n.count) FROM cooc_new n GROUP BY n.item_a, n.item_b
    HAVING sum(n.count) >= %(min_count)s
     ORDER BY n.item_a, n.item_b
    RETURNING item_a
)
INSERT INTO cooc_touched (item_key) SELECT DISTINCT ins.item_a FROM ins ON CONFLICT DO NOTHING

-- name: cooc_clear_neighbors
DELETE FROM pgrec.item_neighbors n WHERE n.item_key IN (SELECT t.item_key FROM cooc_touched t)

-- name: cooc_neighbors
-- Top-N per item by cosine of the co-occurrence counts: count(a, b) / sqrt(users(a) * users(b)).
INSERT INTO pgrec.item_neighbors (item_key, rank, neighbor_key, score)
SELECT r.item_a, r.rk, r.item_b, r.score
  FROM (SELECT p.item_a, p.item_b, p.count / sqrt(ia.users * ib.users) AS score,
               row_number() OVER (PARTITION BY p.item_a
                                  ORDER BY p.count / sqrt(ia.users * ib.users) DESC, p.item_b) AS rk
          FROM pgrec.cooccurrence_pairs p
          JOIN pgrec.cooccurrence_items ia ON ia.item_key = p.item_a
          JOIN pgrec.cooccurrence_items ib ON ib.item_key = p.item_b
         WHERE p.count >= %(min_count)s
           AND p.item_a IN (SELECT t.item_key FROM cooc_touched t)) r
 WHERE r.rk <= %(top_n)s

-- name: latest_event
SELECT max(e.occurred_at) FROM pgrec.events e

-- ---------------------------------------------------------------- stored item-embedding neighbours

-- name: emb_neighbor_items
-- Items whose stored neighbour list is missing or stale (all items with a vector if not stale_only).
SELECT s.item_key FROM pgrec.embedding_neighbor_status s
 WHERE NOT %(stale_only)s OR NOT s.current
 ORDER BY s.item_key

-- name: emb_neighbor_refresh
SELECT pgrec.refresh_embedding_neighbors(%(item_keys)s::bigint[], %(k)s::int)
