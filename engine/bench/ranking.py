"""Stage 2 speed on the loaded data: candidates alone, candidates + features, the ranker's predict, and the same
model compiled to SQL."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator
from datetime import datetime
from typing import Any

import numpy as np
import psycopg
from psycopg import sql as psql

from engine.ranking import features, registry
from engine.sql import query


def _ms(xs: list[float]) -> str:
    a = np.array(xs) * 1000
    return f"p50 {np.percentile(a, 50):.1f} ms, p95 {np.percentile(a, 95):.1f} ms"


def run(conn: psycopg.Connection[Any], *, users: int = 50, n: int = 500, as_of: datetime | None = None,
        seed: int = 0) -> Iterator[str]:
    """Time ``users`` sampled users (with history): the features' own cost is the difference of the two calls."""
    items, events = conn.execute(query("ranking.bench_sizes")).fetchone() or (0, 0)
    yield (f"machine: {platform.machine()}, {os.cpu_count()} cores; data: {items:,} items, {events:,} events; "
           f"n={n}, as_of={'now' if as_of is None else as_of.isoformat()}")
    keys = [int(r[0]) for r in conn.execute(query("ranking.bench_users"), {"seed": str(seed), "n": users})]
    if not keys:
        yield "no users: load data first"
        return
    for k in keys[:3]:  # warm the caches
        features.for_user_key(conn, k, n=n, as_of=as_of)
    cand: list[float] = []
    feat: list[float] = []
    rows: list[int] = []
    frames = []
    for k in keys:
        t0 = time.perf_counter()
        conn.execute(query("ranking.bench_candidates"), {"user_key": k, "n": n, "as_of": as_of}).fetchone()
        t1 = time.perf_counter()
        cf = features.for_user_key(conn, k, n=n, as_of=as_of)
        t2 = time.perf_counter()
        cand.append(t1 - t0)
        feat.append(t2 - t1)
        rows.append(len(cf))
        frames.append(cf)
    extra = [f - c for f, c in zip(feat, cand, strict=True)]
    yield f"candidates_by_key:            {_ms(cand)} ({np.mean(rows):.0f} rows on average)"
    yield f"candidate_features_by_key:    {_ms(feat)} (candidates + {len(frames[0].names)} features, to numpy)"
    yield f"features alone (difference):  {_ms(extra)}"
    version = registry.active_version(conn)
    if version is None:
        yield "no active ranker: predict not timed"
        return
    model = registry.load(conn, version)
    pred = []
    for cf in frames:
        x = cf.matrix(model.features)
        t0 = time.perf_counter()
        model.predict(x)
        pred.append(time.perf_counter() - t0)
    yield f"ranker v{version} predict:    {_ms(pred)} ({model.booster.num_trees()} trees, 1 thread)"
    yield from _sql_ranker(conn, version, [cf.matrix(model.features) for cf in frames])


def _sql_ranker(conn: psycopg.Connection[Any], version: int, matrices: list[np.ndarray]) -> Iterator[str]:
    """The same rows through the model compiled to SQL (what pgrec.recommend runs): each user's feature arrays
    from an indexed temporary table, scored by pgrec.ranker_score_v<version>, minus the same read without it."""
    row = conn.execute(query("serving.compiled"), {"version": version}).fetchone()
    if row is None:
        yield f"ranker v{version} is not compiled to SQL: SQL ranker not timed"
        return
    fn = row[0]
    with conn.transaction():
        conn.execute("CREATE TEMP TABLE pgrec_bench_rank (g int, f float8[]) ON COMMIT DROP")
        with conn.cursor().copy("COPY pgrec_bench_rank (g, f) FROM STDIN") as cp:
            for g, x in enumerate(matrices):
                for r in x:
                    cp.write_row((g, [None if np.isnan(v) else float(v) for v in r]))
        conn.execute("CREATE INDEX ON pgrec_bench_rank (g)")
        conn.execute("ANALYZE pgrec_bench_rank")
        scored = psql.SQL("SELECT sum({}(f)) FROM pgrec_bench_rank WHERE g = %s").format(psql.Identifier("pgrec", fn))
        bare = psql.SQL("SELECT sum(cardinality(f)) FROM pgrec_bench_rank WHERE g = %s")
        with_fn: list[float] = []
        without: list[float] = []
        for g in range(len(matrices)):
            for stmt, out in ((scored, with_fn), (bare, without)):
                t0 = time.perf_counter()
                conn.execute(stmt, (g,)).fetchone()
                out.append(time.perf_counter() - t0)
        rows = np.mean([len(x) for x in matrices])
        yield (f"ranker v{version} in SQL:     {_ms([a - b for a, b in zip(with_fn, without, strict=True)])} "
               f"(pgrec.{fn}, {rows:.0f} rows per user; the read of the rows subtracted)")
