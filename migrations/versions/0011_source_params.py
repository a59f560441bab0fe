"""candidate source parameters checked on write

- sources v1: ``pgrec.source_param_specs()`` (the known ``params`` keys of each candidate source, their types,
  ranges, defaults and meanings) and a BEFORE INSERT OR UPDATE trigger on ``pgrec.candidate_sources`` that
  refuses an unknown source, an unknown key, a value of the wrong JSON type or out of range, naming the
  surface, the source and the key.

Rows already in the table are checked once: a bad one fails the upgrade with the same message (fix the row,
then upgrade again); nothing is changed silently.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

import sqlfiles
from alembic import op

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlfiles.apply("sources", 1)
    op.get_bind().exec_driver_sql(
        "SELECT pgrec.source_params_check(c.surface, c.source, c.params) "
        "FROM pgrec.candidate_sources c ORDER BY c.surface, c.source"
    )


def downgrade() -> None:
    # dropping the trigger function drops the trigger with it (CASCADE)
    sqlfiles.revert("sources", 1)
