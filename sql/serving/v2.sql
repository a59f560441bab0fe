-- Serving: the whole funnel inside PostgreSQL, and the one place a served list becomes impressions.
-- Python (engine/pipeline.py) and SQL-only apps (pgrec.recommend) share pgrec.fallback_score and
-- pgrec.finish_request, so both paths rank, re-rank and log identically.

CREATE OR REPLACE FUNCTION pgrec.fallback_score(
    ann_rank int, history_rank int, trending_rank int, fresh_rank int, popular_rank int)
RETURNS float8
LANGUAGE sql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    -- reciprocal-rank fusion of the candidate sources (k = 60, Cormack et al. 2009)
    SELECT coalesce(1.0::float8 / (60 + ann_rank), 0)
         + coalesce(1.0::float8 / (60 + history_rank), 0)
         + coalesce(1.0::float8 / (60 + trending_rank), 0)
         + coalesce(1.0::float8 / (60 + fresh_rank), 0)
         + coalesce(1.0::float8 / (60 + popular_rank), 0)
$$;
COMMENT ON FUNCTION pgrec.fallback_score(int, int, int, int, int) IS
    'Score of a candidate when no ranker is active: sum over its sources of 1 / (60 + rank) (reciprocal-rank '
    'fusion). The Python and SQL paths both read it from here.';

CREATE OR REPLACE FUNCTION pgrec.serving_candidates()
RETURNS int
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce((SELECT (c.value #>> '{}')::int FROM pgrec.config c WHERE c.key = 'serving_candidates'), 200)
$$;
COMMENT ON FUNCTION pgrec.serving_candidates() IS
    'How many candidates a request ranks (config serving_candidates): the same for the Python and SQL paths.';

CREATE OR REPLACE FUNCTION pgrec.finish_request(
    p_user_id       text,
    p_surface       text,
    p_k             int,
    p_item_keys     bigint[],
    p_scores        float8[],
    p_sources       text[],
    p_context       jsonb DEFAULT '{}',
    p_as_of         timestamptz DEFAULT NULL,
    p_policy_set    text DEFAULT NULL,
    p_model_version bigint DEFAULT NULL,
    p_variant       text DEFAULT NULL,
    p_log           boolean DEFAULT true)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    u   bigint;
    rid uuid := gen_random_uuid();
    r   jsonb;
    ctx jsonb := coalesce(p_context, '{}');
BEGIN
    IF p_user_id IS NULL OR p_user_id = '' THEN
        RAISE EXCEPTION 'pgrec.recommend: user_id is required' USING ERRCODE = '22023';
    END IF;
    IF p_k IS NULL OR p_k < 1 OR p_k > 1000 THEN
        RAISE EXCEPTION 'pgrec.recommend: k must be between 1 and 1000, got %', p_k USING ERRCODE = '22023';
    END IF;
    IF NOT EXISTS (SELECT 1 FROM pgrec.surfaces s WHERE s.surface = p_surface) THEN
        RAISE EXCEPTION 'pgrec.recommend: unknown surface "%"', p_surface
            USING ERRCODE = '22023', HINT = 'the known surfaces are the rows of pgrec.surfaces';
    END IF;
    IF p_context IS NOT NULL AND jsonb_typeof(p_context) <> 'object' THEN
        RAISE EXCEPTION 'pgrec.recommend: context must be a JSON object' USING ERRCODE = '22023';
    END IF;
    IF ctx ? 'exclude_seen' AND jsonb_typeof(ctx -> 'exclude_seen') <> 'boolean' THEN
        RAISE EXCEPTION 'pgrec.recommend: context.exclude_seen must be true or false' USING ERRCODE = '22023';
    END IF;
    IF coalesce(cardinality(p_item_keys), 0) <> coalesce(cardinality(p_scores), 0)
       OR coalesce(cardinality(p_item_keys), 0) <> coalesce(cardinality(p_sources), 0) THEN
        RAISE EXCEPTION 'pgrec.finish_request: item_keys, scores and sources differ in length' USING ERRCODE = '22023';
    END IF;
    IF p_log THEN
        u := pgrec.user_key_for(p_user_id);  -- impressions need a user row: created on first sight
    ELSE
        SELECT us.user_key INTO u FROM pgrec.users us WHERE us.user_id = p_user_id;
    END IF;
    IF (ctx ->> 'exclude_seen')::boolean AND u IS NOT NULL THEN
        -- every item the user had any event with before as_of joins the request's exclude list (a malformed
        -- exclude is left as it is, for pgrec.rerank to refuse)
        ctx := CASE WHEN coalesce(jsonb_typeof(ctx -> 'exclude'), 'null') NOT IN ('array', 'null') THEN ctx
                    ELSE jsonb_set(ctx, '{exclude}', coalesce(CASE WHEN jsonb_typeof(ctx -> 'exclude') = 'array'
                                                                    THEN ctx -> 'exclude' END, '[]')
            || coalesce((SELECT jsonb_agg(DISTINCT i.item_id)
                           FROM pgrec.events e JOIN pgrec.items i ON i.item_key = e.item_key
                          WHERE e.user_key = u AND e.occurred_at < coalesce(p_as_of, now())), '[]')) END;
    END IF;
    r := pgrec.rerank(u, p_surface, p_k, coalesce(p_item_keys, '{}'), coalesce(p_scores, '{}'),
                      coalesce(p_sources, '{}'), ctx - 'exclude_seen', p_as_of, p_policy_set);
    IF p_log AND jsonb_array_length(coalesce(r -> 'items', '[]')) > 0 THEN
        INSERT INTO pgrec.impressions (request_id, user_key, surface, position, item_key, score, model_version,
                                       policy_versions, variant, reasons)
        SELECT rid, u, p_surface, (x ->> 'position')::int, (x ->> 'item_key')::bigint, (x ->> 'score')::float8,
               p_model_version, r -> 'policy_versions', p_variant, x -> 'reasons'
          FROM jsonb_array_elements(r -> 'items') AS x;
    END IF;
    RETURN jsonb_build_object(
        'request_id', CASE WHEN p_log THEN rid END,
        'items', coalesce(r -> 'items', '[]'),
        'dropped', coalesce(r -> 'dropped', '{}'),
        'policy_versions', coalesce(r -> 'policy_versions', '[]'),
        'model_version', p_model_version,
        'variant', p_variant);
END
$$;
COMMENT ON FUNCTION pgrec.finish_request(text, text, int, bigint[], float8[], text[], jsonb, timestamptz, text,
                                         bigint, text, boolean) IS
    'Stage 3 and logging of one request: pgrec.rerank over scored candidates (best first), then the final list '
    'into pgrec.impressions under a new request id, in the same call. context.exclude_seen = true adds every item '
    'the user had an event with before as_of to context.exclude. Returns {request_id, items, dropped, '
    'policy_versions, model_version, variant}. Internal: apps call pgrec.recommend.';

CREATE OR REPLACE FUNCTION pgrec.recommend(
    user_id       text,
    k             int DEFAULT 10,
    surface       text DEFAULT 'default',
    context       jsonb DEFAULT '{}',
    as_of         timestamptz DEFAULT NULL,
    model_version bigint DEFAULT NULL,
    policy_set    text DEFAULT NULL,
    variant       text DEFAULT NULL,
    log           boolean DEFAULT true)
RETURNS TABLE (request_id uuid, "position" int, item_id text, score float8, reasons jsonb)
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
-- statements planned for this call's values (migration 0008); no parallel workers for a per-user request
SET plan_cache_mode = force_custom_plan
SET max_parallel_workers_per_gather = 0
AS $$
#variable_conflict use_variable
DECLARE
    n     int := pgrec.serving_candidates();
    v     bigint;
    fn    text;
    feats text;
    keys  bigint[];
    sc    float8[];
    srcs  text[];
    res   jsonb;
BEGIN
    IF k IS NULL OR k < 1 OR k > 1000 THEN  -- before any work
        RAISE EXCEPTION 'pgrec.recommend: k must be between 1 and 1000, got %', k USING ERRCODE = '22023';
    END IF;
    v := coalesce(model_version,
                  (SELECT m.version FROM pgrec.models m WHERE m.kind = 'ranker' AND m.active));
    IF v IS NULL THEN
        -- no ranker: candidates only, scored by pgrec.fallback_score
        SELECT array_agg(q.item_key ORDER BY q.s DESC, q.item_key),
               array_agg(q.s ORDER BY q.s DESC, q.item_key),
               array_agg(q.src ORDER BY q.s DESC, q.item_key)
          INTO keys, sc, srcs
          FROM (SELECT c.item_key, array_to_string(c.sources, ',') AS src,
                       pgrec.fallback_score(c.ann_rank, c.history_rank, c.trending_rank, c.fresh_rank,
                                            c.popular_rank) AS s
                  FROM pgrec.candidates(user_id, surface, n, as_of) AS c) AS q;
    ELSE
        SELECT cr.function_name, string_agg(format('c.%I::float8', f.name), ', ' ORDER BY f.ord)
          INTO fn, feats
          FROM pgrec.compiled_rankers cr
          CROSS JOIN LATERAL jsonb_array_elements_text(cr.features) WITH ORDINALITY AS f(name, ord)
         WHERE cr.version = v
         GROUP BY cr.function_name;
        IF fn IS NULL THEN
            IF NOT EXISTS (SELECT 1 FROM pgrec.models m WHERE m.version = v AND m.kind = 'ranker') THEN
                RAISE EXCEPTION 'pgrec.recommend: ranker model version % does not exist', v USING ERRCODE = 'P0002';
            END IF;
            RAISE EXCEPTION 'pgrec.recommend: ranker model version % is not compiled to SQL', v
                USING ERRCODE = '55000', HINT = 'run `pgrec models compile ' || v || '` (activation does it)';
        END IF;
        EXECUTE format(
            'SELECT array_agg(q.item_key ORDER BY q.s DESC, q.item_key), array_agg(q.s ORDER BY q.s DESC, q.item_key),'
            '       array_agg(q.src ORDER BY q.s DESC, q.item_key)'
            '  FROM (SELECT c.item_key, array_to_string(c.sources, %L) AS src, pgrec.%I(ARRAY[%s]) AS s'
            '          FROM pgrec.candidate_features($1, $2, $3, $4) AS c) AS q', ',', fn, feats)
          INTO keys, sc, srcs
          USING user_id, surface, n, as_of;
    END IF;
    res := pgrec.finish_request(user_id, surface, k, keys, sc, srcs, context, as_of, policy_set, v, variant, log);
    RETURN QUERY
        SELECT (res ->> 'request_id')::uuid, (x ->> 'position')::int, x ->> 'item_id', (x ->> 'score')::float8,
               x -> 'reasons'
          FROM jsonb_array_elements(res -> 'items') AS x
         ORDER BY (x ->> 'position')::int;
END
$$;
COMMENT ON FUNCTION pgrec.recommend(text, int, text, jsonb, timestamptz, bigint, text, text, boolean) IS
    'The final list for a user, computed inside PostgreSQL: candidates -> features -> the active ranker compiled '
    'to SQL (pgrec.fallback_score when none is active) -> pgrec.rerank -> impressions. Returns one row per item, '
    'best first, all carrying the request id that events may cite (NULL when log is false). context: request '
    'exclude / include-only lists, filter values and exclude_seen (true: leave out every item the user already '
    'had an event with); as_of NULL means now; model_version / policy_set / variant select an A/B arm.';
