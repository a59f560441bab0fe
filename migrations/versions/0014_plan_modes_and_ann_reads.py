"""candidates v5 and features v5: plan cache modes pinned per function; the ann source reads only to its quota

- The candidate sources history, trending, fresh and popular, the union itself and the feature statement keep
  one generic plan (``plan_cache_mode = force_generic_plan`` on the function): under auto plpgsql planned them
  again on most calls. The ann search is pinned to custom plans (its generic plan sorts the catalog), as is the
  per-request aggregate of the item counters (``item_stats_compute``, ``item_segment_trend_compute``: planned for
  the request's item keys).
- ``pgrec.ann_search`` and ``pgrec.source_ann`` take two more optional arguments (``unseen``, ``seen``): with
  ``unseen < k`` the HNSW scan stops once ``unseen`` items outside ``seen`` have come, so the over-fetch for seen
  items costs only as many rows as seen items actually take. ``pgrec.candidates_by_key`` passes them.

Revision ID: 0014
Revises: 0013
"""

from __future__ import annotations

import sqlfiles
from alembic import op

revision = "0014"
down_revision = "0013"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlfiles.apply("candidates", 5)
    sqlfiles.apply("features", 5)


def downgrade() -> None:
    bind = op.get_bind()
    # features v5 only set options: v4 re-creates its function (with its own options); the v3 functions it
    # pinned get their default back
    sqlfiles.revert("features", 5)
    bind.exec_driver_sql("ALTER FUNCTION pgrec.item_stats_compute(date, float8, bigint[]) RESET plan_cache_mode")
    bind.exec_driver_sql(
        "ALTER FUNCTION pgrec.item_segment_trend_compute(date, float8, bigint[], text) RESET plan_cache_mode")
    # the v5 signatures; re-applying candidates v4 creates the v4 ones (and their options) again
    bind.exec_driver_sql(
        "DROP FUNCTION IF EXISTS pgrec.source_ann(bigint, int, timestamptz, text[], jsonb, int, bigint[])")
    bind.exec_driver_sql(
        "DROP FUNCTION IF EXISTS pgrec.ann_search(public.vector, int, timestamptz, text[], jsonb, text, int, bigint[])")
    sqlfiles.revert("candidates", 5)
