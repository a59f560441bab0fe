-- Learned item-item models (engine/itemsim.py): their top-N neighbours per item in pgrec.model_neighbors.

-- name: item_users
-- Items by the number of distinct users with any event before a time, most first (EASE keeps the top ones).
SELECT item_key, count(DISTINCT user_key) AS users FROM pgrec.events
 WHERE occurred_at < %(before)s
 GROUP BY item_key ORDER BY count(DISTINCT user_key) DESC, item_key LIMIT %(max_items)s

-- name: interactions
-- Every (user, item) with any event before a time, among the given items (the EASE matrix), by user.
SELECT DISTINCT user_key, item_key FROM pgrec.events
 WHERE occurred_at < %(before)s AND item_key = ANY (%(items)s::bigint[])
 ORDER BY user_key

-- name: clear
DELETE FROM pgrec.model_neighbors WHERE model = %(model)s

-- name: copy_neighbors
COPY pgrec.model_neighbors (model, item_key, rank, neighbor_key, score, built_at) FROM STDIN

-- name: summary
SELECT count(DISTINCT item_key), count(*), max(built_at) FROM pgrec.model_neighbors WHERE model = %(model)s
