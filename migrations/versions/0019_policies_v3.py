"""policies v3: pgrec.rerank with the same answers as v2 for less work per request

Stage 3's goal is re-ranking 500 scored candidates to 10 with 10 active policies in 2 ms; v2 took 3.2-4.3 ms
of server time (``pgrec bench policies``). v3 (``sql/policies/v3.sql``) redefines only the functions that change
(the rest stays v2's), with the same answers: items, scores, reasons, dropped counts, skipped policies and debug
snapshots (``tests/test_policies.py::test_v3_engine_answers_as_v2``).

- The leading filters (every row and history filter before the first other step; all of them in the usual
  kind order) see the whole list as rows 1..n and mark the rows they drop in one flag per row: no index lists
  to collect, de-duplicate and cut; each filter tests only the rows no earlier filter dropped, and the list is
  rebuilt once from the flags (``array_positions``).
- The history filters read the user's events with the row of each (``pgrec.policy_history_rows``): the rows to
  drop come from the events, without a pass over the list.
- Cheaper passes: arrays unnested in the select list (no tuplestore) for the input and the hot loops; a
  predicate resolves only the values its condition uses; boost, attribute_filter and exploration find the
  matching positions with ``array_positions`` instead of a second pass; MMR, diversity and policy_order drop
  per-call sorts (plain aggregates over ordered input, a running sum in plpgsql, unordered value codes).
- ``pgrec.policy_seq(lo, hi)`` replaces ``ARRAY(SELECT generate_series(lo, hi))`` on the request path: plpgsql
  planned those statements again on every call (the custom plan always looked cheaper than the generic one).
- ``pgrec.rerank`` states its settings (``max_parallel_workers_per_gather = 0``, ``plan_cache_mode = auto``) in
  its definition; the downgrade pins them again on v2's function, as 0010 did.

Measured with ``pgrec bench policies --runs 300`` and a copy of ``pgrec.rerank`` timing its parts (v2 and v3
alternating in one session): about a fifth less server time per call; the goal (p50 <= 2 ms) is still not met,
see docs/policies.md "Speed" and docs/benchmarks.md.

Revision ID: 0019
Revises: 0018
"""

from __future__ import annotations

import sqlfiles
from alembic import op

revision = "0019"
down_revision = "0018"
branch_labels = None
depends_on = None


def upgrade() -> None:
    sqlfiles.apply("policies", 3)


RERANK = "pgrec.rerank(bigint, text, integer, bigint[], float8[], text[], jsonb, timestamptz, text)"


def downgrade() -> None:
    # the new pgrec.policy_history_rows is dropped; the redefined functions get v2's statements back. v3 states
    # rerank's settings in its definition; v2's carries none, so they are pinned again as 0010 left them
    sqlfiles.revert_partial("policies", 3)
    for setting in ("max_parallel_workers_per_gather = 0", "plan_cache_mode = auto"):
        op.get_bind().exec_driver_sql(f"ALTER FUNCTION {RERANK} SET {setting}")
