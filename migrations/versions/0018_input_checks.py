"""ingest v2: clear errors for ids, event times and vector values that v1 left to PostgreSQL's own messages

- ``pgrec.check_id``: an item, user or event id is 1 to 256 characters, refused naming the field otherwise.
- ``pgrec.track_event``: refuses an event before 1970-01-01 (``-infinity`` failed with an unrelated error, and
  every early month created a partition) and an infinite value.
- ``pgrec.upsert_item``: refuses an infinite ``created_at``.
- ``pgrec.check_vector``: a value beyond a 4-byte float's range is refused naming its position; one below the
  smallest 4-byte float becomes 0 (the cast failed with "underflow", an HTTP 500 on the embedding upload).

Revision ID: 0018
Revises: 0017
"""

from __future__ import annotations

import sqlfiles

revision = "0018"
down_revision = "0017"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlfiles.apply("ingest", 2)


def downgrade() -> None:
    # v1's functions back; pgrec.check_id (new) is dropped
    sqlfiles.revert_partial("ingest", 2)
