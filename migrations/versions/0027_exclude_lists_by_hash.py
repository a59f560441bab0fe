"""policies v5 + serving v5: request exclude / include-only lists tested through a hash

``pgrec.rerank`` tested every candidate and reserve row with ``= ANY (list)`` (a scan of the list per row once
its statements run generic plans), and ``context.exclude_seen`` makes the exclude list every item the user ever
touched; ``pgrec.finish_request`` built that list with one item lookup per event. rerank now reads the lists
through the new ``pgrec.list_rows`` as hashed subplans. Same answers.

Revision ID: 0027
Revises: 0026
"""

from __future__ import annotations

import sqlfiles

revision = "0027"
down_revision = "0026"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlfiles.apply("policies", 5)
    sqlfiles.apply("serving", 5)


def downgrade() -> None:
    sqlfiles.revert_partial("policies", 5)
    sqlfiles.revert_partial("serving", 5)
