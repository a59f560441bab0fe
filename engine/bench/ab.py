"""Interleaved A/B of server CPU per call: the same users, alternately on two databases of one server.

For comparing two schema revisions on the same data (copy a database with ``CREATE DATABASE b TEMPLATE a``,
then ``pgrec db downgrade`` one of them). Calls alternate A, B / B, A per user, so load on a shared machine
falls on both alike; the figure is the backend's CPU time from ``/proc`` (a server on this machine only).
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from typing import Any

import psycopg
from psycopg.conninfo import make_conninfo

from engine.bench.ingest import backend_cpu
from engine.config import Settings
from engine.db import apply_session_settings, connect, database_url

# call name -> statement over one user key; each names a request-path function
CALLS = {
    "candidates": "SELECT count(*) FROM pgrec.candidates_by_key(%(u)s, 'default', %(n)s)",
    "features": "SELECT count(*) FROM pgrec.candidate_features_by_key(%(u)s, 'default', %(n)s)",
    "recommend": "SELECT count(*) FROM pgrec.recommend((SELECT u.user_id FROM pgrec.users u WHERE u.user_key = %(u)s),"
                 " 10, log => false)",
}


def _connect(settings: Settings, database: str) -> psycopg.Connection[Any]:
    if settings.database_url:  # the same server, another database
        settings = settings.model_copy(update={"database_url": make_conninfo(database_url(settings), dbname=database)})
    else:
        settings = settings.model_copy(update={"database_name": database})
    conn = connect(settings)
    apply_session_settings(conn, settings, serving=True)
    return conn


def _revision(conn: psycopg.Connection[Any]) -> str:
    row = conn.execute("SELECT version_num FROM pgrec.alembic_version").fetchone()
    return str(row[0]) if row else "?"


def run(settings: Settings, a: str, b: str, *, calls: list[str], users: int = 200, n: int = 200,
        seed: int = 7) -> Iterator[str]:
    unknown = [c for c in calls if c not in CALLS]
    if unknown:
        raise ValueError(f"unknown call {unknown[0]!r}: the calls are {', '.join(CALLS)}")
    with _connect(settings, a) as ca, _connect(settings, b) as cb:
        if backend_cpu(ca) is None:
            raise ValueError("the server is not on this machine: /proc/<backend pid> is unreadable")
        yield f"A = {a} (schema {_revision(ca)}), B = {b} (schema {_revision(cb)})"
        keys = [int(r[0]) for r in ca.execute(
            "SELECT u.user_key FROM pgrec.users u WHERE EXISTS (SELECT 1 FROM pgrec.events e "
            "WHERE e.user_key = u.user_key) ORDER BY u.user_key").fetchall()]
        if not keys:
            raise ValueError(f"{a} has no users with events")
        chosen = random.Random(seed).sample(keys, min(users, len(keys)))
        for name in calls:
            sql = CALLS[name]
            for c in (ca, cb):  # warm caches and plans
                for u in chosen[:10]:
                    c.execute(sql, {"u": u, "n": n}).fetchall()
            total = {"A": 0.0, "B": 0.0}
            for i, u in enumerate(chosen):
                order = ((ca, "A"), (cb, "B")) if i % 2 == 0 else ((cb, "B"), (ca, "A"))
                for c, side in order:
                    before = backend_cpu(c) or 0.0
                    c.execute(sql, {"u": u, "n": n}).fetchall()
                    total[side] += (backend_cpu(c) or 0.0) - before
            per_a, per_b = (1e3 * total[s] / len(chosen) for s in ("A", "B"))
            ratio = f"B / A = {per_b / per_a:.2f}" if per_a > 0 else "too short to time"
            yield f"{name:<11} A {per_a:7.2f} ms   B {per_b:7.2f} ms   CPU per call, {len(chosen)} users ({ratio})"
