-- Set-based bulk loads. Each import COPYs validated rows into a temporary staging table, then runs these.

-- name: create_items_stage
CREATE TEMP TABLE stage_items (
    line int NOT NULL, item_id text NOT NULL, categories text[], created_at timestamptz,
    properties jsonb, available boolean
) ON COMMIT DROP

-- name: merge_items
INSERT INTO pgrec.items AS it (item_id, categories, properties, created_at, available)
SELECT DISTINCT ON (item_id) item_id, coalesce(categories, '{}'), coalesce(properties, '{}'),
       coalesce(created_at, now()), coalesce(available, true)
  FROM stage_items
 ORDER BY item_id, line DESC
ON CONFLICT (item_id) DO UPDATE SET
    categories = coalesce(excluded.categories, it.categories),
    properties = excluded.properties,
    created_at = excluded.created_at,
    available  = excluded.available,
    updated_at = now()
WHERE (it.categories, it.properties, it.created_at, it.available)
      IS DISTINCT FROM (excluded.categories, excluded.properties, excluded.created_at, excluded.available)

-- name: create_users_stage
CREATE TEMP TABLE stage_users (line int NOT NULL, user_id text NOT NULL, properties jsonb) ON COMMIT DROP

-- name: merge_users
INSERT INTO pgrec.users AS u (user_id, properties)
SELECT DISTINCT ON (user_id) user_id, coalesce(properties, '{}')
  FROM stage_users
 ORDER BY user_id, line DESC
ON CONFLICT (user_id) DO UPDATE SET properties = excluded.properties, updated_at = now()
WHERE u.properties IS DISTINCT FROM excluded.properties

-- name: create_events_stage
CREATE TEMP TABLE stage_events (
    line int NOT NULL, event_id text, user_id text NOT NULL, item_id text NOT NULL, event_type text NOT NULL,
    occurred_at timestamptz NOT NULL, value numeric, properties jsonb, request_id uuid
) ON COMMIT DROP

-- name: unknown_event_types
SELECT s.line, s.event_type
  FROM stage_events s LEFT JOIN pgrec.event_types t ON t.name = s.event_type
 WHERE t.type_id IS NULL
 ORDER BY s.line

-- name: unknown_items
SELECT s.line, s.item_id
  FROM stage_events s LEFT JOIN pgrec.items i ON i.item_id = s.item_id
 WHERE i.item_key IS NULL
 ORDER BY s.line

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

-- name: event_time_range
SELECT min(occurred_at), max(occurred_at) FROM stage_events

-- name: ensure_partitions
SELECT pgrec.ensure_event_partitions(%(lo)s, %(hi)s)

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

-- name: create_embeddings_stage
CREATE TEMP TABLE stage_embeddings (line int NOT NULL, id text NOT NULL, v float8[] NOT NULL) ON COMMIT DROP

-- name: unknown_embedding_items
SELECT s.line, s.id FROM stage_embeddings s LEFT JOIN pgrec.items i ON i.item_id = s.id
 WHERE i.item_key IS NULL ORDER BY s.line

-- name: unknown_embedding_users
SELECT s.line, s.id FROM stage_embeddings s LEFT JOIN pgrec.users u ON u.user_id = s.id
 WHERE u.user_key IS NULL ORDER BY s.line

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
