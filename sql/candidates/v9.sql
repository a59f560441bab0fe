-- Stage 1, candidates v9: pgrec.ann_search (v5's) and pgrec.candidates_by_key (v8's) change, one change each, both
-- for users with many seen items; reverting restores v5's and v8's. Same answers.
-- ann_search: the early read (stop at the quota of unseen items) tested each row against the user's seen items
-- in plpgsql with `<> ALL (p_seen)`, a scan of the whole array per row. The same test now runs in the statement,
-- over the index read's rows, where PostgreSQL hashes the (constant, custom-planned) array once.
-- candidates_by_key: the merge flagged seen rows by a LEFT JOIN with unnest(seen); it probes a hashed subplan
-- instead (the function's generic plan estimates the array at 10 rows, so the hash is always chosen, and a
-- hashed subplan does not depend on the join order the planner picks for the whole merge).
-- Measured on the 100k-item benchmark's heaviest user (34,778 events, 10,688 distinct seen items): ann with its
-- seen list 18.5-20.4 -> 11.3-11.6 ms, candidates 27-30 -> 21-21.5 ms (and 56-57 -> 23-24 ms earlier the same
-- day, while v8's merge was planned as a nested loop over the array: the plan follows the statistics); typical
-- users unchanged.

CREATE OR REPLACE FUNCTION pgrec.ann_search(
    p_vector public.vector, p_k int, p_as_of timestamptz DEFAULT NULL, p_categories text[] DEFAULT NULL,
    p_params jsonb DEFAULT '{}', p_source text DEFAULT 'ann', p_unseen int DEFAULT NULL, p_seen bigint[] DEFAULT NULL)
RETURNS TABLE (item_key bigint, source text, score float8, rank int)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    t          timestamptz := coalesce(p_as_of, now());
    exact_max  int := coalesce((p_params ->> 'exact_max_rows')::int, 3000);
    ef         int := coalesce((p_params ->> 'ef_search')::int, 100);
    mode       text := coalesce(p_params ->> 'iterative_scan', 'relaxed_order');
    max_tuples bigint := coalesce((p_params ->> 'max_scan_tuples')::bigint, 20000);
    matching   bigint;
    total      float8;
    old_ef     text;
    old_mode   text;
    old_tuples text;
    early      boolean := p_unseen IS NOT NULL AND p_unseen < p_k;
    r_key      bigint;
    r_d        float8;
    r_seen     boolean;
    got        int := 0;
    lim        int;
    want       int;
    keys       bigint[] := '{}';
    dists      float8[] := '{}';
BEGIN
    IF p_vector IS NULL OR p_k IS NULL OR p_k <= 0 THEN
        RETURN;
    END IF;
    IF mode NOT IN ('off', 'strict_order', 'relaxed_order') THEN
        RAISE EXCEPTION 'pgrec.ann_search: iterative_scan "%" is not off, strict_order or relaxed_order', mode
            USING ERRCODE = '22023';
    END IF;
    IF p_categories IS NOT NULL THEN
        -- Is the filter selective? Count matching rows up to a cap (GIN index): few -> exact scan of just those.
        SELECT count(*) INTO matching FROM (
            SELECT 1 FROM pgrec.items i
             WHERE i.categories && p_categories AND i.available AND i.created_at < t
             LIMIT 10 * exact_max + 1) x;
        IF matching <= exact_max THEN
            -- "+ 0" keeps the planner off the HNSW index: this is an exact distance sort of the matching rows
            RETURN QUERY
            SELECT x.item_key, p_source, 1 - x.d, (row_number() OVER (ORDER BY x.d, x.item_key))::int
              FROM (SELECT e.item_key, e.embedding OPERATOR(public.<=>) p_vector AS d
                      FROM pgrec.items i JOIN pgrec.item_embeddings e ON e.item_key = i.item_key
                     WHERE i.categories && p_categories AND i.available AND i.created_at < t
                     ORDER BY (e.embedding OPERATOR(public.<=>) p_vector) + 0, e.item_key
                     LIMIT p_k) x;
            RETURN;
        END IF;
        -- selective enough to starve the index scan: let it visit about 2 * k / selectivity tuples
        SELECT greatest(c.reltuples, 1) INTO total FROM pg_catalog.pg_class c
         WHERE c.oid = 'pgrec.item_embeddings'::regclass;
        IF matching <= 10 * exact_max THEN
            max_tuples := greatest(max_tuples, least(ceil(2.0 * p_k * total / matching), 10000000)::bigint);
        END IF;
    END IF;
    PERFORM 1 FROM pgrec.item_embeddings LIMIT 0;  -- the vector library is loaded, so hnsw.* GUCs exist
    old_ef := current_setting('hnsw.ef_search', true);
    old_mode := current_setting('hnsw.iterative_scan', true);
    old_tuples := current_setting('hnsw.max_scan_tuples', true);
    -- ef_search must be >= the LIMIT (else the index returns at most ef_search rows); its maximum is 1000,
    -- beyond which the iterative scan supplies the rest
    PERFORM set_config('hnsw.iterative_scan', mode, true);
    PERFORM set_config('hnsw.max_scan_tuples', max_tuples::text, true);
    -- Read the index order until `want` rows have come: k rows, or (early) p_unseen rows outside p_seen. The
    -- scan's cost follows its LIMIT (pgvector searches max(ef_search, LIMIT) deep even when fewer rows are read),
    -- so an early read is first limited to the quota plus a margin for seen items; only when seen items take
    -- more than that margin is the scan run again as far as k.
    want := CASE WHEN early THEN p_unseen ELSE p_k END;
    lim := CASE WHEN early THEN least(p_k, p_unseen + greatest(10, p_unseen / 4)) ELSE p_k END;
    LOOP
        PERFORM set_config('hnsw.ef_search', least(greatest(ef, lim), 1000)::text, true);
        keys := '{}';
        dists := '{}';
        got := 0;
        -- seen: v5's test, `<> ALL (p_seen)`, now in the statement, outside the index read (a subquery, so it
        -- cannot change the scan's plan): the function plans each call with its values (force_custom_plan), and
        -- PostgreSQL hashes a constant array for `<> ALL` once per statement whatever its length, where v5
        -- compared every row in plpgsql with the whole array (a user with 10,688 seen items: the ann read 3x
        -- dearer than without them). Seen = not provably unseen, as in v5 (a NULL element makes every row seen).
        FOR r_key, r_d, r_seen IN
            SELECT q.item_key, q.d, early AND p_seen IS NOT NULL AND (q.item_key <> ALL (p_seen)) IS NOT TRUE
              FROM (SELECT e.item_key, e.embedding OPERATOR(public.<=>) p_vector AS d
                      FROM pgrec.item_embeddings e JOIN pgrec.items i ON i.item_key = e.item_key
                     WHERE i.available AND i.created_at < t
                       AND (p_categories IS NULL OR i.categories && p_categories)
                     ORDER BY e.embedding OPERATOR(public.<=>) p_vector
                     LIMIT lim) q
        LOOP
            keys := keys || r_key;
            dists := dists || r_d;
            IF NOT r_seen THEN
                got := got + 1;
                EXIT WHEN got >= want;
            END IF;
        END LOOP;
        EXIT WHEN got >= want OR cardinality(keys) < lim OR lim >= p_k;
        lim := p_k;
    END LOOP;
    -- relaxed_order may return rows slightly out of order: rank them by distance
    RETURN QUERY
    SELECT x.k, p_source, 1 - x.d, (row_number() OVER (ORDER BY x.d, x.k))::int
      FROM unnest(keys, dists) AS x(k, d);
    IF old_ef IS NOT NULL THEN PERFORM set_config('hnsw.ef_search', old_ef, true); END IF;
    IF old_mode IS NOT NULL THEN PERFORM set_config('hnsw.iterative_scan', old_mode, true); END IF;
    IF old_tuples IS NOT NULL THEN PERFORM set_config('hnsw.max_scan_tuples', old_tuples, true); END IF;
END
$$;
COMMENT ON FUNCTION pgrec.ann_search(public.vector, int, timestamptz, text[], jsonb, text, int, bigint[]) IS
    'Top-k available items (created before as_of, optionally in categories) by cosine similarity to a vector. '
    'HNSW with per-call ef_search / iterative_scan / max_scan_tuples (params), or an exact scan when the '
    'category filter matches at most params.exact_max_rows items. Returns min(k, matching) rows; with unseen < k '
    'the HNSW scan stops as soon as it has returned `unseen` items that are not in `seen` (the rows before them, '
    'seen ones included, are returned, at most k).';

ALTER FUNCTION pgrec.ann_search(public.vector, int, timestamptz, text[], jsonb, text, int, bigint[])
    SET plan_cache_mode = force_custom_plan;

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
                SELECT fl.item_key, fl.s, fl.score, fl.rank, fl.seen,
                       row_number() OVER (PARTITION BY fl.s, fl.seen ORDER BY fl.rank) AS urank
                  FROM (
                  -- seen: a hash of the seen items built once (a hashed subplan; header)
                  SELECT raw.item_key, raw.s, raw.score, raw.rank,
                         coalesce(raw.item_key IN (SELECT sn.k FROM unnest(seen) AS sn(k)), false) AS seen
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
                  ) fl
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
