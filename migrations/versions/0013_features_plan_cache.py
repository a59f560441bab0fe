"""features v4: the feature statement keeps a generic plan when it is no worse (plan_cache_mode auto)

Revision ID: 0013
Revises: 0012
"""

from __future__ import annotations

import sqlfiles

revision = "0013"
down_revision = "0012"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlfiles.apply("features", 4)


def downgrade() -> None:
    sqlfiles.revert("features", 4)  # v3 again, in full
