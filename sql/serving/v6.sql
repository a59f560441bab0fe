-- Serving v6 (migration 0029; reverting restores v5's pgrec.finish_request and v2's pgrec.recommend): a served
-- list keeps the feature rows its items were ranked with. pgrec.finish_request takes the candidates' feature
-- matrix (two new last parameters: the feature names and one row per item key) and, when it logs the list,
-- stores the shown items' rows in pgrec.served_features (config log_served_features, default true), copying one
-- slice of the matrix per item (no work per value). The feature list is looked up in pgrec.feature_sets, where a
-- trigger on pgrec.models registers every ranker's list when it is stored (never inserted by a request: an
-- uncommitted row there would make other requests wait). Training from served lists reads the rows instead of
-- recomputing features with stage-1 models rebuilt since (which have seen the clicks). pgrec.recommend passes the
-- rows its compiled ranker scored. Same lists, same scores.

DROP FUNCTION IF EXISTS pgrec.finish_request(text, text, int, bigint[], float8[], text[], jsonb, timestamptz, text,
                                             bigint, text, boolean, text);

CREATE OR REPLACE FUNCTION pgrec.served_features_on()
RETURNS boolean
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT coalesce((SELECT (c.value #>> '{}')::boolean FROM pgrec.config c WHERE c.key = 'log_served_features'), true)
$$;
COMMENT ON FUNCTION pgrec.served_features_on() IS
    'Whether a logged list stores its feature rows (config log_served_features; true when absent).';

CREATE OR REPLACE FUNCTION pgrec.features_time(p_user_key bigint, p_request_id uuid, p_served_at timestamptz,
                                               p_slack interval)
RETURNS timestamptz
LANGUAGE sql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    -- the serving time or, when an event of the user on a shown item citing the request is stamped within the
    -- clock slack before it (client clocks), that event's time: features recomputed as of it hold no label
    SELECT least(p_served_at, (SELECT min(e.occurred_at) FROM pgrec.events e
                                WHERE e.user_key = p_user_key AND e.request_id = p_request_id
                                  AND e.occurred_at >= p_served_at - p_slack AND e.occurred_at < p_served_at
                                  AND e.item_key IN (SELECT i.item_key FROM pgrec.impressions i
                                                      WHERE i.user_key = p_user_key AND i.request_id = p_request_id)))
$$;
COMMENT ON FUNCTION pgrec.features_time(bigint, uuid, timestamptz, interval) IS
    'The time a served list''s features are recomputed as of when they were not stored (training from served '
    'lists, `pgrec explain --request`): the serving time, or a citing event''s stamped within p_slack before it.';

CREATE OR REPLACE FUNCTION pgrec.models_feature_set()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF NEW.kind = 'ranker' AND jsonb_typeof(NEW.features) = 'array' AND jsonb_array_length(NEW.features) > 0 THEN
        INSERT INTO pgrec.feature_sets (names)
        VALUES (ARRAY(SELECT jsonb_array_elements_text(NEW.features))) ON CONFLICT (names) DO NOTHING;
    END IF;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION pgrec.models_feature_set() IS
    'Trigger: a stored ranker registers its feature list in pgrec.feature_sets, which served lists refer to '
    '(pgrec.finish_request only looks it up).';
CREATE TRIGGER models_feature_set AFTER INSERT ON pgrec.models
    FOR EACH ROW EXECUTE FUNCTION pgrec.models_feature_set();

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
    p_log           boolean DEFAULT true,
    p_experiment    text DEFAULT NULL,
    p_feature_names text[] DEFAULT NULL,
    p_features      float8[] DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    u   bigint;
    rid uuid := gen_random_uuid();
    r   jsonb;
    ctx jsonb := coalesce(p_context, '{}');
    fs  int;
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
    IF p_features IS NOT NULL AND coalesce(
           p_feature_names IS NULL OR cardinality(p_feature_names) = 0
           OR array_position(p_feature_names, NULL) IS NOT NULL
           OR cardinality(p_item_keys) = 0 OR array_ndims(p_features) <> 2
           OR array_lower(p_features, 1) <> 1 OR array_lower(p_features, 2) <> 1
           OR array_length(p_features, 1) <> cardinality(p_item_keys)
           OR array_length(p_features, 2) <> cardinality(p_feature_names), true) THEN
        RAISE EXCEPTION 'pgrec.finish_request: features must be a matrix of one row per item key (%) and one column '
                        'per feature name (%), got % rows of % columns', coalesce(cardinality(p_item_keys), 0),
                        coalesce(cardinality(p_feature_names), 0), coalesce(array_length(p_features, 1), 0),
                        coalesce(array_length(p_features, 2), 0) USING ERRCODE = '22023';
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
            -- (distinct keys first, then one item lookup each: v4 looked an item up per event)
            || coalesce((SELECT jsonb_agg(i.item_id)
                           FROM (SELECT DISTINCT e.item_key FROM pgrec.events e
                                  WHERE e.user_key = u AND e.occurred_at < coalesce(p_as_of, now())) s
                           JOIN pgrec.items i ON i.item_key = s.item_key), '[]')) END;
    END IF;
    r := pgrec.rerank(u, p_surface, p_k, coalesce(p_item_keys, '{}'), coalesce(p_scores, '{}'),
                      coalesce(p_sources, '{}'), ctx - 'exclude_seen', p_as_of, p_policy_set);
    IF p_log AND jsonb_array_length(coalesce(r -> 'items', '[]')) > 0 THEN
        INSERT INTO pgrec.impressions (request_id, user_key, surface, position, item_key, score, model_version,
                                       policy_versions, variant, experiment, reasons)
        SELECT rid, u, p_surface, (x ->> 'position')::int, (x ->> 'item_key')::bigint, (x ->> 'score')::float8,
               p_model_version, r -> 'policy_versions', p_variant, p_experiment, x -> 'reasons'
          FROM jsonb_array_elements(r -> 'items') AS x;
        -- the feature rows the shown items were ranked with (items a policy added from outside the candidates,
        -- such as a pin, have none), for the ranker's training from served lists: one 1 x F slice of the matrix
        -- per item, copied as it is (NaN from the Python path and NULL from the SQL path both mean missing).
        -- The feature list is looked up, never inserted here (a row inserted by an open transaction would make
        -- every other request wait for it): rankers register theirs when stored (pgrec.models_feature_set);
        -- one that is not registered is stored with the row.
        IF p_features IS NOT NULL AND pgrec.served_features_on() THEN
            SELECT f.feature_set INTO fs FROM pgrec.feature_sets f WHERE f.names = p_feature_names;
            INSERT INTO pgrec.served_features (user_key, request_id, feature_set, names, item_keys, features)
            SELECT u, rid, fs, CASE WHEN fs IS NULL THEN p_feature_names END,
                   array_agg(s.item_key ORDER BY s.pos), array_agg(p_features[s.row_no:s.row_no][:] ORDER BY s.pos)
              FROM (SELECT (x ->> 'item_key')::bigint AS item_key, (x ->> 'position')::int AS pos,
                           array_position(p_item_keys, (x ->> 'item_key')::bigint) AS row_no
                      FROM jsonb_array_elements(r -> 'items') AS x) s
             WHERE s.row_no IS NOT NULL
            HAVING count(*) > 0;
        END IF;
    END IF;
    RETURN jsonb_build_object(
        'request_id', CASE WHEN p_log THEN rid END,
        'items', coalesce(r -> 'items', '[]'),
        'dropped', coalesce(r -> 'dropped', '{}'),
        'skipped', coalesce(r -> 'skipped', '{}'),
        'policy_versions', coalesce(r -> 'policy_versions', '[]'),
        'model_version', p_model_version,
        'variant', p_variant,
        'experiment', p_experiment);
END
$$;
COMMENT ON FUNCTION pgrec.finish_request(text, text, int, bigint[], float8[], text[], jsonb, timestamptz, text,
                                         bigint, text, boolean, text, text[], float8[]) IS
    'Stage 3 and logging of one request: pgrec.rerank over scored candidates (best first), then the final list '
    'into pgrec.impressions under a new request id (with the variant and the experiment it belongs to), in the '
    'same call, with the shown items'' feature rows (features: one row per item key, one column per feature '
    'name) into pgrec.served_features unless config log_served_features is false. context.exclude_seen = true '
    'adds every item the user had an event with before as_of to context.exclude. Returns {request_id, items, '
    'dropped, skipped, policy_versions, model_version, variant, experiment}. Internal: apps call pgrec.recommend.';

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
    names text[];
    fx    float8[];
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
        SELECT cr.function_name, string_agg(format('c.%I::float8', f.name), ', ' ORDER BY f.ord),
               array_agg(f.name ORDER BY f.ord)
          INTO fn, feats, names
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
        -- the feature rows too when the list is logged: finish_request stores the shown items' rows
        EXECUTE format(
            'SELECT array_agg(q.item_key ORDER BY q.s DESC, q.item_key), array_agg(q.s ORDER BY q.s DESC, q.item_key),'
            '       array_agg(q.src ORDER BY q.s DESC, q.item_key),'
            '       array_agg(q.x ORDER BY q.s DESC, q.item_key) FILTER (WHERE $5)'
            '  FROM (SELECT p.item_key, p.src, p.x, pgrec.%I(p.x) AS s'
            '          FROM (SELECT c.item_key, array_to_string(c.sources, %L) AS src, ARRAY[%s] AS x'
            '                  FROM pgrec.candidate_features($1, $2, $3, $4) AS c OFFSET 0) AS p) AS q',
            fn, ',', feats)
          INTO keys, sc, srcs, fx
          USING user_id, surface, n, as_of, log;
    END IF;
    res := pgrec.finish_request(user_id, surface, k, keys, sc, srcs, context, as_of, policy_set, v, variant, log,
                                NULL, CASE WHEN fx IS NOT NULL THEN names END, fx);
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
    'best first, all carrying the request id that events may cite (NULL when log is false); a logged list '
    'also stores the feature rows its items were ranked with (pgrec.served_features). context: request '
    'exclude / include-only lists, filter values and exclude_seen (true: leave out every item the user already '
    'had an event with); as_of NULL means now; model_version / policy_set / variant select an A/B arm.';
