-- Set-based bulk loads. Each import COPYs validated rows into a temporary staging table, then runs these.

-- name: import_settings
-- For the import transaction: sorts and hashes of the staging rows in memory, naive times read as UTC, and
-- no JIT (its compile time exceeds what it saves on these one-pass statements).
SELECT set_config('work_mem', '256MB', true), set_config('TimeZone', 'UTC', true), set_config('jit', 'off', true)

-- name: copy_stage
COPY {table} ({columns}) FROM STDIN

-- name: create_items_stage
CREATE TEMP TABLE stage_items (
    line int NOT NULL, item_id text NOT NULL, categories text[], created_at timestamptz,
    properties jsonb, available boolean
) ON COMMIT DROP

-- name: merge_items_new
-- Items import, as pgrec.upsert_item applied line by line: per field, the file's last non-empty value counts (an
-- empty field or a missing column keeps the stored value; a new item gets the defaults). First the new ids
-- (ON CONFLICT DO NOTHING waits for a session inserting the same id), then merge_items_given, a statement of its
-- own so that it sees such a row. Stored = rows inserted + rows changed.
WITH nf AS (  -- per id and field, the value of the last line that has one (categories is an array: no array_agg)
    SELECT DISTINCT ON (s.item_id) s.item_id,
           first_value(s.categories) OVER (PARTITION BY s.item_id ORDER BY s.categories IS NULL, s.line DESC) AS categories,
           first_value(s.properties) OVER (PARTITION BY s.item_id ORDER BY s.properties IS NULL, s.line DESC) AS properties,
           first_value(s.created_at) OVER (PARTITION BY s.item_id ORDER BY s.created_at IS NULL, s.line DESC) AS created_at,
           first_value(s.available) OVER (PARTITION BY s.item_id ORDER BY s.available IS NULL, s.line DESC) AS available
      FROM stage_items s
)
INSERT INTO pgrec.items (item_id, categories, properties, created_at, available)
SELECT nf.item_id, coalesce(nf.categories, '{}'), coalesce(nf.properties, '{}'), coalesce(nf.created_at, now()),
       coalesce(nf.available, true)
  FROM nf ORDER BY nf.item_id
ON CONFLICT (item_id) DO NOTHING

-- name: merge_items_given
WITH nf AS (  -- per id and field, the value of the last line that has one (categories is an array: no array_agg)
    SELECT DISTINCT ON (s.item_id) s.item_id,
           first_value(s.categories) OVER (PARTITION BY s.item_id ORDER BY s.categories IS NULL, s.line DESC) AS categories,
           first_value(s.properties) OVER (PARTITION BY s.item_id ORDER BY s.properties IS NULL, s.line DESC) AS properties,
           first_value(s.created_at) OVER (PARTITION BY s.item_id ORDER BY s.created_at IS NULL, s.line DESC) AS created_at,
           first_value(s.available) OVER (PARTITION BY s.item_id ORDER BY s.available IS NULL, s.line DESC) AS available
      FROM stage_items s
)
UPDATE pgrec.items AS it
   SET categories = coalesce(nf.categories, it.categories),
       properties = coalesce(nf.properties, it.properties),
       created_at = coalesce(nf.created_at, it.created_at),
       available  = coalesce(nf.available, it.available),
       updated_at = now()
  FROM nf
 WHERE it.item_id = nf.item_id
   AND (it.categories, it.properties, it.created_at, it.available)
       IS DISTINCT FROM (coalesce(nf.categories, it.categories), coalesce(nf.properties, it.properties),
                         coalesce(nf.created_at, it.created_at), coalesce(nf.available, it.available))

-- name: create_users_stage
CREATE TEMP TABLE stage_users (line int NOT NULL, user_id text NOT NULL, properties jsonb) ON COMMIT DROP

-- name: merge_users_new
-- Users import, as merge_items_new / merge_items_given: the file's last non-empty properties of an id (empty keeps
-- the stored ones; a new user gets {}).
WITH nf AS (
    SELECT s.user_id,
           (array_agg(s.properties ORDER BY s.line DESC) FILTER (WHERE s.properties IS NOT NULL))[1] AS properties
      FROM stage_users s GROUP BY s.user_id
)
INSERT INTO pgrec.users (user_id, properties)
SELECT nf.user_id, coalesce(nf.properties, '{}') FROM nf ORDER BY nf.user_id
ON CONFLICT (user_id) DO NOTHING

-- name: merge_users_given
WITH nf AS (
    SELECT s.user_id,
           (array_agg(s.properties ORDER BY s.line DESC) FILTER (WHERE s.properties IS NOT NULL))[1] AS properties
      FROM stage_users s GROUP BY s.user_id
)
UPDATE pgrec.users AS u
   SET properties = nf.properties, updated_at = now()
  FROM nf
 WHERE u.user_id = nf.user_id AND nf.properties IS NOT NULL AND u.properties IS DISTINCT FROM nf.properties

-- name: create_events_stage
-- Typed rows, filled by COPY from Python (records, PostgreSQL 15, or a file COPY cannot read), or by
-- events_from_raw; bad_field names the first field events_from_raw found unusable (NULL: the row is good).
CREATE TEMP TABLE stage_events (
    line int NOT NULL, event_id text, user_id text, item_id text, event_type text,
    occurred_at timestamptz, value numeric, properties jsonb, request_id uuid, bad_field text
) ON COMMIT DROP

-- name: create_events_raw
-- A CSV/TSV file as it is: one text column per field pgrec reads, spare ones for the file's other columns.
CREATE TEMP TABLE stage_events_raw (
    line int GENERATED BY DEFAULT AS IDENTITY, event_id text, user_id text, item_id text, event_type text,
    occurred_at text, value text, properties text, request_id text,
    extra_1 text, extra_2 text, extra_3 text, extra_4 text, extra_5 text, extra_6 text, extra_7 text, extra_8 text
) ON COMMIT DROP

-- name: copy_events_raw
-- {columns}: the stage_events_raw column of each field of the file's header (engine/ingest.py _raw_columns)
COPY stage_events_raw ({columns}) FROM STDIN (FORMAT csv, DELIMITER {delimiter})

-- name: create_lines_stage
-- A JSONL file as it is: one row per physical line (line = its number).
CREATE TEMP TABLE stage_lines (line int GENERATED ALWAYS AS IDENTITY, doc text) ON COMMIT DROP

-- name: copy_lines
-- CSV with a delimiter and quote that JSON text never holds unescaped: every line arrives as it is.
COPY stage_lines (doc) FROM STDIN (FORMAT csv, DELIMITER E'\x01', QUOTE E'\x02')

-- name: bad_json_lines
-- After events_raw_from_lines: the lines of a JSONL file that are not one JSON object (blank lines are
-- skipped, as the Python reader does), found without parsing any JSON again.
SELECT l.line, l.doc FROM stage_lines l
 WHERE btrim(l.doc, E' \t\r\n') <> ''
   AND NOT EXISTS (SELECT 1 FROM stage_events_raw r WHERE r.line = l.line)
 ORDER BY l.line

-- name: events_raw_from_lines
-- The fields of JSON-object lines, as text (->> gives strings bare, numbers and nested JSON as their text).
INSERT INTO stage_events_raw (line, event_id, user_id, item_id, event_type, occurred_at, value, properties,
                              request_id)
SELECT line, j ->> 'event_id', j ->> 'user_id', j ->> 'item_id', j ->> 'event_type', j ->> 'occurred_at',
       j ->> 'value', j ->> 'properties', j ->> 'request_id'
  FROM (SELECT line, doc::jsonb AS j FROM stage_lines
         WHERE btrim(doc, E' \t\r\n') <> '' AND pg_input_is_valid(doc, 'jsonb') OFFSET 0) l
 WHERE jsonb_typeof(j) = 'object'

-- name: events_from_raw
-- One set-based pass (PostgreSQL >= 16) over the raw text: trim ASCII whitespace (unless the reader saw none
-- next to a field boundary: %(trim)s false; '' is missing), cast,
-- and name the first unusable field of a bad row in the order the Python parser checks them. Times are
-- YYYY-MM-DD[(T| )HH:MM[:SS[.ffffff]]][Z|+HH[:MM]] (naive = the session's zone, UTC on import) or unix
-- seconds; the Python parser (engine/ingest.py parse_time) accepts the same forms.
INSERT INTO stage_events (line, event_id, user_id, item_id, event_type, occurred_at, value, properties,
                          request_id, bad_field)
SELECT line, event_id, user_id, item_id, event_type, ts, num, props, rid,
       CASE WHEN ts IS NULL OR ts > now() + interval '1 day' OR ts < '1970-01-01 00:00:00+00' THEN 'occurred_at'
            WHEN octet_length(event_id) > 256 AND length(event_id) > 256 THEN 'event_id'
            WHEN user_id IS NULL OR (octet_length(user_id) > 256 AND length(user_id) > 256) THEN 'user_id'
            WHEN item_id IS NULL OR (octet_length(item_id) > 256 AND length(item_id) > 256) THEN 'item_id'
            WHEN event_type IS NULL OR (octet_length(event_type) > 256 AND length(event_type) > 256)
                THEN 'event_type'
            WHEN v IS NOT NULL AND num IS NULL THEN 'value'
            WHEN p IS NOT NULL AND (props IS NULL OR jsonb_typeof(props) <> 'object') THEN 'properties'
            WHEN q IS NOT NULL AND rid IS NULL THEN 'request_id'
       END
  FROM (SELECT line, event_id, user_id, item_id, event_type, v, p, q,
               CASE WHEN o LIKE '____-__-__%%' THEN  -- a date, then nothing or a time from HH:MM on
                        CASE WHEN (octet_length(o) = 10 OR o LIKE '____-__-__T__:%%' OR o LIKE '____-__-__ __:%%')
                                  AND o NOT LIKE '____-__-___24%%'
                                  AND o !~ '[^0-9T:.Z+ -]' AND pg_input_is_valid(o, 'timestamptz')
                             THEN o::timestamptz END
                    WHEN o !~ '[^0-9.-]' AND pg_input_is_valid(o, 'float8') THEN
                        CASE WHEN o::float8 BETWEEN -62135596800 AND 253402300799
                             THEN to_timestamp(o::float8) END
               END AS ts,
               CASE WHEN pg_input_is_valid(v, 'numeric') AND v::numeric NOT IN ('NaN', 'Infinity', '-Infinity')
                    THEN v::numeric END AS num,
               CASE WHEN pg_input_is_valid(p, 'jsonb') THEN p::jsonb END AS props,
               CASE WHEN pg_input_is_valid(q, 'uuid') THEN q::uuid END AS rid
          FROM (SELECT r.line + %(line_offset)s AS line,
                       nullif(CASE WHEN %(trim)s THEN btrim(r.event_id, E' \t\r\n\v\f') ELSE r.event_id END, '') AS event_id,
                       nullif(CASE WHEN %(trim)s THEN btrim(r.user_id, E' \t\r\n\v\f') ELSE r.user_id END, '') AS user_id,
                       nullif(CASE WHEN %(trim)s THEN btrim(r.item_id, E' \t\r\n\v\f') ELSE r.item_id END, '') AS item_id,
                       nullif(CASE WHEN %(trim)s THEN btrim(r.event_type, E' \t\r\n\v\f') ELSE r.event_type END, '') AS event_type,
                       nullif(CASE WHEN %(trim)s THEN btrim(r.occurred_at, E' \t\r\n\v\f') ELSE r.occurred_at END, '') AS o,
                       nullif(CASE WHEN %(trim)s THEN btrim(r.value, E' \t\r\n\v\f') ELSE r.value END, '') AS v,
                       nullif(CASE WHEN %(trim)s THEN btrim(r.properties, E' \t\r\n\v\f') ELSE r.properties END, '') AS p,
                       nullif(CASE WHEN %(trim)s THEN btrim(r.request_id, E' \t\r\n\v\f') ELSE r.request_id END, '') AS q
                  FROM stage_events_raw r OFFSET 0) f
        OFFSET 0) c

-- name: count_bad_event_rows
SELECT count(*) FROM stage_events WHERE bad_field IS NOT NULL

-- name: bad_event_rows
-- The rows events_from_raw could not use, with the raw text of the field that failed.
SELECT s.line, s.bad_field,
       CASE s.bad_field WHEN 'occurred_at' THEN r.occurred_at WHEN 'event_id' THEN r.event_id
                        WHEN 'user_id' THEN r.user_id WHEN 'item_id' THEN r.item_id
                        WHEN 'event_type' THEN r.event_type WHEN 'value' THEN r.value
                        WHEN 'properties' THEN r.properties ELSE r.request_id END AS raw
  FROM stage_events s JOIN stage_events_raw r ON r.line = s.line - %(line_offset)s
 WHERE s.bad_field IS NOT NULL
 ORDER BY s.line

-- name: drop_bad_event_rows
DELETE FROM stage_events WHERE bad_field IS NOT NULL

-- name: unknown_references
-- Rows naming an event type or (unless missing items are created) an item that does not exist.
SELECT s.line, t.type_id IS NULL AS unknown_type, s.event_type,
       i.item_key IS NULL AND NOT %(create_missing_items)s AS unknown_item, s.item_id
  FROM stage_events s
  LEFT JOIN pgrec.event_types t ON t.name = s.event_type
  LEFT JOIN pgrec.items i ON i.item_id = s.item_id
 WHERE t.type_id IS NULL OR (i.item_key IS NULL AND NOT %(create_missing_items)s)
 ORDER BY s.line

-- name: drop_lines
DELETE FROM stage_events WHERE line = ANY(%(lines)s)

-- name: json_id_types
-- The lines of a JSONL file whose ids are not JSON strings or integers (->> gave the text of true, 1.5, {...}).
-- Candidates come from that text, nothing parsed again: true/false, an object or array, or a number with a
-- fraction (jsonb keeps a number's scale: 1.0 stays 1.0, 1e2 is 100, an integer as the Python reader takes it
-- too); only those rare lines are parsed again.
WITH cand AS MATERIALIZED (
    SELECT r.line FROM stage_events_raw r
     WHERE r.event_id IN ('true', 'false') OR left(r.event_id, 1) IN ('{', '[') OR strpos(r.event_id, '.') > 0
        OR r.user_id IN ('true', 'false') OR left(r.user_id, 1) IN ('{', '[') OR strpos(r.user_id, '.') > 0
        OR r.item_id IN ('true', 'false') OR left(r.item_id, 1) IN ('{', '[') OR strpos(r.item_id, '.') > 0
        OR r.event_type IN ('true', 'false') OR left(r.event_type, 1) IN ('{', '[')
        OR strpos(r.event_type, '.') > 0
)
SELECT line, doc
  FROM (SELECT l.line, l.doc, l.doc::jsonb AS j FROM stage_lines l JOIN cand c ON c.line = l.line OFFSET 0) x,
       LATERAL (VALUES (j -> 'event_id'), (j -> 'user_id'), (j -> 'item_id'), (j -> 'event_type')) v(f)
 WHERE jsonb_typeof(f) IN ('boolean', 'object', 'array')
    OR (jsonb_typeof(f) = 'number' AND strpos(f::text, '.') > 0)
 GROUP BY line, doc
 ORDER BY line

-- name: drop_raw_lines
DELETE FROM stage_events_raw WHERE line = ANY(%(lines)s)

-- name: create_missing_items
INSERT INTO pgrec.items (item_id, created_at)
SELECT s.item_id, min(s.occurred_at) FROM stage_events s
 WHERE NOT EXISTS (SELECT 1 FROM pgrec.items i WHERE i.item_id = s.item_id)
 GROUP BY s.item_id
ON CONFLICT (item_id) DO NOTHING

-- name: create_missing_users
INSERT INTO pgrec.users (user_id)
SELECT DISTINCT s.user_id FROM stage_events s
 WHERE NOT EXISTS (SELECT 1 FROM pgrec.users u WHERE u.user_id = s.user_id)
ON CONFLICT (user_id) DO NOTHING

-- name: ensure_partitions
-- The partitions of the months that have events (not every month between the oldest and the newest: one
-- event of 1970 among this year's must not create 600 empty partitions).
SELECT coalesce(sum(pgrec.ensure_event_partitions(m AT TIME ZONE 'UTC', m AT TIME ZONE 'UTC')), 0)
  FROM (SELECT DISTINCT date_trunc('month', occurred_at AT TIME ZONE 'UTC') AS m FROM stage_events ORDER BY 1) d

-- name: merge_events
-- Rows with a client event_id are kept only if (user, event_id) is new; all rows are deduplicated on the
-- natural key. Both make a second import of the same file a no-op.
WITH firsts AS (  -- one row per (user, client event id) in the file: the first line wins
    SELECT min(line) AS line FROM stage_events WHERE event_id IS NOT NULL GROUP BY user_id, event_id
), resolved AS (
    SELECT s.line, s.event_id, u.user_key, i.item_key, t.type_id, t.weight, s.occurred_at, s.value,
           s.properties, s.request_id,
           pgrec.event_polarity(t.polarity, t.positive_min, t.negative_max, s.value) AS polarity
      FROM stage_events s
      JOIN pgrec.users u ON u.user_id = s.user_id
      JOIN pgrec.items i ON i.item_id = s.item_id
      JOIN pgrec.event_types t ON t.name = s.event_type
     WHERE s.event_id IS NULL OR s.line IN (SELECT line FROM firsts)
), new_ids AS (
    INSERT INTO pgrec.event_ids (user_key, event_id, occurred_at)
    SELECT user_key, event_id, occurred_at FROM resolved WHERE event_id IS NOT NULL
     ORDER BY user_key, event_id  -- index-ordered inserts touch each btree page once
    ON CONFLICT DO NOTHING
    RETURNING user_key, event_id
), ins AS (
    INSERT INTO pgrec.events (user_key, item_key, type_id, polarity, weight, value, occurred_at, event_id,
                              request_id, properties)
    SELECT r.user_key, r.item_key, r.type_id, r.polarity, r.weight, r.value, r.occurred_at, r.event_id,
           r.request_id, r.properties
      FROM resolved r
     WHERE r.event_id IS NULL
        OR EXISTS (SELECT 1 FROM new_ids n WHERE n.user_key = r.user_key AND n.event_id = r.event_id)
     ORDER BY r.user_key, r.occurred_at
    ON CONFLICT DO NOTHING
    RETURNING 1
)
SELECT (SELECT count(*) FROM resolved) AS seen, (SELECT count(*) FROM ins) AS stored

-- name: resolve_new_events
-- The fast path of a bulk load, for files of new events (the usual case): the staged rows with their keys,
-- polarity and weight, resolved once (one join each with users, items and types) and sorted in the index order
-- of pgrec.events, for the two plain INSERTs below (which then sort already sorted rows: one pass).
CREATE TEMP TABLE stage_resolved ON COMMIT DROP AS
SELECT u.user_key, i.item_key, t.type_id, pgrec.event_polarity(t.polarity, t.positive_min, t.negative_max, s.value)
       AS polarity, t.weight, s.value, s.occurred_at, s.event_id, s.request_id, s.properties, s.line
  FROM stage_events s
  JOIN pgrec.users u ON u.user_id = s.user_id
  JOIN pgrec.items i ON i.item_id = s.item_id
  JOIN pgrec.event_types t ON t.name = s.event_type
 ORDER BY u.user_key, s.occurred_at, i.item_key, t.type_id, s.line

-- name: insert_new_event_ids
-- After resolve_new_events: a plain INSERT costs one WAL record per row less than ON CONFLICT. It fails on the
-- first (user, event_id) already stored or twice in the file; the caller then rolls back to its savepoint and
-- runs merge_events, which handles every case.
INSERT INTO pgrec.event_ids (user_key, event_id, occurred_at)
SELECT r.user_key, r.event_id, r.occurred_at
  FROM stage_resolved r
 WHERE r.event_id IS NOT NULL
 ORDER BY r.user_key  -- a user's ids share a few btree pages: each is touched once (a text sort costs more)

-- name: insert_new_events
-- After insert_new_event_ids: every row, one per natural key (the first line wins), plain INSERT in index order.
-- Fails (-> merge_events) when a natural key is already stored.
INSERT INTO pgrec.events (user_key, item_key, type_id, polarity, weight, value, occurred_at, event_id,
                          request_id, properties)
SELECT DISTINCT ON (r.user_key, r.occurred_at, r.item_key, r.type_id)
       r.user_key, r.item_key, r.type_id, r.polarity, r.weight, r.value, r.occurred_at, r.event_id, r.request_id,
       r.properties
  FROM stage_resolved r
 ORDER BY r.user_key, r.occurred_at, r.item_key, r.type_id, r.line

-- name: create_embeddings_stage
CREATE TEMP TABLE stage_embeddings (line int NOT NULL, id text NOT NULL, v float8[] NOT NULL) ON COMMIT DROP

-- name: unknown_embedding_items
SELECT s.line, s.id FROM stage_embeddings s LEFT JOIN pgrec.items i ON i.item_id = s.id
 WHERE i.item_key IS NULL ORDER BY s.line

-- name: unknown_embedding_users
SELECT s.line, s.id FROM stage_embeddings s LEFT JOIN pgrec.users u ON u.user_id = s.id
 WHERE u.user_key IS NULL ORDER BY s.line

-- name: item_embedding_rows
-- How many item vectors are stored, counted up to %(upto)s.
SELECT count(*) FROM (SELECT 1 FROM pgrec.item_embeddings LIMIT %(upto)s) x

-- name: drop_item_index
DROP INDEX pgrec.item_embeddings_hnsw

-- name: index_build_memory
-- For the import transaction only: an index build that stays in memory.
SELECT set_config('maintenance_work_mem', '1GB', true)

-- name: create_item_index
-- As migration 0001 creates it (a test compares the definitions).
CREATE INDEX item_embeddings_hnsw ON pgrec.item_embeddings
    USING hnsw (embedding public.vector_cosine_ops) WITH (m = 16, ef_construction = 64)

-- name: merge_item_embeddings
INSERT INTO pgrec.item_embeddings AS e (item_key, embedding, model_version)
SELECT DISTINCT ON (i.item_key) i.item_key, pgrec.check_vector('item', s.id, s.v), %(model_version)s
  FROM stage_embeddings s JOIN pgrec.items i ON i.item_id = s.id
 ORDER BY i.item_key, s.line DESC
ON CONFLICT (item_key) DO UPDATE SET embedding = excluded.embedding, model_version = excluded.model_version,
    updated_at = now()

-- name: merge_user_embeddings
INSERT INTO pgrec.user_embeddings AS e (user_key, embedding, model_version, based_on)
SELECT DISTINCT ON (u.user_key) u.user_key, pgrec.check_vector('user', s.id, s.v), %(model_version)s, now()
  FROM stage_embeddings s JOIN pgrec.users u ON u.user_id = s.id
 ORDER BY u.user_key, s.line DESC
ON CONFLICT (user_key) DO UPDATE SET embedding = excluded.embedding, model_version = excluded.model_version,
    based_on = excluded.based_on, updated_at = now()

-- name: suspect_vectors
-- The staged vectors the merge uses (the last line of each id) that pgrec.check_vector may refuse, or that do not
-- fit a real (the vector type): a superset, each then checked by pgrec.check_vector itself for its exact words.
-- Runs only after a merge failed, so that each refusal names its line.
SELECT line, id, v
  FROM (SELECT DISTINCT ON (id) line, id, v FROM stage_embeddings ORDER BY id, line DESC) s
 WHERE coalesce(cardinality(v), 0) IS DISTINCT FROM (SELECT c.value::int FROM pgrec.config c
                                                      WHERE c.key = 'embedding_dim')
    OR EXISTS (SELECT 1 FROM unnest(v) x WHERE x IS NULL OR x = 'NaN'::float8 OR abs(x) > 3.4e38
                                            OR (x <> 0 AND abs(x) < 1.5e-45))
    OR NOT EXISTS (SELECT 1 FROM unnest(v) x WHERE x <> 0)
 ORDER BY line
 LIMIT 50

-- name: check_vector
SELECT pgrec.check_vector(%(what)s, %(id)s, %(v)s)
