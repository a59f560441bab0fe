"""request-path speed, stored item neighbours and the ranker's EASE features

- policies v2: the same answers as v1 with fewer passes (one read of the user's history for the history
  filters, row filters cut the list once per run of filters, the input read in list order).
- features v3: f_ease_sum / f_ease_max / f_ease_rank from the EASE neighbour lists (``pgrec train ease``).
- candidates v3: the history source reads stored item-embedding neighbours while they are current (else the
  HNSW search, the seed itself excluded), looks items up only until k pass, can add EASE neighbours
  (params.ease_weight); the union in one pass per item (the same rows as v2).
- aggregates v1: the triggers on pgrec.events in one file; one statement trigger keeps the daily counters and
  the trending sums in one pass over the new rows.
- pgrec.model_neighbors: top-N neighbours per item from a learned model ('ease', 'embedding').

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

import sqlfiles
from alembic import op

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None

# concern -> the version this migration applies
# (aggregates v1 holds the triggers on pgrec.events, moved out of features v2 and candidates v2: applied last,
# reverted first, so reverting it drops them and re-applying features v2 / candidates v2 restores them)
VERSIONS = {"policies": 2, "features": 3, "candidates": 3, "aggregates": 1}

CONFIG = [
    ("feature_ease_items", "100",
     "ranker features f_ease_*: the user's latest distinct items whose EASE neighbour lists are summed"),
]

# what 0008 and 0009 pinned with ALTER FUNCTION on the request path; a file re-applied on downgrade carries no
# SET clause of its own, so the downgrade pins these again (new files put their SET clauses in the definition)
PINNED = {
    "pgrec.candidates_by_key(bigint, text, integer, timestamptz, text[])":
        ["max_parallel_workers_per_gather = 0"],
    "pgrec.candidate_sources_call(text, bigint, integer, timestamptz, text[], jsonb)":
        ["max_parallel_workers_per_gather = 0"],
    "pgrec.rerank(bigint, text, integer, bigint[], float8[], text[], jsonb, timestamptz, text)":
        ["max_parallel_workers_per_gather = 0", "plan_cache_mode = auto"],
    "pgrec.similar_items(text, integer)": ["max_parallel_workers_per_gather = 0"],
    "pgrec.trending_items(text, integer, timestamptz)": ["max_parallel_workers_per_gather = 0"],
}


def upgrade() -> None:
    op.get_bind().exec_driver_sql(
        """
-- Item-to-item neighbours learned by a model other than co-occurrence (pgrec.item_neighbors): top-N per item,
-- one list per model name (for example 'ease' item-item weights, 'embedding' nearest item vectors).
CREATE TABLE pgrec.model_neighbors (
    model        text NOT NULL,
    item_key     bigint NOT NULL,
    rank         int NOT NULL,
    neighbor_key bigint NOT NULL,
    score        real NOT NULL,
    built_at     timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (model, item_key, rank)
);
COMMENT ON TABLE pgrec.model_neighbors IS
  'Top-N neighbours per item from a learned item-item model (model: ease, embedding, ...), rank 1 = best.';
"""
    )
    sqlfiles.seed_config(CONFIG)
    for concern, version in VERSIONS.items():
        sqlfiles.apply(concern, version)
    # until a new file states them in the definition, keep the settings 0008/0009 pinned
    _pin()


def downgrade() -> None:
    for concern, version in reversed(VERSIONS.items()):
        sqlfiles.revert(concern, version)
    _pin()
    bind = op.get_bind()
    # features v3 added the EASE columns to the feature row type; v2's function returns the older shape
    bind.exec_driver_sql("ALTER TYPE pgrec.candidate_feature_row DROP ATTRIBUTE IF EXISTS f_ease_sum, "
                         "DROP ATTRIBUTE IF EXISTS f_ease_max, DROP ATTRIBUTE IF EXISTS f_ease_rank")
    bind.exec_driver_sql("DROP TABLE IF EXISTS pgrec.model_neighbors")
    sqlfiles.drop_config(CONFIG)


def _pin() -> None:
    bind = op.get_bind()
    for fn, settings in PINNED.items():
        for setting in settings:
            bind.exec_driver_sql(f"ALTER FUNCTION {fn} SET {setting}")
