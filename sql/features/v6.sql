-- Stage 2 features, v6: pgrec.candidate_features refuses an infinite as_of with a clear error
-- (pgrec.check_as_of, sql/candidates/v7.sql); v3's failed with "cannot subtract infinite dates". Reverting
-- restores v3's.

CREATE OR REPLACE FUNCTION pgrec.candidate_features(
    user_id text,
    surface text DEFAULT 'default',
    n       int DEFAULT 500,
    as_of   timestamptz DEFAULT NULL)
RETURNS SETOF pgrec.candidate_feature_row
LANGUAGE sql VOLATILE SECURITY DEFINER PARALLEL UNSAFE
SET search_path = pg_catalog, pg_temp
AS $$
    SELECT f.* FROM pgrec.candidate_features_by_key(
        (SELECT u.user_key FROM pgrec.users u WHERE u.user_id = candidate_features.user_id),
        surface, n, pgrec.check_as_of('pgrec.candidate_features', as_of)) f
$$;
COMMENT ON FUNCTION pgrec.candidate_features(text, text, int, timestamptz) IS
    'Stage 2 features for a user id (unknown id = cold user): see pgrec.candidate_features_by_key.';
