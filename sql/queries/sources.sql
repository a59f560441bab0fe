-- Stage 1 configuration: the rows of pgrec.candidate_sources (engine/cli/sources.py, `pgrec sources ...`).
-- The database checks every write (sql/sources/v1.sql); these statements only read and write rows.

-- name: rows
-- A surface's own rows (all surfaces when surface is NULL), in the union's source order.
SELECT c.surface, c.source, c.enabled, c.quota, c.fallback_order, c.params
  FROM pgrec.candidate_sources c
 WHERE %(surface)s::text IS NULL OR c.surface = %(surface)s::text
 ORDER BY c.surface, array_position(pgrec.candidate_source_names(), c.source)

-- name: source_names
SELECT pgrec.candidate_source_names()

-- name: surface_exists
SELECT EXISTS (SELECT 1 FROM pgrec.surfaces s WHERE s.surface = %(surface)s)

-- name: add_surface
INSERT INTO pgrec.surfaces (surface, description) VALUES (%(surface)s, %(description)s)
ON CONFLICT (surface) DO NOTHING

-- name: copy_default_rows
-- A surface without rows of its own uses the 'default' rows: start its own set from a copy of them.
INSERT INTO pgrec.candidate_sources (surface, source, enabled, quota, fallback_order, params)
SELECT %(surface)s, d.source, d.enabled, d.quota, d.fallback_order, d.params
  FROM pgrec.candidate_sources d
 WHERE d.surface = 'default'
   AND NOT EXISTS (SELECT 1 FROM pgrec.candidate_sources c WHERE c.surface = %(surface)s)

-- name: copy_default_row
-- One source the surface has no row for yet: start from the 'default' row of that source.
INSERT INTO pgrec.candidate_sources (surface, source, enabled, quota, fallback_order, params)
SELECT %(surface)s, d.source, d.enabled, d.quota, d.fallback_order, d.params
  FROM pgrec.candidate_sources d
 WHERE d.surface = 'default' AND d.source = %(source)s
ON CONFLICT (surface, source) DO NOTHING

-- name: add_row
INSERT INTO pgrec.candidate_sources (surface, source, quota) VALUES (%(surface)s, %(source)s, %(quota)s)
ON CONFLICT (surface, source) DO NOTHING

-- name: update_row
-- NULL leaves a column as it is; params: merged with set_params, then unset_params removed.
UPDATE pgrec.candidate_sources c
   SET quota = coalesce(%(quota)s::real, c.quota),
       fallback_order = CASE WHEN %(no_fallback)s THEN NULL ELSE coalesce(%(fallback_order)s::int, c.fallback_order) END,
       enabled = coalesce(%(enabled)s::boolean, c.enabled),
       params = (c.params || %(set_params)s::jsonb) - %(unset_params)s::text[]
 WHERE c.surface = %(surface)s AND c.source = %(source)s
RETURNING c.surface, c.source, c.enabled, c.quota, c.fallback_order, c.params

-- name: param_specs
-- Every source (those without parameters once, with NULLs), its keys in the order they are listed.
SELECT n.source, s.param, s.expects, s.default_value, s.description
  FROM unnest(pgrec.candidate_source_names()) WITH ORDINALITY AS n(source, ord)
  LEFT JOIN pgrec.source_param_specs() WITH ORDINALITY
       AS s(source, param, type, min, min_open, max, choices, expects, default_value, description, ord)
    ON s.source = n.source
 ORDER BY n.ord, s.ord
