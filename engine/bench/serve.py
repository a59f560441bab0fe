"""Serving latency: the Python path and the SQL-only path, stage by stage, beside a bare HNSW top-100 probe.

Runs on its own database (``pgrec_bench_serve`` on the embedded server, or ``PGREC_DATABASE_URL``), filled
with generated data of the requested size and reused by later runs of the same size.
"""

from __future__ import annotations

import itertools
import os
import platform
import random
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import psycopg

from engine import datasets, migrate
from engine.bench.ingest import backend_cpu
from engine.config import Settings
from engine.db import connect
from engine.ranking.features import serving_count
from engine.sql import query


@dataclass(frozen=True)
class BenchConfig:
    items: int = 100_000
    users: int = 20_000
    events: int = 2_000_000
    requests: int = 300
    k: int = 10
    reuse: bool = True
    num_trees: int = 100      # a compact ranker: the SQL path scores every candidate with every tree
    num_leaves: int = 15
    seed: int = 5
    stored_neighbors: bool = True  # the history source's stored embedding neighbours, as a deployment keeps them


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


WARM = 20  # untimed warm-up requests per path (plans cached, pages in memory)


def _pct(xs: list[float]) -> tuple[float, float, float]:
    a = np.asarray(xs)
    return float(np.percentile(a, 50)), float(np.percentile(a, 95)), float(np.percentile(a, 99))


def _fmt(name: str, xs: list[float], cpu_ms: float | None = None, whose: str = "server") -> str:
    p50, p95, p99 = _pct(xs)
    cpu = f"{cpu_ms:.2f} ({whose})" if cpu_ms is not None else ""
    return f"| {name} | {p50:.2f} | {p95:.2f} | {p99:.2f} | {cpu} |"


def _per_call(before: float | None, after: float | None, calls: int) -> float | None:
    return None if before is None or after is None else (after - before) * 1e3 / calls


def _prepare(settings: Settings, cfg: BenchConfig, say: Callable[[str], None]) -> int:
    """Data of the requested size, co-occurrence, a compact ranker (compiled). Returns the ranker version."""
    from engine import cooccurrence
    from engine.ranking import registry
    from engine.ranking.compile import install_compiled_model

    migrate.upgrade(settings)
    with connect(settings) as conn:
        n_items, n_events = conn.execute("SELECT (SELECT count(*) FROM pgrec.items), "
                                         "(SELECT count(*) FROM pgrec.events)").fetchone() or (0, 0)
        fresh = not (cfg.reuse and n_items == cfg.items and n_events >= 0.9 * cfg.events)
        if fresh:
            if n_items:
                say("dropping the previous benchmark data")
                migrate.downgrade(settings, "base")
                migrate.upgrade(settings)
            t0 = time.perf_counter()
            say(f"generating {cfg.items:,} items / {cfg.users:,} users / {cfg.events:,} events ...")
            data = datasets.generate(datasets.GeneratorConfig(users=cfg.users, items=cfg.items, events=cfg.events,
                                                              seed=cfg.seed, dim=settings.embedding_dim))
            say(f"  generated in {time.perf_counter() - t0:.0f}s; importing ...")
            data.load(conn)
            del data
            conn.execute("VACUUM ANALYZE")
            say(f"  imported in {time.perf_counter() - t0:.0f}s; co-occurrence ...")
            cooccurrence.build(conn)
        if cfg.stored_neighbors:
            from engine import neighbors

            for line in neighbors.ensure_current(conn):
                say(line)
        # today's item counter snapshot, as a serving process builds it once a day (steady state)
        t0 = time.perf_counter()
        built = conn.execute("SELECT pgrec.refresh_item_stats(NULL, true)").fetchone()
        if built and built[0] is not None:
            say(f"item counter snapshot: {built[0]:,} items in {time.perf_counter() - t0:.1f}s")
        version = registry.active_version(conn)
        if version is None or fresh:
            t0 = time.perf_counter()
            say(f"fitting a compact ranker ({cfg.num_trees} trees x {cfg.num_leaves} leaves) ...")
            version = _fit_ranker(conn, cfg)
            say(f"  ranker version {version} in {time.perf_counter() - t0:.0f}s")
        install_compiled_model(conn, version)
        return version


def _fit_ranker(conn: psycopg.Connection[Any], cfg: BenchConfig) -> int:
    """A LightGBM lambdarank model of the size the benchmark asks for, over the real feature columns.

    Latency depends on the model's shape (trees, leaves, features), not on what it learned, so the labels are
    cheap: of each user's current candidates, the items in the categories the user engaged with most. (Replay
    training at every cutoff, the real trainer, costs minutes at this size; ``pgrec train ranker`` does it.)
    """
    import lightgbm as lgb

    from engine.ranking import registry
    from engine.ranking.features import feature_names

    users = [r[0] for r in conn.execute(query("serving.sample_users"), {"n": 150}).fetchall()]
    cur = conn.execute(query("serving.candidate_features_many"), {"user_ids": users, "surface": "default",
                                                                  "as_of": None})
    rows = cur.fetchall()
    cols = [d.name for d in cur.description or ()]
    names = feature_names(cur.description or ())
    liked = dict(conn.execute(query("serving.bench_top_category"), {"users": users}).fetchall())
    cats = dict(conn.execute("SELECT item_key, categories FROM pgrec.items").fetchall())
    ui, ki = cols.index("request_user_id"), cols.index("item_key")
    rows.sort(key=lambda r: r[ui])
    x = np.array([[r[cols.index(n)] for n in names] for r in rows], dtype=np.float64)
    y = np.array([1 if liked.get(r[ui]) in (cats.get(r[ki]) or []) else 0 for r in rows])
    group = [sum(1 for _ in g) for _, g in itertools.groupby(r[ui] for r in rows)]
    booster = lgb.train({"objective": "lambdarank", "num_leaves": cfg.num_leaves, "min_data_in_leaf": 5,
                         "learning_rate": 0.05, "verbose": -1, "num_threads": 2, "seed": cfg.seed},
                        lgb.Dataset(x, y, group=group, feature_name=names), num_boost_round=cfg.num_trees)
    return registry.save(conn, kind="ranker", artifact=booster.model_to_string().encode(),
                         params={"bench": True, "num_leaves": cfg.num_leaves}, features=names,
                         metrics={"trees": booster.num_trees()}, data_window={"bench": "labels by top category"},
                         activate=True)


def run(settings: Settings, cfg: BenchConfig, *, write: Path | None = None,
        say: Callable[[str], None] = print) -> Iterator[str]:
    from engine.pipeline import Recommender

    if not settings.database_url:
        settings = settings.model_copy(update={"database_name": "pgrec_bench_serve"})
    yield f"machine: {machine()}"
    version = _prepare(settings, cfg, say)
    load_before = os.getloadavg()[0]
    rng = random.Random(cfg.seed)
    with connect(settings) as conn:
        users = [r[0] for r in conn.execute(query("serving.sample_users"), {"n": 5000}).fetchall()]
        vecs = [r[0] for r in conn.execute("SELECT embedding FROM pgrec.item_embeddings ORDER BY item_key "
                                           "LIMIT 2000").fetchall()]
        n_cand = serving_count(conn)
        compiled = conn.execute(query("serving.compiled"), {"version": version}).fetchone()
        counts: tuple[Any, ...] = conn.execute(query("core.row_counts")).fetchone() or (0, 0, 0)
        picks = [rng.choice(users) for _ in range(cfg.requests)]
        warm = [rng.choice(users) for _ in range(WARM)]
        yield (f"data: {counts[0]:,} items, {counts[1]:,} users, {counts[2]:,} events; ranker v{version} "
               f"({compiled[2] if compiled else '?'} trees); {n_cand} candidates per request; k={cfg.k}; "
               f"{cfg.requests} requests per path, one client")

        # bare probe: HNSW top-100 on the same table, same session settings
        conn.execute("SET hnsw.ef_search = 100")
        probe: list[float] = []
        cpu: dict[str, float | None] = {}  # backend CPU ms per call (a server on this machine only)
        c0: float | None = None
        for i in range(cfg.requests + WARM):
            v = vecs[rng.randrange(len(vecs))]
            if i == WARM:
                c0 = backend_cpu(conn)
            t0 = time.perf_counter()
            conn.execute("SELECT item_key FROM pgrec.item_embeddings ORDER BY embedding OPERATOR(public.<=>) %s "
                         "LIMIT 100", (v,)).fetchall()
            if i >= WARM:
                probe.append((time.perf_counter() - t0) * 1e3)
        cpu["probe"] = _per_call(c0, backend_cpu(conn), cfg.requests)

        # SQL-only path, total and its parts measured one by one
        feats = ", ".join(f'c."{f}"::float8' for f in (compiled[1] if compiled else []))
        stages: dict[str, list[float]] = {"candidates": [], "candidate_features": [], "features + SQL ranker": [],
                                          "pgrec.recommend (total)": []}
        stmts = {
            "candidates": "SELECT count(*) FROM pgrec.candidates(%(u)s, 'default', pgrec.serving_candidates())",
            "candidate_features": "SELECT count(*) FROM pgrec.candidate_features(%(u)s, 'default', "
                                  "pgrec.serving_candidates(), NULL)",
            "features + SQL ranker": f"SELECT max(pgrec.{compiled[0]}(ARRAY[{feats}])) FROM "  # noqa: S608
                                     "pgrec.candidate_features(%(u)s, 'default', pgrec.serving_candidates(), NULL) c"
            if compiled else "SELECT 1",
            "pgrec.recommend (total)": "SELECT count(*) FROM pgrec.recommend(%(u)s, %(k)s)",
        }
        for name, sql in stmts.items():
            for i, u in enumerate(warm + picks):
                if i == WARM:
                    c0 = backend_cpu(conn)
                t0 = time.perf_counter()
                conn.execute(sql, {"u": u, "k": cfg.k}).fetchall()
                if i >= WARM:
                    stages[name].append((time.perf_counter() - t0) * 1e3)
            cpu[name] = _per_call(c0, backend_cpu(conn), cfg.requests)

    # Python path
    py: dict[str, list[float]] = {}
    client0 = 0.0
    with Recommender(settings.model_copy(update={"pool_min_size": 1, "pool_max_size": 2})) as rec:
        for i, u in enumerate(warm + picks):
            if i == WARM:
                client0 = time.process_time()
            t0 = time.perf_counter()
            r = rec.recommend(u, k=cfg.k)
            wall = (time.perf_counter() - t0) * 1e3
            if i >= WARM:
                for key, val in r.timings_ms.items():
                    py.setdefault(key, []).append(val)
                py.setdefault("wall (incl. pool)", []).append(wall)
    client_ms = (time.process_time() - client0) * 1e3 / cfg.requests

    table = ["| path / stage | p50 ms | p95 ms | p99 ms | CPU ms per call |", "|---|---|---|---|---|",
             _fmt("bare HNSW top-100 probe", probe, cpu["probe"])]
    names = {"candidates_features": "Python: candidates + features (1 round trip)",
             "rank": "Python: LightGBM predict", "rerank_log": "Python: rerank + impressions (1 round trip)",
             "total": "Python: total", "wall (incl. pool)": "Python: wall incl. pool checkout"}
    table += [_fmt(label, py[key], client_ms if key == "total" else None, "Python process")
              for key, label in names.items() if key in py]
    table += [_fmt(f"SQL: {name}", xs, cpu[name]) for name, xs in stages.items()]
    probe50 = _pct(probe)[0]
    py50, _, py99 = _pct(py["wall (incl. pool)"])
    sql50 = _pct(stages["pgrec.recommend (total)"])[0]
    goals = [
        f"Python p50 / probe p50 = {py50 / probe50:.1f}x (goal <= 3x): {'met' if py50 <= 3 * probe50 else 'NOT met'}",
        f"Python p99 = {py99:.1f} ms (goal <= 25 ms): {'met' if py99 <= 25 else 'NOT met'}",
        f"SQL p50 / probe p50 = {sql50 / probe50:.1f}x (goal <= 6x): {'met' if sql50 <= 6 * probe50 else 'NOT met'}",
    ]
    if cpu["probe"] and cpu["pgrec.recommend (total)"]:
        goals.append(f"CPU per call, SQL path / probe = {cpu['pgrec.recommend (total)'] / cpu['probe']:.1f}x "
                     "(the same ratio by server CPU, steadier than wall time on a shared machine)")
    load = f"load average {load_before:.1f} at the start, {os.getloadavg()[0]:.1f} at the end ({os.cpu_count()} cores)"
    yield from table
    yield from goals
    yield load
    if write is not None:
        _write(write, cfg, machine(), table, [*goals, load])
        yield f"written to {write} (section Serving)"


def _write(path: Path, cfg: BenchConfig, mach: str, table: list[str], goals: list[str]) -> None:
    cmd = (f"pgrec bench serve --items {cfg.items} --users {cfg.users} --events {cfg.events} "
           f"--requests {cfg.requests} --write {path}")
    body = "\n".join([
        "## Serving", "",
        f"Measured {datetime.now(UTC):%Y-%m-%d %H:%M} UTC on {mach}; embedded PostgreSQL + pgvector, one client, "
        "ranker compact (see the command's options), other work may have shared the machine.", "",
        f"Command: `{cmd}`", "", *table, "", *[f"- {g}" for g in goals], "", ""])
    text = path.read_text() if path.is_file() else "# Benchmarks\n\nOne section per part; each names its command.\n\n"
    pattern = re.compile(r"^## Serving\n.*?(?=^## |\Z)", re.MULTILINE | re.DOTALL)
    text = pattern.sub(lambda _: body, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + body
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
