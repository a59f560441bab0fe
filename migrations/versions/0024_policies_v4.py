"""policies v4 + serving v4: boosts keep their direction on negative scores; pins into an empty list get a score;
a check; the served answer names the skipped policies

- boost ``multiply`` divides a negative score instead of multiplying it (the ranker's raw scores are often
  negative: a boost of 2 buried the matching items).
- a pin from outside the candidates placed into an empty list got a NULL score (the Python path then failed after
  the impressions were logged); it gets 0.
- ``pin`` refuses inline items without a position each; ``pgrec.rerank`` refuses a NULL score like NaN.
- ``pgrec.finish_request`` returns rerank's ``skipped`` (the Python facade's ``Recommendation.skipped``).

Revision ID: 0024
Revises: 0023
"""

from __future__ import annotations

import sqlfiles

revision = "0024"
down_revision = "0023"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlfiles.apply("policies", 4)
    sqlfiles.apply("serving", 4)


def downgrade() -> None:
    # v3's statements come back for both functions, rerank's SET clauses included (v3 states them itself)
    sqlfiles.revert_partial("policies", 4)
    sqlfiles.revert_partial("serving", 4)
