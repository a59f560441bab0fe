-- HTTP service, v2: pgrec.assign_variant orders the variants by name in the "C" collation (bytewise, the code
-- point order engine/experiments.py sorts them in). v1 used the database's collation: under en_US.utf8 (the
-- pgvector Docker image's default) "_", "-" and "." are ignored at the first level, so for names such as
-- arm_b / arma the SQL-only path gave a user another arm than the Python path. Reverting restores v1's.

CREATE OR REPLACE FUNCTION pgrec.assign_variant(user_id text, surface text DEFAULT 'default')
RETURNS TABLE (experiment text, variant text, model_version bigint, policy_set text)
LANGUAGE sql STABLE PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH e AS (
        SELECT x.experiment FROM pgrec.experiments x WHERE x.surface = assign_variant.surface AND x.active
    ), v AS (
        SELECT v.experiment, v.variant, v.model_version, v.policy_set,
               sum(v.share) OVER (ORDER BY v.variant COLLATE "C") / sum(v.share) OVER () AS upper_bound
          FROM pgrec.experiment_variants v JOIN e ON e.experiment = v.experiment
    )
    SELECT v.experiment, v.variant, v.model_version, v.policy_set
      FROM v, LATERAL (SELECT pgrec.variant_bucket(assign_variant.user_id, v.experiment) AS b) x
     -- the first slice above the bucket; the last variant if rounding left the bucket above every slice
     ORDER BY v.upper_bound <= x.b, CASE WHEN v.upper_bound > x.b THEN v.upper_bound ELSE -v.upper_bound END
     LIMIT 1
$$;
COMMENT ON FUNCTION pgrec.assign_variant(text, text) IS
    'The variant of the active experiment on a surface for a user (no row: no experiment). Variants in name '
    'order (bytes, as Python sorts them) take consecutive slices of [0, 1) in proportion to their shares; the user''s bucket picks one.';
