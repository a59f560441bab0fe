"""candidates v8: the fallback fills n unseen candidates for users with many seen items

A fallback source fetched n plus ``candidates_overfetch_max`` (100) rows; a user with more seen items than that
among them got fewer than n unseen candidates although the catalog had more. It now fetches n plus as many rows
as the user has seen items, up to 4n (or the cap, if larger).

Revision ID: 0025
Revises: 0024
"""

from __future__ import annotations

import sqlfiles

revision = "0025"
down_revision = "0024"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlfiles.apply("candidates", 8)


def downgrade() -> None:
    sqlfiles.revert_partial("candidates", 8)
