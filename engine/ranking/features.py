"""Stage 2 features: the rows of ``pgrec.candidate_features`` as arrays.

The feature list is defined once, in ``sql/features/v1.sql``: every ``f_*`` column of the result, in order.
Training and serving both read features through this module, so the two never drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import psycopg

from engine.errors import InvalidRequest
from engine.sql import query

FEATURE_PREFIX = "f_"
CANDIDATE_COLUMNS = ("item_key", "item_id", "sources")


@dataclass
class CandidateFeatures:
    """One user's candidates: keys, ids, sources, and a float matrix of features (NaN = missing)."""

    user_key: int | None
    as_of: datetime | None
    item_keys: np.ndarray
    item_ids: list[str]
    sources: list[list[str]]
    names: list[str]
    values: np.ndarray

    def __len__(self) -> int:
        return len(self.item_ids)

    def column(self, name: str) -> np.ndarray:
        return self.values[:, self.names.index(name)]

    def matrix(self, names: Sequence[str]) -> np.ndarray:
        """The values in the column order of ``names`` (a model's feature list); a missing name is an error."""
        if list(names) == self.names:
            return self.values
        missing = [n for n in names if n not in self.names]
        if missing:
            raise InvalidRequest(f"the model needs features the database does not compute: {missing}")
        idx = [self.names.index(n) for n in names]
        return self.values[:, idx]


def serving_count(conn: psycopg.Connection[Any]) -> int:
    """How many candidates a served list ranks (config ``serving_candidates``): what training, explanations and
    the demo rank too, so their features are the served ones."""
    row = conn.execute(query("serving.serving_count")).fetchone()
    return int(row[0]) if row else 200


def current_names(conn: psycopg.Connection[Any]) -> list[str]:
    """The features the database computes now (the ``f_*`` columns of ``pgrec.candidate_feature_row``), in order,
    read from the row type without computing any."""
    return feature_names(conn.execute(query("ranking.feature_columns")).description or ())


def feature_names(description: Sequence[Any]) -> list[str]:
    """The feature columns of a result (``cursor.description``), in order."""
    return [c.name for c in description if c.name.startswith(FEATURE_PREFIX)]


def _frame(user_key: int | None, as_of: datetime | None, rows: Sequence[Sequence[Any]],
           description: Sequence[Any]) -> CandidateFeatures:
    cols = [c.name for c in description]
    names = feature_names(description)
    fidx = [cols.index(n) for n in names]
    ki, ii, si = (cols.index(c) for c in CANDIDATE_COLUMNS)
    values = np.array([[r[i] for i in fidx] for r in rows], dtype=np.float64).reshape(len(rows), len(names))
    return CandidateFeatures(
        user_key=user_key,
        as_of=as_of,
        item_keys=np.array([r[ki] for r in rows], dtype=np.int64),
        item_ids=[r[ii] for r in rows],
        sources=[list(r[si] or ()) for r in rows],
        names=names,
        values=values,
    )


def _check(n: int) -> None:
    if n < 1:
        raise InvalidRequest(f"n must be >= 1, got {n}")


def for_user(conn: psycopg.Connection[Any], user_id: str, *, surface: str = "default", n: int = 500,
             as_of: datetime | None = None) -> CandidateFeatures:
    """Candidates and features of a user id (unknown = cold user), as of ``as_of`` (None = now)."""
    _check(n)
    cur = conn.execute(query("ranking.features_for_user"),
                       {"user_id": user_id, "surface": surface, "n": n, "as_of": as_of})
    rows = cur.fetchall()
    key = conn.execute(query("ranking.user_key"), {"user_id": user_id}).fetchone() if rows else None
    return _frame(key[0] if key else None, as_of, rows, cur.description or ())


def for_user_key(conn: psycopg.Connection[Any], user_key: int | None, *, surface: str = "default", n: int = 500,
                 as_of: datetime | None = None, item_keys: Sequence[int] | None = None) -> CandidateFeatures:
    """By internal key. With ``item_keys``: exactly those items (candidate columns NULL where not candidates)."""
    _check(n)
    cur = conn.execute(query("ranking.features_for_key"),
                       {"user_key": user_key, "surface": surface, "n": n, "as_of": as_of,
                        "item_keys": list(item_keys) if item_keys is not None else None})
    return _frame(user_key, as_of, cur.fetchall(), cur.description or ())


def for_user_keys(conn: psycopg.Connection[Any], user_keys: Sequence[int], *, surface: str = "default",
                  n: int = 500, as_of: datetime | None = None) -> dict[int, CandidateFeatures]:
    """Many users at one ``as_of`` in one statement (batch replay and evaluation)."""
    _check(n)
    if not user_keys:
        return {}
    cur = conn.execute(query("ranking.features_for_keys"),
                       {"user_keys": list(user_keys), "surface": surface, "n": n, "as_of": as_of})
    rows = cur.fetchall()
    desc = cur.description or ()
    by_user: dict[int, list[Any]] = {int(u): [] for u in user_keys}
    for r in rows:
        by_user[int(r[0])].append(r)
    return {u: _frame(u, as_of, rs, desc) for u, rs in by_user.items()}
