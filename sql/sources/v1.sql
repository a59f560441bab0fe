-- Stage 1 configuration: the parameters of each candidate source (pgrec.candidate_sources.params), checked when
-- a row is written. pgrec.source_param_specs is the one list of the known keys, their types, ranges, defaults
-- and meanings: the trigger validates against it and `pgrec sources params` prints it. The defaults are those
-- the source functions (sql/candidates/v3.sql) use when a key is absent or null.

CREATE OR REPLACE FUNCTION pgrec.candidate_source_names()
RETURNS text[]
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT ARRAY['ann', 'history', 'trending', 'fresh', 'popular']::text[]
$$;
COMMENT ON FUNCTION pgrec.candidate_source_names() IS
    'The candidate sources a row of pgrec.candidate_sources may name, in the union''s order.';

CREATE OR REPLACE FUNCTION pgrec.source_param_specs()
RETURNS TABLE (source text, param text, type text, min numeric, min_open boolean, max numeric, choices text[],
               expects text, default_value text, description text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT s.source, s.param, s.type, s.min::numeric, s.min_open, s.max::numeric, s.choices,
           CASE WHEN s.type = 'string' THEN 'one of ' || array_to_string(s.choices, ', ')
                ELSE CASE s.type WHEN 'integer' THEN 'an integer' ELSE 'a number' END
                     || CASE WHEN s.min_open THEN ' > ' ELSE ' >= ' END || s.min || ' and <= ' || s.max
           END,
           s.default_value, s.description
      FROM (VALUES
        -- ann (pgrec.ann_search): pgvector accepts hnsw.ef_search 1..1000, hnsw.max_scan_tuples 1..2^31-1
        ('ann', 'ef_search', 'integer', 1, false, 1000, NULL::text[], '100',
         'HNSW candidate list (hnsw.ef_search); raised to the source''s k, at most 1000'),
        ('ann', 'iterative_scan', 'string', NULL, false, NULL, ARRAY['relaxed_order', 'strict_order', 'off'],
         'relaxed_order', 'pgvector iterative index scan: keeps scanning when filters drop rows'),
        ('ann', 'max_scan_tuples', 'integer', 1, false, 2147483647, NULL, '20000',
         'an iterative scan stops after this many tuples (raised for a selective category filter)'),
        ('ann', 'exact_max_rows', 'integer', 0, false, 10000000, NULL, '3000',
         'a category filter matching at most this many items gets an exact distance sort instead of the index'),
        -- history (pgrec.source_history)
        ('history', 'max_events', 'integer', 1, false, 10000, NULL, '30',
         'the user''s latest positive events whose items seed the source'),
        ('history', 'half_life_days', 'number', 0, true, 36500, NULL, '7',
         'recency half-life (days) of the seed items'' weights'),
        ('history', 'per_item', 'integer', 1, false, 1000, NULL, '50',
         'co-occurrence (and EASE) neighbours read per seed item'),
        ('history', 'embedding_items', 'integer', 0, false, 1000, NULL, '3',
         'the newest seed items whose embedding neighbours are added (0 = none)'),
        ('history', 'embedding_k', 'integer', 1, false, 1000, NULL, '10',
         'embedding neighbours per seed item'),
        ('history', 'embedding_weight', 'number', 0, false, 1000000, NULL, '0.5',
         'weight of the embedding neighbours beside the co-occurrence ones'),
        ('history', 'ease_weight', 'number', 0, false, 1000000, NULL, '0',
         'weight of the seeds'' EASE neighbours (`pgrec train ease`); 0 = off'),
        -- trending (pgrec.source_trending)
        ('trending', 'global_weight', 'number', 0, false, 1000000, NULL, '0.5',
         'share of the global trending score added to the user''s segment score'),
        -- fresh (pgrec.source_fresh)
        ('fresh', 'days', 'number', 0, true, 36500, NULL, 'config fresh_days (14)',
         'items created within this many days before as_of'),
        ('fresh', 'max_scan', 'integer', 1, false, 100000, NULL, 'config fresh_max_scan (200)',
         'the newest this many of them are ranked by early engagement')
        -- popular (pgrec.source_popular) takes no parameters
      ) AS s(source, param, type, min, min_open, max, choices, default_value, description)
$$;
COMMENT ON FUNCTION pgrec.source_param_specs() IS
    'The known params keys of each candidate source: JSON type (integer, number, string), range or choices, '
    'what a valid value is (expects), the default when absent and a one-line meaning. A source without rows '
    'takes no parameters.';

CREATE OR REPLACE FUNCTION pgrec.source_params_fail(p_where text, p_msg text, p_source text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    known text;
BEGIN
    SELECT string_agg(s.param, ', ') INTO known FROM pgrec.source_param_specs() s WHERE s.source = p_source;
    RAISE EXCEPTION '%: %', p_where, p_msg
        USING ERRCODE = '22023',
              HINT = CASE WHEN NOT (p_source = ANY (pgrec.candidate_source_names())) THEN
                         'the sources are ' || array_to_string(pgrec.candidate_source_names(), ', ')
                     WHEN known IS NULL THEN format('source %s takes no parameters', p_source)
                     ELSE format('the parameters of %s are %s; see `pgrec sources params`', p_source, known) END;
END
$$;
COMMENT ON FUNCTION pgrec.source_params_fail(text, text, text) IS
    'Raise a candidate source validation error (22023) naming the field, with the source''s known keys as HINT.';

CREATE OR REPLACE FUNCTION pgrec.source_params_check(p_surface text, p_source text, p jsonb)
RETURNS void
LANGUAGE plpgsql IMMUTABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    w    text := format('candidate source %s on surface %s', coalesce(p_source, 'NULL'),
                        coalesce(quote_literal(p_surface), 'NULL'));
    k    text;
    v    jsonb;
    spec record;
    bad  boolean;
BEGIN
    IF p_source IS NULL OR NOT (p_source = ANY (pgrec.candidate_source_names())) THEN
        PERFORM pgrec.source_params_fail(w, 'unknown source', coalesce(p_source, ''));
    END IF;
    IF p IS NULL OR jsonb_typeof(p) <> 'object' THEN
        PERFORM pgrec.source_params_fail(w || ': params', format('must be a JSON object, got %s', coalesce(p::text, 'NULL')),
                                         p_source);
    END IF;
    FOR k, v IN SELECT e.key, e.value FROM jsonb_each(p) e ORDER BY e.key LOOP
        SELECT * INTO spec FROM pgrec.source_param_specs() s WHERE s.source = p_source AND s.param = k;
        IF NOT FOUND THEN
            PERFORM pgrec.source_params_fail(w || ': params.' || k, 'unknown parameter', p_source);
        END IF;
        CONTINUE WHEN jsonb_typeof(v) = 'null';  -- null = the default, as when absent
        -- the sources read integers with (params ->> key)::int, which fails on 100.0; strings are refused
        -- even where a cast would take them, so a value has one spelling
        bad := CASE WHEN spec.type = 'string' THEN jsonb_typeof(v) <> 'string' OR NOT (v #>> '{}' = ANY (spec.choices))
                    WHEN jsonb_typeof(v) <> 'number' THEN true
                    WHEN spec.type = 'integer' AND v::text !~ '^-?[0-9]+$' THEN true
                    ELSE v::numeric < spec.min OR (spec.min_open AND v::numeric = spec.min) OR v::numeric > spec.max
               END;
        IF bad THEN
            PERFORM pgrec.source_params_fail(w || ': params.' || k, format('must be %s, got %s', spec.expects, v),
                                             p_source);
        END IF;
    END LOOP;
END
$$;
COMMENT ON FUNCTION pgrec.source_params_check(text, text, jsonb) IS
    'Refuse a candidate source row whose source is unknown or whose params has an unknown key, a value of the '
    'wrong JSON type or out of range (pgrec.source_param_specs), with a message naming surface, source and key.';

CREATE OR REPLACE FUNCTION pgrec.candidate_sources_before_write()
RETURNS trigger
LANGUAGE plpgsql
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    PERFORM pgrec.source_params_check(NEW.surface, NEW.source, NEW.params);
    RETURN NEW;
END
$$;
COMMENT ON FUNCTION pgrec.candidate_sources_before_write() IS
    'Trigger: validate a row of pgrec.candidate_sources (pgrec.source_params_check) before it is written.';

DROP TRIGGER IF EXISTS candidate_sources_before_write ON pgrec.candidate_sources;
CREATE TRIGGER candidate_sources_before_write BEFORE INSERT OR UPDATE ON pgrec.candidate_sources
    FOR EACH ROW EXECUTE FUNCTION pgrec.candidate_sources_before_write();
