"""request-path functions plan their statements for each call's actual values

plpgsql caches statement plans; after five calls it may keep a generic plan that ignores the values of
``as_of``, ``item_keys`` or the user. For the request path that generic plan was measured 2-3x slower
(pgrec.candidate_features: 125 ms vs 44 ms p50 at 20k items), so the entry points pin
``plan_cache_mode = force_custom_plan``; functions they call inherit it for the call.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from alembic import op

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None

# function -> the mode it pins. rerank's many small statements gain nothing from re-planning (measured
# 3.7 -> 5.9 ms when forced), so it keeps the default even when pgrec.recommend calls it; candidates alone
# (no features) measured 29 ms auto vs 32-37 ms forced at 100k items, so pgrec.candidates keeps the default
# too (it inherits the forced mode when called from the feature query).
MODES = {
    "pgrec.candidate_features_by_key(bigint, text, integer, timestamptz, bigint[])": "force_custom_plan",
    "pgrec.recommend(text, integer, text, jsonb, timestamptz, bigint, text, text, boolean)": "force_custom_plan",
    "pgrec.rerank(bigint, text, integer, bigint[], float8[], text[], jsonb, timestamptz, text)": "auto",
}


def upgrade() -> None:
    for fn, mode in MODES.items():
        op.get_bind().exec_driver_sql(f"ALTER FUNCTION {fn} SET plan_cache_mode = {mode}")


def downgrade() -> None:
    for fn in MODES:
        op.get_bind().exec_driver_sql(f"ALTER FUNCTION {fn} RESET plan_cache_mode")
