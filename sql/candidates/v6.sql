-- Stage 1, candidates v6: the union's fallback never runs dry while the catalog has items, and a user vector
-- survives events far older than the user's latest. Everything else is v4 (sql/candidates/v4.sql) and v5
-- (sql/candidates/v5.sql); reverting restores each function of this file from the latest earlier file that
-- has it (sqlfiles.revert_partial).
--
-- pgrec.user_vector (v4's, one change): an event's weight 2^(-age/half-life) relative to the user's latest
-- positive event is cast to real to scale the item vector; for an event 21 years older (half-life 30 days:
-- 2^-255) the cast raised "value out of range: underflow", so every request of that user failed (Python, SQL
-- and HTTP, the last as a 422) and so did ranker training over them. Such a weight is now 0.
--
-- The popular source lists items by decayed popularity of positive events, so it holds only items someone
-- engaged with. As the fallback that fills a short union it then left a new app (few events), a narrow category
-- or a cold user short of n although the catalog had more items: 16 candidates of n = 20 for a new user of a
-- 30-item catalog with 16 engaged items. In the union the popular rows now continue, when the list is shorter
-- than asked for, with the other available items created before as_of (matching the request's categories),
-- newest first, score 0: their popularity. pgrec.source_popular itself (the single-source popularity list that
-- the evaluation's per-source baselines and pgrec.candidate_sources_call read) is unchanged.

CREATE OR REPLACE FUNCTION pgrec.user_vector(user_key bigint, as_of timestamptz DEFAULT NULL)
RETURNS public.vector
LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    t       timestamptz := coalesce(as_of, now());
    uk      bigint := user_key;
    stored  public.vector;
    based   timestamptz;
    maxn    int := pgrec.candidates_setting('user_vector_max_events', 50)::int;
    half_s  float8 := pgrec.candidates_setting('user_vector_half_life_days', 30) * 86400;
    v       public.vector;
    fv      public.vector;
    nf      int;
BEGIN
    IF uk IS NULL THEN
        RETURN NULL;
    END IF;
    SELECT ue.embedding, ue.based_on INTO stored, based FROM pgrec.user_embeddings ue WHERE ue.user_key = uk;
    IF stored IS NOT NULL AND based IS NOT NULL AND t >= based AND NOT EXISTS (
        SELECT 1 FROM pgrec.events e
         WHERE e.user_key = uk AND e.polarity = 1 AND e.occurred_at >= based AND e.occurred_at < t) THEN
        RETURN stored;
    END IF;
    WITH ev AS (
        SELECT e.item_key, e.weight, e.occurred_at
          FROM pgrec.events e
         WHERE e.user_key = uk AND e.polarity = 1 AND e.occurred_at < t
         ORDER BY e.occurred_at DESC, e.item_key DESC, e.type_id DESC
         LIMIT maxn
    ), w AS (
        SELECT ev.item_key,
               ev.weight * pgrec.pow2_safe(-extract(epoch FROM (max(ev.occurred_at) OVER () - ev.occurred_at)) / half_s)
                   AS w
          FROM ev
    )
    SELECT public.sum(coalesce(ie.context_embedding, ie.embedding)
               -- a weight below float4's range is 0 (an event years older than the latest: 2^-255 as real
               -- raised "value out of range: underflow" and failed the request)
               OPERATOR(public.*) array_fill((CASE WHEN w.w < 1e-38 THEN 0 ELSE w.w END)::real,
                                             ARRAY[public.vector_dims(ie.embedding)])::public.vector)
      INTO v
      FROM w JOIN pgrec.item_embeddings ie ON ie.item_key = w.item_key;
    -- the user features: the vectors of the user's known property tokens, summed / sqrt(how many)
    SELECT public.sum(f.embedding), count(*) INTO fv, nf
      FROM pgrec.users u
     CROSS JOIN LATERAL pgrec.property_tokens(u.properties) AS tok(token)
      JOIN pgrec.user_feature_embeddings f ON f.token = tok.token
     WHERE u.user_key = uk;
    IF nf > 0 THEN
        fv := fv OPERATOR(public.*) array_fill((1 / sqrt(nf::float8))::real, ARRAY[public.vector_dims(fv)])::public.vector;
        v := CASE WHEN v IS NULL THEN fv ELSE v OPERATOR(public.+) fv END;
    END IF;
    IF v IS NULL OR public.vector_norm(v) = 0 THEN
        RETURN NULL;
    END IF;
    RETURN public.l2_normalize(v);
END
$$;
COMMENT ON FUNCTION pgrec.user_vector(bigint, timestamptz) IS
    'The user''s vector at as_of (NULL = now): the stored user_embeddings row when as_of >= based_on and no positive '
    'event falls in [based_on, as_of); else the L2-normalised sum over the last user_vector_max_events positive events '
    'before as_of (ties by item_key, type_id, descending) of weight * 2^(-(t_latest - t)/half_life) * '
    'coalesce(context_embedding, embedding), plus the vectors of the user''s known property tokens '
    '(pgrec.user_feature_embeddings, from the retrieval model) summed and divided by sqrt(their number). '
    'NULL when nothing sums.';

CREATE OR REPLACE FUNCTION pgrec.unengaged_items(
    p_k int, p_as_of timestamptz, p_categories text[], p_exclude bigint[])
RETURNS TABLE (item_key bigint, rank int)
LANGUAGE sql STABLE PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- planned for its values: with a rare category the GIN index beats the created_at order
SET plan_cache_mode = force_custom_plan
AS $$
    SELECT x.item_key, (row_number() OVER (ORDER BY x.created_at DESC, x.item_key DESC))::int
      FROM (SELECT i.item_key, i.created_at
              FROM pgrec.items i
             WHERE i.available AND i.created_at < coalesce(p_as_of, now())
               AND (p_categories IS NULL OR i.categories && p_categories)
               AND NOT (i.item_key = ANY (coalesce(p_exclude, '{}')))
             ORDER BY i.created_at DESC, i.item_key DESC
             LIMIT greatest(p_k, 0)) x
$$;
COMMENT ON FUNCTION pgrec.unengaged_items(int, timestamptz, text[], bigint[]) IS
    'Up to k available items created before as_of (NULL = now), in the categories given (NULL = any), not in '
    'exclude, newest first (ties: item_key descending), ranked 1..k: the tail of the union''s popular fallback.';

CREATE OR REPLACE FUNCTION pgrec.source_popular_filled(
    p_user_key bigint, p_k int, p_as_of timestamptz DEFAULT NULL, p_categories text[] DEFAULT NULL,
    p_params jsonb DEFAULT '{}')
RETURNS TABLE (item_key bigint, source text, score float8, rank int)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET plan_cache_mode = force_generic_plan
AS $$
#variable_conflict use_column
DECLARE
    keys bigint[];
    sc   float8[];
BEGIN
    SELECT coalesce(array_agg(p.item_key ORDER BY p.rank), '{}'), coalesce(array_agg(p.score ORDER BY p.rank), '{}')
      INTO keys, sc
      FROM pgrec.source_popular(p_user_key, p_k, p_as_of, p_categories, p_params) p;
    RETURN QUERY SELECT x.k, 'popular'::text, x.s, x.o::int FROM unnest(keys, sc) WITH ORDINALITY AS x(k, s, o);
    IF cardinality(keys) < p_k THEN
        RETURN QUERY SELECT u.item_key, 'popular'::text, 0::float8, cardinality(keys) + u.rank
                       FROM pgrec.unengaged_items(p_k - cardinality(keys), p_as_of, p_categories, keys) u;
    END IF;
END
$$;
COMMENT ON FUNCTION pgrec.source_popular_filled(bigint, int, timestamptz, text[], jsonb) IS
    'The popular source as the union runs it: pgrec.source_popular, then, when it has fewer than k rows, '
    'pgrec.unengaged_items (score 0, ranks after the popular rows) so that the fallback fills n while the '
    'catalog has items.';

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
    -- ann source reads its extra rows only as far as seen items use them up (its index scan stops there).
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
            CASE WHEN r.fallback_order IS NOT NULL THEN want ELSE ceil(r.quota::numeric * want)::int END + extra);
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

