-- Stage 2 features, v5: plan cache modes only; the functions are v4's (sql/features/v4.sql) and v3's.
-- The feature statement keeps one generic plan (planning it took 5-16 ms of a ~30 ms call; under auto plpgsql
-- kept planning it on many calls). v4 could not force this, because the setting reaches the functions the
-- statement calls and the ann search's generic plan sorts the catalog; candidates v5 pins each source's plan
-- mode, so it can now. The per-request aggregate of the item counters (no snapshot for the day: a replica, or
-- an app that never runs pgrec.refresh_item_stats) must be planned for its item keys, or it would read every
-- item's counters: it is pinned to custom plans.
ALTER FUNCTION pgrec.candidate_features_by_key(bigint, text, int, timestamptz, bigint[])
    SET plan_cache_mode = force_generic_plan;
ALTER FUNCTION pgrec.item_stats_compute(date, float8, bigint[]) SET plan_cache_mode = force_custom_plan;
ALTER FUNCTION pgrec.item_segment_trend_compute(date, float8, bigint[], text) SET plan_cache_mode = force_custom_plan;
