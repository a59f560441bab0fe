"""features v8: pgrec.candidate_features_by_key does less per history event (long histories)

The ``recent`` step looked up the embedding of every distinct positive item of the user's last
``feature_user_history_limit`` events and then kept ``feature_recent_items`` of them; it now picks those first and
looks up only their embeddings. The category affinity (``ucat``) looked up each history event's item; it now
counts the events per item first and looks up each distinct item once. Same rows and values.

Revision ID: 0030
Revises: 0029
"""

from __future__ import annotations

import sqlfiles

revision = "0030"
down_revision = "0029"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlfiles.apply("features", 8)


def downgrade() -> None:
    sqlfiles.revert_partial("features", 8)
