-- Stage 1: candidate sources and their union. Every source is one function with the same signature
--   pgrec.source_<name>(user_key bigint, k int, as_of timestamptz, categories text[], params jsonb)
-- and the same row shape (item_key, source, score, rank); pgrec.candidates_by_key unions them per surface.
-- as_of NULL means now(); every time-dependent part uses only events strictly before as_of.

-- ---------------------------------------------------------------- helpers

CREATE OR REPLACE FUNCTION pgrec.candidates_setting(p_key text, p_default float8)
RETURNS float8
LANGUAGE sql STABLE PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce((SELECT (c.value #>> '{}')::float8 FROM pgrec.config c WHERE c.key = p_key), p_default)
$$;
COMMENT ON FUNCTION pgrec.candidates_setting(text, float8) IS
    'A numeric row of pgrec.config, or the default when the row is absent.';

CREATE OR REPLACE FUNCTION pgrec.pow2_safe(p_exponent float8)
RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    -- 2^x with x clamped to [-1000, 1000]: PostgreSQL raises on float8 underflow/overflow. No SET clause and
    -- one reference to the argument, so the planner inlines it (it runs per row); it names only pg_catalog.
    SELECT pg_catalog.power(2::float8, pg_catalog.float8larger(-1000, pg_catalog.float8smaller(1000, p_exponent)))
$$;
COMMENT ON FUNCTION pgrec.pow2_safe(float8) IS '2^x for x clamped to [-1000, 1000] (no underflow/overflow error).';

-- ---------------------------------------------------------------- the user vector (docs/contracts.md)

CREATE OR REPLACE FUNCTION pgrec.property_tokens(p_properties jsonb)
RETURNS SETOF text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    -- engine.retrieval.data.property_tokens: "<key>=<value>" for strings (1-64 characters), integers and
    -- booleans, "<key>~<floor(log2(|x| + 1))>[-]" for other numbers; one per element of a list
    SELECT DISTINCT CASE
               WHEN jsonb_typeof(v.v) = 'boolean' THEN p.key || '=' || (v.v #>> '{}')
               WHEN jsonb_typeof(v.v) = 'number' AND (v.v #>> '{}') ~ '^-?[0-9]+$' THEN p.key || '=' || (v.v #>> '{}')
               WHEN jsonb_typeof(v.v) = 'number'
                   THEN p.key || '~' || floor(log(2::numeric, abs((v.v #>> '{}')::numeric) + 1))::bigint::text
                        || CASE WHEN (v.v #>> '{}')::numeric < 0 THEN '-' ELSE '' END
               ELSE p.key || '=' || lower(v.v #>> '{}') END
      FROM jsonb_each(CASE WHEN jsonb_typeof(p_properties) = 'object' THEN p_properties ELSE '{}' END) AS p(key, value)
     CROSS JOIN LATERAL (SELECT e.v FROM jsonb_array_elements(p.value) AS e(v) WHERE jsonb_typeof(p.value) = 'array'
                         UNION ALL SELECT p.value WHERE jsonb_typeof(p.value) <> 'array') AS v(v)
     WHERE jsonb_typeof(v.v) IN ('boolean', 'number')
        OR (jsonb_typeof(v.v) = 'string' AND length(v.v #>> '{}') BETWEEN 1 AND 64)
$$;
COMMENT ON FUNCTION pgrec.property_tokens(jsonb) IS
    'The feature tokens of a properties object (the user tower''s user features): as '
    'engine.retrieval.data.property_tokens in Python.';

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
               OPERATOR(public.*) array_fill(w.w::real, ARRAY[public.vector_dims(ie.embedding)])::public.vector)
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

-- ---------------------------------------------------------------- nearest items to a vector

CREATE OR REPLACE FUNCTION pgrec.ann_search(
    p_vector public.vector, p_k int, p_as_of timestamptz DEFAULT NULL, p_categories text[] DEFAULT NULL,
    p_params jsonb DEFAULT '{}', p_source text DEFAULT 'ann')
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
    PERFORM set_config('hnsw.ef_search', least(greatest(ef, p_k), 1000)::text, true);
    PERFORM set_config('hnsw.iterative_scan', mode, true);
    PERFORM set_config('hnsw.max_scan_tuples', max_tuples::text, true);
    RETURN QUERY
    SELECT x.item_key, p_source, 1 - x.d, (row_number() OVER (ORDER BY x.d, x.item_key))::int
      FROM (SELECT e.item_key, e.embedding OPERATOR(public.<=>) p_vector AS d
              FROM pgrec.item_embeddings e JOIN pgrec.items i ON i.item_key = e.item_key
             WHERE i.available AND i.created_at < t
               AND (p_categories IS NULL OR i.categories && p_categories)
             ORDER BY e.embedding OPERATOR(public.<=>) p_vector
             LIMIT p_k) x;
    IF old_ef IS NOT NULL THEN PERFORM set_config('hnsw.ef_search', old_ef, true); END IF;
    IF old_mode IS NOT NULL THEN PERFORM set_config('hnsw.iterative_scan', old_mode, true); END IF;
    IF old_tuples IS NOT NULL THEN PERFORM set_config('hnsw.max_scan_tuples', old_tuples, true); END IF;
END
$$;
COMMENT ON FUNCTION pgrec.ann_search(public.vector, int, timestamptz, text[], jsonb, text) IS
    'Top-k available items (created before as_of, optionally in categories) by cosine similarity to a vector. '
    'HNSW with per-call ef_search / iterative_scan / max_scan_tuples (params), or an exact scan when the '
    'category filter matches at most params.exact_max_rows items. Returns min(k, matching) rows.';

-- ---------------------------------------------------------------- decayed popularity (trending, popular)

CREATE OR REPLACE FUNCTION pgrec.decayed_popularity(
    p_horizon text, p_segment text, p_k int, p_as_of timestamptz DEFAULT NULL, p_categories text[] DEFAULT NULL)
RETURNS TABLE (item_key bigint, score float8)
LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    t      timestamptz := coalesce(p_as_of, now());
    ep     pgrec.trending_epochs%ROWTYPE;
    factor float8;
    prop   text;
BEGIN
    IF p_k IS NULL OR p_k <= 0 OR p_segment IS NULL THEN
        RETURN;
    END IF;
    SELECT * INTO ep FROM pgrec.trending_epochs e WHERE e.horizon = p_horizon;
    IF NOT FOUND THEN
        RETURN;  -- no positive event yet
    END IF;
    IF p_as_of IS NULL OR p_as_of >= now() THEN
        -- now: the running sums (every event so far counts), one index scan in score order
        factor := pgrec.pow2_safe(-extract(epoch FROM t - ep.epoch) / ep.half_life_s);
        RETURN QUERY
        SELECT s.item_key, s.score * factor
          FROM pgrec.trending_scores s JOIN pgrec.items i ON i.item_key = s.item_key
         WHERE s.horizon = p_horizon AND s.segment = p_segment
           AND i.available AND i.created_at < t AND (p_categories IS NULL OR i.categories && p_categories)
         ORDER BY s.score DESC, s.item_key
         LIMIT p_k;
    ELSE
        -- the past (evaluation, replay): recount the positive events in [as_of - 10 half-lives, as_of) from
        -- pgrec.events (partition pruning on occurred_at); the segment is the user's current one
        IF p_segment <> '' THEN
            SELECT c.value #>> '{}' INTO prop FROM pgrec.config c WHERE c.key = 'segment_property';
        END IF;
        RETURN QUERY
        SELECT x.item_key, x.sc
          FROM (SELECT e.item_key,
                       sum(e.weight * pgrec.pow2_safe(-extract(epoch FROM t - e.occurred_at) / ep.half_life_s)) AS sc
                  FROM pgrec.events e
                 WHERE e.polarity = 1
                   AND e.occurred_at >= t - make_interval(secs => 10 * ep.half_life_s) AND e.occurred_at < t
                   AND (p_segment = '' OR EXISTS (SELECT 1 FROM pgrec.users u
                                                   WHERE u.user_key = e.user_key AND u.properties ->> prop = p_segment))
                 GROUP BY e.item_key) x
          JOIN pgrec.items i ON i.item_key = x.item_key
         WHERE i.available AND i.created_at < t AND (p_categories IS NULL OR i.categories && p_categories)
         ORDER BY x.sc DESC, x.item_key
         LIMIT p_k;
    END IF;
END
$$;
COMMENT ON FUNCTION pgrec.decayed_popularity(text, text, int, timestamptz, text[]) IS
    'Top-k items by time-decayed sum of positive event weights (horizon trending or popular, segment '''' = global) '
    'at as_of: the trigger-maintained running sums for now; a recount of the events before as_of for the past.';

-- The user-independent top lists at now (trending per segment, popular, fresh) are the same for every request:
-- kept in pgrec.source_cache for config source_cache_seconds (0 = off), so that concurrent requests read one
-- array instead of each rescanning the running sums. A list is stored with the running sums' epoch (scores are
-- scaled by the decay factor at read, so the order and the scores equal a fresh scan's at the same moment) and
-- dropped when items change (availability, creation time) by the items trigger below.

CREATE OR REPLACE FUNCTION pgrec.source_cache_get(p_key text, p_epoch timestamptz, p_k int)
RETURNS TABLE (item_key bigint, score float8)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    ttl float8 := pgrec.candidates_setting('source_cache_seconds', 30);
    c   pgrec.source_cache%ROWTYPE;
BEGIN
    IF ttl <= 0 THEN
        RETURN;
    END IF;
    SELECT * INTO c FROM pgrec.source_cache s WHERE s.key = p_key;
    IF FOUND AND c.epoch IS NOT DISTINCT FROM p_epoch
       AND c.computed_at > clock_timestamp() - make_interval(secs => ttl)
       AND (c.complete OR cardinality(c.item_keys) >= p_k) THEN
        RETURN QUERY SELECT x.k, x.s FROM unnest(c.item_keys[1:p_k], c.scores[1:p_k]) AS x(k, s);
    END IF;
END
$$;
COMMENT ON FUNCTION pgrec.source_cache_get(text, timestamptz, int) IS
    'The first k rows of a cached shared list (raw scores, best first) when it is younger than '
    'source_cache_seconds, was stored for the same epoch and holds k rows (or every qualifying item); else none.';

CREATE OR REPLACE FUNCTION pgrec.source_cache_put(
    p_key text, p_epoch timestamptz, p_item_keys bigint[], p_scores float8[], p_complete boolean)
RETURNS void
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- never on a read-only transaction (a replica), never waiting: one writer per key at a time, the others
    -- serve their own scan (separate tests: an OR in one expression has no evaluation order)
    IF pgrec.candidates_setting('source_cache_seconds', 30) <= 0 THEN
        RETURN;
    END IF;
    IF current_setting('transaction_read_only') = 'on' THEN
        RETURN;
    END IF;
    IF NOT pg_try_advisory_xact_lock(hashtextextended('pgrec.source_cache:' || p_key, 0)) THEN
        RETURN;
    END IF;
    BEGIN
        -- lists of past as_of values (replays) pile up otherwise
        DELETE FROM pgrec.source_cache s
         WHERE s.computed_at < clock_timestamp() - make_interval(secs => 10 * pgrec.candidates_setting('source_cache_seconds', 30));
        INSERT INTO pgrec.source_cache AS s (key, epoch, item_keys, scores, complete, computed_at)
        VALUES (p_key, p_epoch, coalesce(p_item_keys, '{}'), coalesce(p_scores, '{}'), p_complete, clock_timestamp())
        ON CONFLICT (key) DO UPDATE
           SET epoch = EXCLUDED.epoch, item_keys = EXCLUDED.item_keys, scores = EXCLUDED.scores,
               complete = EXCLUDED.complete, computed_at = EXCLUDED.computed_at;
    EXCEPTION WHEN serialization_failure OR deadlock_detected THEN
        -- a caller's REPEATABLE READ / SERIALIZABLE transaction met a newer list: keep serving, store nothing
        RETURN;
    END;
END
$$;
COMMENT ON FUNCTION pgrec.source_cache_put(text, timestamptz, bigint[], float8[], boolean) IS
    'Store a shared list in pgrec.source_cache (skipped when the cache is off, in a read-only transaction, or '
    'while another transaction is storing the same key).';

CREATE OR REPLACE FUNCTION pgrec.source_cache_clear()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM pgrec.source_cache) THEN
        DELETE FROM pgrec.source_cache;
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION pgrec.source_cache_clear() IS
    'Statement trigger on pgrec.items: a change of the catalog (availability, creation time, new items) drops '
    'the cached shared lists.';

DROP TRIGGER IF EXISTS items_source_cache_clear ON pgrec.items;
CREATE TRIGGER items_source_cache_clear AFTER INSERT OR UPDATE OR DELETE ON pgrec.items
    FOR EACH STATEMENT EXECUTE FUNCTION pgrec.source_cache_clear();

CREATE OR REPLACE FUNCTION pgrec.decayed_popularity_shared(
    p_horizon text, p_segment text, p_k int, p_as_of timestamptz DEFAULT NULL, p_categories text[] DEFAULT NULL)
RETURNS TABLE (item_key bigint, score float8)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    past   boolean := p_as_of < now();
    ep     pgrec.trending_epochs%ROWTYPE;
    factor float8 := 1;
    ckey   text := p_horizon || ':' || p_segment;
    keep   int;
    keys   bigint[];
    raw    float8[];
BEGIN
    IF p_k IS NULL OR p_k <= 0 OR p_segment IS NULL THEN
        RETURN;
    END IF;
    IF p_categories IS NOT NULL OR p_as_of > now() THEN
        RETURN QUERY SELECT * FROM pgrec.decayed_popularity(p_horizon, p_segment, p_k, p_as_of, p_categories);
        RETURN;
    END IF;
    IF past THEN
        -- the past (training replays, evaluation): the recount over the events before as_of is the same for
        -- every user asking at that as_of, so it is shared as well (key with as_of, no epoch, no scaling)
        ckey := ckey || '@' || extract(epoch FROM p_as_of)::text;
    ELSE
        -- now: raw running sums, scaled by the decay factor at read
        SELECT * INTO ep FROM pgrec.trending_epochs e WHERE e.horizon = p_horizon;
        IF NOT FOUND THEN
            RETURN;  -- no positive event yet
        END IF;
        factor := pgrec.pow2_safe(-extract(epoch FROM now() - ep.epoch) / ep.half_life_s);
    END IF;
    RETURN QUERY SELECT c.item_key, c.score * factor FROM pgrec.source_cache_get(ckey, ep.epoch, p_k) c;
    IF FOUND THEN
        RETURN;
    END IF;
    keep := greatest(p_k, pgrec.candidates_setting('source_cache_rows', 1000)::int);
    IF past THEN
        SELECT array_agg(d.item_key ORDER BY d.score DESC, d.item_key), array_agg(d.score ORDER BY d.score DESC, d.item_key)
          INTO keys, raw
          FROM pgrec.decayed_popularity(p_horizon, p_segment, keep, p_as_of, NULL) d;
    ELSE
        -- pgrec.decayed_popularity's now branch without the factor (the stored scores are raw)
        SELECT array_agg(x.item_key ORDER BY x.score DESC, x.item_key), array_agg(x.score ORDER BY x.score DESC, x.item_key)
          INTO keys, raw
          FROM (SELECT s.item_key, s.score
                  FROM pgrec.trending_scores s JOIN pgrec.items i ON i.item_key = s.item_key
                 WHERE s.horizon = p_horizon AND s.segment = p_segment AND i.available AND i.created_at < now()
                 ORDER BY s.score DESC, s.item_key
                 LIMIT keep) x;
    END IF;
    PERFORM pgrec.source_cache_put(ckey, ep.epoch, keys, raw, coalesce(cardinality(keys), 0) < keep);
    RETURN QUERY SELECT x.k, x.s * factor FROM unnest(keys[1:p_k], raw[1:p_k]) AS x(k, s);
END
$$;
COMMENT ON FUNCTION pgrec.decayed_popularity_shared(text, text, int, timestamptz, text[]) IS
    'pgrec.decayed_popularity for the candidate sources: without a category filter, at now or at a past as_of '
    '(the same list for every user), the top list from pgrec.source_cache (at most source_cache_seconds old, else '
    'computed and stored); with a filter or a future as_of the same call.';

CREATE OR REPLACE FUNCTION pgrec.user_segment(p_user_key bigint)
RETURNS text
LANGUAGE sql STABLE PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT nullif(u.properties ->> (SELECT c.value #>> '{}' FROM pgrec.config c WHERE c.key = 'segment_property'), '')
      FROM pgrec.users u WHERE u.user_key = p_user_key
$$;
COMMENT ON FUNCTION pgrec.user_segment(bigint) IS
    'The user''s trending segment: the user property named by config segment_property (NULL when absent).';

-- ---------------------------------------------------------------- sources

CREATE OR REPLACE FUNCTION pgrec.source_ann(
    p_user_key bigint, p_k int, p_as_of timestamptz DEFAULT NULL, p_categories text[] DEFAULT NULL,
    p_params jsonb DEFAULT '{}')
RETURNS TABLE (item_key bigint, source text, score float8, rank int)
LANGUAGE sql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT a.item_key, a.source, a.score, a.rank
      FROM pgrec.ann_search(pgrec.user_vector(p_user_key, p_as_of), p_k, p_as_of, p_categories, p_params, 'ann') a
$$;
COMMENT ON FUNCTION pgrec.source_ann(bigint, int, timestamptz, text[], jsonb) IS
    'Candidate source ann: the user vector (pgrec.user_vector at as_of) against item embeddings (HNSW). '
    'Score = cosine similarity. No rows for a user without a vector.';

CREATE OR REPLACE FUNCTION pgrec.source_history(
    p_user_key bigint, p_k int, p_as_of timestamptz DEFAULT NULL, p_categories text[] DEFAULT NULL,
    p_params jsonb DEFAULT '{}')
RETURNS TABLE (item_key bigint, source text, score float8, rank int)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    ek     int := coalesce((p_params ->> 'embedding_k')::int, 10);
    old_ef text;
BEGIN
    IF p_k IS NULL OR p_k <= 0 OR p_user_key IS NULL THEN
        RETURN;
    END IF;
    PERFORM 1 FROM pgrec.item_embeddings LIMIT 0;  -- the vector library is loaded, so hnsw.* GUCs exist
    old_ef := current_setting('hnsw.ef_search', true);
    -- the item-embedding neighbours are small top-k searches: a small ef_search (>= their LIMIT) keeps them cheap
    PERFORM set_config('hnsw.ef_search', least(greatest(ek + 1, 10), 1000)::text, true);
    RETURN QUERY
    WITH t AS (SELECT coalesce(p_as_of, now()) AS t),
    ev AS (
        SELECT e.item_key, e.weight, e.occurred_at
          FROM pgrec.events e, t
         WHERE e.user_key = p_user_key AND e.polarity = 1 AND e.occurred_at < t.t
         ORDER BY e.occurred_at DESC, e.item_key DESC, e.type_id DESC
         LIMIT coalesce((p_params ->> 'max_events')::int, 30)
    ), seeds AS (
        -- recency weight: 2^(-(t_latest - t) / half_life) per event, summed per item
        SELECT s.item_key, sum(s.w) AS w, row_number() OVER (ORDER BY max(s.occurred_at) DESC, s.item_key) AS rn
          FROM (SELECT ev.item_key, ev.occurred_at,
                       ev.weight * pgrec.pow2_safe(-extract(epoch FROM max(ev.occurred_at) OVER () - ev.occurred_at)
                           / (coalesce((p_params ->> 'half_life_days')::float8, 7) * 86400)) AS w
                  FROM ev) s
         GROUP BY s.item_key
    ), co AS (
        SELECT n.neighbor_key AS item_key, sum(s.w * n.score) AS sc
          FROM seeds s JOIN pgrec.item_neighbors n
            ON n.item_key = s.item_key AND n.rank <= coalesce((p_params ->> 'per_item')::int, 50)
         GROUP BY n.neighbor_key
    ), ez AS (
        -- learned item-item neighbours (pgrec.model_neighbors 'ease', `pgrec train ease`) of the seeds, each
        -- seed's list scaled by its best weight to [0, 1] like the cosines above; off unless ease_weight > 0
        SELECT n.neighbor_key AS item_key,
               sum(s.w * n.score / nullif(top.score, 0)) * coalesce((p_params ->> 'ease_weight')::float8, 0) AS sc
          FROM seeds s
          JOIN pgrec.model_neighbors top ON top.model = 'ease' AND top.item_key = s.item_key AND top.rank = 1
          JOIN pgrec.model_neighbors n
            ON n.model = 'ease' AND n.item_key = s.item_key AND n.rank <= coalesce((p_params ->> 'per_item')::int, 50)
         WHERE coalesce((p_params ->> 'ease_weight')::float8, 0) > 0
         GROUP BY n.neighbor_key
    ), emb AS (
        -- each seed's ek nearest items: the stored list (pgrec.model_neighbors 'embedding', built after the
        -- seed's vector last changed) or, without one, an HNSW search (its LIMIT is the same ek, self excluded)
        SELECT nb.item_key, sum(s.w * nb.sim) * coalesce((p_params ->> 'embedding_weight')::float8, 0.5) AS sc
          FROM seeds s
          JOIN pgrec.item_embeddings se ON se.item_key = s.item_key
          JOIN pgrec.embedding_neighbor_status st ON st.item_key = s.item_key
          CROSS JOIN LATERAL (
              SELECT mn.neighbor_key AS item_key, mn.score::float8 AS sim
                FROM pgrec.model_neighbors mn
               WHERE st.current AND mn.model = 'embedding' AND mn.item_key = s.item_key AND mn.rank <= ek
              UNION ALL
              SELECT l.item_key, l.sim
                FROM (SELECT e2.item_key, 1 - (e2.embedding OPERATOR(public.<=>) se.embedding) AS sim
                        FROM pgrec.item_embeddings e2
                       WHERE e2.item_key <> s.item_key
                       ORDER BY e2.embedding OPERATOR(public.<=>) se.embedding
                       LIMIT ek) l
               WHERE NOT st.current) nb
         WHERE s.rn <= coalesce((p_params ->> 'embedding_items')::int, 3)
         GROUP BY nb.item_key
    ), scored AS (
        SELECT x.item_key, sum(x.sc) AS sc
          FROM (SELECT co.item_key, co.sc FROM co UNION ALL SELECT emb.item_key, emb.sc FROM emb
                UNION ALL SELECT ez.item_key, ez.sc FROM ez) x
         WHERE NOT EXISTS (SELECT 1 FROM seeds s WHERE s.item_key = x.item_key)
         GROUP BY x.item_key
    )
    SELECT r.item_key, 'history'::text, r.sc, (row_number() OVER (ORDER BY r.sc DESC, r.item_key))::int
      FROM (SELECT sc.item_key, sc.sc
              -- best first, then one index lookup per scored item until k pass (the planner would hash-join
              -- the whole catalog, or look every scored item up before sorting)
              FROM (SELECT scored.item_key, scored.sc FROM scored ORDER BY scored.sc DESC, scored.item_key) sc, t
             CROSS JOIN LATERAL (SELECT i.available, i.created_at, i.categories FROM pgrec.items i
                                  WHERE i.item_key = sc.item_key LIMIT 1) i
             WHERE i.available AND i.created_at < t.t
               AND (p_categories IS NULL OR i.categories && p_categories)
             ORDER BY sc.sc DESC, sc.item_key
             LIMIT p_k) r;
    IF old_ef IS NOT NULL THEN
        PERFORM set_config('hnsw.ef_search', old_ef, true);
    END IF;
END
$$;
COMMENT ON FUNCTION pgrec.source_history(bigint, int, timestamptz, text[], jsonb) IS
    'Candidate source history: co-occurrence neighbours (pgrec.item_neighbors) of the user''s recent positive '
    'items plus item-embedding neighbours of the newest few (and, with ease_weight > 0, their EASE neighbours '
    'from pgrec.model_neighbors), weighted by event weight and recency; the seed items themselves are left out. '
    'params: max_events, half_life_days, per_item, embedding_items, embedding_k, embedding_weight, ease_weight.';

CREATE OR REPLACE FUNCTION pgrec.source_trending(
    p_user_key bigint, p_k int, p_as_of timestamptz DEFAULT NULL, p_categories text[] DEFAULT NULL,
    p_params jsonb DEFAULT '{}')
RETURNS TABLE (item_key bigint, source text, score float8, rank int)
LANGUAGE sql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH seg AS (SELECT pgrec.user_segment(p_user_key) AS seg),
    local_ AS (SELECT d.item_key, d.score FROM seg, pgrec.decayed_popularity_shared('trending', seg.seg, p_k, p_as_of, p_categories) d),
    global_ AS (SELECT d.item_key, d.score FROM pgrec.decayed_popularity_shared('trending', '', p_k, p_as_of, p_categories) d),
    blended AS (
        -- in-segment popularity plus a share of the global one (params.global_weight, default 0.5)
        SELECT coalesce(l.item_key, g.item_key) AS item_key,
               coalesce(l.score, 0) + coalesce((p_params ->> 'global_weight')::float8, 0.5) * coalesce(g.score, 0) AS sc
          FROM local_ l FULL JOIN global_ g ON g.item_key = l.item_key
    )
    SELECT b.item_key, 'trending'::text, b.sc, (row_number() OVER (ORDER BY b.sc DESC, b.item_key))::int
      FROM (SELECT * FROM blended ORDER BY sc DESC, item_key LIMIT greatest(p_k, 0)) b
$$;
COMMENT ON FUNCTION pgrec.source_trending(bigint, int, timestamptz, text[], jsonb) IS
    'Candidate source trending: time-decayed popularity (half-life config trending_half_life_hours) in the '
    'user''s segment plus params.global_weight times the global one; global only for users without a segment.';

CREATE OR REPLACE FUNCTION pgrec.source_fresh(
    p_user_key bigint, p_k int, p_as_of timestamptz DEFAULT NULL, p_categories text[] DEFAULT NULL,
    p_params jsonb DEFAULT '{}')
RETURNS TABLE (item_key bigint, source text, score float8, rank int)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_column
DECLARE
    t       timestamptz := coalesce(p_as_of, now());
    days    float8 := coalesce((p_params ->> 'days')::float8, pgrec.candidates_setting('fresh_days', 14));
    scan    int := coalesce((p_params ->> 'max_scan')::int, pgrec.candidates_setting('fresh_max_scan', 200)::int);
    ep      pgrec.trending_epochs%ROWTYPE;
    factor  float8 := 1;
    now_    boolean := p_as_of IS NULL OR p_as_of >= now();
    ckey    text;
    keys    bigint[];
    raws    float8[];
BEGIN
    IF p_k IS NULL OR p_k <= 0 THEN
        RETURN;
    END IF;
    IF now_ THEN
        -- now: early engagement is the item's running popular sum, scaled by the decay factor at t
        SELECT * INTO ep FROM pgrec.trending_epochs e WHERE e.horizon = 'popular';
        factor := CASE WHEN FOUND THEN pgrec.pow2_safe(-extract(epoch FROM t - ep.epoch) / ep.half_life_s) ELSE 0 END;
    END IF;
    -- without a category filter the list is the same for every user at this moment: shared through
    -- pgrec.source_cache (raw scores in list order; at now under the running sums' epoch, in the past by as_of)
    IF p_categories IS NULL AND (p_as_of IS NULL OR p_as_of <= now()) THEN
        ckey := 'fresh:' || days::text || ':' || scan::text
                || CASE WHEN p_as_of < now() THEN '@' || extract(epoch FROM p_as_of)::text ELSE '' END;
        RETURN QUERY SELECT c.item_key, 'fresh'::text, c.score * factor, c.r::int
                       FROM pgrec.source_cache_get(ckey, ep.epoch, p_k) WITH ORDINALITY AS c(item_key, score, r);
        IF FOUND THEN
            RETURN;
        END IF;
    END IF;
    -- the newest scan items created within days before t, best first: by early engagement (now: the running
    -- popular sum, one index lookup per item; the past: positive event weight before as_of, all of which falls
    -- in the fresh window), then by newness
    WITH newest AS (
        SELECT i.item_key, i.created_at
          FROM pgrec.items i
         WHERE i.created_at >= t - make_interval(secs => days * 86400) AND i.created_at < t AND i.available
           AND (p_categories IS NULL OR i.categories && p_categories)
         ORDER BY i.created_at DESC
         LIMIT scan
    ), eng AS (
        SELECT n.item_key, n.created_at,
               coalesce((SELECT s.score FROM pgrec.trending_scores s
                          WHERE s.horizon = 'popular' AND s.segment = '' AND s.item_key = n.item_key), 0) AS raw
          FROM newest n
         WHERE now_
        UNION ALL
        SELECT n.item_key, n.created_at, coalesce(p.w, 0)
          FROM newest n
          LEFT JOIN (SELECT e.item_key, sum(e.weight)::float8 AS w
                       FROM pgrec.events e
                      WHERE e.polarity = 1
                        AND e.occurred_at >= t - make_interval(secs => days * 86400) AND e.occurred_at < t
                      GROUP BY e.item_key) p ON p.item_key = n.item_key
         WHERE NOT now_
    )
    SELECT array_agg(eng.item_key ORDER BY eng.raw DESC, eng.created_at DESC, eng.item_key),
           array_agg(eng.raw ORDER BY eng.raw DESC, eng.created_at DESC, eng.item_key)
      INTO keys, raws
      FROM eng;
    IF ckey IS NOT NULL THEN
        PERFORM pgrec.source_cache_put(ckey, ep.epoch, keys, raws, true);
    END IF;
    RETURN QUERY SELECT x.k, 'fresh'::text, x.s * factor, x.r::int
                   FROM unnest(keys[1:p_k], raws[1:p_k]) WITH ORDINALITY AS x(k, s, r);
END
$$;
COMMENT ON FUNCTION pgrec.source_fresh(bigint, int, timestamptz, text[], jsonb) IS
    'Candidate source fresh: available items created in the last fresh_days (params.days) before as_of, the '
    'newest fresh_max_scan of them ranked by early engagement (positive event weight), then by newness.';

CREATE OR REPLACE FUNCTION pgrec.source_popular(
    p_user_key bigint, p_k int, p_as_of timestamptz DEFAULT NULL, p_categories text[] DEFAULT NULL,
    p_params jsonb DEFAULT '{}')
RETURNS TABLE (item_key bigint, source text, score float8, rank int)
LANGUAGE sql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT d.item_key, 'popular'::text, d.score, (row_number() OVER (ORDER BY d.score DESC, d.item_key))::int
      FROM pgrec.decayed_popularity_shared('popular', '', p_k, p_as_of, p_categories) d
$$;
COMMENT ON FUNCTION pgrec.source_popular(bigint, int, timestamptz, text[], jsonb) IS
    'Candidate source popular (the fallback): global popularity with a long half-life (popular_half_life_days).';

-- ---------------------------------------------------------------- the union

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
    -- has seen items (capped by config candidates_overfetch_max), so excluding seen items later leaves n.
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
                      FROM pgrec.source_ann(uk, (fetch_k ->> 'ann')::int, asof, cats, coalesce(params -> 'ann', '{}')) x
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
                      FROM pgrec.source_popular(uk, (fetch_k ->> 'popular')::int, asof, cats, coalesce(params -> 'popular', '{}')) x
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

CREATE OR REPLACE FUNCTION pgrec.candidates(
    user_id text, surface text DEFAULT 'default', n int DEFAULT 500, as_of timestamptz DEFAULT NULL,
    categories text[] DEFAULT NULL)
RETURNS TABLE (item_key bigint, item_id text, sources text[],
               ann_score float8, ann_rank int, history_score float8, history_rank int,
               trending_score float8, trending_rank int, fresh_score float8, fresh_rank int,
               popular_score float8, popular_rank int)
LANGUAGE sql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT * FROM pgrec.candidates_by_key((SELECT u.user_key FROM pgrec.users u WHERE u.user_id = $1), $2, $3, $4, $5)
$$;
COMMENT ON FUNCTION pgrec.candidates(text, text, int, timestamptz, text[]) IS
    'Stage 1: candidates for a user id (unknown id = a cold user); see pgrec.candidates_by_key.';

-- ---------------------------------------------------------------- similar items, trending list

CREATE OR REPLACE FUNCTION pgrec.similar_items(item text, k int DEFAULT 20)
RETURNS TABLE (item_key bigint, item_id text, score float8, cooccurrence_score float8, embedding_score float8)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET max_parallel_workers_per_gather = 0
AS $$
#variable_conflict use_column
DECLARE
    ik bigint;
    v  public.vector;
BEGIN
    SELECT i.item_key INTO ik FROM pgrec.items i WHERE i.item_id = $1;
    IF ik IS NULL THEN
        RAISE EXCEPTION 'pgrec.similar_items: unknown item "%"', $1 USING ERRCODE = 'P0002';
    END IF;
    SELECT e.embedding INTO v FROM pgrec.item_embeddings e WHERE e.item_key = ik;
    RETURN QUERY
    WITH co AS (
        SELECT n.neighbor_key AS item_key, n.score::float8 AS sc FROM pgrec.item_neighbors n
         WHERE n.item_key = ik ORDER BY n.rank LIMIT $2
    ), em AS (
        SELECT a.item_key, a.score AS sc FROM pgrec.ann_search(v, $2 + 1, NULL, NULL, '{}', 'similar') a
         WHERE a.item_key <> ik
    )
    SELECT x.item_key, i.item_id, coalesce(x.co, 0) + coalesce(x.em, 0), x.co, x.em
      FROM (SELECT coalesce(co.item_key, em.item_key) AS item_key, co.sc AS co, em.sc AS em
              FROM co FULL JOIN em ON em.item_key = co.item_key) x
      JOIN pgrec.items i ON i.item_key = x.item_key
     WHERE i.available
     ORDER BY 3 DESC, x.item_key
     LIMIT $2;
END
$$;
COMMENT ON FUNCTION pgrec.similar_items(text, int) IS
    'Items like an item: co-occurrence score plus embedding cosine similarity. Unknown item: error P0002.';

CREATE OR REPLACE FUNCTION pgrec.trending_items(segment text DEFAULT NULL, k int DEFAULT 20, as_of timestamptz DEFAULT NULL)
RETURNS TABLE (item_key bigint, item_id text, score float8)
LANGUAGE sql STABLE PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET max_parallel_workers_per_gather = 0
AS $$
    SELECT d.item_key, i.item_id, d.score
      FROM pgrec.decayed_popularity('trending', coalesce($1, ''), $2, $3, NULL) d
      JOIN pgrec.items i ON i.item_key = d.item_key
     ORDER BY d.score DESC, d.item_key
$$;
COMMENT ON FUNCTION pgrec.trending_items(text, int, timestamptz) IS
    'Trending items, globally (segment NULL) or in one segment, by time-decayed positive event weight.';

CREATE OR REPLACE FUNCTION pgrec.rebuild_trending()
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    latest timestamptz;
    prop   text;
    n      bigint;
BEGIN
    LOCK TABLE pgrec.trending_scores IN EXCLUSIVE MODE;
    DELETE FROM pgrec.trending_scores;
    DELETE FROM pgrec.trending_epochs;
    SELECT max(e.occurred_at) INTO latest FROM pgrec.events e WHERE e.polarity = 1;
    IF latest IS NULL THEN
        RETURN 0;
    END IF;
    PERFORM pgrec.trending_prepare(latest);
    SELECT c.value #>> '{}' INTO prop FROM pgrec.config c WHERE c.key = 'segment_property';
    INSERT INTO pgrec.trending_scores (horizon, segment, item_key, score)
    SELECT ep.horizon, s.segment, e.item_key,
           sum(e.weight * pgrec.pow2_safe(extract(epoch FROM e.occurred_at - ep.epoch) / ep.half_life_s))
      FROM pgrec.events e
      LEFT JOIN pgrec.users u ON u.user_key = e.user_key
     CROSS JOIN pgrec.trending_epochs ep
     CROSS JOIN LATERAL (VALUES (''::text),
                                (CASE WHEN ep.horizon = 'trending' THEN nullif(u.properties ->> prop, '') END)) s(segment)
     WHERE e.polarity = 1 AND s.segment IS NOT NULL
     GROUP BY 1, 2, 3;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION pgrec.rebuild_trending() IS
    'Recount the running trending/popular sums from pgrec.events (after changing a half-life or the segment '
    'property). Returns the number of (horizon, segment, item) rows.';

-- ---------------------------------------------------------------- stored item-embedding neighbours

-- The one definition of a current stored list: built after the item's vector last changed.
CREATE OR REPLACE VIEW pgrec.embedding_neighbor_status AS
SELECT e.item_key,
       EXISTS (SELECT 1 FROM pgrec.model_neighbors mn
                WHERE mn.model = 'embedding' AND mn.item_key = e.item_key AND mn.rank = 1
                  AND mn.built_at >= e.updated_at) AS current
  FROM pgrec.item_embeddings e;
COMMENT ON VIEW pgrec.embedding_neighbor_status IS
    'Per item with a vector: whether its stored embedding-neighbour list (pgrec.model_neighbors ''embedding'') is '
    'current, i.e. built at or after item_embeddings.updated_at. The history source reads a current list instead '
    'of searching the index.';

CREATE OR REPLACE FUNCTION pgrec.refresh_embedding_neighbors(p_item_keys bigint[], p_k int DEFAULT 20)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET max_parallel_workers_per_gather = 0
AS $$
DECLARE
    n bigint;
BEGIN
    IF p_k IS NULL OR p_k < 1 OR p_k > 500 THEN
        RAISE EXCEPTION 'pgrec.refresh_embedding_neighbors: k must be between 1 and 500, got %', p_k
            USING ERRCODE = '22023';
    END IF;
    PERFORM 1 FROM pgrec.item_embeddings LIMIT 0;  -- the vector library is loaded, so hnsw.* GUCs exist
    -- a wider beam than the request path's (ef_search 2k, at least 40): built once, read many times
    PERFORM set_config('hnsw.ef_search', least(greatest(2 * p_k, 40), 1000)::text, true);
    DELETE FROM pgrec.model_neighbors mn WHERE mn.model = 'embedding' AND mn.item_key = ANY (p_item_keys);
    INSERT INTO pgrec.model_neighbors (model, item_key, rank, neighbor_key, score)
    SELECT 'embedding', se.item_key, nb.rank, nb.item_key, nb.sim
      FROM pgrec.item_embeddings se
     CROSS JOIN LATERAL (
         SELECT l.item_key, l.sim, (row_number() OVER (ORDER BY l.d, l.item_key))::int AS rank
           FROM (SELECT e2.item_key, e2.embedding OPERATOR(public.<=>) se.embedding AS d,
                        1 - (e2.embedding OPERATOR(public.<=>) se.embedding) AS sim
                   FROM pgrec.item_embeddings e2
                  WHERE e2.item_key <> se.item_key
                  ORDER BY e2.embedding OPERATOR(public.<=>) se.embedding
                  LIMIT p_k) l) nb
     WHERE se.item_key = ANY (p_item_keys);
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN n;
END
$$;
COMMENT ON FUNCTION pgrec.refresh_embedding_neighbors(bigint[], int) IS
    'Store the k nearest items (cosine, HNSW, self excluded) of each given item in pgrec.model_neighbors '
    '(model ''embedding''); the history source reads them instead of searching while built_at >= the item''s '
    'item_embeddings.updated_at. Returns the rows written.';

-- ---------------------------------------------------------------- one source by name (the registry)

CREATE OR REPLACE FUNCTION pgrec.candidate_sources_call(
    p_source text, p_user_key bigint, p_k int, p_as_of timestamptz DEFAULT NULL, p_categories text[] DEFAULT NULL,
    p_params jsonb DEFAULT '{}')
RETURNS TABLE (item_key bigint, source text, score float8, rank int)
LANGUAGE plpgsql VOLATILE PARALLEL UNSAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
SET max_parallel_workers_per_gather = 0
AS $$
BEGIN
    CASE p_source
        WHEN 'ann' THEN RETURN QUERY SELECT * FROM pgrec.source_ann(p_user_key, p_k, p_as_of, p_categories, p_params);
        WHEN 'history' THEN RETURN QUERY SELECT * FROM pgrec.source_history(p_user_key, p_k, p_as_of, p_categories, p_params);
        WHEN 'trending' THEN RETURN QUERY SELECT * FROM pgrec.source_trending(p_user_key, p_k, p_as_of, p_categories, p_params);
        WHEN 'fresh' THEN RETURN QUERY SELECT * FROM pgrec.source_fresh(p_user_key, p_k, p_as_of, p_categories, p_params);
        WHEN 'popular' THEN RETURN QUERY SELECT * FROM pgrec.source_popular(p_user_key, p_k, p_as_of, p_categories, p_params);
        ELSE RAISE EXCEPTION 'pgrec.candidate_sources_call: unknown source "%"', p_source
                 USING ERRCODE = '22023', HINT = 'the sources are ann, history, trending, fresh, popular';
    END CASE;
END
$$;
COMMENT ON FUNCTION pgrec.candidate_sources_call(text, bigint, int, timestamptz, text[], jsonb) IS
    'Run one candidate source by name (for evaluation and benchmarks; pgrec.candidates unions them all).';
