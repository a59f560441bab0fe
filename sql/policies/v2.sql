-- Stage 3: re-ranking with business rules stored as rows of pgrec.policies.
-- One engine for every path (Python, SQL-only, HTTP): pgrec.rerank. Each kind has one validator branch
-- (pgrec.policy_validate, run by a trigger when a row is written) and one apply step: pgrec.policy_history_keys
-- (exclude_interacted/negative/served, over the user's events read once per request; exclude_negative with
-- neighbours: pgrec.policy_drop_negative), pgrec.policy_drop_hits (blocklist, freshness, attribute_filter),
-- pgrec.policy_move_<kind> (source_mix, diversity, mmr, promote, exploration) or a branch of pgrec.rerank
-- (holdout, relevance_floor, boost, pin). Predicates are structured JSON interpreted here, never SQL text.
-- The kinds and their parameters are documented in docs/policies.md and engine/policies.py.
-- v2 is v1 made cheaper per request with the same answers (tests/test_policies.py::test_v2_engine_answers_as_v1).

-- ---------------------------------------------------------------- kinds

CREATE OR REPLACE FUNCTION pgrec.policy_kinds()
RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    -- the canonical order: the tie-break after priority (filters, then scores, then order, pins last)
    SELECT ARRAY['holdout', 'exclude_interacted', 'exclude_negative', 'exclude_served', 'blocklist', 'freshness',
                 'attribute_filter', 'relevance_floor', 'boost', 'source_mix', 'diversity', 'mmr', 'promote',
                 'exploration', 'pin']::text[]
$$;
COMMENT ON FUNCTION pgrec.policy_kinds() IS
    'The policy kinds, in the order that breaks priority ties (filters, scores, order, pins last).';

CREATE OR REPLACE FUNCTION pgrec.policy_drop_kinds()
RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT ARRAY['exclude_interacted', 'exclude_negative', 'exclude_served', 'blocklist', 'freshness',
                 'attribute_filter', 'relevance_floor']::text[]
$$;
COMMENT ON FUNCTION pgrec.policy_drop_kinds() IS
    'Kinds that only drop items; all but relevance_floor still run for a user in a holdout.';

-- ---------------------------------------------------------------- validation helpers

CREATE OR REPLACE FUNCTION pgrec.policy_fail(p_where text, p_msg text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    RAISE EXCEPTION '%: %', p_where, p_msg
        USING ERRCODE = '22023', HINT = 'the kinds and their parameters are documented in docs/policies.md';
END
$$;
COMMENT ON FUNCTION pgrec.policy_fail(text, text) IS 'Raise a policy validation error (22023) naming the field.';

CREATE OR REPLACE FUNCTION pgrec.policy_check_keys(p jsonb, p_allowed text[], p_where text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    k text;
BEGIN
    IF p IS NULL OR jsonb_typeof(p) <> 'object' THEN
        PERFORM pgrec.policy_fail(p_where, 'must be a JSON object');
    END IF;
    FOR k IN SELECT jsonb_object_keys(p) LOOP
        IF NOT (k = ANY (p_allowed)) THEN
            PERFORM pgrec.policy_fail(p_where || '.' || k,
                format('unknown parameter (allowed: %s)', array_to_string(p_allowed, ', ')));
        END IF;
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgrec.policy_check_keys(jsonb, text[], text) IS
    'Refuse a parameter object that is not an object or has a key outside p_allowed.';

CREATE OR REPLACE FUNCTION pgrec.policy_num(
    p jsonb, p_key text, p_where text, p_required boolean, p_lo numeric DEFAULT NULL, p_hi numeric DEFAULT NULL,
    p_integer boolean DEFAULT false, p_lo_open boolean DEFAULT false)
RETURNS numeric
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v jsonb := p -> p_key;
    n numeric;
    what text := CASE WHEN p_integer THEN 'an integer' ELSE 'a number' END
                 || CASE WHEN p_lo IS NOT NULL THEN CASE WHEN p_lo_open THEN ' > ' ELSE ' >= ' END || p_lo ELSE '' END
                 || CASE WHEN p_hi IS NOT NULL THEN ' and <= ' || p_hi ELSE '' END;
BEGIN
    IF v IS NULL OR jsonb_typeof(v) = 'null' THEN
        IF p_required THEN
            PERFORM pgrec.policy_fail(p_where || '.' || p_key, 'is required (' || what || ')');
        END IF;
        RETURN NULL;
    END IF;
    IF jsonb_typeof(v) <> 'number' THEN
        PERFORM pgrec.policy_fail(p_where || '.' || p_key, format('must be %s, got %s', what, v));
    END IF;
    n := v::numeric;
    IF (p_integer AND n <> trunc(n)) OR (p_lo IS NOT NULL AND (n < p_lo OR (p_lo_open AND n = p_lo)))
       OR (p_hi IS NOT NULL AND n > p_hi) THEN
        PERFORM pgrec.policy_fail(p_where || '.' || p_key, format('must be %s, got %s', what, v));
    END IF;
    RETURN n;
END
$$;
COMMENT ON FUNCTION pgrec.policy_num(jsonb, text, text, boolean, numeric, numeric, boolean, boolean) IS
    'A numeric parameter, checked (type, bounds, integer); NULL when absent and optional.';

CREATE OR REPLACE FUNCTION pgrec.policy_strings(p jsonb, p_key text, p_where text, p_required boolean)
RETURNS text[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v jsonb := p -> p_key;
BEGIN
    IF v IS NULL OR jsonb_typeof(v) = 'null' THEN
        IF p_required THEN
            PERFORM pgrec.policy_fail(p_where || '.' || p_key, 'is required (a list of strings)');
        END IF;
        RETURN NULL;
    END IF;
    IF jsonb_typeof(v) <> 'array' OR EXISTS (
           SELECT 1 FROM jsonb_array_elements(v) e WHERE jsonb_typeof(e) <> 'string' OR e #>> '{}' = '') THEN
        PERFORM pgrec.policy_fail(p_where || '.' || p_key, format('must be a list of non-empty strings, got %s', v));
    END IF;
    IF p_required AND jsonb_array_length(v) = 0 THEN
        PERFORM pgrec.policy_fail(p_where || '.' || p_key, 'must not be empty');
    END IF;
    RETURN ARRAY(SELECT jsonb_array_elements_text(v));
END
$$;
COMMENT ON FUNCTION pgrec.policy_strings(jsonb, text, text, boolean) IS 'A list-of-strings parameter, checked.';

CREATE OR REPLACE FUNCTION pgrec.policy_choice(
    p jsonb, p_key text, p_where text, p_choices text[], p_required boolean DEFAULT false)
RETURNS text
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    v jsonb := p -> p_key;
BEGIN
    IF v IS NULL OR jsonb_typeof(v) = 'null' THEN
        IF p_required THEN
            PERFORM pgrec.policy_fail(p_where || '.' || p_key,
                format('is required (one of %s)', array_to_string(p_choices, ', ')));
        END IF;
        RETURN NULL;
    END IF;
    IF jsonb_typeof(v) <> 'string' OR NOT (v #>> '{}' = ANY (p_choices)) THEN
        PERFORM pgrec.policy_fail(p_where || '.' || p_key,
            format('must be one of %s, got %s', array_to_string(p_choices, ', '), v));
    END IF;
    RETURN v #>> '{}';
END
$$;
COMMENT ON FUNCTION pgrec.policy_choice(jsonb, text, text, text[], boolean) IS 'A string parameter from a fixed list.';

CREATE OR REPLACE FUNCTION pgrec.policy_check_value(v jsonb, p_where text, p_kind text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    -- a literal, or {"param": name, "default": literal} read from the request context's params
    IF jsonb_typeof(v) = 'object' THEN
        PERFORM pgrec.policy_check_keys(v, ARRAY['param', 'default'], p_where);
        IF jsonb_typeof(v -> 'param') IS DISTINCT FROM 'string' OR v ->> 'param' !~ '^[A-Za-z_][A-Za-z0-9_.-]{0,62}$' THEN
            PERFORM pgrec.policy_fail(p_where || '.param', 'must be a request parameter name (letters, digits, _ . -)');
        END IF;
        IF v ? 'default' THEN
            PERFORM pgrec.policy_check_value(v -> 'default', p_where || '.default', p_kind);
        END IF;
        RETURN;
    END IF;
    IF p_kind = 'number' AND jsonb_typeof(v) <> 'number' THEN
        PERFORM pgrec.policy_fail(p_where, format('must be a number or {"param": ...}, got %s', v));
    ELSIF p_kind = 'list' AND jsonb_typeof(v) <> 'array' THEN
        PERFORM pgrec.policy_fail(p_where, format('must be a list or {"param": ...}, got %s', v));
    ELSIF p_kind = 'scalar' AND jsonb_typeof(v) NOT IN ('string', 'number', 'boolean') THEN
        PERFORM pgrec.policy_fail(p_where, format('must be a string, number or boolean or {"param": ...}, got %s', v));
    ELSIF p_kind = 'list' AND EXISTS (SELECT 1 FROM jsonb_array_elements(v) e
                                      WHERE jsonb_typeof(e) NOT IN ('string', 'number', 'boolean')) THEN
        PERFORM pgrec.policy_fail(p_where, format('must hold strings, numbers or booleans, got %s', v));
    END IF;
END
$$;
COMMENT ON FUNCTION pgrec.policy_check_value(jsonb, text, text) IS
    'Check a predicate value: a literal of the right shape or a {"param": name, "default": ...} reference.';

CREATE OR REPLACE FUNCTION pgrec.policy_check_predicate(p jsonb, p_where text, p_user_side boolean)
RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    op     text;
    field  text;
    ops    text[];
    n      int := 0;
    e      jsonb;
    comb   text;
BEGIN
    IF p IS NULL OR jsonb_typeof(p) <> 'object' THEN
        PERFORM pgrec.policy_fail(p_where, format('must be a predicate object, got %s', coalesce(p::text, 'nothing')));
    END IF;
    FOREACH comb IN ARRAY ARRAY['all', 'any'] LOOP
        IF p ? comb THEN
            PERFORM pgrec.policy_check_keys(p, ARRAY[comb], p_where);
            IF jsonb_typeof(p -> comb) <> 'array' OR jsonb_array_length(p -> comb) = 0 THEN
                PERFORM pgrec.policy_fail(p_where || '.' || comb, 'must be a non-empty list of predicates');
            END IF;
            FOR e IN SELECT jsonb_array_elements(p -> comb) LOOP
                PERFORM pgrec.policy_check_predicate(e, format('%s.%s[%s]', p_where, comb, n), p_user_side);
                n := n + 1;
            END LOOP;
            RETURN;
        END IF;
    END LOOP;
    IF p ? 'not' THEN
        PERFORM pgrec.policy_check_keys(p, ARRAY['not'], p_where);
        PERFORM pgrec.policy_check_predicate(p -> 'not', p_where || '.not', p_user_side);
        RETURN;
    END IF;
    PERFORM pgrec.policy_check_keys(p, ARRAY['field', 'property', 'op', 'value', 'values', 'min', 'max'], p_where);
    IF p ? 'property' = p ? 'field' THEN
        PERFORM pgrec.policy_fail(p_where,
            'a condition names exactly one of "property" (a key of properties) or "field", '
            'or combines conditions with "all", "any", "not"');
    END IF;
    IF p ? 'property' THEN
        IF jsonb_typeof(p -> 'property') <> 'string' OR p ->> 'property' = '' THEN
            PERFORM pgrec.policy_fail(p_where || '.property', 'must be a non-empty string');
        END IF;
        field := 'property';
        ops := ARRAY['equals', 'in', 'range', 'contains', 'exists'];
    ELSE
        field := pgrec.policy_choice(p, 'field', p_where,
            CASE WHEN p_user_side THEN ARRAY['property']
                 ELSE ARRAY['categories', 'item_id', 'source', 'age_days', 'score'] END);
        ops := CASE field
            WHEN 'categories' THEN ARRAY['equals', 'contains', 'in', 'exists']
            WHEN 'item_id' THEN ARRAY['equals', 'in']
            WHEN 'source' THEN ARRAY['equals', 'contains', 'in', 'exists']
            ELSE ARRAY['range'] END;
    END IF;
    op := pgrec.policy_choice(p, 'op', p_where, ops, true);
    IF op IN ('equals', 'contains') THEN
        IF NOT p ? 'value' THEN
            PERFORM pgrec.policy_fail(p_where || '.value', format('is required for op %s', op));
        END IF;
        PERFORM pgrec.policy_check_value(p -> 'value', p_where || '.value', 'scalar');
    ELSIF op = 'in' THEN
        IF NOT p ? 'values' THEN
            PERFORM pgrec.policy_fail(p_where || '.values', 'is required for op in');
        END IF;
        PERFORM pgrec.policy_check_value(p -> 'values', p_where || '.values', 'list');
    ELSIF op = 'range' THEN
        IF NOT (p ? 'min' OR p ? 'max') THEN
            PERFORM pgrec.policy_fail(p_where, 'op range needs "min", "max" or both');
        END IF;
        IF p ? 'min' THEN
            PERFORM pgrec.policy_check_value(p -> 'min', p_where || '.min', 'number');
        END IF;
        IF p ? 'max' THEN
            PERFORM pgrec.policy_check_value(p -> 'max', p_where || '.max', 'number');
        END IF;
    END IF;
    IF op <> 'equals' AND op <> 'contains' AND p ? 'value' THEN
        PERFORM pgrec.policy_fail(p_where || '.value', format('is not used by op %s', op));
    END IF;
    IF op <> 'in' AND p ? 'values' THEN
        PERFORM pgrec.policy_fail(p_where || '.values', format('is not used by op %s', op));
    END IF;
    IF op <> 'range' AND (p ? 'min' OR p ? 'max') THEN
        PERFORM pgrec.policy_fail(p_where, format('min/max are not used by op %s', op));
    END IF;
END
$$;
COMMENT ON FUNCTION pgrec.policy_check_predicate(jsonb, text, boolean) IS
    'Check a structured predicate (all/any/not of conditions {property|field, op, value|values|min|max}); '
    'p_user_side: a segment condition on user properties (only "property" conditions).';

-- ---------------------------------------------------------------- the validator (one branch per kind)

CREATE OR REPLACE FUNCTION pgrec.policy_validate(p_kind text, p jsonb, p_segment jsonb, p_where text)
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w      text := p_where || ': params';
    names  text[];
    miss   text;
    lo     numeric;
    hi     numeric;
    n      int;
BEGIN
    IF p_kind IS NULL OR NOT (p_kind = ANY (pgrec.policy_kinds())) THEN
        PERFORM pgrec.policy_fail(p_where || ': kind',
            format('unknown kind %s (known: %s)', coalesce(quote_literal(p_kind), 'NULL'),
                   array_to_string(pgrec.policy_kinds(), ', ')));
    END IF;
    IF p_segment IS NOT NULL THEN
        PERFORM pgrec.policy_check_predicate(p_segment, p_where || ': segment', true);
    END IF;
    CASE p_kind
    WHEN 'holdout' THEN
        PERFORM pgrec.policy_check_keys(p, ARRAY['percent', 'salt', 'control'], w);
        PERFORM pgrec.policy_num(p, 'percent', w, true, 0, 100, false, true);
        IF p ? 'salt' AND jsonb_typeof(p -> 'salt') <> 'string' THEN
            PERFORM pgrec.policy_fail(w || '.salt', 'must be a string');
        END IF;
        PERFORM pgrec.policy_choice(p, 'control', w, ARRAY['trending', 'scores']);
    WHEN 'exclude_interacted' THEN
        PERFORM pgrec.policy_check_keys(p, ARRAY['event_types', 'lookback_days'], w);
        names := pgrec.policy_strings(p, 'event_types', w, false);
        SELECT min(x) INTO miss FROM unnest(names) x WHERE NOT EXISTS (SELECT 1 FROM pgrec.event_types t WHERE t.name = x);
        IF miss IS NOT NULL THEN
            PERFORM pgrec.policy_fail(w || '.event_types', format('unknown event type %L (see pgrec.event_types)', miss));
        END IF;
        PERFORM pgrec.policy_num(p, 'lookback_days', w, false, 0, NULL, false, true);
    WHEN 'exclude_negative' THEN
        PERFORM pgrec.policy_check_keys(p, ARRAY['lookback_days', 'neighbours', 'min_similarity', 'max_dislikes'], w);
        PERFORM pgrec.policy_num(p, 'lookback_days', w, false, 0, NULL, false, true);
        IF p ? 'neighbours' AND jsonb_typeof(p -> 'neighbours') <> 'boolean' THEN
            PERFORM pgrec.policy_fail(w || '.neighbours', format('must be true or false, got %s', p -> 'neighbours'));
        END IF;
        PERFORM pgrec.policy_num(p, 'min_similarity', w, false, 0, 1, false, true);
        PERFORM pgrec.policy_num(p, 'max_dislikes', w, false, 1, 1000, true);
    WHEN 'exclude_served' THEN
        PERFORM pgrec.policy_check_keys(p, ARRAY['min_impressions', 'window_days', 'engagement_types'], w);
        PERFORM pgrec.policy_num(p, 'min_impressions', w, true, 1, NULL, true);
        PERFORM pgrec.policy_num(p, 'window_days', w, true, 0, NULL, false, true);
        names := pgrec.policy_strings(p, 'engagement_types', w, false);
        SELECT min(x) INTO miss FROM unnest(names) x WHERE NOT EXISTS (SELECT 1 FROM pgrec.event_types t WHERE t.name = x);
        IF miss IS NOT NULL THEN
            PERFORM pgrec.policy_fail(w || '.engagement_types', format('unknown event type %L', miss));
        END IF;
    WHEN 'blocklist' THEN
        PERFORM pgrec.policy_check_keys(p, ARRAY['items', 'item_sets', 'categories'], w);
        PERFORM pgrec.policy_strings(p, 'items', w, false);
        names := pgrec.policy_strings(p, 'item_sets', w, false);
        PERFORM pgrec.policy_strings(p, 'categories', w, false);
        SELECT min(x) INTO miss FROM unnest(names) x WHERE NOT EXISTS (SELECT 1 FROM pgrec.item_sets s WHERE s.name = x);
        IF miss IS NOT NULL THEN
            PERFORM pgrec.policy_fail(w || '.item_sets', format('unknown item set %L (create it first)', miss));
        END IF;
        IF coalesce(jsonb_array_length(p -> 'items'), 0) + coalesce(jsonb_array_length(p -> 'item_sets'), 0)
           + coalesce(jsonb_array_length(p -> 'categories'), 0) = 0 THEN
            PERFORM pgrec.policy_fail(w, 'a blocklist needs items, item_sets or categories');
        END IF;
    WHEN 'freshness' THEN
        PERFORM pgrec.policy_check_keys(p, ARRAY['max_age_days'], w);
        PERFORM pgrec.policy_num(p, 'max_age_days', w, true, 0, NULL, false, true);
    WHEN 'attribute_filter' THEN
        PERFORM pgrec.policy_check_keys(p, ARRAY['predicate', 'mode'], w);
        PERFORM pgrec.policy_check_predicate(p -> 'predicate', w || '.predicate', false);
        PERFORM pgrec.policy_choice(p, 'mode', w, ARRAY['keep', 'drop']);
    WHEN 'relevance_floor' THEN
        PERFORM pgrec.policy_check_keys(p, ARRAY['min_score', 'fill'], w);
        PERFORM pgrec.policy_num(p, 'min_score', w, true);
        PERFORM pgrec.policy_choice(p, 'fill', w, ARRAY['none', 'trending']);
    WHEN 'boost' THEN
        PERFORM pgrec.policy_check_keys(p, ARRAY['predicate', 'multiply', 'add'], w);
        PERFORM pgrec.policy_check_predicate(p -> 'predicate', w || '.predicate', false);
        PERFORM pgrec.policy_num(p, 'multiply', w, false, 0);
        PERFORM pgrec.policy_num(p, 'add', w, false);
        IF NOT (p ? 'multiply' OR p ? 'add') THEN
            PERFORM pgrec.policy_fail(w, 'a boost needs "multiply", "add" or both');
        END IF;
    WHEN 'source_mix' THEN
        PERFORM pgrec.policy_check_keys(p, ARRAY['source', 'min_share', 'max_share'], w);
        IF jsonb_typeof(p -> 'source') IS DISTINCT FROM 'string' OR p ->> 'source' = '' THEN
            PERFORM pgrec.policy_fail(w || '.source', 'is required (a candidate source name such as ann or trending)');
        END IF;
        lo := pgrec.policy_num(p, 'min_share', w, false, 0, 1);
        hi := pgrec.policy_num(p, 'max_share', w, false, 0, 1);
        IF lo IS NULL AND hi IS NULL THEN
            PERFORM pgrec.policy_fail(w, 'a source mix needs "min_share", "max_share" or both');
        END IF;
        IF lo > hi THEN
            PERFORM pgrec.policy_fail(w || '.min_share', 'must not exceed max_share');
        END IF;
    WHEN 'diversity' THEN
        PERFORM pgrec.policy_check_keys(p, ARRAY['property', 'max_per_value', 'window', 'top', 'depth'], w);
        IF p ? 'property' AND (jsonb_typeof(p -> 'property') <> 'string' OR p ->> 'property' = '') THEN
            PERFORM pgrec.policy_fail(w || '.property', 'must be a non-empty string (absent: categories)');
        END IF;
        PERFORM pgrec.policy_num(p, 'max_per_value', w, true, 1, NULL, true);
        PERFORM pgrec.policy_num(p, 'window', w, false, 2, 1000, true);
        PERFORM pgrec.policy_num(p, 'top', w, false, 1, 1000, true);
        PERFORM pgrec.policy_num(p, 'depth', w, false, 1, 5000, true);
    WHEN 'mmr' THEN
        PERFORM pgrec.policy_check_keys(p, ARRAY['lambda', 'pool'], w);
        PERFORM pgrec.policy_num(p, 'lambda', w, true, 0, 1);
        PERFORM pgrec.policy_num(p, 'pool', w, false, 2, 1000, true);
    WHEN 'promote' THEN
        PERFORM pgrec.policy_check_keys(p, ARRAY['predicate', 'share'], w);
        PERFORM pgrec.policy_check_predicate(p -> 'predicate', w || '.predicate', false);
        PERFORM pgrec.policy_num(p, 'share', w, true, 0, 1, false, true);
    WHEN 'exploration' THEN
        PERFORM pgrec.policy_check_keys(p, ARRAY['eligible', 'max_age_days', 'max_impressions', 'window_days',
                                                 'predicate', 'slots', 'positions', 'depth'], w);
        CASE pgrec.policy_choice(p, 'eligible', w, ARRAY['fresh', 'under_exposed', 'predicate'], true)
        WHEN 'fresh' THEN
            PERFORM pgrec.policy_num(p, 'max_age_days', w, true, 0, NULL, false, true);
        WHEN 'under_exposed' THEN
            PERFORM pgrec.policy_num(p, 'max_impressions', w, true, 1, NULL, true);
            PERFORM pgrec.policy_num(p, 'window_days', w, false, 0, NULL, false, true);
        ELSE
            PERFORM pgrec.policy_check_predicate(p -> 'predicate', w || '.predicate', false);
        END CASE;
        n := pgrec.policy_num(p, 'slots', w, false, 1, 100, true);
        PERFORM pgrec.policy_num(p, 'depth', w, false, 1, 5000, true);
        IF p ? 'positions' THEN
            IF jsonb_typeof(p -> 'positions') <> 'array' OR jsonb_array_length(p -> 'positions') = 0 OR EXISTS (
                   SELECT 1 FROM jsonb_array_elements(p -> 'positions') e
                    WHERE jsonb_typeof(e) <> 'number' OR e::numeric < 1 OR e::numeric <> trunc(e::numeric)) THEN
                PERFORM pgrec.policy_fail(w || '.positions', format('must be a list of positions >= 1, got %s', p -> 'positions'));
            END IF;
            IF jsonb_array_length(p -> 'positions') < coalesce(n, 1) THEN
                PERFORM pgrec.policy_fail(w || '.positions', 'needs at least one position per slot');
            END IF;
        END IF;
    WHEN 'pin' THEN
        PERFORM pgrec.policy_check_keys(p, ARRAY['items', 'item_set', 'positions'], w);
        IF p ? 'items' = p ? 'item_set' THEN
            PERFORM pgrec.policy_fail(w, 'a pin names exactly one of "items" (a list of item ids) or "item_set"');
        END IF;
        PERFORM pgrec.policy_strings(p, 'items', w, p ? 'items');
        IF p ? 'item_set' THEN
            IF jsonb_typeof(p -> 'item_set') <> 'string'
               OR NOT EXISTS (SELECT 1 FROM pgrec.item_sets s WHERE s.name = p ->> 'item_set') THEN
                PERFORM pgrec.policy_fail(w || '.item_set', format('unknown item set %s (create it first)', p -> 'item_set'));
            END IF;
        END IF;
        IF p ? 'positions' AND (jsonb_typeof(p -> 'positions') <> 'array' OR jsonb_array_length(p -> 'positions') = 0
           OR EXISTS (SELECT 1 FROM jsonb_array_elements(p -> 'positions') e
                       WHERE jsonb_typeof(e) <> 'number' OR e::numeric < 1 OR e::numeric <> trunc(e::numeric))
           OR (SELECT count(DISTINCT e) <> count(*) FROM jsonb_array_elements(p -> 'positions') e)) THEN
            PERFORM pgrec.policy_fail(w || '.positions', format('must be a list of distinct positions >= 1, got %s', p -> 'positions'));
        END IF;
    END CASE;
END
$$;
COMMENT ON FUNCTION pgrec.policy_validate(text, jsonb, jsonb, text) IS
    'Refuse a malformed policy (unknown kind, bad or unknown parameter, bad segment) with a message naming the field.';

-- ---------------------------------------------------------------- triggers: validation, versions, audit

CREATE OR REPLACE FUNCTION pgrec.policies_before_write()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgrec.policy_validate(NEW.kind, NEW.params, NEW.segment,
                                  format('policy %s (%s)', coalesce(quote_literal(NEW.name), 'NULL'), NEW.kind));
    IF TG_OP = 'UPDATE' THEN
        IF (NEW.name, NEW.kind, NEW.params, NEW.surface, NEW.segment, NEW.priority, NEW.enabled, NEW.starts_at,
            NEW.ends_at, NEW.policy_set, NEW.description)
           IS NOT DISTINCT FROM
           (OLD.name, OLD.kind, OLD.params, OLD.surface, OLD.segment, OLD.priority, OLD.enabled, OLD.starts_at,
            OLD.ends_at, OLD.policy_set, OLD.description) THEN
            RETURN NULL;  -- nothing changed: no new version
        END IF;
        NEW.version := OLD.version + 1;
        NEW.created_at := OLD.created_at;
        NEW.created_by := OLD.created_by;
        NEW.updated_at := now();
        IF NEW.updated_by IS NOT DISTINCT FROM OLD.updated_by THEN
            NEW.updated_by := current_user;
        END IF;
    ELSE
        NEW.version := 1;
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION pgrec.policies_before_write() IS
    'Trigger: validate a policy row, bump its version on a real change, keep the audit columns.';

CREATE OR REPLACE FUNCTION pgrec.policies_after_write()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF TG_OP = 'DELETE' THEN
        INSERT INTO pgrec.policy_audit (policy_id, version, action, row_data)
        VALUES (OLD.policy_id, OLD.version, 'delete', to_jsonb(OLD));
        RETURN OLD;
    END IF;
    INSERT INTO pgrec.policy_audit (policy_id, version, action, row_data, changed_by)
    VALUES (NEW.policy_id, NEW.version, lower(TG_OP), to_jsonb(NEW), NEW.updated_by);
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION pgrec.policies_after_write() IS 'Trigger: write every version of a policy to pgrec.policy_audit.';

DROP TRIGGER IF EXISTS policies_before_write ON pgrec.policies;
CREATE TRIGGER policies_before_write BEFORE INSERT OR UPDATE ON pgrec.policies
    FOR EACH ROW EXECUTE FUNCTION pgrec.policies_before_write();
DROP TRIGGER IF EXISTS policies_after_write ON pgrec.policies;
CREATE TRIGGER policies_after_write AFTER INSERT OR UPDATE OR DELETE ON pgrec.policies
    FOR EACH ROW EXECUTE FUNCTION pgrec.policies_after_write();

CREATE OR REPLACE FUNCTION pgrec.item_sets_before_write()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF EXISTS (SELECT 1 FROM unnest(NEW.items) x WHERE x IS NULL OR x = '') THEN
        RAISE EXCEPTION 'item set %: items must be non-empty item ids', quote_literal(NEW.name) USING ERRCODE = '22023';
    END IF;
    -- dedupe, keeping the first occurrence (pins use the order)
    NEW.items := ARRAY(SELECT s.x FROM (SELECT u.x, min(u.o) AS o FROM unnest(NEW.items) WITH ORDINALITY u(x, o)
                                         GROUP BY u.x) s ORDER BY s.o);
    IF TG_OP = 'UPDATE' THEN
        NEW.created_at := OLD.created_at;
        NEW.created_by := OLD.created_by;
        NEW.updated_at := now();
    END IF;
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION pgrec.item_sets_before_write() IS 'Trigger: refuse empty ids in an item set, dedupe, keep audit columns.';

DROP TRIGGER IF EXISTS item_sets_before_write ON pgrec.item_sets;
CREATE TRIGGER item_sets_before_write BEFORE INSERT OR UPDATE ON pgrec.item_sets
    FOR EACH ROW EXECUTE FUNCTION pgrec.item_sets_before_write();

-- ---------------------------------------------------------------- predicates at request time

CREATE OR REPLACE FUNCTION pgrec.policy_value(v jsonb, p_ctx jsonb)
RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    -- a literal, or {"param": name, "default": x}: the request's context.params[name], else the default
    SELECT CASE WHEN jsonb_typeof(v) = 'object' AND v ? 'param'
                THEN coalesce(p_ctx -> 'params' -> (v ->> 'param'), v -> 'default')
                ELSE v END
$$;
COMMENT ON FUNCTION pgrec.policy_value(jsonb, jsonb) IS
    'Resolve a predicate value: a literal, or {"param": name, "default": x} from context.params.';

CREATE OR REPLACE FUNCTION pgrec.policy_missing_param(p jsonb, p_ctx jsonb)
RETURNS text
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    -- the first {"param": name} without a default that the request does not carry (NULL: none)
    SELECT min(r ->> 'param')
      FROM jsonb_path_query(p, 'strict $.** ? (@.param.type() == "string")') r
     WHERE NOT r ? 'default' AND NOT coalesce(p_ctx -> 'params' ? (r ->> 'param'), false)
$$;
COMMENT ON FUNCTION pgrec.policy_missing_param(jsonb, jsonb) IS
    'The name of a request parameter a policy needs and the request lacks (the policy is then skipped).';

CREATE OR REPLACE FUNCTION pgrec.policy_number(v jsonb, p_where text)
RETURNS numeric
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF v IS NULL OR jsonb_typeof(v) = 'null' THEN
        RETURN NULL;
    END IF;
    IF jsonb_typeof(v) = 'number' THEN
        RETURN v::numeric;
    END IF;
    IF jsonb_typeof(v) = 'string' AND v #>> '{}' ~ '^\s*-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?\s*$' THEN
        RETURN (v #>> '{}')::numeric;
    END IF;
    RAISE EXCEPTION 'pgrec.rerank: % must be a number, got %', p_where, v USING ERRCODE = '22023';
END
$$;
COMMENT ON FUNCTION pgrec.policy_number(jsonb, text) IS 'A resolved range bound as a number (a numeric string is accepted).';

-- ---------------------------------------------------------------- the working list
-- pgrec.rerank keeps every row it may show once, in an array of pgrec.rerank_row (the candidates, then the
-- reserve of items from outside them, then rows it adds); a row is named by its index in that array. The
-- list is an int[] of indices and the current scores a float8[] by index, so a step moves integers, not rows,
-- and a predicate is evaluated in one pass over the rows (one boolean per index).

CREATE OR REPLACE FUNCTION pgrec.policy_match(
    p jsonb, p_rows pgrec.rerank_row[], p_scores float8[], p_idx int[], p_ctx jsonb, p_as_of timestamptz)
RETURNS boolean[]
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    comb   text;
    child  jsonb;
    m      boolean[];
    acc    boolean[];
    vals   jsonb;
    val    jsonb;
    texts  text[];
    strs   text[];
    nums   numeric[];
    field  text;
    prop   text;
    op     text;
    lo     numeric;
    hi     numeric;
BEGIN
    -- the predicate language (docs/policies.md), evaluated for the rows p_idx (one boolean per entry of
    -- p_idx, in order; the score of row i is p_scores[i]). Only the attribute a condition reads is taken from
    -- a row, once (the rows themselves are never copied).
    IF p ? 'all' OR p ? 'any' THEN
        comb := CASE WHEN p ? 'all' THEN 'all' ELSE 'any' END;
        FOR child IN SELECT jsonb_array_elements(p -> comb) LOOP
            m := pgrec.policy_match(child, p_rows, p_scores, p_idx, p_ctx, p_as_of);
            IF acc IS NULL THEN
                acc := m;
            ELSIF comb = 'all' THEN
                acc := ARRAY(SELECT a AND b FROM unnest(acc, m) t(a, b));
            ELSE
                acc := ARRAY(SELECT a OR b FROM unnest(acc, m) t(a, b));
            END IF;
        END LOOP;
        RETURN coalesce(acc, '{}');
    END IF;
    IF p ? 'not' THEN
        m := pgrec.policy_match(p -> 'not', p_rows, p_scores, p_idx, p_ctx, p_as_of);
        RETURN ARRAY(SELECT NOT a FROM unnest(m) a);
    END IF;
    field := coalesce(p ->> 'field', 'property');
    prop := p ->> 'property';
    op := p ->> 'op';
    val := pgrec.policy_value(p -> 'value', p_ctx);
    vals := pgrec.policy_value(p -> 'values', p_ctx);
    IF vals IS NOT NULL AND jsonb_typeof(vals) <> 'array' THEN
        vals := jsonb_build_array(vals);  -- a request parameter holding one value
    END IF;
    texts := ARRAY(SELECT jsonb_array_elements(vals) #>> '{}');
    lo := pgrec.policy_number(pgrec.policy_value(p -> 'min', p_ctx), 'the range minimum');
    hi := pgrec.policy_number(pgrec.policy_value(p -> 'max', p_ctx), 'the range maximum');
    -- one condition (equals, in, range, contains, exists) on a property, the categories, the id, the sources,
    -- the score or the age in days; the values are data, never SQL
    CASE field
    WHEN 'property' THEN
        CASE op
        WHEN 'exists' THEN
            RETURN ARRAY(SELECT coalesce(jsonb_typeof((p_rows[x]).properties -> prop) <> 'null', false) FROM unnest(p_idx) x);
        WHEN 'equals' THEN
            RETURN ARRAY(SELECT coalesce((p_rows[x]).properties -> prop = val, false) FROM unnest(p_idx) x);
        WHEN 'in' THEN
            -- a string or a number is listed when an element of the same type equals it (what vals @> [v]
            -- tests, compared here without building a JSON value per row)
            strs := ARRAY(SELECT e #>> '{}' FROM jsonb_array_elements(vals) e WHERE jsonb_typeof(e) = 'string');
            nums := ARRAY(SELECT e::numeric FROM jsonb_array_elements(vals) e WHERE jsonb_typeof(e) = 'number');
            RETURN ARRAY(SELECT CASE jsonb_typeof(v.v)
                                WHEN 'string' THEN (v.v #>> '{}') = ANY (strs)
                                WHEN 'number' THEN v.v::numeric = ANY (nums)
                                WHEN 'array' THEN coalesce(v.v ?| texts, false)  -- any string element listed
                                WHEN 'null' THEN false
                                ELSE coalesce(vals @> jsonb_build_array(v.v), false) END
                           FROM (SELECT (p_rows[x]).properties -> prop AS v FROM unnest(p_idx) x OFFSET 0) v);
        WHEN 'contains' THEN
            RETURN ARRAY(SELECT CASE jsonb_typeof(v.v)
                                WHEN 'array' THEN v.v @> jsonb_build_array(val)
                                WHEN 'string' THEN strpos(v.v #>> '{}', val #>> '{}') > 0
                                ELSE false END
                           FROM (SELECT (p_rows[x]).properties -> prop AS v FROM unnest(p_idx) x OFFSET 0) v);
        WHEN 'range' THEN
            RETURN ARRAY(SELECT CASE WHEN jsonb_typeof(v.v) = 'number'
                                     THEN (lo IS NULL OR v.v::numeric >= lo) AND (hi IS NULL OR v.v::numeric <= hi)
                                     ELSE false END
                           FROM (SELECT (p_rows[x]).properties -> prop AS v FROM unnest(p_idx) x OFFSET 0) v);
        ELSE
            RETURN ARRAY(SELECT false FROM unnest(p_idx) x);
        END CASE;
    WHEN 'categories' THEN
        CASE op
        WHEN 'exists' THEN
            RETURN ARRAY(SELECT coalesce(cardinality((p_rows[x]).categories), 0) > 0 FROM unnest(p_idx) x);
        WHEN 'in' THEN
            RETURN ARRAY(SELECT coalesce((p_rows[x]).categories && texts, false) FROM unnest(p_idx) x);
        ELSE
            RETURN ARRAY(SELECT coalesce((val #>> '{}') = ANY ((p_rows[x]).categories), false) FROM unnest(p_idx) x);
        END CASE;
    WHEN 'item_id' THEN
        IF op = 'in' THEN
            RETURN ARRAY(SELECT coalesce((p_rows[x]).item_id = ANY (texts), false) FROM unnest(p_idx) x);
        END IF;
        RETURN ARRAY(SELECT coalesce((p_rows[x]).item_id = val #>> '{}', false) FROM unnest(p_idx) x);
    WHEN 'source' THEN
        CASE op
        WHEN 'exists' THEN
            RETURN ARRAY(SELECT coalesce((p_rows[x]).sources, '') <> '' FROM unnest(p_idx) x);
        WHEN 'in' THEN
            RETURN ARRAY(SELECT coalesce(string_to_array((p_rows[x]).sources, ',') && texts, false) FROM unnest(p_idx) x);
        ELSE
            RETURN ARRAY(SELECT coalesce((val #>> '{}') = ANY (string_to_array((p_rows[x]).sources, ',')), false)
                           FROM unnest(p_idx) x);
        END CASE;
    WHEN 'score' THEN
        RETURN ARRAY(SELECT coalesce((lo IS NULL OR p_scores[x] >= lo) AND (hi IS NULL OR p_scores[x] <= hi), false)
                       FROM unnest(p_idx) x);
    WHEN 'age_days' THEN
        RETURN ARRAY(SELECT coalesce((lo IS NULL OR a.s >= lo * 86400) AND (hi IS NULL OR a.s <= hi * 86400), false)
                       FROM (SELECT extract(epoch FROM p_as_of - (p_rows[x]).created_at) AS s
                               FROM unnest(p_idx) x OFFSET 0) a);
    ELSE
        RETURN ARRAY(SELECT false FROM unnest(p_idx) x);
    END CASE;
END
$$;
COMMENT ON FUNCTION pgrec.policy_match(jsonb, pgrec.rerank_row[], float8[], int[], jsonb, timestamptz) IS
    'Evaluate a structured predicate for the rows p_idx of pgrec.rerank: one boolean per entry of p_idx (the '
    'score of row i is p_scores[i]).';

CREATE OR REPLACE FUNCTION pgrec.policy_order(p_list int[], p_prefix int[])
RETURNS int[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    pk int[];
BEGIN
    -- the entries at the positions p_prefix (in that order), then every other entry in its current order
    IF p_prefix IS NULL OR cardinality(p_prefix) = 0
       OR p_prefix = ARRAY(SELECT generate_series(1, cardinality(p_prefix))) THEN
        RETURN p_list;  -- nothing moves
    END IF;
    pk := ARRAY(SELECT p_list[x.i] FROM unnest(p_prefix) WITH ORDINALITY x(i, o) ORDER BY x.o);
    RETURN pk || ARRAY(SELECT c FROM unnest(p_list) c WHERE NOT coalesce(c IN (SELECT unnest(pk)), false));
END
$$;
COMMENT ON FUNCTION pgrec.policy_order(int[], int[]) IS
    'Reorder a list of row indices: the entries at positions p_prefix first, in that order, then the rest in order.';

CREATE OR REPLACE FUNCTION pgrec.policy_floor(p_mask boolean[], p_need int, p_top int)
RETURNS int[]
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    top     int := least(p_top, coalesce(cardinality(p_mask), 0));
    have    int;
    extras  int[];
    victims int[];
    i       int;
    j       int := 1;
    result  int[] := '{}';
BEGIN
    -- at least p_need flagged items in the first p_top positions: the best flagged items from below replace
    -- the lowest unflagged items of the top, position for position
    SELECT count(*) FILTER (WHERE m) INTO have FROM unnest(p_mask[1:top]) m;
    IF have >= p_need OR top = 0 THEN
        RETURN '{}';
    END IF;
    extras := ARRAY(SELECT o FROM unnest(p_mask) WITH ORDINALITY t(m, o) WHERE m AND o > top ORDER BY o LIMIT p_need - have);
    victims := ARRAY(SELECT o FROM unnest(p_mask[1:top]) WITH ORDINALITY t(m, o) WHERE NOT m
                      ORDER BY o DESC LIMIT cardinality(extras));
    IF cardinality(victims) = 0 THEN
        RETURN '{}';
    END IF;
    extras := extras[1:cardinality(victims)];
    FOR i IN 1..top LOOP
        IF i = ANY (victims) THEN
            result := result || extras[j];
            j := j + 1;
        ELSE
            result := result || i;
        END IF;
    END LOOP;
    RETURN result || ARRAY(SELECT v FROM unnest(victims) v ORDER BY v);
END
$$;
COMMENT ON FUNCTION pgrec.policy_floor(boolean[], int, int) IS
    'A new order (prefix of positions) with at least p_need flagged items in the first p_top: the best flagged '
    'items from below replace the lowest unflagged ones.';

-- ---------------------------------------------------------------- filters on the user's history (keys to drop)

-- v1's pgrec.policy_drop_interacted / policy_drop_served (one query per policy, the SQL functions planned on
-- every call) and pgrec.policy_drop_rows (a mask, then a second pass to split the list) are replaced by
-- pgrec.policy_history_keys (over the user's events, read once per request) and pgrec.policy_drop_hits.
DROP FUNCTION IF EXISTS pgrec.policy_drop_interacted(jsonb, bigint[], bigint, timestamptz);
DROP FUNCTION IF EXISTS pgrec.policy_drop_served(jsonb, bigint[], bigint, timestamptz);
DROP FUNCTION IF EXISTS pgrec.policy_drop_rows(text, jsonb, pgrec.rerank_row[], float8[], int[], jsonb, timestamptz);

CREATE OR REPLACE FUNCTION pgrec.policy_history_keys(
    p_kind text, p jsonb, p_ev_key bigint[], p_ev_type smallint[], p_ev_pol smallint[], p_ev_at timestamptz[],
    p_keys bigint[], p_user bigint, p_as_of timestamptz)
RETURNS bigint[]
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lb    timestamptz;
    types smallint[];
BEGIN
    -- the user's events before as_of with the items p_keys come in as arrays (read once per request by
    -- pgrec.rerank), so the history filters of a request share one read; the answer is the item keys to drop
    -- (distinct)
    IF p_kind IN ('exclude_interacted', 'exclude_negative') THEN
        lb := coalesce(p_as_of - make_interval(secs => (p ->> 'lookback_days')::float8 * 86400), '-infinity');
    END IF;
    IF p_kind = 'exclude_interacted' THEN
        -- events of params.event_types (all types when absent) in the lookback
        IF p -> 'event_types' IS NOT NULL THEN
            types := ARRAY(SELECT t.type_id FROM pgrec.event_types t
                            WHERE t.name IN (SELECT jsonb_array_elements_text(p -> 'event_types')));
        END IF;
        RETURN ARRAY(SELECT DISTINCT e.k FROM unnest(p_ev_key, p_ev_type, p_ev_at) e(k, ty, at)
                      WHERE e.at >= lb AND (types IS NULL OR e.ty = ANY (types)));
    ELSIF p_kind = 'exclude_negative' THEN
        -- dislikes (polarity -1) in the lookback; the neighbours variant is pgrec.policy_drop_negative
        RETURN ARRAY(SELECT DISTINCT e.k FROM unnest(p_ev_key, p_ev_pol, p_ev_at) e(k, pol, at)
                      WHERE e.pol = -1 AND e.at >= lb);
    END IF;
    -- exclude_served: shown in >= min_impressions requests in the window, no engagement since the first of them
    IF p -> 'engagement_types' IS NOT NULL THEN
        types := ARRAY(SELECT t.type_id FROM pgrec.event_types t
                        WHERE t.name IN (SELECT jsonb_array_elements_text(p -> 'engagement_types')));
    END IF;
    RETURN ARRAY(
        SELECT s.item_key
          FROM (SELECT im.item_key, min(im.served_at) AS first_at
                  FROM pgrec.impressions im
                 WHERE im.user_key = p_user AND im.served_at < p_as_of
                   AND im.served_at >= p_as_of - make_interval(secs => (p ->> 'window_days')::float8 * 86400)
                   AND im.item_key IN (SELECT unnest(p_keys))
                 GROUP BY im.item_key
                HAVING count(DISTINCT im.request_id) >= (p ->> 'min_impressions')::int) s
         WHERE NOT EXISTS (
               SELECT 1 FROM unnest(p_ev_key, p_ev_type, p_ev_pol, p_ev_at) e(k, ty, pol, at)
                WHERE e.k = s.item_key AND e.at >= s.first_at
                  AND CASE WHEN types IS NULL THEN e.pol = 1 ELSE e.ty = ANY (types) END));
END
$$;
COMMENT ON FUNCTION pgrec.policy_history_keys(text, jsonb, bigint[], smallint[], smallint[], timestamptz[], bigint[], bigint, timestamptz) IS
    'Of p_keys, the item keys a history filter drops, from the user''s events before as_of given as arrays: '
    'exclude_interacted (params.event_types in params.lookback_days), exclude_negative (dislikes in the lookback, '
    'without neighbours), exclude_served (shown in >= params.min_impressions requests in the last '
    'params.window_days without an engagement event since the first of them).';

CREATE OR REPLACE FUNCTION pgrec.policy_drop_negative(p jsonb, p_keys bigint[], p_user bigint, p_as_of timestamptz)
RETURNS bigint[]
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    WITH neg AS (
        SELECT e.item_key, max(e.occurred_at) AS at FROM pgrec.events e
         WHERE e.user_key = p_user AND e.polarity = -1 AND e.occurred_at < p_as_of
           AND e.occurred_at >= coalesce(p_as_of - make_interval(secs => (p ->> 'lookback_days')::float8 * 86400),
                                         '-infinity')
         GROUP BY e.item_key
    ),
    dv AS MATERIALIZED (
        -- the vectors of the latest dislikes (computed once, not per candidate)
        SELECT de.embedding
          FROM (SELECT n.item_key FROM neg n ORDER BY n.at DESC, n.item_key
                 LIMIT coalesce((p ->> 'max_dislikes')::int, 20)) d
          JOIN pgrec.item_embeddings de ON de.item_key = d.item_key
         WHERE coalesce((p ->> 'neighbours')::boolean, false)
    ),
    near AS (
        -- close neighbours of the latest dislikes among the items (cosine similarity >= min_similarity)
        SELECT ce.item_key
          FROM pgrec.item_embeddings ce
         WHERE ce.item_key IN (SELECT unnest(p_keys))
           AND EXISTS (SELECT 1 FROM dv LIMIT 1)
           AND EXISTS (SELECT 1 FROM dv WHERE 1 - (dv.embedding OPERATOR(public.<=>) ce.embedding)
                                              >= coalesce((p ->> 'min_similarity')::float8, 0.9))
    )
    SELECT ARRAY(SELECT n.item_key FROM neg n WHERE n.item_key IN (SELECT unnest(p_keys))
                 UNION SELECT item_key FROM near)
$$;
COMMENT ON FUNCTION pgrec.policy_drop_negative(jsonb, bigint[], bigint, timestamptz) IS
    'exclude_negative: of p_keys, the items the user disliked (polarity -1) and, with params.neighbours, items whose '
    'embedding is within params.min_similarity of one of the last params.max_dislikes dislikes.';

-- ---------------------------------------------------------------- filters on the rows (the rows to drop)

CREATE OR REPLACE FUNCTION pgrec.policy_drop_hits(
    p_kind text, p jsonb, p_rows pgrec.rerank_row[], p_scores float8[], p_idx int[], p_ctx jsonb, p_as_of timestamptz)
RETURNS int[]
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    ids  text[];
    cats text[];
    lim  timestamptz;
    m    boolean[];
    drop boolean;
BEGIN
    -- the entries of p_idx the filter drops, in one pass (a row whose test is NULL is kept)
    CASE p_kind
    WHEN 'blocklist' THEN
        -- params.items, the items of params.item_sets and items in params.categories
        ids := ARRAY(SELECT jsonb_array_elements_text(coalesce(p -> 'items', '[]'))
                     UNION
                     SELECT unnest(s.items) FROM pgrec.item_sets s
                      WHERE s.name IN (SELECT jsonb_array_elements_text(coalesce(p -> 'item_sets', '[]'))));
        cats := ARRAY(SELECT jsonb_array_elements_text(coalesce(p -> 'categories', '[]')));
        RETURN ARRAY(SELECT x FROM unnest(p_idx) x
                      WHERE (p_rows[x]).item_id IN (SELECT unnest(ids)) OR (p_rows[x]).categories && cats);
    WHEN 'freshness' THEN
        -- created more than params.max_age_days before as_of
        lim := p_as_of - make_interval(secs => (p ->> 'max_age_days')::float8 * 86400);
        RETURN ARRAY(SELECT x FROM unnest(p_idx) x WHERE (p_rows[x]).created_at < lim);
    WHEN 'attribute_filter' THEN
        -- keep (mode keep, the default) or drop (mode drop) the rows matching params.predicate
        m := pgrec.policy_match(p -> 'predicate', p_rows, p_scores, p_idx, p_ctx, p_as_of);
        drop := coalesce(p ->> 'mode', 'keep') = 'drop';
        RETURN ARRAY(SELECT u.x FROM unnest(p_idx, m) u(x, a) WHERE u.a = drop);
    END CASE;
    RETURN NULL;
END
$$;
COMMENT ON FUNCTION pgrec.policy_drop_hits(text, jsonb, pgrec.rerank_row[], float8[], int[], jsonb, timestamptz) IS
    'The filters that look only at the row (blocklist, freshness, attribute_filter): the entries of p_idx they '
    'drop. (relevance_floor compares scores in pgrec.rerank.)';

-- ---------------------------------------------------------------- order steps (a new order of the list)

CREATE OR REPLACE FUNCTION pgrec.policy_move_source_mix(
    p jsonb, p_rows pgrec.rerank_row[], p_scores float8[], p_list int[], p_ctx jsonb, p_as_of timestamptz, p_k int)
RETURNS int[]
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    src   text := p ->> 'source';
    top   int := least(p_k, coalesce(cardinality(p_list), 0));
    m     boolean[];
    maxn  int;
BEGIN
    m := ARRAY(SELECT src = ANY (string_to_array((p_rows[c]).sources, ',')) FROM unnest(p_list) c);
    IF p ? 'max_share' THEN
        -- at most floor(max_share * k) items found by the source in the top k; others take their places
        -- (when there are not enough others the cap yields)
        maxn := floor((p ->> 'max_share')::numeric * top);
        p_list := pgrec.policy_order(p_list, ARRAY(
            SELECT s.o::int FROM (SELECT t.o, t.a, row_number() OVER (PARTITION BY t.a ORDER BY t.o) AS rn
                               FROM unnest(m) WITH ORDINALITY t(a, o)) s
             WHERE NOT s.a OR s.rn <= maxn ORDER BY s.o LIMIT top));
        m := ARRAY(SELECT src = ANY (string_to_array((p_rows[c]).sources, ',')) FROM unnest(p_list) c);
    END IF;
    IF p ? 'min_share' THEN
        -- at least ceil(min_share * k): the best items of the source replace the lowest others of the top k
        p_list := pgrec.policy_order(p_list, pgrec.policy_floor(m, ceil((p ->> 'min_share')::numeric * top)::int, top));
    END IF;
    RETURN p_list;
END
$$;
COMMENT ON FUNCTION pgrec.policy_move_source_mix(jsonb, pgrec.rerank_row[], float8[], int[], jsonb, timestamptz, int) IS
    'source_mix: at most params.max_share and at least params.min_share of the top k found by params.source.';

CREATE OR REPLACE FUNCTION pgrec.policy_move_diversity(
    p jsonb, p_rows pgrec.rerank_row[], p_scores float8[], p_list int[], p_ctx jsonb, p_as_of timestamptz, p_k int)
RETURNS int[]
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    prop    text := p ->> 'property';
    maxv    int := (p ->> 'max_per_value')::int;
    win     int := (p ->> 'window')::int;
    depth   int := least(coalesce(cardinality(p_list), 0), coalesce((p ->> 'depth')::int, 100));
    top     int := least(coalesce((p ->> 'top')::int, p_k), depth);
    fv      text[];  -- the values of all items, flattened
    dv      text[];  -- the distinct values, sorted
    vid     int[];   -- value ids of all items, flattened
    st      int[];   -- where item i's values start in vid
    ln      int[];   -- how many values item i has
    nvals   int;
    counts  int[];
    used    boolean[];
    picked  int[] := '{}';
    i       int;
    j       int;
    ok      boolean;
    chosen  int;
    first_free int := 1;
BEGIN
    IF top = 0 THEN
        RETURN p_list;
    END IF;
    -- the values of each item (its categories, or the property's value(s)) flattened in list order, then coded as
    -- small integers (their rank among the distinct values)
    IF prop IS NULL THEN
        -- the categories: flattened by a set-returning function in the select list (no per-row function scan)
        fv := ARRAY(SELECT unnest((p_rows[x]).categories) FROM unnest(p_list[1:depth]) x);
        ln := ARRAY(SELECT coalesce(cardinality((p_rows[x]).categories), 0) FROM unnest(p_list[1:depth]) x);
    ELSE
        SELECT coalesce(array_agg(f.v) FILTER (WHERE f.n IS NOT NULL), '{}'),
               coalesce(array_agg(f.l) FILTER (WHERE f.n = 1 OR f.n IS NULL), '{}')
          INTO fv, ln
          FROM (SELECT v.v, v.n, cardinality(it.vs) AS l
                  FROM (SELECT CASE WHEN jsonb_typeof((p_rows[x]).properties -> prop) = 'array'
                                         THEN ARRAY(SELECT DISTINCT e FROM jsonb_array_elements_text((p_rows[x]).properties -> prop) e)
                                    WHEN jsonb_typeof((p_rows[x]).properties -> prop) IN ('string', 'number', 'boolean')
                                         THEN ARRAY[(p_rows[x]).properties ->> prop]
                                    ELSE '{}'::text[] END AS vs
                          FROM unnest(p_list[1:depth]) x OFFSET 0) it
                  LEFT JOIN LATERAL unnest(it.vs) WITH ORDINALITY v(v, n) ON true) f;
    END IF;
    dv := ARRAY(SELECT DISTINCT x FROM unnest(fv) x ORDER BY 1);
    nvals := cardinality(dv);
    vid := ARRAY(SELECT array_position(dv, x) FROM unnest(fv) x);
    st := ARRAY(SELECT (sum(u.l) OVER (ORDER BY u.o) - u.l + 1)::int FROM unnest(ln) WITH ORDINALITY u(l, o));
    counts := array_fill(0, ARRAY[greatest(nvals, 1)]);
    used := array_fill(false, ARRAY[depth]);
    FOR pos IN 1..top LOOP
        chosen := NULL;
        i := first_free;
        WHILE i <= depth LOOP
            IF NOT used[i] THEN
                ok := true;
                FOR j IN st[i]..st[i] + ln[i] - 1 LOOP
                    IF counts[vid[j]] >= maxv THEN
                        ok := false;
                        EXIT;
                    END IF;
                END LOOP;
                IF ok THEN
                    chosen := i;
                    EXIT;
                END IF;
                IF win IS NULL THEN
                    -- without a window the counts only grow: an item that does not fit now never will
                    used[i] := true;
                END IF;
            END IF;
            i := i + 1;
        END LOOP;
        EXIT WHEN chosen IS NULL;  -- nothing fits: the rest follows in order
        picked := picked || chosen;
        used[chosen] := true;
        WHILE first_free <= depth AND used[first_free] LOOP
            first_free := first_free + 1;
        END LOOP;
        FOR j IN st[chosen]..st[chosen] + ln[chosen] - 1 LOOP
            counts[vid[j]] := counts[vid[j]] + 1;
        END LOOP;
        IF win IS NOT NULL AND pos - win + 1 >= 1 THEN
            -- the pick at pos - win + 1 leaves the window that ends at the next position
            i := picked[pos - win + 1];
            FOR j IN st[i]..st[i] + ln[i] - 1 LOOP
                counts[vid[j]] := counts[vid[j]] - 1;
            END LOOP;
        END IF;
    END LOOP;
    RETURN pgrec.policy_order(p_list, picked);
END
$$;
COMMENT ON FUNCTION pgrec.policy_move_diversity(jsonb, pgrec.rerank_row[], float8[], int[], jsonb, timestamptz, int) IS
    'diversity: greedily fill the top (params.top, default k) with at most params.max_per_value items per '
    'category (or value of params.property), in the whole top or in any params.window consecutive positions.';

CREATE OR REPLACE FUNCTION pgrec.policy_move_mmr(
    p jsonb, p_rows pgrec.rerank_row[], p_scores float8[], p_list int[], p_ctx jsonb, p_as_of timestamptz, p_k int)
RETURNS int[]
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    lam     float8 := (p ->> 'lambda')::float8;
    pool    int := least(coalesce(cardinality(p_list), 0), coalesce((p ->> 'pool')::int, greatest(3 * p_k, 30)));
    rel     float8[];
    vecs    public.vector[];
    maxsim  float8[];
    used    boolean[];
    picked  int[] := '{}';
    best    int;
    best_v  float8;
    v       float8;
    i       int;
    vb      public.vector;
BEGIN
    IF pool < 2 THEN
        RETURN p_list;
    END IF;
    -- relevance: scores of the pool scaled to [0, 1]; similarity: cosine of item embeddings (0 without one)
    SELECT array_agg(CASE WHEN s.hi > s.lo THEN (coalesce(s.score, s.lo) - s.lo) / (s.hi - s.lo) ELSE 1 END ORDER BY s.o),
           array_agg(e.embedding ORDER BY s.o)
      INTO rel, vecs
      FROM (SELECT x.o, (p_rows[x.c]).item_key, p_scores[x.c] AS score,
                   min(p_scores[x.c]) OVER () AS lo, max(p_scores[x.c]) OVER () AS hi
              FROM unnest(p_list[1:pool]) WITH ORDINALITY x(c, o)) s
      LEFT JOIN pgrec.item_embeddings e ON e.item_key = s.item_key;
    maxsim := array_fill(0::float8, ARRAY[pool]);
    used := array_fill(false, ARRAY[pool]);
    FOR step IN 1..least(p_k, pool) LOOP
        best := NULL;
        FOR i IN 1..pool LOOP
            IF NOT used[i] THEN
                v := lam * rel[i] - (1 - lam) * maxsim[i];
                IF best IS NULL OR v > best_v THEN
                    best := i;
                    best_v := v;
                END IF;
            END IF;
        END LOOP;
        picked := picked || best;
        used[best] := true;
        vb := vecs[best];
        IF vb IS NOT NULL AND step < least(p_k, pool) THEN
            SELECT array_agg(CASE WHEN t.v IS NULL THEN t.m
                                  ELSE greatest(t.m, coalesce(nullif(1 - (t.v OPERATOR(public.<=>) vb), 'NaN'), 0)) END
                             ORDER BY t.o)
              INTO maxsim FROM unnest(vecs, maxsim) WITH ORDINALITY t(v, m, o);
        END IF;
    END LOOP;
    RETURN pgrec.policy_order(p_list, picked);
END
$$;
COMMENT ON FUNCTION pgrec.policy_move_mmr(jsonb, pgrec.rerank_row[], float8[], int[], jsonb, timestamptz, int) IS
    'mmr: maximal marginal relevance over the first params.pool items (default max(3k, 30)): pick k by '
    'lambda * relevance - (1 - lambda) * max cosine similarity to the items already picked.';

CREATE OR REPLACE FUNCTION pgrec.policy_move_promote(
    p jsonb, p_rows pgrec.rerank_row[], p_scores float8[], p_list int[], p_ctx jsonb, p_as_of timestamptz, p_k int)
RETURNS int[]
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    top int := least(p_k, coalesce(cardinality(p_list), 0));
    m   boolean[] := pgrec.policy_match(p -> 'predicate', p_rows, p_scores, p_list, p_ctx, p_as_of);
BEGIN
    RETURN pgrec.policy_order(p_list, pgrec.policy_floor(m, ceil((p ->> 'share')::numeric * top)::int, top));
END
$$;
COMMENT ON FUNCTION pgrec.policy_move_promote(jsonb, pgrec.rerank_row[], float8[], int[], jsonb, timestamptz, int) IS
    'promote: at least ceil(params.share * k) items matching params.predicate in the top k; the best matching '
    'items from below replace the lowest others.';

CREATE OR REPLACE FUNCTION pgrec.policy_move_exploration(
    p jsonb, p_rows pgrec.rerank_row[], p_scores float8[], p_list int[], p_ctx jsonb, p_as_of timestamptz, p_k int)
RETURNS int[]
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    depth int := least(coalesce(cardinality(p_list), 0), coalesce((p ->> 'depth')::int, 100));
    top   int := least(p_k, depth);
    slots int := coalesce((p ->> 'slots')::int, 1);
    head  int[] := p_list[1:depth];
    m     boolean[];
    pos   int[];
    chosen int[];
    base  int[];
    i     int;
BEGIN
    IF top = 0 THEN
        RETURN p_list;
    END IF;
    CASE p ->> 'eligible'
    WHEN 'fresh' THEN
        m := pgrec.policy_match(jsonb_build_object('field', 'age_days', 'op', 'range', 'max', p -> 'max_age_days'),
                                p_rows, p_scores, head, p_ctx, p_as_of);
    WHEN 'under_exposed' THEN
        -- fewer than max_impressions impressions (all users) in the window; counting stops at the threshold
        SELECT coalesce(array_agg(x.n < (p ->> 'max_impressions')::int ORDER BY h.o), '{}') INTO m
          FROM unnest(head) WITH ORDINALITY h(c, o)
          CROSS JOIN LATERAL (
              SELECT count(*) AS n FROM (
                  SELECT 1 FROM pgrec.impressions im
                   WHERE im.item_key = (p_rows[h.c]).item_key AND im.served_at < p_as_of
                     AND im.served_at >= p_as_of - make_interval(secs => coalesce((p ->> 'window_days')::float8, 7) * 86400)
                   LIMIT (p ->> 'max_impressions')::int) c) x;
    ELSE
        m := pgrec.policy_match(p -> 'predicate', p_rows, p_scores, head, p_ctx, p_as_of);
    END CASE;
    -- the best `slots` eligible items go to the target positions (params.positions, else the last slots of the
    -- top k); an item already placed higher keeps its place
    chosen := ARRAY(SELECT o FROM unnest(m) WITH ORDINALITY t(a, o) WHERE a ORDER BY o LIMIT slots);
    pos := ARRAY(SELECT least(x::int, top) FROM jsonb_array_elements_text(p -> 'positions') x ORDER BY x::int);
    IF cardinality(pos) = 0 THEN
        pos := ARRAY(SELECT generate_series(greatest(top - slots + 1, 1), top));
    END IF;
    base := ARRAY(SELECT g FROM generate_series(1, depth) g
                   WHERE NOT g = ANY (ARRAY(SELECT c FROM unnest(chosen, pos) u(c, t) WHERE c > t)));
    FOR i IN 1..least(cardinality(chosen), cardinality(pos)) LOOP
        IF chosen[i] > pos[i] THEN
            base := base[1:pos[i] - 1] || chosen[i] || base[pos[i]:];
        END IF;
    END LOOP;
    RETURN pgrec.policy_order(p_list, base);
END
$$;
COMMENT ON FUNCTION pgrec.policy_move_exploration(jsonb, pgrec.rerank_row[], float8[], int[], jsonb, timestamptz, int) IS
    'exploration: at least params.slots eligible items (fresh, under-exposed or matching a predicate such as a '
    'provider group) in the top k: the best eligible items of the first params.depth move up to params.positions '
    '(default the last slots of the top k).';

CREATE OR REPLACE FUNCTION pgrec.policy_pin_ids(p jsonb)
RETURNS text[]
LANGUAGE sql STABLE PARALLEL SAFE
AS $$
    SELECT CASE WHEN p ? 'items' THEN ARRAY(SELECT jsonb_array_elements_text(p -> 'items'))
                ELSE coalesce((SELECT s.items FROM pgrec.item_sets s WHERE s.name = p ->> 'item_set'), '{}') END
$$;
COMMENT ON FUNCTION pgrec.policy_pin_ids(jsonb) IS 'The item ids a pin policy pins, in order.';

CREATE OR REPLACE FUNCTION pgrec.policy_show(p_rows pgrec.rerank_row[], p_scores float8[], p_list int[], p_n int)
RETURNS jsonb
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT coalesce(jsonb_agg(jsonb_build_object('item_id', (p_rows[x.c]).item_id, 'score', p_scores[x.c]) ORDER BY x.o), '[]')
      FROM unnest(p_list[1:p_n]) WITH ORDINALITY x(c, o)
$$;
COMMENT ON FUNCTION pgrec.policy_show(pgrec.rerank_row[], float8[], int[], int) IS 'The first p_n items of a list (debug steps).';

-- ---------------------------------------------------------------- the engine

CREATE OR REPLACE FUNCTION pgrec.rerank(
    user_key   bigint,
    surface    text,
    k          int,
    item_keys  bigint[],
    scores     float8[],
    sources    text[],
    context    jsonb DEFAULT '{}',
    as_of      timestamptz DEFAULT NULL,
    policy_set text DEFAULT NULL)
RETURNS jsonb
LANGUAGE plpgsql STABLE PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    t          timestamptz := coalesce(as_of, now());
    ctx        jsonb := coalesce(context, '{}');
    n_in       int := coalesce(cardinality(item_keys), 0);
    max_k      int;
    excl       text[];
    incl       text[];
    -- the working list: rws holds every row once (the candidates, then the reserve, then rows added on the
    -- way); list and reserve are indices into it, sc the current score of each row
    rws        pgrec.rerank_row[];
    keys       bigint[];
    sc         float8[];
    list       int[];
    reserve    int[] := '{}';
    extra      pgrec.rerank_row[];
    n_rows     int;
    pols       pgrec.policies[];
    active     pgrec.policies[] := '{}';
    pol        pgrec.policies;
    lbl        text;
    dropped    jsonb := '{}';
    skipped    jsonb := '{}';
    versions   jsonb := '[]';
    eff_key    bigint[] := '{}';
    eff_pol    text[] := '{}';
    eff_act    text[] := '{}';
    gone       bigint[] := '{}';
    debug      int;
    steps      jsonb := '[]';
    uprops     jsonb;
    in_holdout boolean := false;
    holdout_control text;
    need_trending boolean := false;
    pin_ids    text[] := '{}';
    ids        text[];
    posn       int[];
    pins       int[];
    pinpos     int[];
    cnt        int;
    mask       boolean[];
    dkeys      bigint[];
    before     int[];
    live       int[];
    new_sc     float8[];
    step_no    int := 0;
    trunc_at   int;
    trunc_len  int;
    hit        bigint[];
    hit_i      int[];
    c_unknown  int;
    c_unavail  int;
    c_excl     int;
    c_incl     int;
    missing    text;
    bad        int;
    acts       text[];
    t_step     timestamptz := clock_timestamp();
    kept_by    text[] := '{}';
    n_i        int;
    ix         int;
    pin_at     int;
    slot_s     float8;
    pinres     boolean[];
    is_drop    boolean;
    pin_only   boolean;
    mul        float8;
    addv       float8;
    min_s      float8;
    hits       int[];
    dead       int[] := '{}';   -- rows dropped by the filters since the list was last cut
    ev_key     bigint[];        -- the user's events before as_of (read once, by the first history filter)
    ev_type    smallint[];
    ev_pol     smallint[];
    ev_at      timestamptz[];
BEGIN
    -- ---- the request
    max_k := coalesce((SELECT (c.value #>> '{}')::int FROM pgrec.config c WHERE c.key = 'policy_max_k'), 1000);
    IF k IS NULL OR k < 1 OR k > max_k THEN
        RAISE EXCEPTION 'pgrec.rerank: k must be between 1 and %, got %', max_k, coalesce(k::text, 'NULL')
            USING ERRCODE = '22023';
    END IF;
    IF surface IS NULL OR NOT EXISTS (SELECT 1 FROM pgrec.surfaces s WHERE s.surface = surface) THEN
        RAISE EXCEPTION 'pgrec.rerank: unknown surface %', coalesce(quote_literal(surface), 'NULL')
            USING ERRCODE = '22023', HINT = 'surfaces are the rows of pgrec.surfaces';
    END IF;
    IF coalesce(cardinality(scores), 0) <> n_in OR (sources IS NOT NULL AND cardinality(sources) <> n_in) THEN
        RAISE EXCEPTION 'pgrec.rerank: item_keys (%), scores (%) and sources (%) must have the same length',
            n_in, coalesce(cardinality(scores), 0), coalesce(cardinality(sources)::text, 'NULL') USING ERRCODE = '22023';
    END IF;
    IF 'NaN'::float8 = ANY (scores) THEN
        SELECT min(o) INTO bad FROM unnest(scores) WITH ORDINALITY x(s, o) WHERE x.s = 'NaN'::float8;
        RAISE EXCEPTION 'pgrec.rerank: scores[%] is NaN', bad USING ERRCODE = '22023';
    END IF;
    IF jsonb_typeof(ctx) <> 'object' THEN
        RAISE EXCEPTION 'pgrec.rerank: context must be a JSON object' USING ERRCODE = '22023';
    END IF;
    FOREACH lbl IN ARRAY ARRAY['exclude', 'include_only'] LOOP
        IF ctx ? lbl AND jsonb_typeof(ctx -> lbl) <> 'null' AND (jsonb_typeof(ctx -> lbl) <> 'array' OR EXISTS (
               SELECT 1 FROM jsonb_array_elements(ctx -> lbl) e WHERE jsonb_typeof(e) <> 'string')) THEN
            RAISE EXCEPTION 'pgrec.rerank: context.% must be a list of item ids', lbl USING ERRCODE = '22023';
        END IF;
    END LOOP;
    IF ctx ? 'params' AND jsonb_typeof(ctx -> 'params') <> 'object' THEN
        RAISE EXCEPTION 'pgrec.rerank: context.params must be a JSON object' USING ERRCODE = '22023';
    END IF;
    IF ctx ? 'debug' THEN
        IF jsonb_typeof(ctx -> 'debug') <> 'number' THEN
            RAISE EXCEPTION 'pgrec.rerank: context.debug must be a number of items per snapshot' USING ERRCODE = '22023';
        END IF;
        debug := greatest((ctx ->> 'debug')::numeric::int, 1);
    END IF;
    excl := CASE WHEN jsonb_typeof(ctx -> 'exclude') = 'array' THEN ARRAY(SELECT jsonb_array_elements_text(ctx -> 'exclude')) END;
    incl := CASE WHEN jsonb_typeof(ctx -> 'include_only') = 'array'
                 THEN ARRAY(SELECT jsonb_array_elements_text(ctx -> 'include_only')) END;

    -- ---- the policies in force: enabled, surface, time window, policy set; then segment and request params
    SELECT coalesce(array_agg(p ORDER BY p.priority, array_position(pgrec.policy_kinds(), p.kind), p.policy_id), '{}')
      INTO pols
      FROM pgrec.policies p
     WHERE p.enabled
       AND (p.surface IS NULL OR p.surface = surface)
       AND (p.starts_at IS NULL OR p.starts_at <= t)
       AND (p.ends_at IS NULL OR t < p.ends_at)
       AND (p.policy_set IS NULL OR p.policy_set = policy_set);
    FOREACH pol IN ARRAY pols LOOP
        lbl := pol.policy_id || '/' || pol.kind;
        IF pol.segment IS NOT NULL THEN
            IF uprops IS NULL THEN
                uprops := coalesce((SELECT u.properties FROM pgrec.users u WHERE u.user_key = user_key), '{}');
            END IF;
            -- the user as a one-row list: segments use the same predicate language as items
            CONTINUE WHEN NOT (pgrec.policy_match(pol.segment,
                ARRAY[ROW(NULL, NULL, NULL, '', '{}', uprops, NULL)::pgrec.rerank_row], ARRAY[NULL]::float8[],
                ARRAY[1], ctx, t))[1];
        END IF;
        IF strpos(pol.params::text, '"param"') > 0 OR strpos(pol.segment::text, '"param"') > 0 THEN
            missing := pgrec.policy_missing_param(jsonb_build_array(pol.params, pol.segment), ctx);
            IF missing IS NOT NULL THEN
                skipped := skipped || jsonb_build_object(lbl, 'the request has no params.' || missing);
                CONTINUE;
            END IF;
        END IF;
        IF pol.kind = 'holdout' THEN
            -- a stable share of users by hash; no user, no holdout
            CONTINUE WHEN user_key IS NULL OR in_holdout
                OR abs(hashtextextended(coalesce(pol.params ->> 'salt', '') || ':' || user_key::text, 0)) % 10000
                   >= round((pol.params ->> 'percent')::numeric * 100);
            in_holdout := true;
            holdout_control := coalesce(pol.params ->> 'control', 'trending');
            need_trending := need_trending OR holdout_control = 'trending';
        ELSIF pol.kind = 'relevance_floor' AND pol.params ->> 'fill' = 'trending' THEN
            need_trending := true;
        ELSIF pol.kind = 'pin' THEN
            pin_ids := pin_ids || pgrec.policy_pin_ids(pol.params);
        END IF;
        active := active || pol;
    END LOOP;
    in_holdout := false;

    -- ---- the list: known, available items allowed by the request, best score first (ties: item_key); when the
    -- only items from outside the candidates are pins, the same statement reads them (the reserve, by item_key)
    pin_only := NOT need_trending AND cardinality(pin_ids) > 0;
    WITH u AS (
        SELECT DISTINCT ON (x.k) x.k, x.s, x.src
          FROM unnest(item_keys, scores, sources) x(k, s, src)
         WHERE x.k IS NOT NULL
         ORDER BY x.k, x.s DESC NULLS LAST),
    j AS (
        SELECT u.k, u.s, u.src, i.item_key IS NOT NULL AS known, coalesce(i.available, false) AS avail,
               i.item_id, i.categories, i.properties, i.created_at,
               coalesce(i.item_id = ANY (excl), false) AS ex,
               incl IS NOT NULL AND NOT coalesce(i.item_id = ANY (incl), false) AS notin, false AS res
          FROM u LEFT JOIN pgrec.items i ON i.item_key = u.k
        UNION ALL
        SELECT i.item_key, NULL, '', true, true, i.item_id, i.categories, i.properties, i.created_at, false, false, true
          FROM pgrec.items i
         WHERE pin_only AND i.item_id = ANY (pin_ids) AND i.available
           AND NOT coalesce(i.item_id = ANY (excl), false) AND (incl IS NULL OR i.item_id = ANY (incl))
         ORDER BY res, s DESC NULLS LAST, k)  -- the aggregates below take the rows in this order (a plain Agg)
    SELECT coalesce(array_agg(ROW(j.k, j.item_id, j.s, coalesce(j.src, ''), j.categories, j.properties,
                                  j.created_at)::pgrec.rerank_row) FILTER (WHERE j.known AND j.avail AND NOT j.ex AND NOT j.notin), '{}'),
           coalesce(array_agg(j.k) FILTER (WHERE j.known AND j.avail AND NOT j.ex AND NOT j.notin), '{}'),
           coalesce(array_agg(j.s) FILTER (WHERE j.known AND j.avail AND NOT j.ex AND NOT j.notin), '{}'),
           count(*) FILTER (WHERE j.known AND j.avail AND NOT j.ex AND NOT j.notin AND NOT j.res),
           count(*) FILTER (WHERE NOT j.known),
           count(*) FILTER (WHERE j.known AND NOT j.avail),
           count(*) FILTER (WHERE j.known AND j.avail AND j.ex),
           count(*) FILTER (WHERE j.known AND j.avail AND NOT j.ex AND j.notin),
           coalesce(array_agg(j.k) FILTER (WHERE NOT (j.known AND j.avail AND NOT j.ex AND NOT j.notin)), '{}')
      INTO rws, keys, sc, n_i, c_unknown, c_unavail, c_excl, c_incl, gone
      FROM j;
    n_rows := cardinality(rws);
    -- the rows are read in list order: best score first (ties: item_key), then the pins' reserve
    list := ARRAY(SELECT generate_series(1, n_i));
    reserve := ARRAY(SELECT generate_series(n_i + 1, n_rows));
    IF c_unknown > 0 THEN dropped := dropped || jsonb_build_object('unknown', c_unknown); END IF;
    IF c_unavail > 0 THEN dropped := dropped || jsonb_build_object('unavailable', c_unavail); END IF;
    IF c_excl > 0 THEN dropped := dropped || jsonb_build_object('request_exclude', c_excl); END IF;
    IF c_incl > 0 THEN dropped := dropped || jsonb_build_object('request_include_only', c_incl); END IF;
    IF debug IS NOT NULL THEN
        steps := steps || jsonb_build_array(jsonb_build_object('policy', 'input', 'kind', 'input',
            'dropped', c_unknown + c_unavail + c_excl + c_incl, 'items', pgrec.policy_show(rws, sc, list, debug),
            'ms', round(extract(epoch FROM clock_timestamp() - t_step) * 1000, 3)));
        t_step := clock_timestamp();
    END IF;

    -- ---- the reserve: items from outside the candidates (trending fill / holdout control, pins), filtered
    -- by the same policies as the list so that they never bypass a rule
    -- (pins only: read with the list above)
    IF need_trending THEN
        WITH outside AS (
            SELECT tr.item_key, tr.score, 'trending' AS src, 0 AS pref
              FROM pgrec.source_trending(user_key, 2 * k + 20, t) tr
            UNION ALL
            SELECT i.item_key, NULL::float8, '', 1 FROM pgrec.items i WHERE i.item_id = ANY (pin_ids)
        )
        SELECT coalesce(array_agg(ROW(x.item_key, x.item_id, x.score, x.src, x.categories, x.properties,
                                      x.created_at)::pgrec.rerank_row ORDER BY x.score DESC NULLS LAST, x.item_key), '{}'),
               coalesce(array_agg(x.item_key ORDER BY x.score DESC NULLS LAST, x.item_key), '{}'),
               coalesce(array_agg(x.score ORDER BY x.score DESC NULLS LAST, x.item_key), '{}')
          INTO extra, hit, new_sc
          FROM (SELECT DISTINCT ON (o.item_key) o.item_key, i.item_id, o.score, o.src, i.categories, i.properties, i.created_at
                  FROM outside o JOIN pgrec.items i ON i.item_key = o.item_key
                 WHERE i.available AND NOT (i.item_key = ANY (gone))
                   AND NOT coalesce(i.item_id = ANY (excl), false)
                   AND (incl IS NULL OR i.item_id = ANY (incl))
                 ORDER BY o.item_key, o.pref) x;
    END IF;
    IF cardinality(extra) > 0 THEN
        reserve := ARRAY(SELECT generate_series(n_rows + 1, n_rows + cardinality(extra)));
        rws := rws || extra;
        keys := keys || hit;
        sc := sc || new_sc;
        n_rows := n_rows + cardinality(extra);
    END IF;

    -- ---- the steps at the end that only reorder a known prefix of the list (diversity: depth, mmr: pool,
    -- exploration: depth, pin: its positions) never look further down: from the first of them on, the list is
    -- cut to that prefix (plus the pinned items found below it)
    trunc_len := greatest(k, coalesce(debug, 0));
    FOR n_i IN REVERSE cardinality(active)..1 LOOP
        EXIT WHEN NOT (active[n_i]).kind IN ('diversity', 'mmr', 'exploration', 'pin');
        trunc_at := n_i;
        trunc_len := greatest(trunc_len, CASE (active[n_i]).kind
            WHEN 'diversity' THEN coalesce(((active[n_i]).params ->> 'depth')::int, 100)
            WHEN 'mmr' THEN coalesce(((active[n_i]).params ->> 'pool')::int, greatest(3 * k, 30))
            WHEN 'exploration' THEN coalesce(((active[n_i]).params ->> 'depth')::int, 100)
            ELSE coalesce((SELECT max(x::int) FROM jsonb_array_elements_text((active[n_i]).params -> 'positions') x),
                          cardinality(pgrec.policy_pin_ids((active[n_i]).params))) END);
    END LOOP;
    trunc_len := trunc_len + cardinality(pin_ids);

    -- ---- apply, in order
    FOREACH pol IN ARRAY active LOOP
        lbl := pol.policy_id || '/' || pol.kind;
        step_no := step_no + 1;
        is_drop := pol.kind = ANY (pgrec.policy_drop_kinds());
        IF cardinality(dead) > 0 AND NOT (is_drop AND pol.kind <> 'relevance_floor') THEN
            -- the filters before this step are done: cut what they dropped, once
            list := ARRAY(SELECT x FROM unnest(list) x WHERE x NOT IN (SELECT unnest(dead)));
            reserve := ARRAY(SELECT x FROM unnest(reserve) x WHERE x NOT IN (SELECT unnest(dead)));
            dead := '{}';
        END IF;
        IF step_no = trunc_at AND cardinality(list) > trunc_len THEN
            list := list[1:trunc_len] || ARRAY(SELECT x FROM unnest(list[trunc_len + 1:]) x
                                                WHERE (rws[x]).item_id = ANY (pin_ids));
        END IF;
        -- a holdout user gets the control list with the content filters only (no score floor: other scale)
        IF in_holdout AND (NOT is_drop OR pol.kind = 'relevance_floor') THEN
            skipped := skipped || jsonb_build_object(lbl, 'holdout');
            CONTINUE;
        END IF;
        versions := versions || jsonb_build_array(jsonb_build_object(
            'id', pol.policy_id, 'name', pol.name, 'kind', pol.kind, 'version', pol.version));
        cnt := 0;
        IF is_drop AND pol.kind <> 'relevance_floor' THEN
            -- a filter is per item: one evaluation covers the list and the reserve. What it drops joins `dead`;
            -- the list and the reserve are cut once, before the next step that is not such a filter (the rows
            -- already dead are tested again but not counted again)
            IF cardinality(list) > 0 OR cardinality(reserve) > 0 THEN
                live := list || reserve;
                hits := NULL;
                IF pol.kind IN ('exclude_interacted', 'exclude_negative', 'exclude_served') THEN
                    IF pol.kind = 'exclude_negative' AND coalesce((pol.params ->> 'neighbours')::boolean, false) THEN
                        dkeys := pgrec.policy_drop_negative(pol.params, keys, user_key, t);
                    ELSE
                        IF ev_key IS NULL THEN
                            -- the user's events before as_of with the items of the request (every row that can
                            -- be listed is in keys by now), once for every history filter of the request
                            SELECT coalesce(array_agg(e.item_key), '{}'), coalesce(array_agg(e.type_id), '{}'),
                                   coalesce(array_agg(e.polarity), '{}'), coalesce(array_agg(e.occurred_at), '{}')
                              INTO ev_key, ev_type, ev_pol, ev_at
                              FROM pgrec.events e
                             WHERE e.user_key = user_key AND e.occurred_at < t
                               AND e.item_key IN (SELECT unnest(keys));
                        END IF;
                        dkeys := pgrec.policy_history_keys(pol.kind, pol.params, ev_key, ev_type, ev_pol, ev_at,
                                                           keys, user_key, t);
                    END IF;
                    IF cardinality(dkeys) > 0 THEN
                        hits := ARRAY(SELECT l.x FROM unnest(live) l(x) JOIN unnest(dkeys) d(k) ON d.k = keys[l.x]);
                    END IF;
                ELSE
                    hits := pgrec.policy_drop_hits(pol.kind, pol.params, rws, sc, live, ctx, t);
                END IF;
                IF cardinality(hits) > 0 AND cardinality(dead) > 0 THEN
                    hits := ARRAY(SELECT h FROM unnest(hits) h WHERE h NOT IN (SELECT unnest(dead)));
                END IF;
                IF cardinality(hits) > 0 THEN
                    dead := dead || hits;
                    -- counted: the items of the list it drops (not the reserve's)
                    cnt := cardinality(hits);
                    IF cardinality(reserve) > 0 THEN
                        cnt := cnt - (SELECT count(*) FROM unnest(hits) h WHERE h = ANY (reserve));
                    END IF;
                    IF cnt > 0 THEN
                        dropped := dropped || jsonb_build_object(lbl, cnt);
                    END IF;
                END IF;
            END IF;
            IF pol.kind = 'attribute_filter' AND coalesce(pol.params ->> 'mode', 'keep') = 'keep' THEN
                -- every item listed in the end passed it (items from outside the candidates too)
                kept_by := kept_by || lbl;
            END IF;
        ELSIF pol.kind = 'relevance_floor' THEN
            -- scored under params.min_score: the list only (the reserve's scores are not on this scale)
            IF cardinality(list) > 0 THEN
                min_s := (pol.params ->> 'min_score')::float8;
                SELECT coalesce(array_agg(f.x) FILTER (WHERE f.d), '{}'), coalesce(array_agg(f.x) FILTER (WHERE NOT f.d), '{}')
                  INTO hit_i, list
                  FROM (SELECT x, coalesce(sc[x] < min_s, true) AS d FROM unnest(list) x OFFSET 0) f;
                cnt := cardinality(hit_i);
                IF cnt > 0 THEN
                    dropped := dropped || jsonb_build_object(lbl, cnt);
                END IF;
            END IF;
            IF pol.params ->> 'fill' = 'trending' AND NOT in_holdout
               AND cardinality(list) < k THEN
                -- fill the short list from trending, below the kept items, at the floor score (new rows: the
                -- reserve keeps its own scores)
                extra := ARRAY(
                    SELECT ROW(r.item_key, r.item_id, (pol.params ->> 'min_score')::float8, r.sources, r.categories,
                               r.properties, r.created_at)::pgrec.rerank_row
                      FROM unnest(reserve) x, LATERAL (SELECT (rws[x]).*) r
                     WHERE r.sources = 'trending' AND NOT (r.item_key = ANY (SELECT keys[q] FROM unnest(list) q))
                     ORDER BY sc[x] DESC, r.item_key
                     LIMIT k - cardinality(list));
                IF cardinality(extra) > 0 THEN
                    list := list || ARRAY(SELECT generate_series(n_rows + 1, n_rows + cardinality(extra)));
                    rws := rws || extra;
                    hit := ARRAY(SELECT r.item_key FROM unnest(extra) r);
                    keys := keys || hit;
                    sc := sc || ARRAY(SELECT r.score FROM unnest(extra) r);
                    n_rows := n_rows + cardinality(extra);
                    eff_key := eff_key || hit;
                    eff_pol := eff_pol || array_fill(lbl, ARRAY[cardinality(hit)]);
                    eff_act := eff_act || array_fill('filled'::text, ARRAY[cardinality(hit)]);
                END IF;
            END IF;
        ELSIF pol.kind = 'holdout' THEN
            in_holdout := true;
            IF holdout_control = 'trending' AND EXISTS (SELECT 1 FROM unnest(reserve) x WHERE (rws[x]).sources = 'trending') THEN
                list := ARRAY(SELECT x FROM unnest(reserve) x WHERE (rws[x]).sources = 'trending'
                               ORDER BY sc[x] DESC, keys[x]);
            END IF;  -- no trending items (a quiet catalogue): the control is the input order
            hit := ARRAY(SELECT keys[x] FROM unnest(list) x);
            eff_key := eff_key || hit;
            eff_pol := eff_pol || array_fill(lbl, ARRAY[cardinality(hit)]);
            eff_act := eff_act || array_fill('holdout'::text, ARRAY[cardinality(hit)]);
        ELSIF pol.kind = 'boost' THEN
            -- score * multiply + add for the matching items of the list, then re-sort
            mask := pgrec.policy_match(pol.params -> 'predicate', rws, sc, list, ctx, t);
            mul := coalesce((pol.params ->> 'multiply')::float8, 1);
            addv := coalesce((pol.params ->> 'add')::float8, 0);
            SELECT coalesce(array_agg(b.x ORDER BY b.o), '{}'),
                   coalesce(array_agg(keys[b.x] ORDER BY b.o), '{}'),
                   coalesce(array_agg(CASE WHEN b.ns > sc[b.x] THEN 'boosted' ELSE 'buried' END ORDER BY b.o), '{}'),
                   coalesce(array_agg(b.ns ORDER BY b.o), '{}')
              INTO hit_i, hit, acts, new_sc
              FROM (SELECT l.x, l.o, sc[l.x] * mul + addv AS ns
                      FROM unnest(list, mask) WITH ORDINALITY l(x, m, o) WHERE l.m) b
             WHERE b.ns IS DISTINCT FROM sc[b.x];
            IF cardinality(hit) > 0 THEN
                eff_key := eff_key || hit;
                eff_pol := eff_pol || array_fill(lbl, ARRAY[cardinality(hit)]);
                eff_act := eff_act || acts;
                FOR n_i IN 1..cardinality(hit_i) LOOP
                    sc[hit_i[n_i]] := new_sc[n_i];
                END LOOP;
                list := ARRAY(SELECT x FROM unnest(list) x ORDER BY sc[x] DESC NULLS LAST, keys[x]);
            END IF;
        ELSIF pol.kind = 'pin' THEN
            -- item i at position i of params.positions; items beyond the positions are not pinned; an item
            -- neither in the list nor in the reserve (unavailable, filtered, excluded) leaves its slot to the list
            ids := pgrec.policy_pin_ids(pol.params);
            posn := CASE WHEN pol.params ? 'positions'
                         THEN ARRAY(SELECT x::int FROM jsonb_array_elements_text(pol.params -> 'positions') x)
                         ELSE ARRAY(SELECT generate_series(1, cardinality(ids))) END;
            pins := '{}';
            pinpos := '{}';
            pinres := '{}';
            FOR n_i IN 1..least(cardinality(ids), cardinality(posn)) LOOP
                ix := (SELECT x FROM unnest(list) x WHERE (rws[x]).item_id = ids[n_i] LIMIT 1);
                IF ix IS NULL THEN
                    ix := (SELECT x FROM unnest(reserve) x WHERE (rws[x]).item_id = ids[n_i] LIMIT 1);
                    CONTINUE WHEN ix IS NULL OR keys[ix] = ANY (SELECT keys[q] FROM unnest(pins) q);
                    pinres := pinres || true;
                ELSE
                    CONTINUE WHEN keys[ix] = ANY (SELECT keys[q] FROM unnest(pins) q);
                    pinres := pinres || false;
                END IF;
                pins := pins || ix;
                pinpos := pinpos || posn[n_i];
            END LOOP;
            IF cardinality(pins) > 0 THEN
                list := ARRAY(SELECT x FROM unnest(list) x WHERE NOT keys[x] = ANY (SELECT keys[q] FROM unnest(pins) q));
                FOR n_i IN SELECT o FROM unnest(pinpos) WITH ORDINALITY u(pp, o) ORDER BY pp, o LOOP
                    ix := pins[n_i];
                    pin_at := least(pinpos[n_i], coalesce(cardinality(list), 0) + 1);
                    IF sc[ix] IS NULL OR pinres[n_i] THEN
                        -- a new row (the reserve keeps its own); an item without a score (from outside the
                        -- candidates) takes the score of the slot it fills
                        slot_s := sc[ix];
                        IF slot_s IS NULL THEN
                            slot_s := coalesce(sc[list[pin_at]], sc[list[pin_at - 1]]);
                        END IF;
                        extra := ARRAY[rws[ix]];
                        rws := rws || ROW(extra[1].item_key, extra[1].item_id, slot_s, extra[1].sources,
                                          extra[1].categories, extra[1].properties, extra[1].created_at)::pgrec.rerank_row;
                        keys := keys || keys[ix];
                        sc := sc || slot_s;
                        n_rows := n_rows + 1;
                        ix := n_rows;
                    END IF;
                    list := list[1:pin_at - 1] || ix || list[pin_at:];
                END LOOP;
            END IF;
            -- the pinned items in the top k (also those that happened to stay where they were)
            hit := ARRAY(SELECT keys[x] FROM unnest(list[1:k]) x WHERE (rws[x]).item_id = ANY (ids));
            eff_key := eff_key || hit;
            eff_pol := eff_pol || array_fill(lbl, ARRAY[cardinality(hit)]);
            eff_act := eff_act || array_fill('pinned'::text, ARRAY[cardinality(hit)]);
        ELSE
            before := list;
            list := CASE pol.kind
                WHEN 'source_mix' THEN pgrec.policy_move_source_mix(pol.params, rws, sc, list, ctx, t, k)
                WHEN 'diversity' THEN pgrec.policy_move_diversity(pol.params, rws, sc, list, ctx, t, k)
                WHEN 'mmr' THEN pgrec.policy_move_mmr(pol.params, rws, sc, list, ctx, t, k)
                WHEN 'promote' THEN pgrec.policy_move_promote(pol.params, rws, sc, list, ctx, t, k)
                WHEN 'exploration' THEN pgrec.policy_move_exploration(pol.params, rws, sc, list, ctx, t, k)
                END;
            -- the items this step moved up into or within the top k
            hit := ARRAY(SELECT keys[a.x] FROM unnest(list[1:k]) WITH ORDINALITY a(x, o)
                          WHERE a.o < array_position(before, a.x) ORDER BY a.o);
            eff_key := eff_key || hit;
            eff_pol := eff_pol || array_fill(lbl, ARRAY[cardinality(hit)]);
            eff_act := eff_act || array_fill(CASE pol.kind WHEN 'promote' THEN 'promoted' WHEN 'exploration' THEN 'explored'
                                                           ELSE 'moved' END, ARRAY[cardinality(hit)]);
        END IF;
        IF debug IS NOT NULL THEN
            IF cardinality(dead) > 0 THEN
                list := ARRAY(SELECT x FROM unnest(list) x WHERE x NOT IN (SELECT unnest(dead)));
                reserve := ARRAY(SELECT x FROM unnest(reserve) x WHERE x NOT IN (SELECT unnest(dead)));
                dead := '{}';
            END IF;
            steps := steps || jsonb_build_array(jsonb_build_object('policy', lbl, 'name', pol.name, 'kind', pol.kind,
                'dropped', cnt, 'items', pgrec.policy_show(rws, sc, list, debug),
                'ms', round(extract(epoch FROM clock_timestamp() - t_step) * 1000, 3)));
            t_step := clock_timestamp();
        END IF;
    END LOOP;

    -- ---- the answer: the top k with reasons
    IF cardinality(dead) > 0 THEN
        list := ARRAY(SELECT x FROM unnest(list) x WHERE x NOT IN (SELECT unnest(dead)));
    END IF;
    list := list[1:k];
    RETURN jsonb_build_object(
        'items', coalesce((
            SELECT jsonb_agg(jsonb_build_object(
                       'item_key', keys[l.x], 'item_id', (rws[l.x]).item_id, 'score', sc[l.x], 'position', l.o,
                       'reasons', jsonb_build_object(
                           'sources', to_jsonb(coalesce(string_to_array(nullif((rws[l.x]).sources, ''), ','), '{}'::text[])),
                           'policies', coalesce(e.pols, '[]'::jsonb) || kb.kept)) ORDER BY l.o)
              FROM unnest(list) WITH ORDINALITY l(x, o)
              CROSS JOIN (SELECT coalesce(jsonb_agg(jsonb_build_object('policy', kb.lbl, 'action', 'kept') ORDER BY kb.n),
                                          '[]'::jsonb) AS kept
                            FROM unnest(kept_by) WITH ORDINALITY kb(lbl, n)) kb
              LEFT JOIN (
                  SELECT x.key, jsonb_agg(jsonb_build_object('policy', x.pol, 'action', x.act) ORDER BY x.n) AS pols
                    FROM unnest(eff_key, eff_pol, eff_act) WITH ORDINALITY x(key, pol, act, n)
                   WHERE x.key IN (SELECT keys[q] FROM unnest(list) q)
                   GROUP BY x.key) e ON e.key = keys[l.x]), '[]'::jsonb),
        'dropped', dropped,
        'policy_versions', versions,
        'skipped', skipped,
        'holdout', in_holdout,
        'steps', CASE WHEN debug IS NOT NULL THEN steps END);
END
$$;
COMMENT ON FUNCTION pgrec.rerank(bigint, text, int, bigint[], float8[], text[], jsonb, timestamptz, text) IS
    'Stage 3: apply the policies in force (surface, segment, time window, policy set) to a scored list, by '
    'priority then kind, and return {"items": [{item_key, item_id, score, position, reasons: {sources, policies}}], '
    '"dropped": {"<policy id>/<kind>": n}, "policy_versions": [...], "skipped": {...}, "holdout": bool}. '
    'context: {"exclude": [item ids], "include_only": [item ids], "params": {...}, "debug": n} (debug: "steps" '
    'holds the first n items and the milliseconds after the input and after each policy). '
    'Deterministic: ties are broken by item_key.';
