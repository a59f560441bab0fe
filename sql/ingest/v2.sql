-- Getting data in: events, items, users, embeddings. Functions an app calls on its own connection.
-- SECURITY DEFINER functions pin search_path and qualify every name (pgrec.*, public.vector).

CREATE OR REPLACE FUNCTION pgrec.ensure_event_partitions(p_from timestamptz, p_to timestamptz)
RETURNS int
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- month (the default) or year, fixed at install (config event_partition_interval)
    iv   text := coalesce((SELECT c.value #>> '{}' FROM pgrec.config c WHERE c.key = 'event_partition_interval'),
                          'month');
    step interval := CASE iv WHEN 'year' THEN interval '1 year' ELSE interval '1 month' END;
    fmt  text := CASE iv WHEN 'year' THEN 'YYYY' ELSE 'YYYYMM' END;
    m    timestamptz;
    nxt  timestamptz;
    part text;
    made int := 0;
BEGIN
    IF p_from IS NULL OR p_to IS NULL THEN
        RETURN 0;
    END IF;
    m := date_trunc(CASE iv WHEN 'year' THEN 'year' ELSE 'month' END, p_from AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    WHILE m <= p_to LOOP
        nxt := ((m AT TIME ZONE 'UTC') + step) AT TIME ZONE 'UTC';
        part := 'events_' || to_char(m AT TIME ZONE 'UTC', fmt);
        IF to_regclass('pgrec.' || part) IS NULL THEN
            -- two sessions may want the same partition: serialise creation, then look again
            PERFORM pg_advisory_xact_lock(hashtext('pgrec.events.partitions'));
            IF to_regclass('pgrec.' || part) IS NULL THEN
                EXECUTE format('CREATE TABLE pgrec.%I PARTITION OF pgrec.events FOR VALUES FROM (%L) TO (%L)',
                               part, m, nxt);
                made := made + 1;
            END IF;
        END IF;
        m := nxt;
    END LOOP;
    RETURN made;
END
$$;
COMMENT ON FUNCTION pgrec.ensure_event_partitions(timestamptz, timestamptz) IS
    'Create the partitions of pgrec.events (monthly, or yearly per config event_partition_interval) covering '
    '[p_from, p_to]; returns how many were made.';

CREATE OR REPLACE FUNCTION pgrec.event_polarity(
    p_polarity text, p_positive_min numeric, p_negative_max numeric, p_value numeric)
RETURNS smallint
LANGUAGE sql IMMUTABLE PARALLEL SAFE
AS $$
    SELECT (CASE
        WHEN p_value IS NOT NULL AND p_positive_min IS NOT NULL AND p_value >= p_positive_min THEN 1
        WHEN p_value IS NOT NULL AND p_negative_max IS NOT NULL AND p_value <= p_negative_max THEN -1
        WHEN p_value IS NOT NULL AND (p_positive_min IS NOT NULL OR p_negative_max IS NOT NULL) THEN 0
        WHEN p_polarity = 'positive' THEN 1
        WHEN p_polarity = 'negative' THEN -1
        ELSE 0 END)::smallint
$$;
COMMENT ON FUNCTION pgrec.event_polarity(text, numeric, numeric, numeric) IS
    'The one rule for an event''s polarity: by value against the type''s thresholds, else by the type.';

CREATE OR REPLACE FUNCTION pgrec.user_key_for(p_user_id text)
RETURNS bigint
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE k bigint;
BEGIN
    SELECT u.user_key INTO k FROM pgrec.users u WHERE u.user_id = p_user_id;
    IF k IS NULL THEN
        INSERT INTO pgrec.users (user_id) VALUES (p_user_id) ON CONFLICT (user_id) DO NOTHING RETURNING user_key INTO k;
        IF k IS NULL THEN  -- another session created the user between our two statements
            SELECT u.user_key INTO k FROM pgrec.users u WHERE u.user_id = p_user_id;
        END IF;
    END IF;
    RETURN k;
END
$$;
COMMENT ON FUNCTION pgrec.user_key_for(text) IS 'The internal key of a user, created on first sight.';

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
    IF user_id IS NULL OR user_id = '' THEN
        RAISE EXCEPTION 'pgrec.track_event: user_id is required' USING ERRCODE = '22023';
    END IF;
    IF item_id IS NULL OR item_id = '' THEN
        RAISE EXCEPTION 'pgrec.track_event: item_id is required' USING ERRCODE = '22023';
    END IF;
    IF occurred_at IS NULL THEN
        RAISE EXCEPTION 'pgrec.track_event: occurred_at is required' USING ERRCODE = '22023';
    END IF;
    IF occurred_at > now() + interval '1 day' THEN
        RAISE EXCEPTION 'pgrec.track_event: occurred_at % is in the future', occurred_at USING ERRCODE = '22023';
    END IF;
    IF value IS NOT NULL AND value = 'NaN'::numeric THEN
        RAISE EXCEPTION 'pgrec.track_event: value is NaN' USING ERRCODE = '22023';
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
    IF item_id IS NULL OR item_id = '' THEN
        RAISE EXCEPTION 'pgrec.upsert_item: item_id is required' USING ERRCODE = '22023';
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
    IF user_id IS NULL OR user_id = '' THEN
        RAISE EXCEPTION 'pgrec.upsert_user: user_id is required' USING ERRCODE = '22023';
    END IF;
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
    IF NOT EXISTS (SELECT 1 FROM unnest(p_values) AS x(v) WHERE v <> 0) THEN
        RAISE EXCEPTION 'embedding for % "%" is all zeros (cosine distance is undefined)', p_what, p_id
            USING ERRCODE = '22023';
    END IF;
    RETURN p_values::real[]::public.vector;
END
$$;
COMMENT ON FUNCTION pgrec.check_vector(text, text, float8[]) IS
    'The one validation of an embedding: dimension, NULL/NaN/infinity, all zeros. Errors name the item or user.';

CREATE OR REPLACE FUNCTION pgrec.set_item_embedding(item_id text, embedding float8[],
                                                    model_version text DEFAULT 'imported')
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE k bigint;
BEGIN
    SELECT it.item_key INTO k FROM pgrec.items it WHERE it.item_id = set_item_embedding.item_id;
    IF k IS NULL THEN
        RAISE EXCEPTION 'pgrec.set_item_embedding: unknown item "%"', item_id USING ERRCODE = 'P0002';
    END IF;
    INSERT INTO pgrec.item_embeddings AS e (item_key, embedding, model_version)
    VALUES (k, pgrec.check_vector('item', item_id, embedding), model_version)
    ON CONFLICT (item_key) DO UPDATE SET embedding = excluded.embedding,
        model_version = excluded.model_version, updated_at = now();
END
$$;
COMMENT ON FUNCTION pgrec.set_item_embedding(text, float8[], text) IS
    'Store an item''s vector (checked by pgrec.check_vector).';

CREATE OR REPLACE FUNCTION pgrec.set_user_embedding(user_id text, embedding float8[],
                                                    model_version text DEFAULT 'imported')
RETURNS void
LANGUAGE plpgsql VOLATILE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
#variable_conflict use_variable
DECLARE k bigint;
BEGIN
    SELECT u.user_key INTO k FROM pgrec.users u WHERE u.user_id = set_user_embedding.user_id;
    IF k IS NULL THEN
        RAISE EXCEPTION 'pgrec.set_user_embedding: unknown user "%"', user_id USING ERRCODE = 'P0002';
    END IF;
    INSERT INTO pgrec.user_embeddings AS e (user_key, embedding, model_version, based_on)
    VALUES (k, pgrec.check_vector('user', user_id, embedding), model_version, now())
    ON CONFLICT (user_key) DO UPDATE SET embedding = excluded.embedding,
        model_version = excluded.model_version, based_on = excluded.based_on, updated_at = now();
END
$$;
COMMENT ON FUNCTION pgrec.set_user_embedding(text, float8[], text) IS
    'Store a user''s vector (checked by pgrec.check_vector).';
