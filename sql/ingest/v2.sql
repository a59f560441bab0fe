-- Getting data in, v2: clear errors where v1 let PostgreSQL's own surface (each function here replaces v1's of the
-- same signature; reverting restores v1's, pgrec.check_id is new and dropped).
-- - ids: NULL, empty or longer than 256 characters is refused naming the field (v1: a raw check-constraint
--   violation for a long id or an empty event_id);
-- - pgrec.track_event: an event before 1970-01-01 (-infinity included: v1 failed naming no field, "null values
--   cannot be formatted as an SQL identifier", and any early time made a new monthly partition) and an infinite
--   value are refused;
-- - pgrec.upsert_item: an infinite created_at is refused;
-- - pgrec.check_vector (set_item_embedding, set_user_embedding, imports, the HTTP upload): a value beyond a
--   4-byte float's range is refused naming its position, one below its smallest becomes 0 (v1: "value out of
--   range: underflow / overflow", an HTTP 500).

CREATE OR REPLACE FUNCTION pgrec.check_id(p_fn text, p_field text, p_id text)
RETURNS void
LANGUAGE plpgsql IMMUTABLE
SET search_path = pg_catalog, pg_temp
AS $$
BEGIN
    IF p_id IS NULL OR p_id = '' THEN
        RAISE EXCEPTION '%: % is required', p_fn, p_field USING ERRCODE = '22023';
    END IF;
    IF length(p_id) > 256 THEN
        RAISE EXCEPTION '%: % is longer than 256 characters (%)', p_fn, p_field, length(p_id) USING ERRCODE = '22023';
    END IF;
END
$$;
COMMENT ON FUNCTION pgrec.check_id(text, text, text) IS
    'The rule for an external id (item, user, event): 1 to 256 characters. Raises naming the function and field.';

CREATE OR REPLACE FUNCTION pgrec.check_vector(p_what text, p_id text, p_values float8[])
RETURNS public.vector
LANGUAGE plpgsql STABLE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    dim int := (SELECT c.value::int FROM pgrec.config c WHERE c.key = 'embedding_dim');
    n   int := coalesce(cardinality(p_values), 0);
    bad int;
BEGIN
    IF n <> dim THEN
        RAISE EXCEPTION 'embedding for % "%" has % dimensions, expected %', p_what, p_id, n, dim
            USING ERRCODE = '22023';
    END IF;
    SELECT min(o) INTO bad FROM unnest(p_values) WITH ORDINALITY AS x(v, o)
     WHERE v IS NULL OR v = 'NaN'::float8 OR v IN ('Infinity'::float8, '-Infinity'::float8);
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'embedding for % "%" has a NULL, NaN or infinite value at position %', p_what, p_id, bad
            USING ERRCODE = '22023';
    END IF;
    SELECT min(o) INTO bad FROM unnest(p_values) WITH ORDINALITY AS x(v, o) WHERE abs(v) >= 3.4028235677973366e38;  -- rounds to infinity as a real
    IF bad IS NOT NULL THEN
        RAISE EXCEPTION 'embedding for % "%" has a value beyond the range of a 4-byte float (3.4e38) at position %',
            p_what, p_id, bad USING ERRCODE = '22023';
    END IF;
    -- a value too small for a 4-byte float is 0 there (the cast would fail with "underflow")
    p_values := ARRAY(SELECT CASE WHEN abs(x.v) < 1.401298464324817e-45 THEN 0::float8 ELSE x.v END
                        FROM unnest(p_values) WITH ORDINALITY AS x(v, o) ORDER BY x.o);
    IF NOT EXISTS (SELECT 1 FROM unnest(p_values) AS x(v) WHERE v <> 0) THEN
        RAISE EXCEPTION 'embedding for % "%" is all zeros (cosine distance is undefined)', p_what, p_id
            USING ERRCODE = '22023';
    END IF;
    RETURN p_values::real[]::public.vector;
END
$$;
COMMENT ON FUNCTION pgrec.check_vector(text, text, float8[]) IS
    'The one validation of an embedding: dimension, NULL/NaN/infinity, beyond float4, all zeros (values below float4''s '
    'smallest are 0). Errors name the item or user.';

CREATE OR REPLACE FUNCTION pgrec.track_event(
    user_id     text,
    item_id     text,
    event_type  text,
    occurred_at timestamptz DEFAULT now(),
    value       numeric DEFAULT NULL,
    event_id    text DEFAULT NULL,
    properties  jsonb DEFAULT NULL,
    request_id  uuid DEFAULT NULL)
RETURNS text
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE
    u bigint;
    i bigint;
    t pgrec.event_types%ROWTYPE;
    n int;
BEGIN
    PERFORM pgrec.check_id('pgrec.track_event', 'user_id', user_id);
    PERFORM pgrec.check_id('pgrec.track_event', 'item_id', item_id);
    IF event_id IS NOT NULL THEN
        PERFORM pgrec.check_id('pgrec.track_event', 'event_id', event_id);
    END IF;
    IF occurred_at IS NULL THEN
        RAISE EXCEPTION 'pgrec.track_event: occurred_at is required' USING ERRCODE = '22023';
    END IF;
    IF occurred_at > now() + interval '1 day' THEN
        RAISE EXCEPTION 'pgrec.track_event: occurred_at % is in the future', occurred_at USING ERRCODE = '22023';
    END IF;
    IF occurred_at < '1970-01-01 00:00:00+00'::timestamptz THEN  -- -infinity included; each month is a partition
        RAISE EXCEPTION 'pgrec.track_event: occurred_at % is before 1970-01-01', occurred_at USING ERRCODE = '22023';
    END IF;
    IF value IS NOT NULL AND value IN ('NaN'::numeric, 'Infinity'::numeric, '-Infinity'::numeric) THEN
        RAISE EXCEPTION 'pgrec.track_event: value is %', value USING ERRCODE = '22023';
    END IF;
    IF properties IS NOT NULL AND jsonb_typeof(properties) <> 'object' THEN
        RAISE EXCEPTION 'pgrec.track_event: properties must be a JSON object' USING ERRCODE = '22023';
    END IF;
    SELECT * INTO t FROM pgrec.event_types et WHERE et.name = event_type;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgrec.track_event: unknown event type "%"', event_type
            USING ERRCODE = '22023', HINT = 'the known types are the rows of pgrec.event_types';
    END IF;
    SELECT it.item_key INTO i FROM pgrec.items it WHERE it.item_id = track_event.item_id;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'pgrec.track_event: unknown item "%"', item_id
            USING ERRCODE = 'P0002', HINT = 'create the item first with pgrec.upsert_item';
    END IF;
    u := pgrec.user_key_for(user_id);
    IF event_id IS NOT NULL THEN
        INSERT INTO pgrec.event_ids (user_key, event_id, occurred_at)
        VALUES (u, event_id, occurred_at) ON CONFLICT DO NOTHING;
        GET DIAGNOSTICS n = ROW_COUNT;
        IF n = 0 THEN
            RETURN 'duplicate';
        END IF;
    END IF;
    PERFORM pgrec.ensure_event_partitions(occurred_at, occurred_at);
    INSERT INTO pgrec.events (user_key, item_key, type_id, polarity, weight, value, occurred_at,
                              event_id, request_id, properties)
    VALUES (u, i, t.type_id, pgrec.event_polarity(t.polarity, t.positive_min, t.negative_max, value),
            t.weight, value, occurred_at, event_id, request_id, properties)
    ON CONFLICT DO NOTHING;
    GET DIAGNOSTICS n = ROW_COUNT;
    RETURN CASE WHEN n = 1 THEN 'stored' ELSE 'duplicate' END;
END
$$;
COMMENT ON FUNCTION pgrec.track_event(text, text, text, timestamptz, numeric, text, jsonb, uuid) IS
    'Record one event. Users are created on first sight; an unknown item is an error. Returns ''stored'', '
    'or ''duplicate'' when the same event_id (per user) or the same (user, item, type, time) was seen before.';

CREATE OR REPLACE FUNCTION pgrec.upsert_item(
    item_id    text,
    categories text[] DEFAULT NULL,
    properties jsonb DEFAULT NULL,
    created_at timestamptz DEFAULT NULL,
    available  boolean DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE k bigint;
BEGIN
    PERFORM pgrec.check_id('pgrec.upsert_item', 'item_id', item_id);
    IF created_at IS NOT NULL AND created_at IN ('infinity'::timestamptz, '-infinity'::timestamptz) THEN
        RAISE EXCEPTION 'pgrec.upsert_item: item "%": created_at must be a finite time', item_id
            USING ERRCODE = '22023';
    END IF;
    IF properties IS NOT NULL AND jsonb_typeof(properties) <> 'object' THEN
        RAISE EXCEPTION 'pgrec.upsert_item: item "%": properties must be a JSON object', item_id
            USING ERRCODE = '22023';
    END IF;
    IF categories IS NOT NULL AND array_position(categories, NULL) IS NOT NULL THEN
        RAISE EXCEPTION 'pgrec.upsert_item: item "%": categories contain NULL', item_id USING ERRCODE = '22023';
    END IF;
    INSERT INTO pgrec.items AS it (item_id, categories, properties, created_at, available)
    VALUES (item_id, coalesce(categories, '{}'), coalesce(properties, '{}'), coalesce(created_at, now()),
            coalesce(available, true))
    ON CONFLICT ON CONSTRAINT items_item_id_key DO UPDATE SET
        categories = coalesce(upsert_item.categories, it.categories),
        properties = coalesce(upsert_item.properties, it.properties),
        created_at = coalesce(upsert_item.created_at, it.created_at),
        available  = coalesce(upsert_item.available, it.available),
        updated_at = now()
    RETURNING it.item_key INTO k;
    RETURN k;
END
$$;
COMMENT ON FUNCTION pgrec.upsert_item(text, text[], jsonb, timestamptz, boolean) IS
    'Create an item or update the fields given (NULL keeps the stored value). Returns the internal key.';

CREATE OR REPLACE FUNCTION pgrec.upsert_user(user_id text, properties jsonb DEFAULT NULL)
RETURNS bigint
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE k bigint;
BEGIN
    PERFORM pgrec.check_id('pgrec.upsert_user', 'user_id', user_id);
    IF properties IS NOT NULL AND jsonb_typeof(properties) <> 'object' THEN
        RAISE EXCEPTION 'pgrec.upsert_user: user "%": properties must be a JSON object', user_id
            USING ERRCODE = '22023';
    END IF;
    INSERT INTO pgrec.users AS u (user_id, properties)
    VALUES (user_id, coalesce(properties, '{}'))
    ON CONFLICT ON CONSTRAINT users_user_id_key DO UPDATE SET
        properties = coalesce(upsert_user.properties, u.properties),
        updated_at = now()
    RETURNING u.user_key INTO k;
    RETURN k;
END
$$;
COMMENT ON FUNCTION pgrec.upsert_user(text, jsonb) IS
    'Create a user or replace their properties (NULL keeps them). Returns the internal key.';
