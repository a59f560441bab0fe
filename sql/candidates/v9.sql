-- Stage 1, candidates v9: only pgrec.ann_search changes (v5's, one change); reverting restores v5's.
-- The early read (stop at the quota of unseen items) tested each row against the user's seen items with
-- `<> ALL (p_seen)`, a scan of the whole array per row: for a user with 34,778 events (the heaviest of the
-- 100k-item benchmark's users) the ann source took 35 ms against 3.4 ms without the test. Each row now probes a
-- hash of p_seen built once per scan (a hashed subplan), whatever the array's length.

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
        -- (seen: a hashed subplan over p_seen, built once per scan; v5 compared every row with the whole array,
        -- which made a user with 35,000 seen items' ann read 10x dearer than the index scan itself)
        FOR r_key, r_d, r_seen IN
            SELECT e.item_key, e.embedding OPERATOR(public.<=>) p_vector,
                   early AND e.item_key IN (SELECT s.k FROM unnest(p_seen) AS s(k))
              FROM pgrec.item_embeddings e JOIN pgrec.items i ON i.item_key = e.item_key
             WHERE i.available AND i.created_at < t
               AND (p_categories IS NULL OR i.categories && p_categories)
             ORDER BY e.embedding OPERATOR(public.<=>) p_vector
             LIMIT lim
        LOOP
            keys := keys || r_key;
            dists := dists || r_d;
            IF r_seen IS NOT TRUE THEN
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
