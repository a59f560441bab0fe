-- Policies (stage 3): rows of pgrec.policies and pgrec.item_sets, and the rerank call.
-- The rules themselves run in SQL (sql/policies/v1.sql); these statements only read and write rows.

-- name: insert_policy
INSERT INTO pgrec.policies (name, kind, params, surface, segment, priority, enabled, starts_at, ends_at,
                            policy_set, description, created_by, updated_by)
VALUES (%(name)s, %(kind)s, %(params)s, %(surface)s, %(segment)s, %(priority)s, %(enabled)s, %(starts_at)s,
        %(ends_at)s, %(policy_set)s, %(description)s, coalesce(%(actor)s, current_user), coalesce(%(actor)s, current_user))
RETURNING policy_id

-- name: list_policies
SELECT policy_id, name, kind, params, surface, segment, priority, enabled, starts_at, ends_at, policy_set,
       description, version, created_at, created_by, updated_at, updated_by
  FROM pgrec.policies
 WHERE (%(surface)s::text IS NULL OR surface IS NULL OR surface = %(surface)s)
   AND (%(all)s OR enabled)
 ORDER BY priority, array_position(pgrec.policy_kinds(), kind), policy_id

-- name: get_policy
SELECT policy_id, name, kind, params, surface, segment, priority, enabled, starts_at, ends_at, policy_set,
       description, version, created_at, created_by, updated_at, updated_by
  FROM pgrec.policies
 WHERE name = %(ref)s OR policy_id::text = %(ref)s
 ORDER BY name = %(ref)s DESC
 LIMIT 1

-- name: set_enabled
UPDATE pgrec.policies SET enabled = %(enabled)s, updated_by = coalesce(%(actor)s, current_user)
 WHERE policy_id = %(policy_id)s

-- name: update_policy
UPDATE pgrec.policies
   SET params = coalesce(%(params)s, params),
       priority = coalesce(%(priority)s, priority),
       updated_by = coalesce(%(actor)s, current_user)
 WHERE policy_id = %(policy_id)s

-- name: delete_policy
DELETE FROM pgrec.policies WHERE policy_id = %(policy_id)s

-- name: policy_history
SELECT version, action, row_data, changed_at, changed_by
  FROM pgrec.policy_audit WHERE policy_id = %(policy_id)s ORDER BY audit_id

-- name: put_item_set
INSERT INTO pgrec.item_sets AS s (name, items, description, created_by, updated_by)
VALUES (%(name)s, %(items)s, %(description)s, coalesce(%(actor)s, current_user), coalesce(%(actor)s, current_user))
ON CONFLICT (name) DO UPDATE
   SET items = excluded.items,
       description = coalesce(excluded.description, s.description),
       updated_by = excluded.updated_by
RETURNING name, items

-- name: list_item_sets
SELECT name, items, description, updated_at, updated_by FROM pgrec.item_sets ORDER BY name

-- name: delete_item_set
DELETE FROM pgrec.item_sets WHERE name = %(name)s

-- name: item_set_users
SELECT name FROM pgrec.policies
 WHERE params -> 'item_sets' ? %(name)s OR params ->> 'item_set' = %(name)s
 ORDER BY name

-- name: rerank
SELECT pgrec.rerank(%(user_key)s, %(surface)s, %(k)s, %(item_keys)s::bigint[], %(scores)s::float8[],
                    %(sources)s::text[], %(context)s::jsonb, %(as_of)s::timestamptz, %(policy_set)s::text)

-- name: user_key
SELECT user_key FROM pgrec.users WHERE user_id = %(user_id)s

-- name: seen_item_ids
-- the items a user had any event with before as_of: context.exclude_seen in explain, as pgrec.finish_request
SELECT DISTINCT i.item_id FROM pgrec.events e JOIN pgrec.items i ON i.item_key = e.item_key
 WHERE e.user_key = %(user_key)s AND e.occurred_at < coalesce(%(as_of)s::timestamptz, now())
