-- Stage 2 features: the one definition the ranker trains and serves on.
-- Every feature column is float8 and named f_*; Python reads the list (names, order) from the result columns.
-- Point in time: everything is computed from events strictly before as_of. Item counters come from
-- pgrec.item_daily_counts, whole UTC days before the day of as_of (so they lag at most one day, and never leak).

-- ---------------------------------------------------------------- counters kept by triggers on pgrec.events

CREATE OR REPLACE FUNCTION pgrec.item_daily_counts_insert()
RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    prop text := (SELECT c.value #>> '{}' FROM pgrec.config c WHERE c.key = 'segment_property');
BEGIN
    -- rows in key order so concurrent statements lock counters in the same order (no deadlocks)
    INSERT INTO pgrec.item_daily_counts AS d (item_key, day, segment, n_events, n_positive, n_negative, w_positive)
    SELECT n.item_key, (n.occurred_at AT TIME ZONE 'UTC')::date, coalesce(u.properties ->> prop, ''),
           count(*), count(*) FILTER (WHERE n.polarity = 1), count(*) FILTER (WHERE n.polarity = -1),
           coalesce(sum(n.weight) FILTER (WHERE n.polarity = 1), 0)
      FROM new_rows n LEFT JOIN pgrec.users u ON u.user_key = n.user_key
     GROUP BY 1, 2, 3
     ORDER BY 1, 2, 3
    ON CONFLICT (item_key, day, segment) DO UPDATE SET
        n_events = d.n_events + excluded.n_events,
        n_positive = d.n_positive + excluded.n_positive,
        n_negative = d.n_negative + excluded.n_negative,
        w_positive = d.w_positive + excluded.w_positive;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION pgrec.item_daily_counts_insert() IS
    'Trigger: adds the inserted events of one statement to pgrec.item_daily_counts.';

CREATE OR REPLACE FUNCTION pgrec.item_daily_counts_delete()
RETURNS trigger
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    prop text := (SELECT c.value #>> '{}' FROM pgrec.config c WHERE c.key = 'segment_property');
BEGIN
    -- the segment is looked up again: a user whose segment changed since is subtracted from the new one
    -- (counts stay right per item and day, the split by segment drifts by those few rows)
    UPDATE pgrec.item_daily_counts d SET
        n_events = greatest(d.n_events - o.n_events, 0),
        n_positive = greatest(d.n_positive - o.n_positive, 0),
        n_negative = greatest(d.n_negative - o.n_negative, 0),
        w_positive = greatest(d.w_positive - o.w_positive, 0)
      FROM (SELECT r.item_key, (r.occurred_at AT TIME ZONE 'UTC')::date AS day,
                   coalesce(u.properties ->> prop, '') AS segment, count(*) AS n_events,
                   count(*) FILTER (WHERE r.polarity = 1) AS n_positive,
                   count(*) FILTER (WHERE r.polarity = -1) AS n_negative,
                   coalesce(sum(r.weight) FILTER (WHERE r.polarity = 1), 0) AS w_positive
              FROM old_rows r LEFT JOIN pgrec.users u ON u.user_key = r.user_key
             GROUP BY 1, 2, 3) o
     WHERE d.item_key = o.item_key AND d.day = o.day AND d.segment = o.segment;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION pgrec.item_daily_counts_delete() IS
    'Trigger: subtracts the deleted events of one statement from pgrec.item_daily_counts.';

CREATE OR REPLACE TRIGGER events_item_daily_counts_insert
    AFTER INSERT ON pgrec.events REFERENCING NEW TABLE AS new_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgrec.item_daily_counts_insert();
CREATE OR REPLACE TRIGGER events_item_daily_counts_delete
    AFTER DELETE ON pgrec.events REFERENCING OLD TABLE AS old_rows
    FOR EACH STATEMENT EXECUTE FUNCTION pgrec.item_daily_counts_delete();

-- ---------------------------------------------------------------- features of candidate rows

-- The row every feature function returns: the candidate columns of pgrec.candidates, then the features.
-- Adding a feature = a new vN of this file with the column here and its expression below.
DROP TYPE IF EXISTS pgrec.candidate_feature_row CASCADE;
CREATE TYPE pgrec.candidate_feature_row AS (
    item_key bigint, item_id text, sources text[],
    ann_score float8, ann_rank int, history_score float8, history_rank int,
    trending_score float8, trending_rank int, fresh_score float8, fresh_rank int,
    popular_score float8, popular_rank int,
    f_ann_score float8, f_ann_rank float8, f_history_score float8, f_history_rank float8,
    f_trending_score float8, f_trending_rank float8, f_fresh_score float8, f_fresh_rank float8,
    f_popular_score float8, f_popular_rank float8, f_n_sources float8,
    f_pop_1d float8, f_pop_7d float8, f_pop_30d float8, f_pop_365d float8,
    f_pos_rate float8, f_neg_rate float8, f_item_age_days float8,
    f_trend_global float8, f_trend_segment float8, f_segment_share float8,
    f_user_events float8, f_user_events_30d float8, f_user_pos_rate float8, f_user_days_since_last float8,
    f_cat_affinity float8, f_cat_days_since float8,
    f_user_item_dot float8, f_recent_sim_max float8, f_recent_sim_mean float8,
    f_cooc_sum float8, f_cooc_max float8);
COMMENT ON TYPE pgrec.candidate_feature_row IS
    'Stage 2 rows: candidate columns (as pgrec.candidates) + one float8 column f_* per ranker feature.';

CREATE OR REPLACE FUNCTION pgrec.candidate_features_by_key(
    p_user_key  bigint,
    p_surface   text DEFAULT 'default',
    p_n         int DEFAULT 500,
    p_as_of     timestamptz DEFAULT NULL,
    p_item_keys bigint[] DEFAULT NULL)
RETURNS SETOF pgrec.candidate_feature_row
LANGUAGE plpgsql VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    t      timestamptz := coalesce(p_as_of, now());
    d      date := (coalesce(p_as_of, now()) AT TIME ZONE 'UTC')::date;
    seg    text;
    uvec   public.vector;
    lim    int := coalesce((SELECT c.value::text::int FROM pgrec.config c WHERE c.key = 'feature_user_history_limit'), 500);
    hl     float8 := coalesce((SELECT c.value::text::float8 FROM pgrec.config c
                                WHERE c.key = 'feature_trending_half_life_days'), 3);
    nrec   int := coalesce((SELECT c.value::text::int FROM pgrec.config c WHERE c.key = 'feature_recent_items'), 10);
BEGIN
    IF p_n IS NULL OR p_n < 1 THEN
        RAISE EXCEPTION 'pgrec.candidate_features: n must be >= 1, got %', p_n USING ERRCODE = '22023';
    END IF;
    IF p_user_key IS NOT NULL THEN
        SELECT u.properties ->> (SELECT c.value #>> '{}' FROM pgrec.config c WHERE c.key = 'segment_property')
          INTO seg FROM pgrec.users u WHERE u.user_key = p_user_key;
        uvec := pgrec.user_vector(p_user_key, t);
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
    ), ucat AS (
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
        SELECT dc.item_key,
               sum(dc.n_events) FILTER (WHERE dc.day >= d - 1)::float8 AS pop_1d,
               sum(dc.n_events) FILTER (WHERE dc.day >= d - 7)::float8 AS pop_7d,
               sum(dc.n_events) FILTER (WHERE dc.day >= d - 30)::float8 AS pop_30d,
               sum(dc.n_events)::float8 AS pop_365d,
               sum(dc.n_positive)::float8 AS pos, sum(dc.n_negative)::float8 AS neg,
               sum(dc.w_positive * power(2::float8, -((d - dc.day) - 0.5) / hl))
                   FILTER (WHERE dc.day >= d - 60) AS trend_all,
               sum(dc.w_positive * power(2::float8, -((d - dc.day) - 0.5) / hl))
                   FILTER (WHERE dc.day >= d - 60 AND dc.segment = seg) AS trend_seg
          FROM rws r JOIN pgrec.item_daily_counts dc
            ON dc.item_key = r.item_key AND dc.day >= d - 365 AND dc.day < d
         GROUP BY dc.item_key
    ), icat AS (
        SELECT r.item_key, sum(uc.npos) / nullif((SELECT u.npos FROM utot u), 0) AS aff,
               extract(epoch FROM t - max(uc.last_at))::float8 / 86400 AS since
          FROM rws r CROSS JOIN LATERAL unnest(r.categories) AS x(cat)
          JOIN ucat uc ON uc.cat = x.cat
         GROUP BY r.item_key
    ), isim AS (
        SELECT r.item_key,
               -(uvec OPERATOR(public.<#>) ie.embedding)::float8 AS dot,
               (SELECT max(1 - (ie.embedding OPERATOR(public.<=>) rc.embedding)) FROM recent rc
                 WHERE rc.embedding IS NOT NULL AND rc.item_key <> r.item_key)::float8 AS sim_max,
               (SELECT avg(1 - (ie.embedding OPERATOR(public.<=>) rc.embedding)) FROM recent rc
                 WHERE rc.embedding IS NOT NULL AND rc.item_key <> r.item_key)::float8 AS sim_mean
          FROM rws r JOIN pgrec.item_embeddings ie ON ie.item_key = r.item_key
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
           CASE WHEN u.n > 0 THEN coalesce(ic.aff, 0) END, ic.since,
           s.dot, s.sim_max, s.sim_mean,
           CASE WHEN EXISTS (SELECT 1 FROM recent) THEN coalesce(co.s, 0) END, co.m
      FROM rws r
     CROSS JOIN utot u
      LEFT JOIN ipop p ON p.item_key = r.item_key
      LEFT JOIN icat ic ON ic.item_key = r.item_key
      LEFT JOIN isim s ON s.item_key = r.item_key
      LEFT JOIN icooc co ON co.item_key = r.item_key;
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
