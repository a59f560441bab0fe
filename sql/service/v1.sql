-- HTTP service: A/B variant assignment (also callable by apps that serve from SQL).
-- The bucket formula is mirrored by engine/experiments.py (a test pins them together).

CREATE OR REPLACE FUNCTION pgrec.variant_bucket(user_id text, experiment text)
RETURNS double precision
LANGUAGE sql IMMUTABLE STRICT PARALLEL SAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT (('x' || substr(encode(pg_catalog.sha256(pg_catalog.convert_to(experiment || ':' || user_id, 'UTF8')),
                                  'hex'), 1, 13))::bit(52)::bigint)::double precision / 4503599627370496.0
$$;
COMMENT ON FUNCTION pgrec.variant_bucket(text, text) IS
    'A stable number in [0, 1) for (user, experiment): the first 52 bits of sha256(experiment || '':'' || user_id).';

CREATE OR REPLACE FUNCTION pgrec.assign_variant(user_id text, surface text DEFAULT 'default')
RETURNS TABLE (experiment text, variant text, model_version bigint, policy_set text)
LANGUAGE sql STABLE PARALLEL SAFE SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
    WITH e AS (
        SELECT x.experiment FROM pgrec.experiments x WHERE x.surface = assign_variant.surface AND x.active
    ), v AS (
        SELECT v.experiment, v.variant, v.model_version, v.policy_set,
               sum(v.share) OVER (ORDER BY v.variant) / sum(v.share) OVER () AS upper_bound
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
    'order take consecutive slices of [0, 1) in proportion to their shares; the user''s bucket picks one.';
