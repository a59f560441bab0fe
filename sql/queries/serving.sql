-- Serving: the statements engine/pipeline.py and engine/ranking/compile.py run.
-- Each request is two round trips: candidates (+ features) with the active ranker version, then finish_request.

-- name: candidates
-- No ranker: candidates scored by pgrec.fallback_score. active_model tells the caller when a ranker appeared.
SELECT c.item_key, c.item_id, array_to_string(c.sources, ',') AS source_list,
       pgrec.fallback_score(c.ann_rank, c.history_rank, c.trending_rank, c.fresh_rank, c.popular_rank) AS fallback_score,
       (SELECT m.version FROM pgrec.models m WHERE m.kind = 'ranker' AND m.active) AS active_model
  FROM pgrec.candidates(%(user_id)s, %(surface)s, pgrec.serving_candidates(), %(as_of)s) AS c

-- name: candidate_features
-- Candidates with their features (one float8 column per feature, named as in the model's feature list).
SELECT c.*, array_to_string(c.sources, ',') AS source_list,
       (SELECT m.version FROM pgrec.models m WHERE m.kind = 'ranker' AND m.active) AS active_model
  FROM pgrec.candidate_features(%(user_id)s, %(surface)s, pgrec.serving_candidates(), %(as_of)s) AS c

-- name: candidates_many
SELECT u.user_id AS request_user_id, c.item_key, c.item_id, array_to_string(c.sources, ',') AS source_list,
       pgrec.fallback_score(c.ann_rank, c.history_rank, c.trending_rank, c.fresh_rank, c.popular_rank) AS fallback_score,
       (SELECT m.version FROM pgrec.models m WHERE m.kind = 'ranker' AND m.active) AS active_model
  FROM unnest(%(user_ids)s::text[]) AS u(user_id)
 CROSS JOIN LATERAL pgrec.candidates(u.user_id, %(surface)s, pgrec.serving_candidates(), %(as_of)s) AS c

-- name: candidate_features_many
-- log_features: whether a logged list's feature rows are stored (config log_served_features; finish_request
-- decides, this spares the client sending them when it would not)
SELECT u.user_id AS request_user_id, c.*, array_to_string(c.sources, ',') AS source_list,
       (SELECT m.version FROM pgrec.models m WHERE m.kind = 'ranker' AND m.active) AS active_model,
       (SELECT pgrec.served_features_on()) AS log_features   -- a subquery: read once per statement
  FROM unnest(%(user_ids)s::text[]) AS u(user_id)
 CROSS JOIN LATERAL pgrec.candidate_features(u.user_id, %(surface)s, pgrec.serving_candidates(), %(as_of)s) AS c

-- name: active_model
SELECT m.version FROM pgrec.models m WHERE m.kind = 'ranker' AND m.active

-- name: finish_request
-- The scored list travels as three strings (engine/pipeline.py:_list_params): array literals of the keys and
-- scores, a JSON array of the source lists; dumping 200-element Python lists element by element cost ~2 ms.
-- async_commit: the transaction that writes the impressions commits without waiting for its WAL flush
-- (synchronous_commit = off until the end of this transaction only; settings.impressions_sync_commit).
-- features: the scored rows of a logged list (binary float8[][], engine/pipeline.py:FeatureMatrix), NULL else.
SELECT pgrec.finish_request(%(user_id)s, %(surface)s, %(k)s, %(item_keys)s::bigint[], %(scores)s::float8[],
                            ARRAY(SELECT s.v FROM jsonb_array_elements_text(%(sources)s::jsonb) WITH ORDINALITY AS s(v, i)
                                   ORDER BY s.i),
                            %(context)s::jsonb, %(as_of)s::timestamptz, %(policy_set)s,
                            %(model_version)s::bigint, %(variant)s, %(log)s, %(experiment)s,
                            %(feature_names)s::text[], %(features)s::float8[]),
       CASE WHEN %(async_commit)s THEN set_config('synchronous_commit', 'off', true) END

-- name: recommend_sql
-- The SQL-only path, for benchmarks and parity checks from Python.
SELECT r.request_id, r.position, r.item_id, r.score, r.reasons
  FROM pgrec.recommend(%(user_id)s, %(k)s, %(surface)s, %(context)s::jsonb, %(as_of)s::timestamptz,
                       %(model_version)s::bigint, %(policy_set)s, %(variant)s, %(log)s) AS r

-- name: similar
SELECT s.item_id, s.score, s.cooccurrence_score, s.embedding_score FROM pgrec.similar_items(%(item_id)s, %(k)s) AS s

-- name: trending
SELECT t.item_id, t.score FROM pgrec.trending_items(%(segment)s, %(k)s, %(as_of)s::timestamptz) AS t

-- name: model_artifact
SELECT m.artifact, m.features FROM pgrec.models m WHERE m.version = %(version)s AND m.kind = 'ranker'

-- name: model_kind
SELECT m.kind FROM pgrec.models m WHERE m.version = %(version)s

-- name: record_compiled
INSERT INTO pgrec.compiled_rankers (version, function_name, features, num_trees)
VALUES (%(version)s, %(function_name)s, %(features)s::jsonb, %(num_trees)s)
ON CONFLICT (version) DO UPDATE
   SET function_name = EXCLUDED.function_name, features = EXCLUDED.features, num_trees = EXCLUDED.num_trees,
       installed_at = now()

-- name: forget_compiled
DELETE FROM pgrec.compiled_rankers WHERE version = %(version)s

-- name: compiled
SELECT c.function_name, c.features, c.num_trees FROM pgrec.compiled_rankers c WHERE c.version = %(version)s

-- name: sample_users
-- Users with at least one event, for demos and benchmarks.
SELECT u.user_id FROM pgrec.users u
 WHERE EXISTS (SELECT 1 FROM pgrec.events e WHERE e.user_key = u.user_key)
 ORDER BY u.user_key LIMIT %(n)s

-- name: impressions_of_request
SELECT i.position, it.item_id, i.score, i.model_version, i.policy_versions, i.variant, i.reasons, i.surface
  FROM pgrec.impressions i JOIN pgrec.items it ON it.item_key = i.item_key
 WHERE i.request_id = %(request_id)s ORDER BY i.position

-- name: bench_top_category
-- Per user, the category of most of their positive events (labels for the benchmark's compact ranker).
SELECT DISTINCT ON (u.user_id) u.user_id, c.category
  FROM pgrec.events e
  JOIN pgrec.users u ON u.user_key = e.user_key
  JOIN pgrec.items i ON i.item_key = e.item_key
 CROSS JOIN LATERAL unnest(i.categories) AS c(category)
 WHERE e.polarity = 1 AND u.user_id = ANY(%(users)s::text[])
 GROUP BY u.user_id, c.category
 ORDER BY u.user_id, count(*) DESC, c.category

-- name: serving_count
-- How many candidates a served list ranks (config serving_candidates): training and explanations use it too.
SELECT pgrec.serving_candidates()
