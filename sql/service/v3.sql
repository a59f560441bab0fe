-- HTTP service, v3: a ranker version that serves an arm of an active experiment cannot be deleted (nor the
-- models table truncated while one does). Before, the DELETE went through and that arm's requests failed on both
-- paths ("model version N does not exist") while service copies that had loaded it kept serving it (found by a
-- review). Reverting drops the triggers.

CREATE OR REPLACE FUNCTION pgrec.models_guard()
RETURNS trigger
LANGUAGE plpgsql SECURITY DEFINER
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    hit record;
BEGIN
    -- a DELETE (per row): that version; a TRUNCATE (per statement): any version
    SELECT v.experiment, v.variant, v.model_version INTO hit
      FROM pgrec.experiment_variants v JOIN pgrec.experiments x ON x.experiment = v.experiment
     WHERE x.active AND v.model_version IS NOT NULL
       AND (TG_OP = 'TRUNCATE' OR v.model_version = OLD.version)
     ORDER BY v.experiment, v.variant
     LIMIT 1;
    IF FOUND THEN
        RAISE EXCEPTION 'model version % serves variant "%" of the active experiment "%"',
            hit.model_version, hit.variant, hit.experiment
            USING ERRCODE = '23503', HINT = 'end the experiment first: pgrec experiments end ' || hit.experiment;
    END IF;
    RETURN CASE WHEN TG_OP = 'TRUNCATE' THEN NULL ELSE OLD END;
END
$$;
COMMENT ON FUNCTION pgrec.models_guard() IS
    'Trigger: refuses to delete a model version that an arm of an active experiment serves, and to truncate '
    'pgrec.models while one does.';

DROP TRIGGER IF EXISTS models_before_delete ON pgrec.models;
CREATE TRIGGER models_before_delete BEFORE DELETE ON pgrec.models
    FOR EACH ROW EXECUTE FUNCTION pgrec.models_guard();
DROP TRIGGER IF EXISTS models_before_truncate ON pgrec.models;
CREATE TRIGGER models_before_truncate BEFORE TRUNCATE ON pgrec.models
    FOR EACH STATEMENT EXECUTE FUNCTION pgrec.models_guard();
