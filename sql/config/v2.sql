-- Config v2 (reverting restores v1's two functions): a boolean type, and the key log_served_features (true or
-- false, default true when absent): pgrec.finish_request stores the feature rows a served list was ranked with
-- (pgrec.served_features) for the ranker's training from served lists (sql/serving/v6.sql).

CREATE OR REPLACE FUNCTION pgrec.config_specs()
RETURNS TABLE (key text, type text, min numeric, min_open boolean, max numeric, fixed boolean, expects text,
               after_change text)
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT s.key, s.type, s.min::numeric, s.min_open, s.max::numeric, s.fixed,
           CASE s.type
               WHEN 'string' THEN 'a non-empty string'
               WHEN 'event_types' THEN 'a JSON list of event type names (rows of pgrec.event_types)'
               WHEN 'interval' THEN 'month or year'
               WHEN 'boolean' THEN 'true or false'
               ELSE CASE s.type WHEN 'integer' THEN 'an integer' ELSE 'a number' END
                    || CASE WHEN s.min_open THEN ' > ' ELSE ' >= ' END || s.min || ' and <= ' || s.max
           END,
           s.after_change
      FROM (VALUES
        ('candidates_overfetch_max', 'integer', 0, false, 10000, false, NULL::text),
        ('cooccurrence_max_gap', 'integer', 1, false, 1000000, false, 'pgrec train cooccurrence'),
        ('cooccurrence_min_count', 'integer', 1, false, 1000000, false, 'pgrec train cooccurrence'),
        ('cooccurrence_top_n', 'integer', 1, false, 10000, false, 'pgrec train cooccurrence'),
        ('cooccurrence_window_hours', 'number', 0, true, 876000, false, 'pgrec train cooccurrence'),
        ('embedding_dim', 'integer', 2, false, 2000, true, NULL),
        ('event_partition_interval', 'interval', NULL, false, NULL, true, NULL),
        ('feature_ease_items', 'integer', 0, false, 100000, false, NULL),
        ('feature_recent_items', 'integer', 1, false, 10000, false, NULL),
        ('feature_trending_half_life_days', 'number', 0, true, 36500, false, NULL),
        ('feature_user_history_limit', 'integer', 1, false, 10000000, false, NULL),
        ('fresh_days', 'number', 0, true, 36500, false, NULL),
        ('fresh_max_scan', 'integer', 1, false, 100000, false, NULL),
        ('log_served_features', 'boolean', NULL, false, NULL, false, NULL),
        ('policy_max_k', 'integer', 1, false, 100000, false, NULL),
        ('popular_half_life_days', 'number', 0, true, 36500, false, 'SELECT pgrec.rebuild_trending()'),
        ('report_attribution_hours', 'number', 0, false, 87600, false, NULL),
        ('report_click_types', 'event_types', NULL, false, NULL, false, NULL),
        ('report_conversion_types', 'event_types', NULL, false, NULL, false, NULL),
        ('segment_property', 'string', NULL, false, NULL, false, 'SELECT pgrec.rebuild_trending()'),
        ('serving_candidates', 'integer', 1, false, 10000, false, NULL),
        ('source_cache_rows', 'integer', 1, false, 1000000, false, NULL),
        ('source_cache_seconds', 'number', 0, false, 86400, false, NULL),
        ('trending_half_life_hours', 'number', 0, true, 876000, false, 'SELECT pgrec.rebuild_trending()'),
        ('user_vector_half_life_days', 'number', 0, true, 36500, false, NULL),
        ('user_vector_max_events', 'integer', 1, false, 100000, false, NULL)
      ) AS s(key, type, min, min_open, max, fixed, after_change)
$$;
COMMENT ON FUNCTION pgrec.config_specs() IS
    'The keys pgrec.config may hold: JSON type (integer, number, string, boolean, event_types, interval), range, whether '
    'the value is fixed at install, what a valid value is (expects) and what to run after a change, if anything.';

CREATE OR REPLACE FUNCTION pgrec.config_check(p_key text, p_value jsonb)
RETURNS void
LANGUAGE plpgsql STABLE PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    s       record;
    num     numeric;
    ok      boolean;
    unknown text;
    got     text := coalesce(left(p_value::text, 80), 'NULL');
BEGIN
    SELECT * INTO s FROM pgrec.config_specs() c WHERE c.key = p_key;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgrec.config: unknown key %', coalesce(quote_literal(p_key), 'NULL')
            USING ERRCODE = '22023',
                  HINT = 'the keys are ' || (SELECT string_agg(c.key, ', ' ORDER BY c.key) FROM pgrec.config_specs() c);
    END IF;
    -- jsonb_typeof of SQL NULL is NULL: ok stays NULL and the value is refused
    IF s.type IN ('integer', 'number') THEN
        ok := jsonb_typeof(p_value) = 'number';
        IF ok THEN
            num := p_value::numeric;
            ok := NOT ((s.type = 'integer' AND num <> trunc(num)) OR num > s.max OR num < s.min
                       OR (s.min_open AND num = s.min));
        END IF;
    ELSIF s.type = 'string' THEN
        ok := jsonb_typeof(p_value) = 'string' AND p_value #>> '{}' <> '';
    ELSIF s.type = 'boolean' THEN
        ok := jsonb_typeof(p_value) = 'boolean';
    ELSIF s.type = 'interval' THEN
        ok := jsonb_typeof(p_value) = 'string' AND p_value #>> '{}' IN ('month', 'year');
    ELSE  -- event_types
        ok := jsonb_typeof(p_value) = 'array';
        IF ok THEN
            ok := NOT EXISTS (SELECT 1 FROM jsonb_array_elements(p_value) e WHERE jsonb_typeof(e) <> 'string');
        END IF;
    END IF;
    IF NOT coalesce(ok, false) THEN
        RAISE EXCEPTION 'pgrec.config: % must be %, got %', p_key, s.expects, got USING ERRCODE = '22023';
    END IF;
    IF s.type = 'event_types' THEN
        SELECT string_agg(e, ', ') INTO unknown
          FROM jsonb_array_elements_text(p_value) e
         WHERE NOT EXISTS (SELECT 1 FROM pgrec.event_types t WHERE t.name = e);
        IF unknown IS NOT NULL THEN
            RAISE EXCEPTION 'pgrec.config: % names unknown event types: %', p_key, unknown
                USING ERRCODE = '22023',
                      HINT = 'the event types are ' || (SELECT string_agg(t.name, ', ' ORDER BY t.name) FROM pgrec.event_types t);
        END IF;
    END IF;
END
$$;
COMMENT ON FUNCTION pgrec.config_check(text, jsonb) IS
    'Raise SQLSTATE 22023 naming the key, what it expects and the value given when the value is not valid for '
    'the key (pgrec.config_specs), or when the key is unknown.';
