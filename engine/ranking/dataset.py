"""Ranker training data, from the event log (replay) or from served lists (impressions). Same table shape.

Replay: at a cutoff, each user active in the window after it gets the candidates and features as of the cutoff
(only events before it), labelled by their events in ``[cutoff, cutoff + horizon)``. Impressions: each served
request is a group; the shown items get the feature rows they were ranked with (stored when the list was served)
or, for lists served without them, features recomputed as of the serving time, and labels from the engagement
that followed (by request id, or within an attribution window). One LightGBM query group per (user, cutoff) or
request.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import psycopg

from engine.experiments import CITATION_CLOCK_SLACK
from engine.ranking import features
from engine.sql import query

Progress = Callable[[str, int, int], None]  # (stage, done, total)

MAX_LABEL = 30  # lambdarank's default label_gain has 31 entries


def grade(weight: float | None, negative: bool) -> int:
    """Graded relevance of one (user, item): 0 without a positive event or with any negative one, else
    ceil(log2(1 + the largest positive weight)), so view 1 < click 2 = rating 2 < like 3 = purchase 4 ..."""
    if negative or weight is None or weight <= 0:
        return 0
    return int(min(MAX_LABEL, max(1, math.ceil(math.log2(1.0 + float(weight))))))


@dataclass
class TrainingSet:
    """Rows grouped by query; ``group`` holds the group sizes in row order (LightGBM's layout)."""

    names: list[str]
    x: np.ndarray
    y: np.ndarray
    group: list[int] = field(default_factory=list)
    queries: list[tuple[int, datetime]] = field(default_factory=list)  # (user_key, as_of) per group
    item_keys: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=np.int64))
    position: np.ndarray | None = None  # impressions: the position each row was shown at (1-based)
    logged_groups: int = 0  # impressions: groups whose rows are the stored served ones (the rest recomputed)

    @property
    def rows(self) -> int:
        return int(self.x.shape[0])

    @staticmethod
    def empty(names: Sequence[str]) -> TrainingSet:
        return TrainingSet(list(names), np.zeros((0, len(names))), np.zeros(0, dtype=np.int32))

    def extend(self, other: TrainingSet) -> TrainingSet:
        if not self.rows:
            return other
        if not other.rows:
            return self
        if other.names != self.names:
            raise ValueError("training sets with different feature lists cannot be joined")
        pos = None
        if self.position is not None and other.position is not None:
            pos = np.concatenate([self.position, other.position])
        return TrainingSet(self.names, np.vstack([self.x, other.x]), np.concatenate([self.y, other.y]),
                           self.group + other.group, self.queries + other.queries,
                           np.concatenate([self.item_keys, other.item_keys]), pos,
                           self.logged_groups + other.logged_groups)


def _labels(conn: psycopg.Connection[Any], start: datetime, end: datetime) -> dict[int, dict[int, int]]:
    out: dict[int, dict[int, int]] = {}
    for u, i, w, neg in conn.execute(query("ranking.window_labels"), {"start": start, "end": end}).fetchall():
        out.setdefault(int(u), {})[int(i)] = grade(w, bool(neg))
    return out


def _seen(conn: psycopg.Connection[Any], users: Sequence[int], before: datetime) -> dict[int, set[int]]:
    rows = conn.execute(query("ranking.items_before"), {"users": list(users), "before": before}).fetchall()
    return {int(u): {int(i) for i in items} for u, items in rows}


def replay(conn: psycopg.Connection[Any], cutoff: datetime, horizon: timedelta | None = None, *,
           end: datetime | None = None, n: int = 200,
           surface: str = "default", max_users: int | None = 2000, seed: int = 42, batch: int = 50,
           keep_seen: bool = False, progress: Progress | None = None) -> TrainingSet:
    """Groups for the users with a positive event in ``[cutoff, end)`` (``end`` = cutoff + horizon if not given).

    Candidates the user had any event with before the cutoff are dropped (the policy stage excludes them at
    serving) unless ``keep_seen``; groups without a relevant candidate are dropped (no ranking signal).
    """
    if end is None:
        if horizon is None:
            raise ValueError("replay needs a horizon or an end")
        end = cutoff + horizon
    labels = _labels(conn, cutoff, end)
    users = sorted(u for u, items in labels.items() if any(g > 0 for g in items.values()))
    if max_users is not None and len(users) > max_users:
        users = sorted(random.Random(seed).sample(users, max_users))
    seen = {} if keep_seen else _seen(conn, users, cutoff)
    out: TrainingSet | None = None
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    group: list[int] = []
    queries: list[tuple[int, datetime]] = []
    names: list[str] = []
    for start in range(0, len(users), batch):
        chunk = users[start:start + batch]
        for u, cf in features.for_user_keys(conn, chunk, surface=surface, n=n, as_of=cutoff).items():
            names = cf.names
            if not len(cf):
                continue
            keep = np.array([int(k) not in seen.get(u, ()) for k in cf.item_keys], dtype=bool)
            y = np.array([labels[u].get(int(k), 0) for k in cf.item_keys], dtype=np.int32)[keep]
            if not y.any():
                continue
            xs.append(cf.values[keep])
            ys.append(y)
            keys.append(cf.item_keys[keep])
            group.append(int(keep.sum()))
            queries.append((u, cutoff))
        if progress:
            progress(f"replay {cutoff:%Y-%m-%d}", min(start + batch, len(users)), len(users))
    if not group:
        return TrainingSet.empty(names)
    out = TrainingSet(names, np.vstack(xs), np.concatenate(ys), group, queries, np.concatenate(keys))
    return out


def _stored_rows(names: Sequence[str], shown: Sequence[int], stored_names: Sequence[str],
                 stored_items: Sequence[int], stored: Any) -> tuple[np.ndarray, list[int]] | None:
    """The stored rows of the shown items, columns as ``names`` (NULL and NaN: missing), NaN rows for the shown
    items without one (a policy added them from outside the candidates) and those items; None when the stored
    list lacks one of ``names``."""
    col = {n: j for j, n in enumerate(stored_names)}
    if any(n not in col for n in names):
        return None
    x = np.array(stored, dtype=np.float64).reshape(len(stored_items), len(stored_names))  # None -> NaN
    row = {int(k): i for i, k in enumerate(stored_items)}
    out = np.full((len(shown), len(names)), np.nan)
    have = [i for i, k in enumerate(shown) if int(k) in row]
    out[have] = x[np.ix_([row[int(shown[i])] for i in have], [col[n] for n in names])]
    return out, [int(k) for k in shown if int(k) not in row]


def from_impressions(conn: psycopg.Connection[Any], since: datetime, until: datetime, *,
                     window: timedelta = timedelta(days=1), n: int = 200, label_until: datetime | None = None,
                     use_logged: bool = True, batch: int = 500, progress: Progress | None = None) -> TrainingSet:
    """Groups from the lists served in ``[since, until)`` that have a relevant item: shown items, labels from the
    engagement that followed (before ``label_until``, default ``until`` plus the attribution window; an event
    without a request id counts for the latest list that showed its item). Features: the rows each list was
    ranked with, stored when it was served (``pgrec.served_features``, read for the labelled lists only), when
    they cover every feature (and ``use_logged``; a shown item without a row, one a policy added from outside
    the candidates, gets its features recomputed); else recomputed as of the serving time (or of a label event
    stamped within the clock slack before it: no label event among the features) at ``n`` candidates (the
    serving count), from the event log with the stage-1 models stored now (item vectors, co-occurrence, EASE):
    a model rebuilt after the clicks has seen them, so such rows are not exactly those the list was ranked with
    (docs/ranking.md). ``logged_groups`` counts the groups of stored rows. ``position`` is kept beside the rows
    (not as a feature) for LightGBM's position-bias correction, so it cannot leak into serving."""
    params = {"since": since, "until": until}
    labels: dict[Any, dict[int, int]] = {}
    for rid, item, w, neg in conn.execute(query("ranking.impression_labels"), {
            **params, "window": window, "slack": CITATION_CLOCK_SLACK,
            "label_until": label_until if label_until is not None else until + window}).fetchall():
        labels.setdefault(rid, {})[int(item)] = grade(w, bool(neg))
    relevant = [rid for rid, items in labels.items() if any(items.values())]  # no relevant item: no signal
    requests = conn.execute(query("ranking.impression_requests"),
                            {**params, "slack": CITATION_CLOCK_SLACK, "request_ids": relevant}).fetchall()
    names = features.current_names(conn)
    xs: list[np.ndarray] = []
    ys: list[np.ndarray] = []
    ps: list[np.ndarray] = []
    keys: list[np.ndarray] = []
    group: list[int] = []
    queries: list[tuple[int, datetime]] = []
    logged_groups = 0

    def add(x: np.ndarray, y: np.ndarray, pos: np.ndarray, items: np.ndarray, user_key: int, at: datetime) -> None:
        xs.append(x)
        ys.append(y)
        ps.append(pos)
        keys.append(items)
        group.append(len(items))
        queries.append((int(user_key), at))

    for start in range(0, len(requests), batch):
        chunk = requests[start:start + batch]
        stored: dict[Any, tuple[Any, Any, Any]] = {}
        if use_logged and (want := [(r[1], r[0]) for r in chunk if r[7]]):
            for rid, snames, sitems, rows in conn.execute(query("ranking.served_rows"), {
                    "user_keys": [u for u, _ in want], "request_ids": [q for _, q in want]}).fetchall():
                stored[rid] = (snames, sitems, rows)
        for rid, user_key, surface, served_at, features_at, item_keys, positions, _ in chunk:
            y_of = labels[rid]
            got = _stored_rows(names, item_keys, *stored[rid]) if rid in stored else None
            if got is not None:
                x, missing = got
                if missing:  # shown items that were not candidates: recomputed as of the serving time
                    cf = features.for_user_key(conn, user_key, surface=surface, n=n, as_of=features_at,
                                               item_keys=missing)
                    at, fx = {int(k): i for i, k in enumerate(cf.item_keys)}, cf.matrix(names)
                    for i, k in enumerate(item_keys):
                        if int(k) in at:
                            x[i] = fx[at[int(k)]]
                add(x, np.array([y_of.get(int(k), 0) for k in item_keys], dtype=np.int32),
                    np.array(positions, dtype=np.int32), np.array(item_keys, dtype=np.int64), user_key, served_at)
                logged_groups += 1
                continue
            cf = features.for_user_key(conn, user_key, surface=surface, n=n, as_of=features_at, item_keys=item_keys)
            pos_of = {int(k): int(p) for k, p in zip(item_keys, positions, strict=True)}
            y = np.array([y_of.get(int(k), 0) for k in cf.item_keys], dtype=np.int32)
            if len(cf) and y.any():
                add(cf.matrix(names), y, np.array([pos_of[int(k)] for k in cf.item_keys], dtype=np.int32),
                    cf.item_keys, user_key, features_at)
        if progress:
            progress("impressions", min(start + batch, len(requests)), len(requests))
    if not group:
        return TrainingSet.empty(names)
    return TrainingSet(names, np.vstack(xs), np.concatenate(ys), group, queries, np.concatenate(keys),
                       np.concatenate(ps), logged_groups)
