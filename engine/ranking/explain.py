"""``pgrec explain USER ITEM``: the ranker's features for one (user, item) and what each contributed; ``pgrec explain
--request RID ITEM``: the same for an item of a served list, with the feature row it was ranked with."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any
from uuid import UUID

import numpy as np
import psycopg

from engine.errors import InvalidRequest, NotFound
from engine.experiments import CITATION_CLOCK_SLACK
from engine.ranking import features
from engine.ranking.registry import LoadedModel, load
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
    # a served item: the request, its position and served score, and whether the features are the stored row
    # it was ranked with (else recomputed as training recomputes them, as of ``as_of``)
    request_id: UUID | None = None
    position: int | None = None
    served_score: float | None = None
    stored_features: bool | None = None


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
    return _explained(model, cf.matrix(model.features)[0], user_id, item_id, as_of, cf.sources[0])


def explain_served(conn: psycopg.Connection[Any], request_id: UUID, item_id: str) -> Explanation:
    """Why ``item_id`` stood where it did in the served list ``request_id``: the ranker version that served it,
    with the feature row the list was ranked with (stored when it was served) or, for a list without one,
    features recomputed as training recomputes them: as of the serving time or of a citing event stamped within
    the clock slack before it, at the serving count of candidates."""
    item = conn.execute(query("ranking.item_key"), {"item_id": item_id}).fetchone()
    if item is None:
        raise NotFound(f"unknown item {item_id!r}")
    row = conn.execute(query("ranking.served_item"), {"request_id": request_id, "item_key": int(item[0]),
                                                      "slack": CITATION_CLOCK_SLACK}).fetchone()
    if row is None:
        raise NotFound(f"request {request_id} did not show item {item_id!r} (or there is no such request)")
    user_id, user_key, surface, served_at, position, served_score, version, names, stored, features_at, sources = row
    if version is None:
        raise InvalidRequest(f"request {request_id} was ranked without a ranker (pgrec.fallback_score): "
                             "there are no features to explain")
    model = load(conn, int(version))
    as_of = served_at
    if stored is not None and names is not None and all(f in names for f in model.features):
        values = np.array(stored, dtype=np.float64).reshape(-1)  # a 1 x 1 x F slice; None -> NaN
        x = values[[list(names).index(f) for f in model.features]]
    else:
        # as training recomputes a list without stored rows: as of the serving time or an earlier-stamped
        # citing event (the label is never among the features)
        cf = features.for_user_key(conn, int(user_key), surface=surface, n=features.serving_count(conn),
                                   as_of=features_at, item_keys=[int(item[0])])
        x, stored, as_of = cf.matrix(model.features)[0], None, features_at
    ex = _explained(model, x, user_id, item_id, as_of, list(sources or ()))
    ex.request_id, ex.position, ex.served_score = request_id, int(position), served_score
    ex.stored_features = stored is not None
    return ex


def _explained(model: LoadedModel, x: np.ndarray, user_id: str, item_id: str, as_of: datetime | None,
               sources: list[str]) -> Explanation:
    contrib = np.asarray(model.booster.predict(x.reshape(1, -1), pred_contrib=True))[0]
    rows = [Contribution(name, None if np.isnan(v) else float(v), float(c))
            for name, v, c in zip(model.features, x, contrib[:-1], strict=True)]
    rows.sort(key=lambda r: -abs(r.contribution))
    return Explanation(user_id, item_id, model.version, as_of, sources, float(contrib.sum()), float(contrib[-1]),
                       rows)
