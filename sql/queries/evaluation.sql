-- Temporal splits for offline evaluation.

-- name: cutoff_at_fraction
-- The time below which `fraction` of all events lie.
SELECT percentile_disc(%(fraction)s) WITHIN GROUP (ORDER BY occurred_at) FROM pgrec.events

-- name: future_positives
-- Per user active after the cutoff: positive items in [cutoff, end) the user had no event with before it.
SELECT e.user_key, array_agg(DISTINCT e.item_key) AS items
  FROM pgrec.events e
 WHERE e.occurred_at >= %(cutoff)s
   AND (%(end)s::timestamptz IS NULL OR e.occurred_at < %(end)s::timestamptz)
   AND e.polarity > 0
   AND NOT EXISTS (SELECT 1 FROM pgrec.events p
                    WHERE p.user_key = e.user_key AND p.item_key = e.item_key AND p.occurred_at < %(cutoff)s)
 GROUP BY e.user_key

-- name: past_items
-- Per user: every item they had any event with before the cutoff (excluded from their lists).
SELECT user_key, array_agg(DISTINCT item_key) AS items
  FROM pgrec.events
 WHERE occurred_at < %(cutoff)s AND user_key = ANY(%(users)s)
 GROUP BY user_key

-- name: catalog_before
-- Items that exist (created) before a time.
SELECT item_key FROM pgrec.items WHERE created_at < %(t)s

-- name: active_retrieval_window
-- The active retrieval model (the item vectors) and the newest event it was trained on.
SELECT m.version, (m.data_window ->> 'last_event')::timestamptz AS last_event
  FROM pgrec.models m WHERE m.kind = 'retrieval' AND m.active

-- name: any_item_vector
SELECT 1 FROM pgrec.item_embeddings LIMIT 1
