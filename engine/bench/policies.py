"""Re-ranking speed: ``pgrec.rerank`` on a scored list with a set of active policies.

Everything the benchmark writes (items, a user with history and impressions, ten policies) lives in one
transaction that is rolled back at the end, and the policies already in the database are disabled inside that
transaction only, so the figures are for exactly the benchmark's policies and nothing is left behind.
"""

from __future__ import annotations

import json
import os
import platform
import random
import statistics
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from psycopg import Connection
from psycopg.types.json import Jsonb

from engine.config import Settings
from engine.db import connect, is_embedded
from engine.sql import query

BENCH_POLICIES: list[tuple[str, dict[str, Any]]] = [
    ("exclude_negative", {}),  # as seeded; {"neighbours": true} adds the embedding check (see docs/policies.md)
    ("exclude_interacted", {"event_types": ["view", "purchase"], "lookback_days": 30}),
    ("exclude_served", {"min_impressions": 3, "window_days": 7}),
    ("blocklist", {"item_sets": ["bench-blocked"], "categories": ["c7"]}),
    ("attribute_filter", {"predicate": {"property": "age_rating", "op": "range",
                                        "max": {"param": "max_age_rating", "default": 18}}}),
    ("boost", {"predicate": {"any": [{"property": "brand", "op": "in", "values": ["b1", "b2"]},
                                     {"field": "source", "op": "contains", "value": "fresh"}]}, "multiply": 1.3}),
    ("diversity", {"max_per_value": 2}),
    ("mmr", {"lambda": 0.7}),
    ("exploration", {"eligible": "fresh", "max_age_days": 7, "slots": 1, "positions": [5]}),
    ("pin", {"items": ["bench-3"], "positions": [1]}),
]


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def _backend_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds of a local server process (Linux /proc), None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return None


def _pct(values: list[float], q: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


@dataclass
class Setup:
    """What :func:`setup` wrote (inside the caller's transaction) and the requests to re-rank."""

    description: str
    requests: list[dict[str, Any]]
    debug_context: Jsonb


def setup(conn: Connection[Any], *, candidates: int = 500, k: int = 10, kinds: list[str] | None = None,
          seed: int = 5, neighbours: bool = False) -> Setup:
    """Write the benchmark's items, user, impressions and policies in the open transaction of ``conn`` (the
    caller rolls it back) and build eight requests of ``candidates`` scored items each."""
    rng = random.Random(seed)
    chosen = [(kind, {"neighbours": True, "min_similarity": 0.95} if kind == "exclude_negative" and neighbours else p)
              for kind, p in BENCH_POLICIES if kinds is None or kind in kinds]
    now = datetime.now(UTC)
    tag = uuid.uuid4().hex[:6]
    dim = int(conn.execute("SELECT value::int FROM pgrec.config WHERE key = 'embedding_dim'").fetchone()[0])  # type: ignore[index]
    n_items = max(candidates * 2, 1000)
    rows = []
    for n in range(n_items):
        props = {"brand": f"b{n % 20}", "age_rating": (0, 7, 12, 16, 18, 21)[n % 6]}
        rows.append((f"bench-{tag}-{n}", [f"c{n % 12}", f"c{(n * 7) % 12}"], json.dumps(props),
                     now - timedelta(days=rng.uniform(0, 400))))
    with conn.cursor() as cur:
        cur.executemany("SELECT pgrec.upsert_item(%s, %s, %s::jsonb, %s)", rows)
    keys = [r[0] for r in conn.execute(
        "SELECT item_key FROM pgrec.items WHERE item_id LIKE %s ORDER BY item_key", (f"bench-{tag}-%",)).fetchall()]
    conn.execute(
        "INSERT INTO pgrec.item_embeddings (item_key, embedding) "
        "SELECT k, (SELECT array_agg(random()::real - 0.5) FROM generate_series(1, %s) WHERE k > 0)::public.vector "
        "FROM unnest(%s::bigint[]) k", (dim, keys))
    user = f"bench-{tag}-user"
    for n in range(60):
        item = rows[rng.randrange(candidates)][0]
        kind = rng.choice(["view", "purchase", "dislike", "click"])
        conn.execute("SELECT pgrec.track_event(%s, %s, %s, %s)",
                     (user, item, kind, now - timedelta(days=rng.uniform(0, 60), seconds=n)))
    user_key = conn.execute("SELECT user_key FROM pgrec.users WHERE user_id = %s", (user,)).fetchone()[0]  # type: ignore[index]
    for n in range(40):
        conn.execute(
            "INSERT INTO pgrec.impressions (request_id, user_key, surface, position, item_key, served_at) "
            "VALUES (%s, %s, 'default', 1, %s, %s)",
            (uuid.uuid4(), user_key, keys[n % 15], now - timedelta(days=rng.uniform(0, 6))))
    conn.execute(query("policies.put_item_set"), {
        "name": f"bench-blocked-{tag}", "items": [rows[rng.randrange(n_items)][0] for _ in range(50)],
        "description": "benchmark", "actor": "bench"})
    conn.execute("UPDATE pgrec.policies SET enabled = false WHERE enabled")  # rolled back at the end
    # statistics for the planner (inside the transaction: they go away with the rollback)
    conn.execute("ANALYZE pgrec.items, pgrec.item_embeddings, pgrec.events, pgrec.impressions, pgrec.users")
    for n, (kind, params) in enumerate(chosen):
        p = json.loads(json.dumps(params).replace("bench-blocked", f"bench-blocked-{tag}")
                       .replace('"bench-3"', f'"bench-{tag}-3"'))
        conn.execute(query("policies.insert_policy"), {
            "name": f"bench-{tag}-{n}", "kind": kind, "params": Jsonb(p), "surface": None, "segment": None,
            "priority": 100, "enabled": True, "starts_at": None, "ends_at": None, "policy_set": None,
            "description": "benchmark", "actor": "bench"})
    description = (f"setup: {n_items} items with {dim}-d vectors, a user with 60 events and 40 impressions, "
                   f"{len(chosen)} active policies: {', '.join(kind for kind, _ in chosen)}")
    sources = ["ann", "history", "trending", "fresh", "ann,trending"]
    requests = []
    for _ in range(8):
        cand = rng.sample(keys, candidates)
        requests.append({
            "user_key": user_key, "surface": "default", "k": k, "item_keys": cand,
            "scores": [rng.random() for _ in cand], "sources": [rng.choice(sources) for _ in cand],
            "context": Jsonb({"exclude": [rows[0][0]], "params": {"max_age_rating": 16}}),
            "as_of": None, "policy_set": None})
    return Setup(description, requests, Jsonb({"exclude": [rows[0][0]], "params": {"max_age_rating": 16}, "debug": 1}))


def run(settings: Settings, *, candidates: int = 500, k: int = 10, runs: int = 300,
        kinds: list[str] | None = None, seed: int = 5, neighbours: bool = False) -> Iterator[str]:
    """Print lines: setup, then p50/p95/p99 of client-side latency and the server-side mean per call."""
    yield f"machine: {machine()}"
    conn = connect(settings, autocommit=False)
    try:
        bench = setup(conn, candidates=candidates, k=k, kinds=kinds, seed=seed, neighbours=neighbours)
        requests = bench.requests
        yield bench.description
        stmt = query("policies.rerank")
        out = conn.execute(stmt, requests[0]).fetchone()[0]  # type: ignore[index]
        yield (f"one answer: {len(out['items'])} items, {len(out['policy_versions'])} policies ran, "
               f"dropped {out['dropped']}")
        for r in requests:  # warm-up: plans cached on this connection
            conn.execute(stmt, r)
        # the server process's CPU time, when it runs on this machine (the embedded server)
        pid = int(conn.execute("SELECT pg_backend_pid()").fetchone()[0])  # type: ignore[index]
        cpu0 = _backend_cpu_seconds(pid) if is_embedded(settings) else None
        lat = []
        for i in range(runs):
            t0 = time.perf_counter()
            conn.execute(stmt, requests[i % len(requests)]).fetchone()
            lat.append((time.perf_counter() - t0) * 1000)
        cpu1 = _backend_cpu_seconds(pid)
        yield (f"rerank {candidates} -> {k}, {runs} calls (client side, one connection): "
               f"p50 {_pct(lat, 0.5):.2f} ms, p95 {_pct(lat, 0.95):.2f} ms, p99 {_pct(lat, 0.99):.2f} ms, "
               f"mean {statistics.fmean(lat):.2f} ms")
        if cpu0 is not None and cpu1 is not None:
            # CPU the server process spent per call (parse, bind, execute): unlike wall-clock latency it does not
            # grow with the time a busy machine makes the process wait for a core
            yield f"server CPU per call (from /proc, the same {runs} calls): {1000 * (cpu1 - cpu0) / runs:.2f} ms"
        # the database's own execution time of the call (no round trip, no client), from EXPLAIN ANALYZE
        server = []
        explain = "EXPLAIN (ANALYZE, SUMMARY, TIMING OFF, FORMAT JSON) " + stmt
        for i in range(max(20, runs // 3)):
            plan = conn.execute(explain, requests[i % len(requests)]).fetchone()[0]  # type: ignore[index]
            server.append(float(plan[0]["Execution Time"]))
        yield (f"server side (EXPLAIN ANALYZE execution time), {len(server)} calls: p50 {_pct(server, 0.5):.2f} ms, "
               f"p95 {_pct(server, 0.95):.2f} ms, p99 {_pct(server, 0.99):.2f} ms")
        # where the time goes: the debug mode's per-step milliseconds (median over the requests)
        per_step: dict[str, list[float]] = {}
        for i in range(max(10, runs // 10)):
            r = dict(requests[i % len(requests)])
            r["context"] = bench.debug_context
            for step in conn.execute(stmt, r).fetchone()[0]["steps"]:  # type: ignore[index]
                if "ms" in step:
                    per_step.setdefault(step["kind"], []).append(float(step["ms"]))
        yield "per step, median ms (debug mode): " + ", ".join(
            f"{kind} {statistics.median(v):.2f}" for kind, v in per_step.items())
    finally:
        conn.rollback()
        conn.close()
