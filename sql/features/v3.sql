-- Stage 2 features: the one definition the ranker trains and serves on.
-- Every feature column is float8 and named f_*; Python reads the list (names, order) from the result columns.
-- Point in time: everything is computed from events strictly before as_of. Item counters come from
-- pgrec.item_daily_counts, whole UTC days before the day of as_of (so they lag at most one day, and never leak).
-- v2: those item counters are read from a per-day snapshot (pgrec.item_stats, pgrec.item_segment_trend: one
-- aggregate of the daily counters per UTC day, built by pgrec.refresh_item_stats) instead of aggregating up to
-- 365 daily rows per candidate on every request; when the day's snapshot is missing, the same aggregate runs
-- over the request's candidates only. Item vectors are fetched per candidate (no hash join over the catalog).

-- v3: features from a learned item-item model (pgrec.model_neighbors, model 'ease', built by `pgrec train ease`):
-- f_ease_sum / f_ease_max / f_ease_rank. The feature row type gets their columns here (idempotent: dropped and
-- added again, so re-applying this file is safe); reverting to v2 must drop them (migration 0010's downgrade).

ALTER TYPE pgrec.candidate_feature_row
    DROP ATTRIBUTE IF EXISTS f_ease_sum, DROP ATTRIBUTE IF EXISTS f_ease_max, DROP ATTRIBUTE IF EXISTS f_ease_rank;
ALTER TYPE pgrec.candidate_feature_row
    ADD ATTRIBUTE f_ease_sum float8, ADD ATTRIBUTE f_ease_max float8, ADD ATTRIBUTE f_ease_rank float8;

-- ---------------------------------------------------------------- item counters per day (snapshots)

CREATE OR REPLACE FUNCTION pgrec.item_stats_half_life()
RETURNS float8
LANGUAGE sql STABLE PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce((SELECT c.value::text::float8 FROM pgrec.config c WHERE c.key = 'feature_trending_half_life_days'), 3)
$$;
COMMENT ON FUNCTION pgrec.item_stats_half_life() IS
    'Half-life (days) of the decayed popularity in the trending features (config feature_trending_half_life_days).';

CREATE OR REPLACE FUNCTION pgrec.item_stats_compute(p_day date, p_half_life_days float8, p_item_keys bigint[] DEFAULT NULL)
RETURNS TABLE (item_key bigint, n_1d float8, n_7d float8, n_30d float8, n_365d float8, n_pos float8, n_neg float8,
               trend float8)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT dc.item_key,
           sum(dc.n_events) FILTER (WHERE dc.day >= p_day - 1)::float8,
           sum(dc.n_events) FILTER (WHERE dc.day >= p_day - 7)::float8,
           sum(dc.n_events) FILTER (WHERE dc.day >= p_day - 30)::float8,
           sum(dc.n_events)::float8,
           sum(dc.n_positive)::float8, sum(dc.n_negative)::float8,
           sum(dc.w_positive * power(2::float8, -((p_day - dc.day) - 0.5) / p_half_life_days))
               FILTER (WHERE dc.day >= p_day - 60)
      FROM pgrec.item_daily_counts dc
     WHERE dc.day >= p_day - 365 AND dc.day < p_day
       AND (p_item_keys IS NULL OR dc.item_key = ANY (p_item_keys))
     GROUP BY dc.item_key
$$;
COMMENT ON FUNCTION pgrec.item_stats_compute(date, float8, bigint[]) IS
    'The item counters the ranker sees on UTC day p_day, from pgrec.item_daily_counts of the whole days before it: '
    'events in the last 1/7/30/365 days, positive and negative events (365 days), and the positive weight decayed '
    'with the half-life (60 days). All items with events (item_keys NULL) or just those. The one definition: '
    'snapshots (pgrec.refresh_item_stats) and the no-snapshot path of pgrec.candidate_features_by_key use it.';

CREATE OR REPLACE FUNCTION pgrec.item_segment_trend_compute(
    p_day date, p_half_life_days float8, p_item_keys bigint[] DEFAULT NULL, p_segment text DEFAULT NULL)
RETURNS TABLE (segment text, item_key bigint, trend float8)
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT dc.segment, dc.item_key,
           sum(dc.w_positive * power(2::float8, -((p_day - dc.day) - 0.5) / p_half_life_days))
      FROM pgrec.item_daily_counts dc
     WHERE dc.day >= p_day - 60 AND dc.day < p_day
       AND (p_item_keys IS NULL OR dc.item_key = ANY (p_item_keys))
       AND (p_segment IS NULL OR dc.segment = p_segment)
     GROUP BY dc.segment, dc.item_key
$$;
COMMENT ON FUNCTION pgrec.item_segment_trend_compute(date, float8, bigint[], text) IS
    'Per user segment: the decayed positive weight of pgrec.item_stats_compute counted over that segment''s users '
    'only (the trend feature "in the user''s segment").';

CREATE OR REPLACE FUNCTION pgrec.item_stats_invalidate(p_from date)
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_from IS NULL THEN
        RETURN;
    END IF;
    -- a snapshot of day d counts the days before d: events of day p_from change the snapshots of later days
    IF EXISTS (SELECT 1 FROM pgrec.item_stats_days s WHERE s.day > p_from) THEN
        DELETE FROM pgrec.item_stats_days s WHERE s.day > p_from;
        DELETE FROM pgrec.item_stats s WHERE s.day > p_from;
        DELETE FROM pgrec.item_segment_trend s WHERE s.day > p_from;
    END IF;
END
$$;
COMMENT ON FUNCTION pgrec.item_stats_invalidate(date) IS
    'Drop the item counter snapshots that events of UTC day p_from change (the days after it).';

CREATE OR REPLACE FUNCTION pgrec.refresh_item_stats(day date DEFAULT NULL, only_if_missing boolean DEFAULT false)
RETURNS bigint
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    today date := (now() AT TIME ZONE 'UTC')::date;
    d     date := coalesce(refresh_item_stats.day, (now() AT TIME ZONE 'UTC')::date);
    hl    float8 := pgrec.item_stats_half_life();
    n     bigint;
BEGIN
    IF d > today THEN
        RAISE EXCEPTION 'pgrec.refresh_item_stats: % is in the future (today is % UTC)', d, today
            USING ERRCODE = '22023';
    END IF;
    -- one builder per day at a time; the others wait, then find it built
    PERFORM pg_advisory_xact_lock(1919252069, d - date '2000-01-01');
    IF only_if_missing AND EXISTS (SELECT 1 FROM pgrec.item_stats_days s
                                    WHERE s.day = d AND s.half_life_days = hl) THEN
        RETURN NULL;
    END IF;
    DELETE FROM pgrec.item_stats_days s WHERE s.day = d;
    DELETE FROM pgrec.item_stats s WHERE s.day = d;
    DELETE FROM pgrec.item_segment_trend s WHERE s.day = d;
    INSERT INTO pgrec.item_stats (day, item_key, n_1d, n_7d, n_30d, n_365d, n_pos, n_neg, trend)
    SELECT d, c.item_key, c.n_1d, c.n_7d, c.n_30d, c.n_365d, c.n_pos, c.n_neg, c.trend
      FROM pgrec.item_stats_compute(d, hl) c;
    GET DIAGNOSTICS n = ROW_COUNT;
    INSERT INTO pgrec.item_segment_trend (day, segment, item_key, trend)
    SELECT d, c.segment, c.item_key, c.trend FROM pgrec.item_segment_trend_compute(d, hl) c;
    INSERT INTO pgrec.item_stats_days (day, half_life_days, items, built_at) VALUES (d, hl, n, now());
    IF d = today THEN
        -- keep a week of serving snapshots; older days (training replays) are rebuilt when asked for
        DELETE FROM pgrec.item_stats_days s WHERE s.day < today - 7;
        DELETE FROM pgrec.item_stats s WHERE s.day < today - 7;
        DELETE FROM pgrec.item_segment_trend s WHERE s.day < today - 7;
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION pgrec.refresh_item_stats(date, boolean) IS
    'Build the snapshot of the ranker''s item counters for UTC day `day` (NULL = today) from pgrec.item_daily_counts '
    '(pgrec.item_stats_compute for every item). Serving uses it from then on; run it once a day (pgrec''s service '
    'and Python facade do so on their own; apps that only speak SQL: a daily cron job). Returns the number of '
    'items (NULL when only_if_missing and it exists).';

-- ---------------------------------------------------------------- features of candidate rows

CREATE OR REPLACE FUNCTION pgrec.candidate_features_by_key(
    p_user_key  bigint,
    p_surface   text DEFAULT 'default',
    p_n         int DEFAULT 500,
    p_as_of     timestamptz DEFAULT NULL,
    p_item_keys bigint[] DEFAULT NULL)
RETURNS SETOF pgrec.candidate_feature_row
LANGUAGE plpgsql VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
-- plan each statement for this call's values (a cached generic plan ignoring as_of / the user measured 2-3x
-- slower), and no parallel workers: starting them costs more than these small per-user statements
SET plan_cache_mode = force_custom_plan
SET max_parallel_workers_per_gather = 0
AS $$
#variable_conflict use_column
DECLARE
    t      timestamptz := coalesce(p_as_of, now());
    d      date := (coalesce(p_as_of, now()) AT TIME ZONE 'UTC')::date;
    seg    text;
    uvec   public.vector;
    lim    int := coalesce((SELECT c.value::text::int FROM pgrec.config c WHERE c.key = 'feature_user_history_limit'), 500);
    hl     float8 := pgrec.item_stats_half_life();
    snap   boolean;
    nrec   int := coalesce((SELECT c.value::text::int FROM pgrec.config c WHERE c.key = 'feature_recent_items'), 10);
    nease  int := coalesce((SELECT c.value::text::int FROM pgrec.config c WHERE c.key = 'feature_ease_items'), 100);
    has_ease boolean := EXISTS (SELECT 1 FROM pgrec.model_neighbors m WHERE m.model = 'ease');
BEGIN
    IF p_n IS NULL OR p_n < 1 THEN
        RAISE EXCEPTION 'pgrec.candidate_features: n must be >= 1, got %', p_n USING ERRCODE = '22023';
    END IF;
    IF p_user_key IS NOT NULL THEN
        SELECT u.properties ->> (SELECT c.value #>> '{}' FROM pgrec.config c WHERE c.key = 'segment_property')
          INTO seg FROM pgrec.users u WHERE u.user_key = p_user_key;
        uvec := pgrec.user_vector(p_user_key, t);
    END IF;
    -- the item counters of day d: the snapshot when built; a past day's is built now (training replays ask for
    -- the same few days again and again); today's is built by pgrec.refresh_item_stats, and until then (or on a
    -- read-only replica) the same aggregate runs over this request's candidates
    snap := EXISTS (SELECT 1 FROM pgrec.item_stats_days s WHERE s.day = d AND s.half_life_days = hl);
    IF NOT snap AND d < (now() AT TIME ZONE 'UTC')::date AND current_setting('transaction_read_only') = 'off' THEN
        PERFORM pgrec.refresh_item_stats(d, true);
        snap := true;
    END IF;
    RETURN QUERY
    WITH cand AS MATERIALIZED (
        SELECT c.* FROM pgrec.candidates_by_key(p_user_key, p_surface, p_n, t) c
    ), base AS (
        SELECT c.item_key, c.item_id, c.sources, c.ann_score, c.ann_rank, c.history_score, c.history_rank,
               c.trending_score, c.trending_rank, c.fresh_score, c.fresh_rank, c.popular_score, c.popular_rank
          FROM cand c WHERE p_item_keys IS NULL
        UNION ALL
        SELECT k.item_key, NULL, coalesce(c.sources, '{}'::text[]), c.ann_score, c.ann_rank, c.history_score,
               c.history_rank, c.trending_score, c.trending_rank, c.fresh_score, c.fresh_rank, c.popular_score,
               c.popular_rank
          FROM (SELECT DISTINCT k.item_key FROM unnest(p_item_keys) AS k(item_key)) k
          LEFT JOIN cand c ON c.item_key = k.item_key
         WHERE p_item_keys IS NOT NULL
    ), rws AS MATERIALIZED (
        -- item attributes by one index lookup per row (a hash join would scan the whole catalog)
        SELECT b.*, it.item_id AS id, it.categories, it.created_at
          FROM base b CROSS JOIN LATERAL (SELECT i.item_id, i.categories, i.created_at FROM pgrec.items i
                                           WHERE i.item_key = b.item_key LIMIT 1) it
    ), hist AS MATERIALIZED (
        SELECT e.item_key, e.occurred_at, e.polarity FROM pgrec.events e
         WHERE e.user_key = p_user_key AND e.occurred_at < t
         ORDER BY e.occurred_at DESC LIMIT lim
    ), utot AS (
        SELECT count(*)::float8 AS n,
               count(*) FILTER (WHERE h.occurred_at >= t - interval '30 days')::float8 AS n30,
               count(*) FILTER (WHERE h.polarity = 1)::float8 AS npos,
               extract(epoch FROM t - max(h.occurred_at))::float8 / 86400 AS since
          FROM hist h
    ), ucat AS MATERIALIZED (
        SELECT x.cat, count(*) FILTER (WHERE h.polarity = 1)::float8 AS npos, max(h.occurred_at) AS last_at
          FROM hist h
         CROSS JOIN LATERAL (SELECT i.categories FROM pgrec.items i WHERE i.item_key = h.item_key LIMIT 1) i
         CROSS JOIN LATERAL unnest(i.categories) AS x(cat)
         GROUP BY x.cat
    ), recent AS MATERIALIZED (
        SELECT r.item_key, ie.embedding
          FROM (SELECT DISTINCT ON (h.item_key) h.item_key, h.occurred_at FROM hist h WHERE h.polarity = 1
                 ORDER BY h.item_key, h.occurred_at DESC) r
          LEFT JOIN pgrec.item_embeddings ie ON ie.item_key = r.item_key
         ORDER BY r.occurred_at DESC LIMIT nrec
    ), ipop AS (
        SELECT r.item_key, st.n_1d AS pop_1d, st.n_7d AS pop_7d, st.n_30d AS pop_30d, st.n_365d AS pop_365d,
               st.n_pos AS pos, st.n_neg AS neg, st.trend AS trend_all,
               (SELECT sg.trend FROM pgrec.item_segment_trend sg
                 WHERE sg.day = d AND sg.segment = seg AND sg.item_key = r.item_key) AS trend_seg
          FROM rws r
         CROSS JOIN LATERAL (SELECT s.* FROM pgrec.item_stats s
                              WHERE s.day = d AND s.item_key = r.item_key LIMIT 1) st
         WHERE snap
        UNION ALL
        SELECT c.item_key, c.n_1d, c.n_7d, c.n_30d, c.n_365d, c.n_pos, c.n_neg, c.trend, sg.trend
          FROM pgrec.item_stats_compute(d, hl, (SELECT array_agg(r.item_key) FROM rws r)) c
          LEFT JOIN pgrec.item_segment_trend_compute(d, hl, (SELECT array_agg(r.item_key) FROM rws r), seg) sg
            ON sg.item_key = c.item_key
         WHERE NOT snap
    ), iper AS (
        -- per candidate, by index lookups and scans of the user's few categories / recent items (no join
        -- over the catalog): category affinity, similarity to the recent items, user-vector dot
        SELECT r.item_key,
               cs.npos / nullif((SELECT u.npos FROM utot u), 0) AS aff,
               extract(epoch FROM t - cs.last_at)::float8 / 86400 AS cat_since,
               -(uvec OPERATOR(public.<#>) ie.embedding)::float8 AS dot,
               rs.sim_max::float8 AS sim_max, rs.sim_mean::float8 AS sim_mean
          FROM rws r
         CROSS JOIN LATERAL (SELECT sum(uc.npos) AS npos, max(uc.last_at) AS last_at
                               FROM unnest(r.categories) AS x(cat) JOIN ucat uc ON uc.cat = x.cat) cs
          LEFT JOIN LATERAL (SELECT e.embedding FROM pgrec.item_embeddings e
                              WHERE e.item_key = r.item_key LIMIT 1) ie ON true
          LEFT JOIN LATERAL (SELECT max(1 - (ie.embedding OPERATOR(public.<=>) rc.embedding)) AS sim_max,
                                    avg(1 - (ie.embedding OPERATOR(public.<=>) rc.embedding)) AS sim_mean
                               FROM recent rc
                              WHERE rc.embedding IS NOT NULL AND rc.item_key <> r.item_key
                                AND ie.embedding IS NOT NULL) rs ON true
    ), eh AS MATERIALIZED (
        -- the user's latest distinct items (any event: EASE is fitted on every interaction), at most nease
        SELECT h.item_key FROM hist h GROUP BY h.item_key ORDER BY max(h.occurred_at) DESC, h.item_key LIMIT nease
    ), iease AS MATERIALIZED (
        -- EASE score of each candidate (and requested item): its weights from the user's items, one index range
        -- scan of pgrec.model_neighbors per history item (top-N lists, so an approximation of x_u B)
        SELECT nb.neighbor_key AS item_key, sum(nb.score)::float8 AS s, max(nb.score)::float8 AS m,
               bool_or(nb.neighbor_key IN (SELECT c.item_key FROM cand c)) AS is_cand
          FROM eh JOIN pgrec.model_neighbors nb ON nb.model = 'ease' AND nb.item_key = eh.item_key
         WHERE has_ease
           AND (nb.neighbor_key IN (SELECT c.item_key FROM cand c) OR nb.neighbor_key IN (SELECT r.item_key FROM rws r))
         GROUP BY nb.neighbor_key
    ), erank AS MATERIALIZED (
        -- rank among the candidates by EASE score (an item that is not a candidate: where it would rank)
        SELECT e.item_key, rank() OVER (ORDER BY e.s DESC)::float8 AS rk FROM iease e WHERE e.is_cand
    ), icooc AS (
        SELECT nb.neighbor_key AS item_key, sum(nb.score)::float8 AS s, max(nb.score)::float8 AS m
          FROM recent rc JOIN pgrec.item_neighbors nb ON nb.item_key = rc.item_key
         WHERE nb.neighbor_key IN (SELECT r.item_key FROM rws r)
         GROUP BY nb.neighbor_key
    )
    SELECT r.item_key, r.id, r.sources, r.ann_score, r.ann_rank, r.history_score, r.history_rank,
           r.trending_score, r.trending_rank, r.fresh_score, r.fresh_rank, r.popular_score, r.popular_rank,
           r.ann_score, r.ann_rank::float8, r.history_score, r.history_rank::float8,
           r.trending_score, r.trending_rank::float8, r.fresh_score, r.fresh_rank::float8,
           r.popular_score, r.popular_rank::float8, cardinality(r.sources)::float8,
           coalesce(p.pop_1d, 0), coalesce(p.pop_7d, 0), coalesce(p.pop_30d, 0), coalesce(p.pop_365d, 0),
           (coalesce(p.pos, 0) + 1) / (coalesce(p.pop_365d, 0) + 2),
           (coalesce(p.neg, 0) + 0.1) / (coalesce(p.pop_365d, 0) + 1),
           extract(epoch FROM t - r.created_at)::float8 / 86400,
           coalesce(p.trend_all, 0), coalesce(p.trend_seg, 0),
           CASE WHEN seg IS NULL THEN NULL ELSE (coalesce(p.trend_seg, 0) + 0.1) / (coalesce(p.trend_all, 0) + 1) END,
           u.n, u.n30, (u.npos + 1) / (u.n + 2), u.since,
           CASE WHEN u.n > 0 THEN coalesce(ic.aff, 0) END, ic.cat_since,
           ic.dot, ic.sim_max, ic.sim_mean,
           CASE WHEN EXISTS (SELECT 1 FROM recent) THEN coalesce(co.s, 0) END, co.m,
           CASE WHEN has_ease AND EXISTS (SELECT 1 FROM eh) THEN coalesce(ea.s, 0) END, ea.m,
           CASE WHEN ea.s IS NULL THEN NULL
                WHEN ea.is_cand THEN er.rk
                ELSE 1 + (SELECT count(*) FROM iease x WHERE x.is_cand AND x.s > ea.s)::float8 END
      FROM rws r
     CROSS JOIN utot u
      LEFT JOIN ipop p ON p.item_key = r.item_key
      LEFT JOIN iper ic ON ic.item_key = r.item_key
      LEFT JOIN icooc co ON co.item_key = r.item_key
      LEFT JOIN iease ea ON ea.item_key = r.item_key
      LEFT JOIN erank er ON er.item_key = r.item_key;
END
$$;
COMMENT ON FUNCTION pgrec.candidate_features_by_key(bigint, text, int, timestamptz, bigint[]) IS
    'Stage 2 features by internal user key (NULL = cold user): the candidate rows of pgrec.candidates_by_key '
    '(or, when item_keys is given, exactly those items with their candidate columns where they were candidates) '
    'plus one float8 column f_* per feature, all as of as_of (events strictly before it; item counters of whole '
    'UTC days before it). Used by training and serving alike.';

CREATE OR REPLACE FUNCTION pgrec.candidate_features(
    user_id text,
    surface text DEFAULT 'default',
    n       int DEFAULT 500,
    as_of   timestamptz DEFAULT NULL)
RETURNS SETOF pgrec.candidate_feature_row
LANGUAGE sql VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT f.* FROM pgrec.candidate_features_by_key(
        (SELECT u.user_key FROM pgrec.users u WHERE u.user_id = candidate_features.user_id),
        surface, n, as_of) f
$$;
COMMENT ON FUNCTION pgrec.candidate_features(text, text, int, timestamptz) IS
    'Stage 2 features for a user id (unknown id = cold user): see pgrec.candidate_features_by_key.';
