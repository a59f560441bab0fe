-- Stage 1, candidates v8: only pgrec.candidates_by_key changes (v6's, one change); reverting restores v6's.
-- A fallback source fetches n plus as many rows as the user has seen items, up to 4n (or candidates_overfetch_max
-- if larger), not n plus that cap alone: a user with more seen items than the cap among the fallback's rows got
-- fewer than n unseen candidates although the catalog had them (592 of 600 for a user with 257 seen items; found
-- by a review). Beyond 4n seen items among the fallback's top rows the list can still fall short.

CREATE OR REPLACE FUNCTION pgrec.candidates_by_key(
    user_key bigint, surface text DEFAULT 'default', n int DEFAULT 500, as_of timestamptz DEFAULT NULL,
    categories text[] DEFAULT NULL)
RETURNS TABLE (item_key bigint, item_id text, sources text[],
               ann_score float8, ann_rank int, history_score float8, history_rank int,
               trending_score float8, trending_rank int, fresh_score float8, fresh_rank int,
               popular_score float8, popular_rank int)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET max_parallel_workers_per_gather = 0
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    uk       bigint := $1;
    surf     text := coalesce($2, 'default');
    want     int := $3;
    asof     timestamptz := $4;
    cats     text[] := $5;
    t        timestamptz := coalesce($4, now());
    cfg_surf text;
    seen     bigint[] := '{}';
    extra    int := 0;
    r        record;
    si       int;
    -- per source code (1 ann, 2 history, 3 trending, 4 fresh, 5 popular; the order of the sources column):
    -- its quota of unseen items and its fill weight (fallback order, 10^6 for a non-fallback source, times 10^6)
    quota_k  int[] := '{NULL,NULL,NULL,NULL,NULL}';
    fill_w   bigint[] := '{NULL,NULL,NULL,NULL,NULL}';
    fetch_k  jsonb := '{}';
    params   jsonb := '{}';
BEGIN
    IF want IS NULL OR want < 1 OR want > 10000 THEN
        RAISE EXCEPTION 'pgrec.candidates: n must be between 1 and 10000, got %', want USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgrec.surfaces s WHERE s.surface = surf) THEN
        RAISE EXCEPTION 'pgrec.candidates: unknown surface "%"', surf
            USING ERRCODE = '22023', HINT = 'the known surfaces are the rows of pgrec.surfaces';
    END IF;
    cfg_surf := CASE WHEN EXISTS (SELECT 1 FROM pgrec.candidate_sources c WHERE c.surface = surf)
                     THEN surf ELSE 'default' END;
    -- Over-fetch: n counts unseen items. Each source fetches its share plus as many extra rows as the user
    -- has seen items (capped by config candidates_overfetch_max), so excluding seen items later leaves n. The
    -- ann source reads its extra rows only as far as seen items use them up (its index scan stops there). A
    -- fallback source, which must be able to fill the whole list, fetches n plus as many rows as the user has
    -- seen items, up to 4n (or the cap, if larger): with only the cap, a user with more seen items than it got
    -- fewer than n unseen candidates; every seen item (20,000 for one user) made such a request 2.7x dearer and
    -- grew the shared popular list in pgrec.source_cache that every request reads.
    IF uk IS NOT NULL THEN
        SELECT coalesce(array_agg(DISTINCT e.item_key), '{}') INTO seen
          FROM pgrec.events e WHERE e.user_key = uk AND e.occurred_at < t;
        extra := least(cardinality(seen), pgrec.candidates_setting('candidates_overfetch_max', 100)::int);
    END IF;
    FOR r IN SELECT c.source, c.quota, c.fallback_order, c.params
               FROM pgrec.candidate_sources c WHERE c.surface = cfg_surf AND c.enabled LOOP
        si := array_position(ARRAY['ann', 'history', 'trending', 'fresh', 'popular'], r.source);
        -- quota is real: through numeric, 0.1 * 40 is 4 (as real it is 4.0000000596, whose ceil is 5)
        quota_k[si] := ceil(r.quota::numeric * want)::int;
        fill_w[si] := coalesce(r.fallback_order, 1000000)::bigint * 1000000;
        -- a fallback source may have to fill the whole list
        fetch_k := fetch_k || jsonb_build_object(r.source,
            CASE WHEN r.fallback_order IS NOT NULL THEN want + greatest(extra, least(cardinality(seen), 4 * want))
                 ELSE ceil(r.quota::numeric * want)::int + extra END);
        params := params || jsonb_build_object(r.source, r.params);
    END LOOP;
    -- One pass over the sources' rows (a few hundred). Every source returns distinct items ranked 1..k (none
    -- when off: its k is NULL), so rows carry a source code (1..5, the order of the sources column) rather than
    -- its name, and an item has at most one row per source. Every row knows its item's seen flag and its rank
    -- among its source's unseen rows (urank); per item, whether it is in a source's quota of unseen items (prim),
    -- its fill position (fallback order, then urank) and whether it is a seen item within a source's share
    -- (+ over-fetch). One more numbering puts the prim items first, then the others by fill position: an unseen
    -- item numbered within n fills the list short of n (overlaps, a cold user). Nested subqueries, not CTEs: a
    -- CTE over these volatile functions would be materialised, one more copy of every row.
    RETURN QUERY
    SELECT p.item_key, i.item_id,
           array_remove(ARRAY[CASE WHEN p.mask & 2 <> 0 THEN 'ann' END, CASE WHEN p.mask & 4 <> 0 THEN 'history' END,
                              CASE WHEN p.mask & 8 <> 0 THEN 'trending' END, CASE WHEN p.mask & 16 <> 0 THEN 'fresh' END,
                              CASE WHEN p.mask & 32 <> 0 THEN 'popular' END], NULL),
           p.ann_score, p.ann_rank, p.history_score, p.history_rank,
           p.trending_score, p.trending_rank, p.fresh_score, p.fresh_rank, p.popular_score, p.popular_rank
      FROM (
        SELECT g.*, row_number() OVER (ORDER BY NOT g.prim, g.pos, g.item_key) AS fill_pos
          FROM (
            SELECT m.item_key,
                   bool_or(NOT m.seen AND m.urank <= quota_k[m.s]) AS prim,
                   bool_or(m.seen AND m.rank <= quota_k[m.s] + extra) AS seen_kept,
                   min(fill_w[m.s] + m.urank) FILTER (WHERE NOT m.seen) AS pos,
                   min(m.rank) AS best_rank,
                   bit_or(1 << m.s) AS mask,
                   max(m.score) FILTER (WHERE m.s = 1) AS ann_score, min(m.rank) FILTER (WHERE m.s = 1) AS ann_rank,
                   max(m.score) FILTER (WHERE m.s = 2) AS history_score, min(m.rank) FILTER (WHERE m.s = 2) AS history_rank,
                   max(m.score) FILTER (WHERE m.s = 3) AS trending_score, min(m.rank) FILTER (WHERE m.s = 3) AS trending_rank,
                   max(m.score) FILTER (WHERE m.s = 4) AS fresh_score, min(m.rank) FILTER (WHERE m.s = 4) AS fresh_rank,
                   max(m.score) FILTER (WHERE m.s = 5) AS popular_score, min(m.rank) FILTER (WHERE m.s = 5) AS popular_rank
              FROM (
                SELECT raw.item_key, raw.s, raw.score, raw.rank, (sn.item_key IS NOT NULL) AS seen,
                       row_number() OVER (PARTITION BY raw.s, (sn.item_key IS NOT NULL) ORDER BY raw.rank) AS urank
                  FROM (
                    SELECT x.item_key, 1 AS s, x.score, x.rank
                      FROM pgrec.source_ann(uk, (fetch_k ->> 'ann')::int, asof, cats, coalesce(params -> 'ann', '{}'),
                                         (fetch_k ->> 'ann')::int - extra, seen) x
                    UNION ALL
                    SELECT x.item_key, 2, x.score, x.rank
                      FROM pgrec.source_history(uk, (fetch_k ->> 'history')::int, asof, cats, coalesce(params -> 'history', '{}')) x
                    UNION ALL
                    SELECT x.item_key, 3, x.score, x.rank
                      FROM pgrec.source_trending(uk, (fetch_k ->> 'trending')::int, asof, cats, coalesce(params -> 'trending', '{}')) x
                    UNION ALL
                    SELECT x.item_key, 4, x.score, x.rank
                      FROM pgrec.source_fresh(uk, (fetch_k ->> 'fresh')::int, asof, cats, coalesce(params -> 'fresh', '{}')) x
                    UNION ALL
                    SELECT x.item_key, 5, x.score, x.rank
                      FROM pgrec.source_popular_filled(uk, (fetch_k ->> 'popular')::int, asof, cats, coalesce(params -> 'popular', '{}')) x
                  ) raw
                  LEFT JOIN unnest(seen) AS sn(item_key) ON sn.item_key = raw.item_key
              ) m
             GROUP BY m.item_key
          ) g
      ) p
     CROSS JOIN LATERAL (SELECT it.item_id FROM pgrec.items it WHERE it.item_key = p.item_key) i
     -- seen items a source ranked within its share (+ over-fetch) stay, for the caller's policies to judge
     WHERE p.prim OR p.seen_kept OR (p.pos IS NOT NULL AND p.fill_pos <= want)
     ORDER BY p.best_rank, p.item_key;
END
$$;
COMMENT ON FUNCTION pgrec.candidates_by_key(bigint, text, int, timestamptz, text[]) IS
    'Stage 1 by internal user key (NULL = a cold user): the union of the surface''s candidate sources '
    '(pgrec.candidate_sources; the default rows when the surface has none), one row per item with every source''s '
    'score and rank. n counts items the user has not interacted with before as_of: each source''s quota of those, '
    'then fallbacks in order until n; seen items that sources ranked within their share are returned as well. '
    'as_of NULL = now; only events strictly before as_of are used.';
