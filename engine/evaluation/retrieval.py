"""Offline evaluation of the retrieval model on a temporal split, beside popularity and EASE.

The two-tower model trains on the events before the cutoff only. Its item vectors go into a private temporary
table with its own HNSW index (the served vectors are not touched); each test user's vector is the contract's
formula over their history before the cutoff, and their top k come from the index through SQL with the items
they have seen excluded. The exact top k (numpy dot over all items) is reported beside it, so the index's own
loss is visible. Items created after the cutoff are cold: they have no events in training and are embedded by
their features alone.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
import psycopg

from engine.evaluation.metrics import evaluate
from engine.evaluation.split import Split, temporal_split
from engine.retrieval import ease
from engine.retrieval.data import Positives, RetrievalData, load
from engine.retrieval.store import check_dimension
from engine.retrieval.train import BatchHook, EpochHook, RetrievalConfig, TrainResult, top_k, train
from engine.sql import query


@dataclass
class RetrievalReport:
    cutoff: datetime
    users: int
    ks: tuple[int, ...]
    rows: dict[str, dict[str, float]] = field(default_factory=dict)   # method -> recall@k
    cold: dict[str, Any] = field(default_factory=dict)
    ease_lambda: float | None = None
    train: dict[str, Any] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def _seen_pairs(users: np.ndarray, data: RetrievalData, split: Split,
                index: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    rows, items = [], []
    for r, u in enumerate(data.user_keys[users].tolist()):
        cols = [index[k] for k in split.seen.get(u, ()) if k in index]
        rows += [r] * len(cols)
        items += cols
    return np.asarray(rows, dtype=np.int64), np.asarray(items, dtype=np.int64)


def ann_lists(conn: psycopg.Connection[Any], item_keys: np.ndarray, vectors: np.ndarray,
              queries: dict[int, np.ndarray], seen: dict[int, list[int]], k: int) -> dict[int, list[int]]:
    """Top k item keys per user through an HNSW index on a private temporary copy of ``vectors``."""
    out: dict[int, list[int]] = {}
    try:
        conn.execute(query("retrieval.create_eval_index"))
        with conn.cursor() as cur, cur.copy(
                "COPY retrieval_eval_items (item_key, embedding, model_version) FROM STDIN") as copy:
            for key, v in zip(item_keys.tolist(), vectors, strict=True):
                copy.write_row((key, "[" + ",".join(repr(float(x)) for x in v) + "]", "eval"))
        conn.execute(query("retrieval.build_eval_index"))
        conn.execute("ANALYZE retrieval_eval_items")
        ef = conn.execute("SELECT current_setting('hnsw.ef_search')").fetchone()
        conn.execute(f"SET hnsw.ef_search = {max(int(k), 40) * 2}")
        for user, q in queries.items():
            qv = "[" + ",".join(repr(float(x)) for x in q) + "]"
            rows = conn.execute(query("retrieval.eval_ann"),
                                {"q": qv, "seen": list(seen.get(user, ())), "k": k}).fetchall()
            out[user] = [int(r[0]) for r in rows]
        if ef is not None:
            conn.execute(f"SET hnsw.ef_search = {int(ef[0])}")
    finally:
        conn.execute(query("retrieval.drop_eval_index"))
    return out


def evaluate_retrieval(conn: psycopg.Connection[Any], cutoff: datetime, config: RetrievalConfig | None = None,
                       *, ks: Sequence[int] = (50, 100, 200), ease_lambdas: Sequence[float] = (100, 300, 1000),
                       use_ann: bool = True, on_batch: BatchHook | None = None,
                       on_epoch: EpochHook | None = None) -> RetrievalReport:
    """Train on the past of ``cutoff``; recall@k of ann (HNSW), exact two-tower, popularity and EASE."""
    cfg = config or RetrievalConfig()
    if use_ann:
        check_dimension(conn, cfg.dim)
    kmax = max(ks)
    t0 = time.perf_counter()
    split = temporal_split(conn, cutoff, require_history=True)
    data = load(conn, cutoff, properties=cfg.properties)
    report = RetrievalReport(cutoff, len(split.truth), tuple(ks))
    result: TrainResult = train(data, cfg, on_batch=on_batch, on_epoch=on_epoch)
    report.train = result.metrics()
    report.seconds["train"] = time.perf_counter() - t0
    index = {int(k): i for i, k in enumerate(data.item_keys.tolist())}

    # test users with a positive history: their vectors at the cutoff
    pos = Positives.of(data)
    test_users = np.array(sorted(index_u for u in split.truth
                                 if (index_u := _user_index(data, u)) is not None), dtype=np.int64)
    starts = np.searchsorted(pos.user, test_users, side="left")
    ends = np.searchsorted(pos.user, test_users, side="right")
    has = ends > starts
    test_users, starts, ends = test_users[has], starts[has], ends[has]
    hi, hw = pos.histories(ends, starts, data.max_events, data.half_life_days)
    seen_rows, seen_items = _seen_pairs(test_users, data, split, index)
    V = result.model.item_vectors().astype(np.float32)
    C = result.model.context_vectors().astype(np.float32).astype(np.float64)
    t1 = time.perf_counter()
    # the user tower's property part, as stored (float32)
    feats = result.model.user_feature_sum(test_users)
    feats = None if feats is None else feats.astype(np.float32).astype(np.float64)
    exact = top_k(V.astype(np.float64), C, hi, hw, seen_rows, seen_items, kmax, features=feats)
    keys = data.user_keys[test_users].tolist()
    lists: dict[str, dict[int, list[int]]] = {
        "two-tower (exact)": {u: data.item_keys[exact[r]].tolist() for r, u in enumerate(keys)}}
    if use_ann:
        from engine.retrieval.model import user_vectors

        U = user_vectors(C, hi, hw, feats)
        seen = {u: sorted(split.seen.get(u, ())) for u in keys}
        lists["two-tower (ann, HNSW)"] = ann_lists(conn, data.item_keys, V, dict(zip(keys, U, strict=True)),
                                                   seen, kmax)
    report.seconds["two-tower lists"] = time.perf_counter() - t1

    # popularity: positive events before the cutoff
    all_users = sorted(split.truth)
    counts = np.bincount(data.ev_item[data.ev_polarity == 1], minlength=data.n_items)
    ranked = data.item_keys[np.argsort(-counts, kind="stable")].tolist()
    lists["popularity"] = {}
    for u in all_users:
        s = split.seen.get(u, set())
        lists["popularity"][u] = [i for i in ranked[: kmax + len(s)] if i not in s][:kmax]

    # EASE on the users' positive items before the cutoff; lambda picked on this split (optimistic for EASE)
    t2 = time.perf_counter()
    posmask = data.ev_polarity == 1
    active = np.unique(data.ev_item[posmask])
    col = np.full(data.n_items, -1, dtype=np.int64)
    col[active] = np.arange(len(active))
    X = ease.interactions(data.ev_user[posmask], col[data.ev_item[posmask]], data.n_users, len(active))
    urows = np.array([r for u in all_users if (r := _user_index(data, u)) is not None], dtype=np.int64)
    ukeys = data.user_keys[urows].tolist()
    ex = np.zeros((len(urows), len(active)), dtype=bool)
    for r, u in enumerate(ukeys):
        cols = [c for k in split.seen.get(u, ()) if (c := col[index[k]]) >= 0] if u in split.seen else []
        ex[r, cols] = True
    best: tuple[float, float, dict[int, list[int]]] | None = None
    for lam in ease_lambdas:
        B = ease.fit(X, float(lam))
        top = ease.recommend(B, X[urows], kmax, ex)
        cand = {u: data.item_keys[active[top[r]]].tolist() for r, u in enumerate(ukeys)}
        score = evaluate(cand, split, (100,), metrics=("recall",))["recall@100"]
        if best is None or score > best[0]:
            best = (score, float(lam), cand)
    if best is not None:
        report.ease_lambda = best[1]
        lists[f"EASE (lambda {best[1]:g})"] = best[2]
    report.seconds["ease"] = time.perf_counter() - t2

    for name, per_user in lists.items():
        m = evaluate(per_user, split, ks, metrics=("recall",))
        report.rows[name] = {f"recall@{k}": m[f"recall@{k}"] for k in ks}

    # cold items: created at or after the cutoff
    cold = set(data.item_keys[data.item_created >= cutoff.timestamp()].tolist())
    cold_truth = [(u, i) for u, items in split.truth.items() for i in items if i in cold]
    report.cold = {"items": len(cold), "truth_pairs": len(cold_truth)}
    for name, per_user in lists.items():
        if name.startswith("two-tower"):
            reached = {i for items in per_user.values() for i in items[:kmax] if i in cold}
            found = sum(1 for u, i in cold_truth if i in per_user.get(u, [])[:kmax])
            report.cold[f"{name}: cold items in some top-{kmax}"] = len(reached)
            report.cold[f"{name}: recall@{kmax} of cold truth"] = found / len(cold_truth) if cold_truth else 0.0
    return report


def _user_index(data: RetrievalData, user_key: int) -> int | None:
    pos = int(np.searchsorted(data.user_keys, user_key))
    if pos < data.n_users and int(data.user_keys[pos]) == user_key:
        return pos
    return None
