-- Statements of the HTTP service (engine/api, engine/experiments.py, `pgrec keys`, `pgrec report online`).

-- name: insert_key
INSERT INTO pgrec.api_keys (name, prefix, key_hash, scopes)
VALUES (%(name)s, %(prefix)s, %(key_hash)s, %(scopes)s)
RETURNING key_id, created_at

-- name: revoke_key
UPDATE pgrec.api_keys SET revoked_at = now()
 WHERE key_id = %(key_id)s AND revoked_at IS NULL
RETURNING key_id

-- name: key_exists
SELECT revoked_at FROM pgrec.api_keys WHERE key_id = %(key_id)s

-- name: list_keys
SELECT key_id, name, prefix, scopes, created_at, revoked_at
  FROM pgrec.api_keys
 WHERE %(all)s OR revoked_at IS NULL
 ORDER BY key_id

-- name: key_by_hash
SELECT key_id, name, scopes FROM pgrec.api_keys WHERE key_hash = %(key_hash)s AND revoked_at IS NULL

-- name: schema_revision
SELECT version_num FROM pgrec.alembic_version

-- name: surface_exists
SELECT 1 FROM pgrec.surfaces WHERE surface = %(surface)s

-- name: model_exists
-- FOR KEY SHARE: a concurrent DELETE of the model waits for the experiment's transaction, then its trigger
-- (service v3) sees the experiment and refuses
SELECT kind FROM pgrec.models WHERE version = %(version)s FOR KEY SHARE

-- name: insert_experiment
INSERT INTO pgrec.experiments (experiment, surface, description) VALUES (%(experiment)s, %(surface)s, %(description)s)

-- name: insert_variant
INSERT INTO pgrec.experiment_variants (experiment, variant, share, model_version, policy_set)
VALUES (%(experiment)s, %(variant)s, %(share)s, %(model_version)s, %(policy_set)s)

-- name: end_experiment
UPDATE pgrec.experiments SET active = false, ended_at = now()
 WHERE experiment = %(experiment)s AND active
RETURNING experiment

-- name: experiment_state
SELECT active FROM pgrec.experiments WHERE experiment = %(experiment)s

-- name: list_experiments
SELECT x.experiment, x.surface, x.active, x.description, x.created_at, x.ended_at,
       coalesce(jsonb_agg(jsonb_build_object('name', v.variant, 'share', v.share,
                                             'model_version', v.model_version, 'policy_set', v.policy_set)
                          ORDER BY v.variant) FILTER (WHERE v.variant IS NOT NULL), '[]') AS variants
  FROM pgrec.experiments x LEFT JOIN pgrec.experiment_variants v ON v.experiment = x.experiment
 WHERE %(all)s OR x.active
 GROUP BY x.experiment
 ORDER BY x.created_at, x.experiment

-- name: assign_variant
SELECT experiment, variant, model_version, policy_set FROM pgrec.assign_variant(%(user_id)s, %(surface)s)

-- name: policy_set_exists
-- an enabled policy of the set that applies on the surface (else the arm is the control)
SELECT 1 FROM pgrec.policies
 WHERE policy_set = %(policy_set)s AND enabled AND (surface IS NULL OR surface = %(surface)s)
 LIMIT 1

-- name: probe_timeout
-- /ready's query may not wait longer than the probe (in its own transaction)
SELECT set_config('statement_timeout', %(ms)s::text, true)

-- name: item_exists
SELECT item_key FROM pgrec.items WHERE item_id = %(item_id)s

-- name: online_report
-- One row per (surface, experiment, variant, position) and a total per (surface, experiment, variant) with
-- position NULL. An impression's experiment is the one logged with it (migration 0022), else the one that ran on its
-- surface when it was served (at most one runs per surface at a time), so two experiments that reuse variant names
-- stay apart; '' when none ran (or the impression has no variant).
-- An impression is clicked / converted when the same user had a click / conversion event on the same item
-- that cites the impression's request id (from a clock slack before it on: client clocks differ from the
-- database's), or, without a request id, within the attribution window after it; such an event is credited once, to the latest impression of that user and item before it
-- (ties: the greater request id), so that two lists showing the item do not both count one click.
WITH cfg AS (
    SELECT coalesce((SELECT array_agg(t.type_id) FROM pgrec.event_types t
                      WHERE t.name IN (SELECT jsonb_array_elements_text(c.value) FROM pgrec.config c
                                        WHERE c.key = 'report_click_types')), '{}') AS click_ids,
           coalesce((SELECT array_agg(t.type_id) FROM pgrec.event_types t
                      WHERE t.name IN (SELECT jsonb_array_elements_text(c.value) FROM pgrec.config c
                                        WHERE c.key = 'report_conversion_types')), '{}') AS conversion_ids,
           coalesce((SELECT c.value::text::float8 FROM pgrec.config c WHERE c.key = 'report_attribution_hours'), 24)
               * interval '1 hour' AS attribution
), imp AS (
    SELECT i.* FROM pgrec.impressions i
     WHERE i.served_at >= coalesce(%(since)s::timestamptz, '-infinity')
       AND (%(surface)s::text IS NULL OR i.surface = %(surface)s::text)
), judged AS (
    SELECT imp.surface,
           coalesce(imp.experiment, (SELECT x.experiment FROM pgrec.experiments x
                      WHERE imp.variant IS NOT NULL AND x.surface = imp.surface AND x.created_at <= imp.served_at
                        AND (x.ended_at IS NULL OR imp.served_at < x.ended_at)
                      ORDER BY x.created_at DESC LIMIT 1), '') AS experiment,
           coalesce(imp.variant, '') AS variant, imp.position,
           coalesce(m.clicked, false) AS clicked, coalesce(m.converted, false) AS converted
      FROM imp CROSS JOIN cfg
      LEFT JOIN LATERAL (
          SELECT bool_or(e.type_id = ANY (cfg.click_ids)) AS clicked,
                 bool_or(e.type_id = ANY (cfg.conversion_ids)) AS converted
            FROM pgrec.events e
           WHERE e.user_key = imp.user_key AND e.item_key = imp.item_key
             AND e.type_id = ANY (cfg.click_ids || cfg.conversion_ids)
             -- an event citing the request may be a little early (engine/experiments.py CITATION_CLOCK_SLACK:
             -- client clocks; a skew of seconds lost such conversions); days early is an error
             AND (e.request_id = imp.request_id AND e.occurred_at >= imp.served_at - %(slack)s::interval
                  OR (e.request_id IS NULL AND e.occurred_at >= imp.served_at
                      AND e.occurred_at < imp.served_at + cfg.attribution
                      AND NOT EXISTS (
                          SELECT 1 FROM pgrec.impressions later
                           WHERE later.user_key = imp.user_key AND later.item_key = imp.item_key
                             AND later.served_at <= e.occurred_at
                             AND (later.served_at, later.request_id) > (imp.served_at, imp.request_id))))
      ) m ON true
)
SELECT surface, experiment, variant, position, count(*) AS impressions,
       count(*) FILTER (WHERE clicked) AS clicks,
       count(*) FILTER (WHERE converted) AS conversions
  FROM judged
 GROUP BY GROUPING SETS ((surface, experiment, variant), (surface, experiment, variant, position))
 ORDER BY surface, experiment, variant, position NULLS FIRST

-- name: track_event
SELECT pgrec.track_event(%(user_id)s::text, %(item_id)s::text, %(event_type)s::text,
                         coalesce(%(occurred_at)s::timestamptz, now()), %(value)s::numeric, %(event_id)s::text,
                         %(properties)s::jsonb, %(request_id)s::uuid)

-- name: upsert_item
SELECT pgrec.upsert_item(%(item_id)s::text, %(categories)s::text[], %(properties)s::jsonb,
                         %(created_at)s::timestamptz, %(available)s::boolean)

-- name: upsert_user
SELECT pgrec.upsert_user(%(user_id)s::text, %(properties)s::jsonb)

-- name: set_item_embedding
SELECT pgrec.set_item_embedding(%(item_id)s::text, %(vector)s::float8[], %(model_version)s::text)

-- name: get_item
SELECT item_id, categories, properties, created_at, updated_at, available,
       EXISTS (SELECT 1 FROM pgrec.item_embeddings e WHERE e.item_key = i.item_key) AS has_embedding
  FROM pgrec.items i WHERE item_id = %(item_id)s
