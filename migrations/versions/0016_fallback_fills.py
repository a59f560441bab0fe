"""candidates v6: the union's popular fallback continues with the catalog's other items when it runs short

- ``pgrec.unengaged_items(k, as_of, categories, exclude)``: available items created before as_of, newest first.
- ``pgrec.source_popular_filled``: ``pgrec.source_popular``, then (when it has fewer than k rows) those items with
  score 0, so a new app with few events, a narrow category or a cold user gets n candidates while the catalog
  has them. ``pgrec.candidates_by_key`` runs it in place of ``pgrec.source_popular``.

Revision ID: 0016
Revises: 0015
"""

from __future__ import annotations

import sqlfiles

revision = "0016"
down_revision = "0015"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlfiles.apply("candidates", 6)


def downgrade() -> None:
    # drops the two new functions and applies v5 again (its candidates_by_key, with its plan mode)
    sqlfiles.revert("candidates", 6)
