"""Ingest speed: bulk import from a CSV file, and single track_event calls."""

from __future__ import annotations

import os
import platform
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import psycopg

from engine import datasets, ingest
from engine.config import Settings
from engine.db import connect


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}"


def run(settings: Settings, *, events: int, single: int, workdir: Path) -> Iterator[str]:
    items = max(1000, events // 100)
    users = max(1000, events // 50)
    yield f"machine: {machine()}"
    yield f"generating {events:,} events over {items:,} items / {users:,} users ..."
    data = datasets.generate(datasets.GeneratorConfig(users=users, items=items, events=events, seed=11))
    # fresh ids so repeated runs measure inserts, not duplicate detection
    tag = uuid.uuid4().hex[:6]
    for it in data.items:
        it["item_id"] = f"b{tag}-{it['item_id']}"
    for u in data.users:
        u["user_id"] = f"b{tag}-{u['user_id']}"
    for e in data.events:
        e["item_id"] = f"b{tag}-{e['item_id']}"
        e["user_id"] = f"b{tag}-{e['user_id']}"
        e["event_id"] = f"b{tag}-{e['event_id']}"
    paths = data.write(workdir)
    with connect(settings) as conn:
        ingest.import_file(conn, "items", paths["items"])
        ingest.import_file(conn, "users", paths["users"])
        t0 = time.perf_counter()
        r = ingest.import_file(conn, "events", paths["events"])
        dt = time.perf_counter() - t0
        yield (f"bulk import (CSV -> validate -> COPY -> merge): {r.stored:,} events in {dt:.1f}s = "
               f"{r.stored / dt:,.0f} events/s")
        again = ingest.import_file(conn, "events", paths["events"])
        yield f"same file again: {again.stored} new rows, {again.duplicates:,} duplicates (idempotent)"
        evs = data.events[:single]
        # each call commits on its own, so a single connection is bound by the WAL flush of every commit;
        # concurrent connections share flushes (group commit); synchronous_commit=off trades the last few
        # hundred ms of acknowledged events on a server crash for speed (a per-role or per-session choice).
        for clients, sync in ((1, "on"), (8, "on"), (1, "off")):
            n, dt = _track_events(settings, evs, clients, suffix=f"-s{clients}{sync}", sync=sync)
            yield (f"single pgrec.track_event calls, one transaction each, {clients} connection(s), "
                   f"synchronous_commit={sync}: {n:,} in {dt:.1f}s = {n / dt:,.0f} events/s")


def _track_events(settings: Settings, events: list[dict[str, Any]], clients: int, suffix: str,
                  sync: str) -> tuple[int, float]:
    chunks = [events[i::clients] for i in range(clients)]
    conns = [connect(settings) for _ in range(clients)]
    for c in conns:
        c.execute("SELECT set_config('synchronous_commit', %s, false)", (sync,))

    def work(conn: psycopg.Connection[Any], chunk: list[dict[str, Any]]) -> None:
        for e in chunk:
            conn.execute(
                "SELECT pgrec.track_event(%s, %s, %s, %s::timestamptz, NULL, %s)",
                (e["user_id"], e["item_id"], e["event_type"], e["occurred_at"], e["event_id"] + suffix),
            )

    t0 = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(work, conns, chunks))
    dt = time.perf_counter() - t0
    for c in conns:
        c.close()
    return len(events), dt
