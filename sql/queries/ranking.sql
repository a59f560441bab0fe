-- Stage 2: features, training data (replay and impressions), the model registry.

-- name: features_for_user
SELECT * FROM pgrec.candidate_features(%(user_id)s, %(surface)s, %(n)s, %(as_of)s)

-- name: features_for_key
SELECT * FROM pgrec.candidate_features_by_key(%(user_key)s, %(surface)s, %(n)s, %(as_of)s, %(item_keys)s)

-- name: features_for_keys
-- Many users at one as_of in one statement (batch replay); user_key is the first column.
SELECT u.user_key AS for_user_key, f.*
  FROM unnest(%(user_keys)s::bigint[]) WITH ORDINALITY AS u(user_key, ord)
 CROSS JOIN LATERAL pgrec.candidate_features_by_key(u.user_key, %(surface)s, %(n)s, %(as_of)s) f
 ORDER BY u.ord

-- name: feature_columns
-- The feature row type's columns, no row: engine/ranking/features.py:current_names reads the description.
SELECT (NULL::pgrec.candidate_feature_row).* LIMIT 0

-- name: event_range
SELECT min(occurred_at), max(occurred_at), count(*) FROM pgrec.events

-- name: impression_start
-- Training from served lists in [since, until): the first list's time (NULL: none), the time of the first list
-- after the earliest four fifths (they train; it and the later ones validate), and the attribution window the online
-- report uses (config report_attribution_hours, default 24), for labels that credit alike.
WITH lists AS (
    SELECT min(i.served_at) AS t FROM pgrec.impressions i
     WHERE i.served_at >= coalesce(%(since)s::timestamptz, '-infinity') AND i.served_at < %(until)s
     GROUP BY i.request_id
)
SELECT (SELECT min(l.t) FROM lists l),
       (SELECT l.t FROM lists l ORDER BY l.t OFFSET (SELECT floor(0.8 * count(*))::bigint FROM lists) LIMIT 1),
       coalesce((SELECT c.value::text::float8 FROM pgrec.config c WHERE c.key = 'report_attribution_hours'), 24)

-- name: time_at_fractions
-- The times below which the given shares of the events before `until` lie (ranker label windows).
SELECT percentile_disc(%(fractions)s::float8[]) WITHIN GROUP (ORDER BY occurred_at)
  FROM pgrec.events WHERE occurred_at < %(until)s

-- name: window_labels
-- Per (user, item) in [start, end): the largest weight of a positive event, and whether any event was negative.
SELECT e.user_key, e.item_key, max(e.weight) FILTER (WHERE e.polarity = 1) AS w, bool_or(e.polarity = -1) AS neg
  FROM pgrec.events e
 WHERE e.occurred_at >= %(start)s AND e.occurred_at < %(end)s
 GROUP BY e.user_key, e.item_key

-- name: items_before
-- Per user: the items they had any event with before a time (candidates they already know).
SELECT e.user_key, array_agg(DISTINCT e.item_key)
  FROM pgrec.events e
 WHERE e.user_key = ANY(%(users)s) AND e.occurred_at < %(before)s
 GROUP BY e.user_key

-- name: impression_requests
-- Served lists in [since, until) among the given request ids (those with a label): one row per request, items in
-- position order, and whether the feature rows the list was ranked with were stored (pgrec.served_features).
-- features_at: the time features are recomputed as of where they were not stored (pgrec.features_time: the
-- serving time, or a citing label event's stamped within the clock slack before it, so that no label event is
-- among them).
SELECT r.request_id, r.user_key, r.surface, r.served_at,
       pgrec.features_time(r.user_key, r.request_id, r.served_at, %(slack)s::interval) AS features_at,
       r.item_keys, r.positions,
       EXISTS (SELECT 1 FROM pgrec.served_features sf
                WHERE sf.user_key = r.user_key AND sf.request_id = r.request_id) AS stored
  FROM (SELECT i.request_id, i.user_key, i.surface, min(i.served_at) AS served_at,
               array_agg(i.item_key ORDER BY i.position) AS item_keys,
               array_agg(i.position ORDER BY i.position) AS positions
          FROM pgrec.impressions i
         WHERE i.served_at >= %(since)s AND i.served_at < %(until)s
           AND i.request_id = ANY (%(request_ids)s::uuid[])
         GROUP BY i.request_id, i.user_key, i.surface) r
 ORDER BY r.served_at, r.request_id

-- name: served_rows
-- The stored feature rows of some served lists (by user key and request id, in pairs): the feature list, the
-- items that have a row (in position order) and the rows (a k x 1 x F array).
SELECT sf.request_id, coalesce(fs.names, sf.names), sf.item_keys, sf.features
  FROM unnest(%(user_keys)s::bigint[], %(request_ids)s::uuid[]) AS q(user_key, request_id)
  JOIN pgrec.served_features sf ON sf.user_key = q.user_key AND sf.request_id = q.request_id
  LEFT JOIN pgrec.feature_sets fs ON fs.feature_set = sf.feature_set

-- name: impression_labels
-- Engagement with what was shown: events of the same user and item tied to the request by request_id (from
-- the clock slack before serving on: client clocks, as the online report), or (events without a request_id) after
-- serving, within the attribution window, credited once: to the latest list of that user that showed the item
-- before the event (ties: the greater request id), as the online report does. No label comes from an event at or
-- after label_until (the end of the training data: `pgrec train ranker --until`).
SELECT i.request_id, i.item_key, max(e.weight) FILTER (WHERE e.polarity = 1) AS w, bool_or(e.polarity = -1) AS neg
  FROM pgrec.impressions i
  JOIN pgrec.events e
    ON e.user_key = i.user_key AND e.item_key = i.item_key
   AND e.occurred_at < %(label_until)s
   AND (e.request_id = i.request_id AND e.occurred_at >= i.served_at - %(slack)s::interval
        OR (e.request_id IS NULL AND e.occurred_at >= i.served_at
            AND e.occurred_at < i.served_at + %(window)s::interval
            AND NOT EXISTS (
                SELECT 1 FROM pgrec.impressions later
                 WHERE later.user_key = i.user_key AND later.item_key = i.item_key
                   AND later.served_at <= e.occurred_at
                   AND (later.served_at, later.request_id) > (i.served_at, i.request_id))))
 WHERE i.served_at >= %(since)s AND i.served_at < %(until)s
 GROUP BY i.request_id, i.item_key

-- name: model_insert
INSERT INTO pgrec.models (kind, artifact, params, features, metrics, data_window)
VALUES (%(kind)s, %(artifact)s, %(params)s, %(features)s, %(metrics)s, %(data_window)s)
RETURNING version

-- name: model_list
SELECT version, kind, created_at, active, activated_at, params, features, metrics, data_window,
       octet_length(artifact) AS artifact_bytes
  FROM pgrec.models
 WHERE %(kind)s::text IS NULL OR kind = %(kind)s::text
 ORDER BY version DESC

-- name: model_get
SELECT version, kind, created_at, active, activated_at, params, features, metrics, data_window, artifact
  FROM pgrec.models WHERE version = %(version)s

-- name: model_active_version
-- Cheap (the partial unique index on active models): what the serving cache polls.
SELECT version FROM pgrec.models WHERE kind = %(kind)s AND active

-- name: model_lock_kind
SELECT pg_advisory_xact_lock(hashtext('pgrec.models.activate'), hashtext(%(kind)s))

-- name: model_deactivate
UPDATE pgrec.models SET active = false WHERE kind = %(kind)s AND active

-- name: model_set_active
UPDATE pgrec.models SET active = true, activated_at = now() WHERE version = %(version)s AND kind = %(kind)s

-- name: model_log_activation
INSERT INTO pgrec.model_activations (kind, version, action) VALUES (%(kind)s, %(version)s, %(action)s)

-- name: model_activation_log
SELECT version, action FROM pgrec.model_activations WHERE kind = %(kind)s ORDER BY id

-- name: user_key
SELECT user_key FROM pgrec.users WHERE user_id = %(user_id)s

-- name: item_key
SELECT item_key FROM pgrec.items WHERE item_id = %(item_id)s

-- name: served_item
-- One item of a served list (`pgrec explain --request`): who was shown it, when, where, by which ranker, its
-- sources, and the feature row it was ranked with when the list stored it (pgrec.served_features; NULL else).
-- features_at: the time features are recomputed as of without a stored row, as training does
-- (pgrec.features_time).
SELECT u.user_id, i.user_key, i.surface, i.served_at, i.position, i.score, i.model_version,
       coalesce(fs.names, sf.names), sf.features[r.row_no:r.row_no][1:1][:],
       pgrec.features_time(i.user_key, i.request_id, i.served_at, %(slack)s::interval) AS features_at,
       ARRAY(SELECT jsonb_array_elements_text(CASE WHEN jsonb_typeof(i.reasons -> 'sources') = 'array'
                                                   THEN i.reasons -> 'sources' ELSE '[]' END)) AS sources
  FROM pgrec.impressions i
  JOIN pgrec.users u ON u.user_key = i.user_key
  LEFT JOIN pgrec.served_features sf ON sf.user_key = i.user_key AND sf.request_id = i.request_id
  LEFT JOIN pgrec.feature_sets fs ON fs.feature_set = sf.feature_set
  LEFT JOIN LATERAL (SELECT array_position(sf.item_keys, i.item_key) AS row_no) r ON true
 WHERE i.request_id = %(request_id)s AND i.item_key = %(item_key)s

-- name: eval_popularity
-- Items by positive events before a time (the popularity baseline), most first.
SELECT item_key FROM pgrec.events WHERE occurred_at < %(before)s AND polarity = 1
 GROUP BY item_key ORDER BY count(*) DESC, item_key

-- name: eval_interactions
-- Every (user, item) with any event before a time (the EASE baseline's matrix).
SELECT DISTINCT user_key, item_key FROM pgrec.events WHERE occurred_at < %(before)s

-- name: eval_candidate_sets
-- The candidate union of many users at one as_of (recall against candidate count).
SELECT u.k, array_agg(c.item_key)
  FROM unnest(%(users)s::bigint[]) AS u(k)
 CROSS JOIN LATERAL pgrec.candidates_by_key(u.k, %(surface)s, %(n)s, %(as_of)s) c
 GROUP BY u.k

-- name: eval_catalog_size
SELECT count(*) FROM pgrec.items WHERE created_at < %(before)s

-- name: item_categories
SELECT item_key, categories FROM pgrec.items

-- name: bench_sizes
SELECT (SELECT count(*) FROM pgrec.items), (SELECT count(*) FROM pgrec.events)

-- name: bench_users
SELECT user_key FROM pgrec.users ORDER BY md5(user_key::text || %(seed)s) LIMIT %(n)s

-- name: bench_candidates
SELECT count(*) FROM pgrec.candidates_by_key(%(user_key)s, 'default', %(n)s, %(as_of)s)
