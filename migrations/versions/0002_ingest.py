"""ingest functions: track_event, upsert_item, upsert_user, embeddings, event partitions

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlfiles

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlfiles.apply("ingest", 1)


def downgrade() -> None:
    sqlfiles.revert("ingest", 1)
