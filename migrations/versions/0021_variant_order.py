"""service v2: pgrec.assign_variant orders variants bytewise (COLLATE "C"), as the Python path does

Under a linguistic collation (en_US.utf8, the pgvector Docker image's default) the SQL-only path could give a
user another arm than the Python and HTTP paths for names that differ in punctuation.

Revision ID: 0021
Revises: 0020
"""

from __future__ import annotations

import sqlfiles

revision = "0021"
down_revision = "0020"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlfiles.apply("service", 2)


def downgrade() -> None:
    sqlfiles.revert_partial("service", 2)
