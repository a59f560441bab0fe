"""Learned item-item models stored as neighbour lists: ``pgrec train ease`` -> ``pgrec.model_neighbors``.

EASE (``engine/retrieval/ease.py``) fitted on every (user, item) with any event before ``as_of`` gives item-item
weights ``B``; a user's EASE score of item c is ``sum over the user's items h of B[h, c]``. Per item h the
``top_n`` items c with the largest positive ``B[h, c]`` are stored (model ``'ease'``, rank 1 = best), so the
ranker's feature ``f_ease_sum`` (``sql/features/v3.sql``) is one indexed range scan per history item.

EASE inverts an items x items matrix (time ~ items^3, memory ~ 8 bytes x items^2 several times), so it is fitted
over the ``max_items`` items with the most users only (default 5,000: ~1 GB peak, seconds on 2 cores); the other
items get no neighbours and are nobody's neighbour. Point in time: ``as_of`` fits on the events before it only
(an evaluation or ``pgrec train all`` rebuilds it as of each ranker cutoff, so no label window leaks in).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np
import psycopg

from engine.errors import InvalidRequest
from engine.retrieval import ease
from engine.sql import query

EASE = "ease"
Progress = Callable[[str, int, int], None]  # (stage, done, total)


@dataclass(frozen=True)
class EaseConfig:
    lam: float = 200.0        # L2 weight (the evaluation's EASE baseline uses the same)
    max_items: int = 5000     # fit over the items with the most users only (an items x items inverse)
    top_n: int = 50           # neighbours stored per item


@dataclass(frozen=True)
class EaseBuild:
    as_of: datetime
    users: int
    items: int
    rows: int
    seconds: float


def fit_neighbors(conn: psycopg.Connection[Any], as_of: datetime, config: EaseConfig,
                  progress: Progress | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """(item keys, neighbour indices into them, weights, users) of EASE on the events before ``as_of``."""
    from scipy import sparse

    if config.max_items < 2 or config.top_n < 1 or config.lam <= 0:
        raise InvalidRequest("ease: max_items must be >= 2, top_n >= 1 and lambda > 0")
    top = conn.execute(query("itemsim.item_users"), {"before": as_of, "max_items": config.max_items}).fetchall()
    keys = np.array([int(r[0]) for r in top], dtype=np.int64)
    if len(keys) < 2:
        return keys, np.zeros((len(keys), 0), dtype=np.int64), np.zeros((len(keys), 0)), 0
    rows = conn.execute(query("itemsim.interactions"), {"before": as_of, "items": keys.tolist()}).fetchall()
    if progress:
        progress("ease (fit, store)", 1, 4)
    arr = np.array(rows, dtype=np.int64).reshape(-1, 2)
    _, uidx = np.unique(arr[:, 0], return_inverse=True)
    col = {int(k): i for i, k in enumerate(keys)}
    iidx = np.array([col[int(k)] for k in arr[:, 1]], dtype=np.int64)
    n_users = int(uidx.max()) + 1 if len(uidx) else 0
    x = sparse.csr_matrix((np.ones(len(iidx)), (uidx, iidx)), shape=(n_users, len(keys)))
    gram = np.asarray((x.T @ x).todense(), dtype=np.float64)
    if progress:
        progress("ease (fit, store)", 2, 4)
    b = ease.fit_gram(gram, config.lam)
    del gram
    if progress:
        progress("ease (fit, store)", 3, 4)
    idx, w = ease.top_neighbors(b, config.top_n)
    return keys, idx, w, n_users


def build_ease(conn: psycopg.Connection[Any], *, as_of: datetime | None = None, config: EaseConfig | None = None,
               progress: Progress | None = None) -> EaseBuild:
    """Fit EASE on the events before ``as_of`` (default now) and replace the model's neighbour lists, in one
    transaction (readers see the old lists until it commits)."""
    t0 = time.perf_counter()
    config = config or EaseConfig()
    as_of = as_of or datetime.now(UTC)
    keys, idx, w, users = fit_neighbors(conn, as_of, config, progress)
    built = datetime.now(UTC)
    n = 0
    with conn.transaction():
        conn.execute(query("itemsim.clear"), {"model": EASE})
        with conn.cursor() as cur, cur.copy(query("itemsim.copy_neighbors")) as copy:
            for h in range(idx.shape[0]):
                rank = 0
                for j, s in zip(idx[h], w[h], strict=True):
                    if j < 0:
                        break
                    rank += 1
                    copy.write_row((EASE, int(keys[h]), rank, int(keys[j]), float(s), built))
                    n += 1
    if progress:
        progress("ease (fit, store)", 4, 4)
    return EaseBuild(as_of, users, len(keys), n, round(time.perf_counter() - t0, 2))
