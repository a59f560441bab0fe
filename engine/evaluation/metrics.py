"""Ranking metrics over per-user lists. Lists are best first; ``truth`` are the relevant items."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence

import numpy as np

from engine.evaluation.split import Split


def recall_at_k(ranked: Sequence[int], truth: set[int], k: int) -> float:
    """Share of the relevant items found in the top k (denominator min(k, |truth|), as is usual for top-k)."""
    if not truth:
        return 0.0
    hits = sum(1 for i in ranked[:k] if i in truth)
    return hits / min(k, len(truth))


def full_recall_at_k(ranked: Sequence[int], truth: set[int], k: int) -> float:
    """Share of all relevant items found in the top k (denominator |truth|): the recall of a candidate set."""
    if not truth:
        return 0.0
    return sum(1 for i in ranked[:k] if i in truth) / len(truth)


def precision_at_k(ranked: Sequence[int], truth: set[int], k: int) -> float:
    return sum(1 for i in ranked[:k] if i in truth) / k if k else 0.0


def ndcg_at_k(ranked: Sequence[int], truth: set[int], k: int) -> float:
    """Binary-relevance NDCG@k."""
    if not truth:
        return 0.0
    dcg = sum(1.0 / math.log2(pos + 2) for pos, i in enumerate(ranked[:k]) if i in truth)
    ideal = sum(1.0 / math.log2(pos + 2) for pos in range(min(k, len(truth))))
    return dcg / ideal


def map_at_k(ranked: Sequence[int], truth: set[int], k: int) -> float:
    """Mean average precision at k (denominator min(k, |truth|))."""
    if not truth:
        return 0.0
    hits, total = 0, 0.0
    for pos, i in enumerate(ranked[:k]):
        if i in truth:
            hits += 1
            total += hits / (pos + 1)
    return total / min(k, len(truth))


METRICS: dict[str, Callable[[Sequence[int], set[int], int], float]] = {
    "ndcg": ndcg_at_k,
    "recall": recall_at_k,
    "map": map_at_k,
    "precision": precision_at_k,
}


def evaluate(lists: Mapping[int, Sequence[int]], split: Split, ks: Iterable[int] = (10, 50),
             metrics: Iterable[str] = ("ndcg", "recall", "map")) -> dict[str, float]:
    """Mean of each metric@k over the users of the split (a user without a list scores 0)."""
    users = split.users
    out: dict[str, float] = {}
    for name in metrics:
        fn = METRICS[name]
        for k in ks:
            vals = [fn(lists.get(u, ()), split.truth[u], k) for u in users]
            out[f"{name}@{k}"] = float(np.mean(vals)) if vals else 0.0
    out["users"] = float(len(users))
    return out


def coverage(lists: Mapping[int, Sequence[int]], n_items: int, k: int = 10) -> float:
    """Share of the catalog that appears in at least one top-k list."""
    if n_items <= 0:
        return 0.0
    shown = {i for items in lists.values() for i in items[:k]}
    return len(shown) / n_items


def intra_list_diversity(lists: Mapping[int, Sequence[int]], categories: Mapping[int, Sequence[str]],
                         k: int = 10) -> float:
    """Mean pairwise category dissimilarity (1 - Jaccard) within each top-k list, averaged over lists."""
    scores = []
    for items in lists.values():
        top = [set(categories.get(i, ())) for i in items[:k]]
        if len(top) < 2:
            continue
        total, pairs = 0.0, 0
        for a in range(len(top)):
            for b in range(a + 1, len(top)):
                union = top[a] | top[b]
                total += 1.0 - (len(top[a] & top[b]) / len(union) if union else 1.0)
                pairs += 1
        scores.append(total / pairs)
    return float(np.mean(scores)) if scores else 0.0
