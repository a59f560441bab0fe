-- Stage 2 features, v8: pgrec.candidate_features_by_key (v7's) does less per history event, for users with long
-- histories; reverting restores v7's. Same rows and values (the same statements over the same rows, in the same
-- order: tests/test_ranking_features.py::test_v8_features_answer_as_v7).
-- - recent: v7 looked up the embedding of every distinct positive item of the history (up to
--   feature_user_history_limit events) and then kept the feature_recent_items latest; v8 sorts the same rows
--   the same way (DISTINCT ON, then the top-N sort by time, so ties at the cut fall as in v7), keeps those items
--   and looks up only their embeddings, in that order.
-- - ucat (category affinity): v7 looked up each history event's item; v8 counts the events per item first and
--   looks up each distinct item once (the per-category sums of integer counts and max times are the same).
-- Measured on the 100k-item benchmark database (2M events; users with 700 events have 500 history events over
-- about 380 distinct items, 360 of them positive): embedding lookups 360 -> 10 and item lookups 500 -> 380 per
-- request for those users (55-event users: 48 -> 10 and 55 -> 50). Server CPU per call of
-- candidate_features_by_key(user, 'default', 200, NULL), v7 and v8 side by side, alternating, 10 rounds over 10
-- median (55 events), 10 top-1% (680-720 events) and the 5 heaviest (8k-35k events) users, median of the paired
-- differences: 0.15, 0.39 and 0.87 ms less (medians v7 -> v8: 8.87 -> 8.82, 12.41 -> 11.80, 21.23 -> 20.82 ms);
-- 17-22-event and cold users unchanged. Schema 0029 vs 0030 alternated 6 rounds, medians: features 10.15 -> 10.14,
-- 13.73 -> 12.63, 21.74 -> 21.80 ms; pgrec.recommend (log => false) 13.30 -> 13.30, 17.43 -> 16.87, 30.36 ->
-- 31.06 ms (the heaviest users' calls vary by more than the change). Most of a request is elsewhere: stage 1
-- (pgrec.candidates_by_key, about 8 of the top-1% users' 12 ms) and one index lookup per candidate row for its
-- attributes, counters, segment trend and embedding.

CREATE OR REPLACE FUNCTION pgrec.candidate_features_by_key(
    p_user_key  bigint,
    p_surface   text DEFAULT 'default',
    p_n         int DEFAULT 500,
    p_as_of     timestamptz DEFAULT NULL,
    p_item_keys bigint[] DEFAULT NULL)
RETURNS SETOF pgrec.candidate_feature_row
LANGUAGE plpgsql VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
-- one generic plan for the feature statement (v5's setting, see sql/features/v5.sql); no parallel workers
SET plan_cache_mode = force_generic_plan
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
    -- the same few days again and again) when the session's role owns the schema; today's is built by pgrec.refresh_item_stats, and until then (or on a
    -- read-only replica) the same aggregate runs over this request's candidates
    snap := EXISTS (SELECT 1 FROM pgrec.item_stats_days s WHERE s.day = d AND s.half_life_days = hl);
    -- only for the schema owner's sessions (training, evaluation, the service): an app role calling
    -- pgrec.recommend with many past as_of values would otherwise have every one of them stored
    IF NOT snap AND d < (now() AT TIME ZONE 'UTC')::date AND current_setting('transaction_read_only') = 'off'
       AND pg_has_role(session_user, (SELECT n.nspowner FROM pg_namespace n WHERE n.nspname = 'pgrec'), 'MEMBER') THEN
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
        -- v8: one item lookup per distinct history item (v7: per event), its events counted first
        SELECT x.cat, sum(hi.npos)::float8 AS npos, max(hi.last_at) AS last_at
          FROM (SELECT h.item_key, count(*) FILTER (WHERE h.polarity = 1) AS npos, max(h.occurred_at) AS last_at
                  FROM hist h GROUP BY h.item_key) hi
         CROSS JOIN LATERAL (SELECT i.categories FROM pgrec.items i WHERE i.item_key = hi.item_key LIMIT 1) i
         CROSS JOIN LATERAL unnest(i.categories) AS x(cat)
         GROUP BY x.cat
    ), recent AS MATERIALIZED (
        -- v8: the nrec latest distinct positive items first, then their nrec embeddings (v7 looked up the
        -- embedding of every distinct positive item of the history and kept nrec); the same sort of the same
        -- rows picks them, and the embeddings come in its order
        SELECT r.item_key,
               (SELECT ie.embedding FROM pgrec.item_embeddings ie WHERE ie.item_key = r.item_key) AS embedding
          FROM (SELECT r.item_key, r.occurred_at
                  FROM (SELECT DISTINCT ON (h.item_key) h.item_key, h.occurred_at FROM hist h WHERE h.polarity = 1
                         ORDER BY h.item_key, h.occurred_at DESC) r
                 ORDER BY r.occurred_at DESC LIMIT nrec) r
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
          -- a user without a segment has no segment trend (the function's NULL segment means every segment)
          LEFT JOIN (SELECT x.item_key, x.trend
                       FROM pgrec.item_segment_trend_compute(d, hl, (SELECT array_agg(r.item_key) FROM rws r), seg) x
                      WHERE seg IS NOT NULL) sg
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
