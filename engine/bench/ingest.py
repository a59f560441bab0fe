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


def load() -> str:
    """The 1-minute load average: other work on the machine skews every figure."""
    return f"load average {os.getloadavg()[0]:.2f}"


def backend_cpu(conn: psycopg.Connection[Any]) -> float | None:
    """CPU seconds the connection's server process has used (a server on this machine only), else None.

    With CPU time next to wall time, runs on a busy machine stay comparable.
    """
    try:
        stat = Path(f"/proc/{conn.info.backend_pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _cpu_note(conn: psycopg.Connection[Any], rows: int, client0: float, server0: float | None) -> str:
    client = time.process_time() - client0
    server1 = backend_cpu(conn)
    if server0 is None or server1 is None:
        return f"CPU: client {client:.1f}s"
    server = server1 - server0
    return (f"CPU: client {client:.1f}s + server backend {server:.1f}s = "
            f"{rows / (client + server):,.0f} rows per CPU-second")


def run(settings: Settings, *, events: int, single: int, workdir: Path) -> Iterator[str]:
    items = max(1000, events // 100)
    users = max(1000, events // 50)
    yield f"machine: {machine()}, {load()}"
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
        yield f"server: PostgreSQL {conn.info.server_version // 10000}, {load()}"
        t0, c0, s0 = time.perf_counter(), time.process_time(), backend_cpu(conn)
        r = ingest.import_file(conn, "events", paths["events"])
        dt = time.perf_counter() - t0
        yield (f"bulk import (CSV -> COPY -> checked by {r.checked_by} -> merge): {r.stored:,} events in {dt:.1f}s = "
               f"{r.stored / dt:,.0f} events/s ({load()}; {_cpu_note(conn, r.stored, c0, s0)})")
        t0, c0, s0 = time.perf_counter(), time.process_time(), backend_cpu(conn)
        again = ingest.import_file(conn, "events", paths["events"])
        dt = time.perf_counter() - t0
        yield (f"same file again: {again.stored} new rows, {again.duplicates:,} duplicates (idempotent) "
               f"in {dt:.1f}s = {again.read / dt:,.0f} rows/s ({_cpu_note(conn, again.read, c0, s0)})")
        # the bulk loads above leave a checkpoint's worth of writes behind: flush them first, so that the
        # single calls below measure their own commits, not the bulk load's pending I/O
        try:
            conn.execute("CHECKPOINT")
        except psycopg.errors.InsufficientPrivilege:
            yield "(no privilege for CHECKPOINT: single calls may share the disk with the bulk load's writes)"
        evs = data.events[:single]
        # each call commits on its own, so a single connection is bound by the WAL flush of every commit;
        # concurrent connections share flushes (group commit); synchronous_commit=off trades the last few
        # hundred ms of acknowledged events on a server crash for speed (a per-role or per-session choice).
        for clients, sync in ((1, "on"), (8, "on"), (1, "off")):
            n, dt = _track_events(settings, evs, clients, suffix=f"-s{clients}{sync}", sync=sync)
            yield (f"single pgrec.track_event calls, one transaction each, {clients} connection(s), "
                   f"synchronous_commit={sync}: {n:,} in {dt:.1f}s = {n / dt:,.0f} events/s ({load()})")


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
