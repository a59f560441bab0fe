-- Inspection queries for `pgrec doctor` and `pgrec stats`.

-- name: row_counts
SELECT (SELECT count(*) FROM pgrec.items) AS items,
       (SELECT count(*) FROM pgrec.users) AS users,
       (SELECT count(*) FROM pgrec.events) AS events,
       (SELECT count(*) FROM pgrec.item_embeddings) AS item_embeddings,
       (SELECT count(*) FROM pgrec.user_embeddings) AS user_embeddings,
       (SELECT count(*) FROM pgrec.impressions) AS impressions,
       (SELECT count(*) FROM pgrec.models) AS models

-- name: item_stats_status
-- The newest item counter snapshot (pgrec.refresh_item_stats) and whether it is today's.
SELECT s.day, s.items, s.built_at, s.day = (now() AT TIME ZONE 'UTC')::date AS today
  FROM pgrec.item_stats_days s ORDER BY s.day DESC LIMIT 1

-- name: embedding_neighbors_status
-- Items with a vector, and how many of them have a current stored neighbour list.
SELECT count(*), count(*) FILTER (WHERE s.current) FROM pgrec.embedding_neighbor_status s

-- name: dataset_stats
SELECT count(*) AS events,
       count(DISTINCT user_key) AS active_users,
       count(DISTINCT item_key) AS active_items,
       count(DISTINCT (user_key, item_key)) AS user_item_pairs,
       min(occurred_at) AS first_event,
       max(occurred_at) AS last_event,
       count(*) FILTER (WHERE polarity > 0) AS positive,
       count(*) FILTER (WHERE polarity < 0) AS negative,
       count(*) FILTER (WHERE polarity = 0) AS neutral
  FROM pgrec.events

-- name: events_by_type
SELECT t.name, count(e.*) AS n
  FROM pgrec.event_types t LEFT JOIN pgrec.events e ON e.type_id = t.type_id
 GROUP BY t.name ORDER BY n DESC, t.name

-- name: top_categories
SELECT c AS category, count(*) AS items FROM pgrec.items, unnest(categories) AS c
 GROUP BY c ORDER BY items DESC, c LIMIT 12

-- name: activity_quantiles
SELECT percentile_disc(ARRAY[0.5, 0.9, 0.99]) WITHIN GROUP (ORDER BY n) AS per_user
  FROM (SELECT count(*) AS n FROM pgrec.events GROUP BY user_key) s

-- name: config
SELECT key, value::text, coalesce(description, '') FROM pgrec.config ORDER BY key
