"""pgrec.config checked on write

- config v1: ``pgrec.config_specs()`` (every key the SQL functions read, its JSON type, range, whether it is
  fixed at install and what to run after a change) and a trigger on ``pgrec.config`` that refuses an unknown
  key, a value of the wrong JSON type or out of range (SQLSTATE 22023, naming the key, what it expects and the
  value given), a change to a key fixed at install (embedding_dim, event_partition_interval) and its deletion.
  Before, a bad value was stored and failed later, at request time, without naming the key.

Rows already in the table are checked once: a bad one fails the upgrade with the same message (fix the row,
then upgrade again); nothing is changed silently.

Revision ID: 0015
Revises: 0014
"""

from __future__ import annotations

import sqlfiles
from alembic import op

revision = "0015"
down_revision = "0014"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlfiles.apply("config", 1)
    op.get_bind().exec_driver_sql("SELECT pgrec.config_check(c.key, c.value) FROM pgrec.config c ORDER BY c.key")


def downgrade() -> None:
    # dropping the trigger function drops the trigger with it (CASCADE)
    sqlfiles.revert("config", 1)
