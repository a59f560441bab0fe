-- Ingest v3 (reverting restores v1's pgrec.ensure_event_partitions):
-- - a partition that ended more than 31 days ago is created only for sessions of the role owning pgrec.events. A
--   least-privilege app role could call pgrec.track_event once per month back to 1970 and leave ~680 partitions,
--   which every request then scanned (pgrec.recommend went from ~20 to ~65 ms; found by a security review).
--   Events of an older month for which a partition exists are still accepted from anyone.

CREATE OR REPLACE FUNCTION pgrec.ensure_event_partitions(p_from timestamptz, p_to timestamptz)
RETURNS int
LANGUAGE plpgsql VOLATILE
SET search_path = pg_catalog, pg_temp
AS $$
DECLARE
    -- month (the default) or year, fixed at install (config event_partition_interval)
    iv   text := coalesce((SELECT c.value #>> '{}' FROM pgrec.config c WHERE c.key = 'event_partition_interval'),
                          'month');
    step interval := CASE iv WHEN 'year' THEN interval '1 year' ELSE interval '1 month' END;
    fmt  text := CASE iv WHEN 'year' THEN 'YYYY' ELSE 'YYYYMM' END;
    m    timestamptz;
    nxt  timestamptz;
    part text;
    made int := 0;
BEGIN
    IF p_from IS NULL OR p_to IS NULL THEN
        RETURN 0;
    END IF;
    m := date_trunc(CASE iv WHEN 'year' THEN 'year' ELSE 'month' END, p_from AT TIME ZONE 'UTC') AT TIME ZONE 'UTC';
    WHILE m <= p_to LOOP
        nxt := ((m AT TIME ZONE 'UTC') + step) AT TIME ZONE 'UTC';
        part := 'events_' || to_char(m AT TIME ZONE 'UTC', fmt);
        IF to_regclass('pgrec.' || part) IS NULL THEN
            -- an app role (pgrec_app calling pgrec.track_event) could otherwise make one partition per month back
            -- to 1970 in one statement, and every request would then scan them all; only sessions of the role
            -- that owns pgrec.events (the migrating role: imports, the service, backfills) create partitions that
            -- ended more than 31 days ago (the schema itself may belong to another role: CREATE SCHEMA IF NOT EXISTS)
            IF nxt < now() - interval '31 days' AND NOT pg_has_role(
                   session_user, (SELECT c.relowner FROM pg_class c WHERE c.oid = 'pgrec.events'::regclass), 'MEMBER') THEN
                RAISE EXCEPTION 'pgrec: no partition of pgrec.events holds % yet, and only the sessions of the '
                                'owner of pgrec.events create partitions that ended more than 31 days ago', p_from
                    USING ERRCODE = '22023',
                          HINT = 'import old events with pgrec import events as the role that ran pgrec db upgrade';
            END IF;
            -- two sessions may want the same partition: serialise creation, then look again
            PERFORM pg_advisory_xact_lock(hashtext('pgrec.events.partitions'));
            IF to_regclass('pgrec.' || part) IS NULL THEN
                EXECUTE format('CREATE TABLE pgrec.%I PARTITION OF pgrec.events FOR VALUES FROM (%L) TO (%L)',
                               part, m, nxt);
                made := made + 1;
            END IF;
        END IF;
        m := nxt;
    END LOOP;
    RETURN made;
END
$$;
COMMENT ON FUNCTION pgrec.ensure_event_partitions(timestamptz, timestamptz) IS
    'Create the partitions of pgrec.events (monthly, or yearly per config event_partition_interval) covering '
    '[p_from, p_to]; returns how many were made. Sessions of roles other than the owner of pgrec.events (app '
    'roles) may not create a partition that ended more than 31 days ago.';
