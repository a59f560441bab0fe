"""candidates v9: seen items tested through a hash (users with long histories)

``pgrec.ann_search`` compared every row of its early read with the whole seen-items array (``<> ALL`` in
plpgsql), and ``pgrec.candidates_by_key`` flagged seen rows by a join whose plan followed the statistics (at times
a nested loop over the array): for a user with thousands of seen items both could cost more than the sources
themselves. Each row now probes a hash of the array, built once per statement (same answers).

Revision ID: 0026
Revises: 0025
"""

from __future__ import annotations

import sqlfiles

revision = "0026"
down_revision = "0025"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlfiles.apply("candidates", 9)


def downgrade() -> None:
    sqlfiles.revert_partial("candidates", 9)
