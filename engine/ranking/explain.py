"""``pgrec explain USER ITEM``: the ranker's features for one (user, item) and what each contributed."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import psycopg

from engine.errors import NotFound
from engine.ranking import features
from engine.ranking.registry import LoadedModel
from engine.sql import query


@dataclass
class Contribution:
    name: str
    value: float | None
    contribution: float


@dataclass
class Explanation:
    user_id: str
    item_id: str
    model_version: int
    as_of: datetime | None
    sources: list[str]
    score: float
    base: float
    contributions: list[Contribution]  # largest absolute contribution first


def explain(conn: psycopg.Connection[Any], model: LoadedModel, user_id: str, item_id: str, *,
            as_of: datetime | None = None, surface: str = "default", n: int | None = None) -> Explanation:
    """Features of ``item_id`` for ``user_id`` (as of ``as_of``) and their SHAP contributions (pred_contrib).
    ``n``: the candidates ranked beside it, by default the serving count, as served lists are ranked."""
    if n is None:
        n = features.serving_count(conn)
    item = conn.execute(query("ranking.item_key"), {"item_id": item_id}).fetchone()
    if item is None:
        raise NotFound(f"unknown item {item_id!r}")
    user = conn.execute(query("ranking.user_key"), {"user_id": user_id}).fetchone()
    if user is None:
        raise NotFound(f"unknown user {user_id!r}")
    cf = features.for_user_key(conn, int(user[0]), surface=surface, n=n, as_of=as_of, item_keys=[int(item[0])])
    x = cf.matrix(model.features)
    contrib = np.asarray(model.booster.predict(x, pred_contrib=True))[0]
    values = x[0]
    rows = [Contribution(name, None if np.isnan(v) else float(v), float(c))
            for name, v, c in zip(model.features, values, contrib[:-1], strict=True)]
    rows.sort(key=lambda r: -abs(r.contribution))
    return Explanation(user_id, item_id, model.version, as_of, cf.sources[0], float(contrib.sum()),
                       float(contrib[-1]), rows)
