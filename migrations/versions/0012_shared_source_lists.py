"""shared source lists: the user-independent candidate lists read from a short-lived cache

- candidates v4: the trending, popular and fresh sources read their top lists at now (no category filter)
  from ``pgrec.source_cache`` while it is younger than config ``source_cache_seconds`` (30; 0 = off),
  scanning and storing them otherwise; a statement trigger on ``pgrec.items`` drops the lists when the catalog
  changes. Quotas are taken through numeric (a real 0.1 of 40 is 4, not 5). ``pgrec.trending_items`` (the
  trending API) still reads the running sums directly, so an event shows there at once.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

import sqlfiles
from alembic import op

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None

CONFIG = [
    ("source_cache_seconds", "30",
     "candidate sources trending/popular/fresh: how long their shared top lists at now are reused (0 = off)"),
    ("source_cache_rows", "1000", "candidate sources trending/popular: rows kept per shared list"),
]

# settings 0010 pinned with ALTER FUNCTION that candidates v3's text does not state
PINNED_V3 = {
    "pgrec.similar_items(text, integer)": "max_parallel_workers_per_gather = 0",
    "pgrec.trending_items(text, integer, timestamptz)": "max_parallel_workers_per_gather = 0",
}


def upgrade() -> None:
    bind = op.get_bind()
    bind.exec_driver_sql(
        """
-- Shared top lists of the user-independent candidate sources at now (key: 'trending:<segment>',
-- 'popular:', 'fresh:<days>:<max_scan>'): item keys and raw running-sum scores, best first, with the running
-- sums' epoch they were read under; reused for config source_cache_seconds.
CREATE TABLE pgrec.source_cache (
    key         text PRIMARY KEY,
    epoch       timestamptz,
    item_keys   bigint[] NOT NULL,
    scores      float8[] NOT NULL,
    complete    boolean NOT NULL,
    computed_at timestamptz NOT NULL
);
COMMENT ON TABLE pgrec.source_cache IS
  'Short-lived shared lists of the trending, popular and fresh sources at now (complete: the list holds every '
  'qualifying item, so any k can be served from it).';
"""
    )
    sqlfiles.seed_config(CONFIG)
    sqlfiles.apply("candidates", 4)


def downgrade() -> None:
    bind = op.get_bind()
    sqlfiles.revert("candidates", 4)  # drops the v4-only functions (the items trigger with them)
    for fn, setting in PINNED_V3.items():
        bind.exec_driver_sql(f"ALTER FUNCTION {fn} SET {setting}")
    bind.exec_driver_sql("DROP TABLE IF EXISTS pgrec.source_cache")
    sqlfiles.drop_config(CONFIG)
