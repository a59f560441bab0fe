"""service v3: a ranker version serving an arm of an active experiment cannot be deleted

Deleting it broke that arm on both paths (and copies that had it loaded kept serving it). Triggers on
``pgrec.models`` refuse the DELETE (and a TRUNCATE), naming the experiment and the variant.

Revision ID: 0028
Revises: 0027
"""

from __future__ import annotations

import sqlfiles

revision = "0028"
down_revision = "0027"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlfiles.apply("service", 3)


def downgrade() -> None:
    sqlfiles.revert_partial("service", 3)  # drops the new functions and, with them, the triggers
