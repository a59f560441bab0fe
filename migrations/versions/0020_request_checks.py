"""candidates v7 + features v6: clear errors for a request's k and as_of

- ``pgrec.check_as_of`` / ``pgrec.check_k``: an infinite ``as_of`` and a ``k`` outside 1..1000 are refused naming
  the function (``pgrec.candidates``, ``pgrec.candidate_features`` and so ``pgrec.recommend`` and the Python path,
  ``pgrec.similar_items``, ``pgrec.trending_items``); before, PostgreSQL answered "cannot subtract infinite dates"
  or "LIMIT must not be negative".
- ``pgrec.candidate_features_by_key`` stores a past day's item-counter snapshot only for sessions of the schema
  owner's role (an app role could make the database store one per past ``as_of`` day it asked for); otherwise the
  same aggregate is computed per request.

Revision ID: 0020
Revises: 0019
"""

from __future__ import annotations

import sqlfiles
from alembic import op

revision = "0020"
down_revision = "0019"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlfiles.apply("candidates", 7)
    sqlfiles.apply("features", 6)


def downgrade() -> None:
    # v3's candidate_features, v4's candidates / similar_items / trending_items; the two checks are dropped
    sqlfiles.revert_partial("features", 6)
    sqlfiles.revert_partial("candidates", 7)
    # v4's candidate_features_by_key carries plan_cache_mode auto; v5 (migration 0013) set it to generic
    op.get_bind().exec_driver_sql("ALTER FUNCTION pgrec.candidate_features_by_key(bigint, text, int, timestamptz, "
                                  "bigint[]) SET plan_cache_mode = force_generic_plan")
