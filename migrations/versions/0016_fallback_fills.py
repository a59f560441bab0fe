"""candidates v6: the union's popular fallback continues with the catalog's other items when it runs short;
a user vector survives events far older than the user's latest

- ``pgrec.unengaged_items(k, as_of, categories, exclude)``: available items created before as_of, newest first.
- ``pgrec.source_popular_filled``: ``pgrec.source_popular``, then (when it has fewer than k rows) those items with
  score 0, so a new app with few events, a narrow category or a cold user gets n candidates while the catalog
  has them. ``pgrec.candidates_by_key`` runs it in place of ``pgrec.source_popular``.
- ``pgrec.user_vector``: a recency weight too small for a real (an event decades older than the user's latest)
  is 0 instead of an underflow error that failed every request of that user.

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
    # drops the two new functions; candidates_by_key gets v5's statements back, user_vector v4's
    sqlfiles.revert_partial("candidates", 6)
