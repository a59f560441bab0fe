"""features v7 + ingest v3: no per-segment copies of candidates; app roles cannot fan out old partitions

- ``pgrec.candidate_features_by_key`` without today's item-counter snapshot joined every segment's trend to a
  user without a segment (no segment property, a cold user): each candidate came back once per segment.
- ``pgrec.ensure_event_partitions`` creates a partition that ended more than 31 days ago only for sessions of the
  role that owns pgrec.events: an app role calling ``pgrec.track_event`` could leave one partition per month back to 1970,
  which every request then scanned.

Revision ID: 0023
Revises: 0022
"""

from __future__ import annotations

import sqlfiles

revision = "0023"
down_revision = "0022"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlfiles.apply("features", 7)
    sqlfiles.apply("ingest", 3)


def downgrade() -> None:
    sqlfiles.revert_partial("ingest", 3)
    sqlfiles.revert_partial("features", 7)
