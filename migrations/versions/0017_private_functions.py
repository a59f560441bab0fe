"""functions private again: only what pgrec_app is granted by name is callable by other roles

PostgreSQL gives PUBLIC EXECUTE on every new function. Migration 0006 revoked it from the functions that
existed then and ran ``ALTER DEFAULT PRIVILEGES IN SCHEMA pgrec REVOKE EXECUTE ON FUNCTIONS FROM PUBLIC``,
which cannot take away a global default: every function created by 0007-0016 (item_stats_invalidate,
refresh_embedding_neighbors, source_cache_put, ...) was callable, as its SECURITY DEFINER owner, by any role
with USAGE on the schema, pgrec_app included. This revokes PUBLIC from all of them; ``sqlfiles`` now does the
same after every file it runs, so later versions stay private.

Revision ID: 0017
Revises: 0016
"""

from __future__ import annotations

import sqlfiles
from alembic import op

revision = "0017"
down_revision = "0016"
branch_labels = None
depends_on = None


def upgrade() -> None:
    # pgrec_app's grants are its own ACL entries (0006, 0007): they stay
    op.get_bind().exec_driver_sql(sqlfiles.PRIVATE_FUNCTIONS)


def downgrade() -> None:
    # nothing to give back: 0016 did not mean PUBLIC to call these functions
    pass
