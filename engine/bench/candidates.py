"""Stage-1 latency: each candidate source and the union at n, beside a bare HNSW top-100 probe on the same table."""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import psycopg

from engine import candidates, cooccurrence, datasets, neighbors
from engine.bench.ingest import machine
from engine.config import Settings
from engine.db import connect
from engine.sql import query


def _prefix(items: int) -> str:
    return f"cb{items}-"


def _ensure_data(conn: psycopg.Connection[Any], items: int, dim: int, reuse: bool) -> Iterator[str]:
    prefix = _prefix(items)
    have = conn.execute("SELECT count(*) FROM pgrec.items WHERE item_id LIKE %s", (prefix + "%",)).fetchone()
    if reuse and have is not None and have[0] >= items:
        yield f"reusing the benchmark catalog {prefix}* ({have[0]:,} items)"
        return
    users, events = max(2_000, items // 5), items * 3
    yield f"generating {items:,} items, {users:,} users, {events:,} events (dim {dim}) ..."
    data = datasets.generate(datasets.GeneratorConfig(users=users, items=items, events=events, dim=dim, seed=23))
    for it in data.items:
        it["item_id"] = prefix + it["item_id"]
    for u in data.users:
        u["user_id"] = prefix + u["user_id"]
    for e in data.events:
        e["item_id"] = prefix + e["item_id"]
        e["user_id"] = prefix + e["user_id"]
        e["event_id"] = prefix + e["event_id"]
    t0 = time.perf_counter()
    data.load(conn)
    yield f"loaded in {time.perf_counter() - t0:.0f}s (items, users, events, embeddings + HNSW)"
    conn.execute("ANALYZE pgrec.items")
    conn.execute("ANALYZE pgrec.item_embeddings")
    t0 = time.perf_counter()
    r = cooccurrence.build(conn)
    yield f"co-occurrence full build: {r.pairs:,} pairs in {time.perf_counter() - t0:.0f}s"


def _time(fn: Callable[[], object], repeat: int) -> list[float]:
    out = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        out.append((time.perf_counter() - t0) * 1000)
    return out


def _line(name: str, ms: list[float]) -> str:
    p50, p95, p99 = np.percentile(ms, [50, 95, 99])
    return f"{name:<28} p50 {p50:7.2f} ms   p95 {p95:7.2f} ms   p99 {p99:7.2f} ms"


def run(settings: Settings, *, items: int = 100_000, n: int = 500, requests: int = 200,
        reuse: bool = True, stored_neighbors: bool = True) -> Iterator[str]:
    yield f"machine: {machine()}"
    with connect(settings) as conn:
        dim = int(conn.execute("SELECT value::int FROM pgrec.config WHERE key = 'embedding_dim'").fetchone()[0])  # type: ignore[index]
        yield from _ensure_data(conn, items, dim, reuse)
        if stored_neighbors:
            yield from neighbors.ensure_current(conn)
        else:
            yield "embedding neighbours: not built (--no-neighbours): the history source searches the index per seed"
        prefix = _prefix(items)
        rng = random.Random(5)
        keys = [int(r[0]) for r in conn.execute(
            """SELECT DISTINCT e.user_key FROM pgrec.events e JOIN pgrec.users u ON u.user_key = e.user_key
                WHERE u.user_id LIKE %s AND e.polarity = 1 LIMIT 5000""", (prefix + "%",)).fetchall()]
        if not keys:
            yield "no benchmark users with events: nothing to measure"
            return
        users = [rng.choice(keys) for _ in range(requests)]
        vectors = [conn.execute(query("candidates.user_vector"), {"user_key": u, "as_of": None}).fetchone()[0]  # type: ignore[index]
                   for u in users[:50]]
        total = conn.execute("SELECT count(*) FROM pgrec.item_embeddings").fetchone()[0]  # type: ignore[index]
        yield f"catalog: {total:,} item embeddings; {requests} requests per line; n = {n}"
        it = iter(range(10**9))

        def next_user() -> int:
            return users[next(it) % len(users)]

        def probe() -> None:
            v = vectors[next(it) % len(vectors)]
            conn.execute(query("candidates.bare_probe"), {"vector": v, "k": 100}).fetchall()

        conn.execute("SET hnsw.ef_search = 100")
        _time(probe, 20)  # warm the cache
        probe_ms = _time(probe, requests)
        yield _line("bare HNSW top-100 (ef 100)", probe_ms)
        cfg = candidates.source_params(conn)
        for source in candidates.SOURCES:
            if source not in cfg:
                continue
            row = cfg[source]
            k = n if row["fallback_order"] is not None else math.ceil(float(row["quota"]) * n)

            def one(source: str = source, k: int = k, params: dict[str, Any] = row["params"]) -> None:
                candidates.run_source(conn, source, next_user(), k, params=params)

            _time(one, 10)
            yield _line(f"source {source} (k={k})", _time(one, requests))

        def union() -> None:
            candidates.candidates_by_key(conn, next_user(), n=n)

        _time(union, 10)
        union_ms = _time(union, requests)
        yield _line(f"union pgrec.candidates n={n}", union_ms)
        yield (f"union p50 / bare probe p50 = {np.percentile(union_ms, 50) / np.percentile(probe_ms, 50):.1f}x "
               "(goal <= 3x)")
