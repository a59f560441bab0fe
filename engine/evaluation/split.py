"""Temporal splits: train on the past, test on the future, never a random split."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import psycopg

from engine.errors import InvalidRequest
from engine.sql import query


@dataclass
class Split:
    """Ground truth for users active after ``cutoff``.

    ``truth[user_key]``: positive items in [cutoff, end) that the user had no event with before the cutoff.
    ``seen[user_key]``: every item the user had an event with before the cutoff (to exclude from lists).
    """

    cutoff: datetime
    end: datetime | None
    truth: dict[int, set[int]]
    seen: dict[int, set[int]] = field(default_factory=dict)

    @property
    def users(self) -> list[int]:
        return sorted(self.truth)


def resolve_cutoff(conn: psycopg.Connection[Any], split_at: datetime | None = None,
                   split_fraction: float | None = None) -> datetime:
    """The split time: given, or the time below which ``split_fraction`` of the events lie (default 0.9)."""
    if split_at is not None:
        return split_at
    fraction = 0.9 if split_fraction is None else split_fraction
    if not 0.0 < fraction < 1.0:
        raise InvalidRequest(f"split_fraction must be between 0 and 1, got {fraction}")
    row = conn.execute(query("evaluation.cutoff_at_fraction"), {"fraction": fraction}).fetchone()
    if row is None or row[0] is None:
        raise InvalidRequest("there are no events to split")
    cutoff: datetime = row[0]
    return cutoff


def temporal_split(conn: psycopg.Connection[Any], cutoff: datetime, *, horizon: timedelta | None = None,
                   require_history: bool = False) -> Split:
    """Truth and seen sets for the users with new positive items after ``cutoff`` (within ``horizon``).

    ``require_history`` keeps only users with at least one event before the cutoff.
    """
    end = cutoff + horizon if horizon is not None else None
    truth = {int(u): {int(i) for i in items}
             for u, items in conn.execute(query("evaluation.future_positives"),
                                          {"cutoff": cutoff, "end": end}).fetchall()}
    seen = {int(u): {int(i) for i in items}
            for u, items in conn.execute(query("evaluation.past_items"),
                                         {"cutoff": cutoff, "users": list(truth)}).fetchall()}
    if require_history:
        truth = {u: t for u, t in truth.items() if u in seen}
    return Split(cutoff, end, truth, seen)
