"""``pgrec eval``: the full funnel (candidates -> features -> ranker) beside simple baselines, on a temporal split.

Everything is trained on the past only: co-occurrence, the EASE neighbours and the retrieval model as of each
ranker cutoff and
again as of the split; the ranker on cutoffs before the split (its last label window ends at the split). Then,
for the users with new positive items after the split, each method's list (seen items excluded) is scored:
NDCG@10, Recall@10/50, MAP@10, catalog coverage and intra-list diversity of the top 10.

Methods: the funnel; popularity (positive events before the split); EASE (on the events before the split,
popularity for users without any); each candidate source alone, ordered by its own score, over the same
candidate rows the funnel sees.

The evaluation retrains the co-occurrence table, the EASE neighbours and the item vectors of the database it
runs on (as of the split): run it on a copy, or retrain afterwards (``pgrec train all``).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timedelta
from typing import Any

import numpy as np
import psycopg

from engine.errors import InvalidRequest
from engine.evaluation import metrics as m
from engine.evaluation.split import Split, resolve_cutoff, temporal_split
from engine.ranking import features
from engine.ranking.features import CandidateFeatures
from engine.ranking.train import RankerConfig, TrainedRanker, plan_windows, train_ranker
from engine.sql import query

Progress = Callable[[str, int, int], None]
SOURCES = ("ann", "history", "trending", "fresh", "popular")


@dataclass(frozen=True)
class EvalConfig:
    """What ``pgrec eval`` does; every field has the CLI's default."""

    split_at: datetime | None = None
    split_fraction: float | None = None        # None and no split_at: 0.9 of the events lie before the split
    horizon_days: float | None = None          # test window after the split (None: every later event)
    n_candidates: int = 300                    # candidates the ranker orders per user
    k: int = 10
    candidate_counts: tuple[int, ...] = (25, 50, 100, 200, 500)
    max_users: int | None = None               # evaluate a seeded sample of the test users
    recall_users: int = 100                    # recall vs candidate count: on a seeded sample of this many
    ease_lambda: float = 200.0
    retrain: bool = True                       # co-occurrence and retrieval as of the cutoffs and the split
    retrieval: bool = True                     # train the two-tower model (else keep the stored vectors)
    retrieval_every: int = 4                   # ranker replay: retrain it at the first and every k-th cutoff
    ranker: RankerConfig = field(default_factory=RankerConfig)
    seed: int = 42


@dataclass
class EvalReport:
    split: dict[str, Any]
    methods: dict[str, dict[str, float]]
    recall_vs_candidates: dict[str, list[float]]   # "n" and "recall" (of the union, seen items excluded)
    importance: dict[str, float]
    ranker: dict[str, Any]
    notes: list[str]
    timings_s: dict[str, float]

    def best_baseline(self) -> tuple[str, float]:
        base = {k: v["ndcg@10"] for k, v in self.methods.items() if k != "funnel"}
        name = max(base, key=lambda n: base[n])
        return name, base[name]

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        name, value = self.best_baseline()
        funnel = self.methods.get("funnel", {}).get("ndcg@10", 0.0)
        out["summary"] = {"best_baseline": name, "best_baseline_ndcg@10": value, "funnel_ndcg@10": funnel,
                          "ratio": funnel / value if value else None}
        return out


# ---------------------------------------------------------------- training the past


def _retrain(conn: psycopg.Connection[Any], as_of: datetime, config: EvalConfig, *, retrieval: bool,
             progress: Progress | None = None) -> None:
    """Co-occurrence and the EASE neighbours (and, with ``retrieval``, the two-tower vectors) from the events
    before ``as_of`` only."""
    from engine import cooccurrence, itemsim

    cooccurrence.build(conn, as_of=as_of)
    itemsim.build_ease(conn, as_of=as_of, config=itemsim.EaseConfig(lam=config.ease_lambda))
    if retrieval and config.retrieval:
        from engine.retrieval.store import schema_dim, train_and_store
        from engine.retrieval.train import RetrievalConfig

        train_and_store(conn, RetrievalConfig(dim=schema_dim(conn), seed=config.seed), as_of=as_of)
    if progress:
        progress(f"stage-1 models as of {as_of:%Y-%m-%d}", 1, 1)


# ---------------------------------------------------------------- lists


def _top(keys: np.ndarray, scores: np.ndarray, seen: set[int], k: int) -> list[int]:
    order = np.argsort(-scores, kind="stable")
    out: list[int] = []
    for i in order:
        key = int(keys[i])
        if key not in seen:
            out.append(key)
            if len(out) == k:
                break
    return out


def _source_list(cf: CandidateFeatures, source: str, seen: set[int], k: int) -> list[int]:
    col = cf.column(f"f_{source}_score")
    found = ~np.isnan(col)
    return _top(cf.item_keys[found], col[found], seen, k)


def popularity(conn: psycopg.Connection[Any], before: datetime) -> list[int]:
    rows = conn.execute(query("ranking.eval_popularity"), {"before": before}).fetchall()
    return [int(r[0]) for r in rows]


def _pop_list(ranked: Sequence[int], seen: set[int], k: int) -> list[int]:
    out = []
    for i in ranked:
        if i not in seen:
            out.append(i)
            if len(out) == k:
                break
    return out


def ease_lists(conn: psycopg.Connection[Any], split: Split, users: Sequence[int], k: int, lam: float,
               pop: Sequence[int]) -> dict[int, list[int]]:
    """EASE fit on every interaction before the split; users without one get popularity."""
    from engine.retrieval import ease

    rows = conn.execute(query("ranking.eval_interactions"), {"before": split.cutoff}).fetchall()
    if not rows:
        return {u: _pop_list(pop, split.seen.get(u, set()), k) for u in users}
    arr = np.array(rows, dtype=np.int64)
    ukeys, uidx = np.unique(arr[:, 0], return_inverse=True)
    ikeys, iidx = np.unique(arr[:, 1], return_inverse=True)
    x = ease.interactions(uidx, iidx, len(ukeys), len(ikeys))
    b = ease.fit(x, lam)
    pos = {int(u): i for i, u in enumerate(ukeys)}
    have = [u for u in users if u in pos]
    out = {u: _pop_list(pop, split.seen.get(u, set()), k) for u in users if u not in pos}
    if have:
        xu = x[[pos[u] for u in have]]
        top = ease.recommend(b, xu, min(k, len(ikeys)))
        for u, row in zip(have, top, strict=True):
            out[u] = [int(ikeys[j]) for j in row]
    return out


def _union_recall(conn: psycopg.Connection[Any], split: Split, users: Sequence[int], counts: Sequence[int],
                  surface: str, progress: Progress | None) -> list[float]:
    """Recall of the candidate union (seen items excluded) at each size n."""
    out = []
    for done, n in enumerate(counts, start=1):
        vals = []
        for lo in range(0, len(users), 100):
            chunk = list(users[lo:lo + 100])
            rows = conn.execute(query("ranking.eval_candidate_sets"),
                                {"users": chunk, "surface": surface, "n": n, "as_of": split.cutoff}).fetchall()
            got = {int(u): {int(i) for i in items} for u, items in rows}
            for u in chunk:
                truth = split.truth[u]
                vals.append(len(truth & (got.get(u, set()) - split.seen.get(u, set()))) / len(truth))
        out.append(float(np.mean(vals)) if vals else 0.0)
        if progress:
            progress("candidate recall", done, len(counts))
    return out


def _score(lists: dict[int, list[int]], split: Split, n_items: int, cats: dict[int, list[str]],
           k: int) -> dict[str, float]:
    res = m.evaluate(lists, split, ks=(k, 50), metrics=("ndcg", "recall", "map"))
    out = {f"ndcg@{k}": res[f"ndcg@{k}"], f"recall@{k}": res[f"recall@{k}"], "recall@50": res["recall@50"],
           f"map@{k}": res[f"map@{k}"]}
    out[f"coverage@{k}"] = m.coverage(lists, n_items, k)
    out[f"diversity@{k}"] = m.intra_list_diversity(lists, cats, k)
    return out


# ---------------------------------------------------------------- the run


def run(conn: psycopg.Connection[Any], config: EvalConfig | None = None, *,
        progress: Progress | None = None) -> tuple[EvalReport, TrainedRanker]:
    """Train on the past, evaluate every method on the users active after the split."""
    config = config or EvalConfig()
    t0 = time.perf_counter()
    timings: dict[str, float] = {}
    notes: list[str] = ["seen items are excluded in Python (the items each user had any event with before the "
                        "split), the same rule as the exclude-seen policy"]
    cutoff = resolve_cutoff(conn, config.split_at, config.split_fraction)
    horizon = timedelta(days=config.horizon_days) if config.horizon_days else None
    split = temporal_split(conn, cutoff, horizon=horizon)
    users = split.users
    if config.max_users is not None and len(users) > config.max_users:
        rng = np.random.default_rng(config.seed)
        users = sorted(int(u) for u in rng.choice(users, size=config.max_users, replace=False))
        split = Split(split.cutoff, split.end, {u: split.truth[u] for u in users},
                      {u: split.seen[u] for u in users if u in split.seen})
    if not users:
        raise InvalidRequest(f"no user has a new positive item after the split {cutoff.isoformat()}")

    # 1. the ranker, on cutoffs before the split; co-occurrence / retrieval rebuilt as of each cutoff
    # the ranker trains on the candidate count it is tested with (RankerConfig's own default is the serving count)
    rc = config.ranker if config.ranker.n_candidates is not None else replace(config.ranker,
                                                                              n_candidates=config.n_candidates)
    cutoffs = [c for c, _ in plan_windows(conn, cutoff, rc)]
    # co-occurrence at every cutoff (cheap), the retrieval model at the first and every k-th cutoff (stale for
    # the ones in between but blind to every label window)
    every = max(1, config.retrieval_every)

    def prepare(c: datetime) -> None:
        _retrain(conn, c, config, retrieval=cutoffs.index(c) % every == 0, progress=progress)

    if config.retrieval and config.retrain:
        notes.append(f"ranker training: co-occurrence and EASE neighbours rebuilt as of each cutoff, the retrieval "
                     f"model as of the first "
                     f"and every {every}th cutoff; both again as of the split for the test")
    trained = train_ranker(conn, rc, until=cutoff, cutoffs=cutoffs, prepare=prepare if config.retrain else None,
                           progress=progress)
    timings["train_ranker"] = time.perf_counter() - t0

    # 2. the stage-1 models as of the split
    t1 = time.perf_counter()
    if config.retrain:
        _retrain(conn, cutoff, config, retrieval=True, progress=progress)
    timings["retrain_at_split"] = time.perf_counter() - t1

    # 3. candidates + features as of the split for every test user; the lists of every method
    t2 = time.perf_counter()
    n_items = int(conn.execute(query("ranking.eval_catalog_size"), {"before": cutoff}).fetchone()[0])  # type: ignore[index]
    cats = {int(k): list(c) for k, c in conn.execute(query("ranking.item_categories")).fetchall()}
    pop = popularity(conn, cutoff)
    lists: dict[str, dict[int, list[int]]] = {"funnel": {}, "popularity": {}}
    for s in SOURCES:
        lists[f"source:{s}"] = {}
    depth = max(50, config.k)
    names = trained.names
    for lo in range(0, len(users), 50):
        chunk = users[lo:lo + 50]
        for u, cf in features.for_user_keys(conn, chunk, surface=rc.surface, n=config.n_candidates,
                                            as_of=cutoff).items():
            seen = split.seen.get(u, set())
            if len(cf):
                scores = np.asarray(trained.booster.predict(cf.matrix(names), num_threads=rc.num_threads))
                lists["funnel"][u] = _top(cf.item_keys, scores, seen, depth)
                for s in SOURCES:
                    lists[f"source:{s}"][u] = _source_list(cf, s, seen, depth)
            lists["popularity"][u] = _pop_list(pop, seen, depth)
        if progress:
            progress("evaluate", min(lo + 50, len(users)), len(users))
    lists["ease"] = ease_lists(conn, split, users, depth, config.ease_lambda, pop)
    timings["lists"] = time.perf_counter() - t2

    methods = {name: _score(ls, split, n_items, cats, config.k) for name, ls in lists.items()}
    t3 = time.perf_counter()
    counts = sorted(set(config.candidate_counts))
    sample = users
    if len(users) > config.recall_users:
        sample = sorted(int(u) for u in np.random.default_rng(config.seed).choice(users, config.recall_users,
                                                                                  replace=False))
    recall = _union_recall(conn, split, sample, counts, rc.surface, progress)
    timings["candidate_recall"] = time.perf_counter() - t3
    timings["total"] = time.perf_counter() - t0
    report = EvalReport(
        split={"cutoff": cutoff.isoformat(), "end": split.end.isoformat() if split.end else None,
               "users": len(users), "items_before_split": n_items,
               "users_with_history": sum(1 for u in users if split.seen.get(u)),
               "n_candidates": config.n_candidates, "ranker_cutoffs": [c.isoformat() for c in cutoffs]},
        methods=methods,
        recall_vs_candidates={"n": [float(c) for c in counts], "recall": recall, "users": [float(len(sample))]},
        importance=trained.importance,
        ranker={"metrics": {k: v for k, v in trained.metrics.items() if k != "importance"},
                "data_window": trained.data_window, "config": asdict(rc)},
        notes=notes,
        timings_s={k: round(v, 2) for k, v in timings.items()},
    )
    return report, trained
