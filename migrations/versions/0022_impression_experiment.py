"""serving v3: impressions record the experiment of their variant

``pgrec.impressions.experiment`` (NULL for older rows and SQL-only calls) is written by ``pgrec.finish_request``
(a new last parameter). The online report takes it and derives the experiment from the serving time only when it
is NULL: for a few seconds after an experiment was ended and another started on a surface, lists served with the
ended experiment's arms (service copies cache experiments for 5 s) were counted under the new one.

Revision ID: 0022
Revises: 0021
"""

from __future__ import annotations

import sqlfiles
from alembic import op

revision = "0022"
down_revision = "0021"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.execute("ALTER TABLE pgrec.impressions ADD COLUMN experiment text")
    sqlfiles.apply("serving", 3)


def downgrade() -> None:
    # v3's signature has one more parameter: drop it, then v2's function comes back
    op.execute("DROP FUNCTION pgrec.finish_request(text, text, int, bigint[], float8[], text[], jsonb, timestamptz, "
               "text, bigint, text, boolean, text)")
    sqlfiles.restore("serving", 2, "finish_request")
    op.execute("ALTER TABLE pgrec.impressions DROP COLUMN experiment")
