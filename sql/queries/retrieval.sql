-- The retrieval model: reading training data, writing vectors and the model row, evaluating the ann index.

-- name: settings
-- The user-vector settings (candidates part) and the schema's vector dimension; defaults when a key is absent.
SELECT coalesce((SELECT value::int FROM pgrec.config WHERE key = 'embedding_dim'), 0) AS embedding_dim,
       coalesce((SELECT value::int FROM pgrec.config WHERE key = 'user_vector_max_events'), 50) AS max_events,
       coalesce((SELECT value::float8 FROM pgrec.config WHERE key = 'user_vector_half_life_days'), 30)
           AS half_life_days

-- name: items
SELECT item_key, categories, properties, extract(epoch FROM created_at)::float8 AS created
  FROM pgrec.items
 ORDER BY item_key

-- name: events
-- Every event strictly before as_of (NULL: all), in the order pgrec.user_vector reads them (ties: item, type).
SELECT user_key, item_key, polarity, weight::float8, extract(epoch FROM occurred_at)::float8 AS t
  FROM pgrec.events
 WHERE %(as_of)s::timestamptz IS NULL OR occurred_at < %(as_of)s::timestamptz
 ORDER BY user_key, occurred_at, item_key, type_id

-- name: user_properties
-- Users' properties (the user tower's feature tokens), for the users with events.
SELECT u.user_key, u.properties FROM pgrec.users u
 WHERE u.properties IS NOT NULL AND u.properties <> '{}'::jsonb
   AND EXISTS (SELECT 1 FROM pgrec.events e WHERE e.user_key = u.user_key)

-- name: ignored_impressions
-- Items shown before as_of that the user never engaged with afterwards (before as_of): extra negatives.
SELECT DISTINCT i.user_key, i.item_key
  FROM pgrec.impressions i
 WHERE (%(as_of)s::timestamptz IS NULL OR i.served_at < %(as_of)s::timestamptz)
   AND NOT EXISTS (SELECT 1 FROM pgrec.events e
                    WHERE e.user_key = i.user_key AND e.item_key = i.item_key AND e.polarity = 1
                      -- an event citing the list may be stamped a little early (client clocks: the slack)
                      AND (e.occurred_at >= i.served_at
                           OR (e.request_id = i.request_id AND e.occurred_at >= i.served_at - %(slack)s::interval))
                      AND (%(as_of)s::timestamptz IS NULL OR e.occurred_at < %(as_of)s::timestamptz))

-- name: latest_event
SELECT max(occurred_at) FROM pgrec.events
 WHERE %(as_of)s::timestamptz IS NULL OR occurred_at < %(as_of)s::timestamptz

-- name: insert_model
INSERT INTO pgrec.models (kind, active, artifact, params, features, metrics, data_window)
VALUES ('retrieval', false, %(artifact)s, %(params)s, %(features)s, %(metrics)s, %(data_window)s)
RETURNING version

-- name: create_item_stage
-- (dropped first: an evaluation trains several models in one transaction)
DROP TABLE IF EXISTS pg_temp.stage_retrieval_items;
CREATE TEMP TABLE stage_retrieval_items (LIKE pgrec.item_embeddings INCLUDING DEFAULTS) ON COMMIT DROP

-- name: create_user_stage
-- (dropped first: an evaluation trains several models in one transaction)
DROP TABLE IF EXISTS pg_temp.stage_retrieval_users;
CREATE TEMP TABLE stage_retrieval_users (LIKE pgrec.user_embeddings INCLUDING DEFAULTS) ON COMMIT DROP

-- name: merge_item_vectors
INSERT INTO pgrec.item_embeddings AS e (item_key, embedding, context_embedding, model_version, updated_at)
SELECT s.item_key, s.embedding, s.context_embedding, s.model_version, now()
  FROM stage_retrieval_items s JOIN pgrec.items i ON i.item_key = s.item_key
ON CONFLICT (item_key) DO UPDATE SET embedding = excluded.embedding,
    context_embedding = excluded.context_embedding, model_version = excluded.model_version, updated_at = now()

-- name: merge_user_vectors
INSERT INTO pgrec.user_embeddings AS e (user_key, embedding, model_version, based_on, updated_at)
SELECT s.user_key, s.embedding, s.model_version, s.based_on, now()
  FROM stage_retrieval_users s JOIN pgrec.users u ON u.user_key = s.user_key
ON CONFLICT (user_key) DO UPDATE SET embedding = excluded.embedding, model_version = excluded.model_version,
    based_on = excluded.based_on, updated_at = now()

-- name: drop_other_user_vectors
-- A user the new model has no vector for (no events before its as_of, nothing that sums) keeps none: the old
-- row was in the previous model's space, which the new item vectors replaced (pgrec.user_vector then computes
-- one from the user's events in the new space).
DELETE FROM pgrec.user_embeddings e WHERE e.model_version IS DISTINCT FROM %(version)s::text

-- name: clear_user_features
DELETE FROM pgrec.user_feature_embeddings

-- name: user_properties_of
SELECT u.properties FROM pgrec.users u WHERE u.user_key = %(user_key)s

-- name: user_feature_vectors_of
SELECT f.token, f.embedding::real[] FROM pgrec.user_feature_embeddings f WHERE f.token = ANY (%(tokens)s::text[])

-- name: deactivate_models
UPDATE pgrec.models SET active = false WHERE kind = 'retrieval' AND active AND version <> %(version)s

-- name: activate_model
UPDATE pgrec.models SET active = true, activated_at = now() WHERE version = %(version)s

-- name: active_model
SELECT version, artifact, params, features, metrics, data_window, created_at
  FROM pgrec.models WHERE kind = 'retrieval' AND active

-- name: user_history
-- One user's positive events strictly before as_of, oldest first (the input of the user vector).
SELECT item_key, weight::float8, extract(epoch FROM occurred_at)::float8
  FROM pgrec.events
 WHERE user_key = %(user_key)s AND polarity = 1 AND occurred_at < %(as_of)s
 ORDER BY occurred_at, item_key, type_id

-- name: context_vectors_of
SELECT item_key, coalesce(context_embedding, embedding)::real[]
  FROM pgrec.item_embeddings WHERE item_key = ANY(%(items)s::bigint[])

-- name: create_eval_index
-- A private copy of the item vectors with its own HNSW index: evaluation never touches the served vectors.
CREATE TEMP TABLE retrieval_eval_items (LIKE pgrec.item_embeddings INCLUDING DEFAULTS)

-- name: build_eval_index
CREATE INDEX ON retrieval_eval_items USING hnsw (embedding public.vector_cosine_ops)
    WITH (m = 16, ef_construction = 64)

-- name: drop_eval_index
DROP TABLE IF EXISTS retrieval_eval_items

-- name: eval_ann
-- Top k by the HNSW index, items the user has seen excluded (iterative scan), then exactly re-sorted.
WITH r AS MATERIALIZED (
    SELECT item_key, embedding OPERATOR(public.<=>) %(q)s::public.vector AS d
      FROM retrieval_eval_items
     WHERE item_key <> ALL(%(seen)s::bigint[])
     ORDER BY embedding OPERATOR(public.<=>) %(q)s::public.vector
     LIMIT %(k)s
)
SELECT item_key FROM r ORDER BY d, item_key
