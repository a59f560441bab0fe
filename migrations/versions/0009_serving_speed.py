"""serving speed: item counter snapshots per day for the ranker's features; no parallel workers on the request path

The features read each candidate's item counters (events in 1/7/30/365 days, positive/negative counts, decayed
trend, globally and per segment) for whole UTC days before as_of. v1 aggregated up to 365 daily rows per
candidate on every request (about 36,000 rows, 20+ ms, for 500 candidates at 20k items); v2 reads one row per
candidate from a snapshot of the day (``pgrec.item_stats``), built once a day by ``pgrec.refresh_item_stats``.

User tower with user features: ``pgrec.user_feature_embeddings`` (one vector per user property token, written
by the retrieval model) and ``pgrec.user_vector`` v2 adding them (``pgrec.property_tokens``).

candidates v2: the history source looks its scored items up one by one (the planner hash-joined the whole
catalog: 16.9 -> 5.7 ms at 20k items).

serving v2: ``context.exclude_seen`` (true: every item the user had an event with is excluded), handled in
``pgrec.finish_request`` for the Python and SQL paths alike.

Request-path functions also pin ``max_parallel_workers_per_gather = 0``: a parallel plan for a per-user
statement spends milliseconds starting workers (measured 8.6 vs 2.4 ms for the fresh source's query).

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

import sqlfiles
from alembic import op

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None

# entry points of the request path (functions they call inherit the setting for the call)
NO_PARALLEL = [
    "pgrec.candidates_by_key(bigint, text, integer, timestamptz, text[])",
    "pgrec.candidate_sources_call(text, bigint, integer, timestamptz, text[], jsonb)",
    "pgrec.recommend(text, integer, text, jsonb, timestamptz, bigint, text, text, boolean)",
    "pgrec.rerank(bigint, text, integer, bigint[], float8[], text[], jsonb, timestamptz, text)",
    "pgrec.similar_items(text, integer)",
    "pgrec.trending_items(text, integer, timestamptz)",
]


def upgrade() -> None:
    bind = op.get_bind()
    bind.exec_driver_sql(
        """
-- Snapshots of the ranker's item counters, one per UTC day (built by pgrec.refresh_item_stats).
CREATE TABLE pgrec.item_stats_days (
    day            date PRIMARY KEY,
    half_life_days float8 NOT NULL,
    items          bigint NOT NULL,
    built_at       timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgrec.item_stats_days IS
  'Which days have an item counter snapshot (pgrec.item_stats, pgrec.item_segment_trend), with the trend half-life used.';
CREATE TABLE pgrec.item_stats (
    day      date NOT NULL,
    item_key bigint NOT NULL,
    n_1d     float8,
    n_7d     float8,
    n_30d    float8,
    n_365d   float8,
    n_pos    float8,
    n_neg    float8,
    trend    float8,
    PRIMARY KEY (day, item_key)
);
COMMENT ON TABLE pgrec.item_stats IS
  'Ranker item counters as of a UTC day (pgrec.item_stats_compute over the whole days before it), one row per item with events.';
CREATE TABLE pgrec.item_segment_trend (
    day      date NOT NULL,
    segment  text NOT NULL,
    item_key bigint NOT NULL,
    trend    float8,
    PRIMARY KEY (day, segment, item_key)
);
COMMENT ON TABLE pgrec.item_segment_trend IS
  'Ranker item trend per user segment as of a UTC day (pgrec.item_segment_trend_compute).';
-- The user tower's user features: one learned vector per known property token (written with the retrieval
-- model's vectors, in the same transaction), added to the history part of pgrec.user_vector.
CREATE TABLE pgrec.user_feature_embeddings (
    token         text PRIMARY KEY,
    embedding     public.vector NOT NULL,
    model_version bigint,
    updated_at    timestamptz NOT NULL DEFAULT now()
);
COMMENT ON TABLE pgrec.user_feature_embeddings IS
  'Retrieval model: vectors of user property tokens ("<key>=<value>", pgrec.property_tokens) for the user tower.';
"""
    )
    sqlfiles.apply("features", 2)
    sqlfiles.apply("candidates", 2)
    sqlfiles.apply("serving", 2)
    for fn in NO_PARALLEL:
        bind.exec_driver_sql(f"ALTER FUNCTION {fn} SET max_parallel_workers_per_gather = 0")


def downgrade() -> None:
    bind = op.get_bind()
    for fn in NO_PARALLEL:
        bind.exec_driver_sql(f"ALTER FUNCTION {fn} RESET max_parallel_workers_per_gather")
    sqlfiles.revert("serving", 2)
    sqlfiles.revert("candidates", 2)
    sqlfiles.revert("features", 2)
    # v1's definition carries no SET clause: restore what 0008 pinned
    for fn in ("pgrec.candidate_features_by_key(bigint, text, integer, timestamptz, bigint[])",
               "pgrec.recommend(text, integer, text, jsonb, timestamptz, bigint, text, text, boolean)"):
        bind.exec_driver_sql(f"ALTER FUNCTION {fn} SET plan_cache_mode = force_custom_plan")
    bind.exec_driver_sql("DROP TABLE IF EXISTS pgrec.item_stats, pgrec.item_segment_trend, pgrec.item_stats_days, "
                         "pgrec.user_feature_embeddings")
