"""candidates v9: the ann source's early read tests seen items through a hash

``pgrec.ann_search`` compared every row of its early read with the whole seen-items array (``<> ALL``): for a
user with thousands of seen items that cost more than the index scan. Each row now probes a hash of the array,
built once per scan (same answers).

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
